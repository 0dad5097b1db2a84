"""GRPO vs BPGO vs RAS-only vs CRT-only on the scene world, several seeds.

    python launch/study.py --config=configs/study.py --outdir=runs/study

Every method runs with the same base config (configs/image.py) and the same
sample budget; only the advantage settings differ. No method got its own
hyper-parameter search: all share the paper's public defaults
(alpha = 0.5, k = 1, lambda = 1, s = 0.5).
"""

from configs import image


def get_config():
    c = image.get_config()
    c.study = dict(
        seeds=(0, 1, 2),
        methods={
            "grpo": {"method": "grpo"},
            "bpgo": {"method": "bpgo", "alpha": 0.5, "crt_coef": 0.5},
            "ras_only": {"method": "bpgo", "alpha": 0.5, "crt_coef": 0.0},
            "crt_only": {"method": "bpgo", "alpha": 0.0, "crt_coef": 0.5},
        },
        # samples-to-threshold: first eval whose seed-mean oracle accuracy reaches it
        threshold_metric="oracle_accuracy",
        threshold=0.5,
    )
    c.log.tensorboard = False
    return c
