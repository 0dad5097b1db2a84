"""GRPO against BPGO (paper and released forms) and their RAS-only / CRT-only parts.

    python launch/study.py --config=configs/study.py \
        --outdir=docs/study_powered/shipped_reward --dry_run
    python launch/study.py --config=configs/study.py --outdir=docs/study_powered/shipped_reward

The design, the power analysis and the time estimate are in docs/study_plan.md,
written before the study ran. Every method runs configs/image.py's budget (30
epochs x 64 samples) and gets the same tuning budget: `study.tune.lr` x
the values of its own knob (`knob`, `grid`), one run per point and tuning
seed, scored on the dev sets (prompts_val / prompts_heldout); the best point
then runs over `study.report.seeds`, evaluated on the test sets
(prompts_test_val / prompts_test_heldout, 512 prompts each). Runs are kept
and skipped once finished, so the study can be completed over several
sittings; `--max_runs=N` stops after N runs, `--summary_only` rebuilds the
summary from the finished runs. `--config.study.workers=1` on a single
accelerator. The noisy-reward condition: configs/study_noisy.py.
"""

import ml_collections

from bpgo_jax.configs import image
from bpgo_jax.configs.common import ASSETS

# Eq. 2-4 with the paper's public defaults (alpha 0.5, k 1, lambda 1, s 0.5).
PAPER = {"method": "bpgo", "alpha": 0.5, "k": 1.0, "lam": 1.0, "crt_coef": 0.5}


def methods() -> dict:
    """Each method: its advantage fields, its own knob and the knob's grid (the
    published default first: a tie in tuning goes to the earlier point)."""
    out = {
        # GRPO has no advantage knob; its one real knob besides the learning
        # rate is the KL coefficient (the clip range is inert: one on-policy
        # update per epoch, so every ratio is 1).
        "grpo": dict(advantage={"method": "grpo"}, knob="train.kl_beta", grid=(0.04, 0.01)),
        # k = 1 keeps RAS weights within ~0.95-1.11 on this reward's scale; 10 lets them move.
        "bpgo_paper": dict(advantage=PAPER, knob="advantage.k", grid=(1.0, 10.0)),
        "ras_paper": dict(
            advantage=PAPER | {"crt_coef": 0.0}, knob="advantage.k", grid=(1.0, 10.0)
        ),
        "crt_paper": dict(
            advantage=PAPER | {"alpha": 0.0}, knob="advantage.crt_coef", grid=(0.5, 2.0)
        ),
    }
    # The authors' released code's forms (bpgo_jax/advantages/forms.py).
    released = {"method": "bpgo", "preset": "released"}
    custom = {"method": "bpgo", "preset": "custom"}
    out |= {
        "bpgo_released": dict(advantage=released, knob="advantage.bayes.alpha", grid=(1.0, 0.5)),
        "ras_released": dict(
            advantage=custom | {"ras": "bayes", "crt": "none", "ras_on": "raw"},
            knob="advantage.bayes.alpha",
            grid=(1.0, 0.5),
        ),
        "crt_released": dict(
            advantage=custom | {"ras": "none", "crt": "binary", "crt_mode": "replace"},
            knob="advantage.binary.a",
            grid=(50.0, 5.0),
        ),
    }
    return out


def get_config():
    c = image.get_config()
    c.study = dict(
        methods=methods(),
        baseline="grpo",
        tune=dict(
            seeds=(100,),
            lr=(1e-4, 5e-5, 2e-4),  # configs/image.py's learning rate first
            # The dev sets, all 256 prompts each; evaluations at the start,
            # after the first epoch and at the end (the trainer's schedule).
            eval=dict(
                prompts_path=str(ASSETS / "prompts_val.jsonl"),
                extra_prompts={"heldout": str(ASSETS / "prompts_heldout.jsonl")},
                num_prompts=256,
                every=30,
            ),
        ),
        report=dict(
            seeds=(0, 1, 2, 3, 4),
            # The test sets, all 512 prompts each; evaluations at the start
            # and after epochs 1, 11, 21 and 30.
            eval=dict(
                prompts_path=str(ASSETS / "prompts_test_val.jsonl"),
                extra_prompts={"heldout": str(ASSETS / "prompts_test_heldout.jsonl")},
                num_prompts=512,
                every=10,
            ),
        ),
        # The endpoint selection and report use: the mean oracle accuracy of the
        # two evaluation sets at the last evaluation.
        primary=dict(
            name="oracle_accuracy_both", metrics=("oracle_accuracy", "oracle_accuracy_heldout")
        ),
        metrics=("eval_world_clip", "eval_world_clip_heldout"),
        # Each oracle curve beside the learned reward on the same prompts.
        reward_pairs=(
            ("oracle_accuracy", "eval_world_clip"),
            ("oracle_accuracy_heldout", "eval_world_clip_heldout"),
        ),
        # Samples to threshold: the first evaluation whose seed mean of the primary
        # endpoint is `threshold_gain` above the seeds' common start (or set
        # `threshold` to an absolute value). Fixed before the study ran.
        threshold=ml_collections.config_dict.placeholder(float),
        threshold_gain=0.05,
        # The summary's planning check: the difference a paired t-test over the
        # report seeds detects with the observed spread (alpha: Holm's first step
        # over the two primary comparisons).
        power=dict(alpha=0.025, power=0.8),
        # Runs trained at once, each in its own process: ~1.5x the throughput
        # of one at a time on two CPU cores; 1 on a single accelerator.
        workers=2,
        # Costs for `--dry_run`'s estimate (2-core Intel Xeon, one run alone,
        # docs/study_plan.md): start-up and compilation, per training sample,
        # per evaluation sample; two workers' throughput relative to one.
        estimate=dict(
            startup_s=40.0, train_sample_s=0.061, eval_sample_s=0.03, parallel_speedup=1.5
        ),
    )
    c.log.tensorboard = False
    return c
