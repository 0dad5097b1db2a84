"""GRPO vs BPGO vs RAS-only vs CRT-only on the scene world, several seeds.

    python launch/study.py --config=configs/study.py --outdir=runs/study

Every method runs with the same base config (configs/image.py) and the same
sample budget; only the advantage settings differ. No method got its own
hyper-parameter search: all share configs/image.py's training settings and
the paper's public BPGO defaults (alpha = 0.5, k = 1, lambda = 1, s = 0.5).
The default budget (10 epochs x 64 samples per run, 12 runs, both
evaluation sets) took 66 min on the 2-core machine of README "Status".
`--config.train.num_epochs=30` gives every run the default training budget.
Results: docs/study/ and the README.
"""

from configs import image


def get_config():
    c = image.get_config()
    c.train.num_epochs = 10
    c.eval.every = 5  # + the starting policy and the last epoch
    c.study = dict(
        seeds=(0, 1, 2),
        methods={
            "grpo": {"method": "grpo"},
            "bpgo": {"method": "bpgo", "alpha": 0.5, "crt_coef": 0.5},
            "ras_only": {"method": "bpgo", "alpha": 0.5, "crt_coef": 0.0},
            "crt_only": {"method": "bpgo", "alpha": 0.0, "crt_coef": 0.5},
        },
        # samples-to-threshold: first eval whose seed-mean oracle accuracy
        # reaches it (the shipped generator starts at 0.234 on these val prompts)
        threshold_metric="oracle_accuracy",
        threshold=0.28,
        report=("eval_world_clip", "oracle_accuracy_heldout"),
    )
    c.log.tensorboard = False
    return c
