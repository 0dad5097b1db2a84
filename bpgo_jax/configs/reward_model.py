"""Trains WorldCLIP, the built-in world's learned reward model, on one CPU core.

Stops early once its validation ROC-AUC reaches `target_auc`: the point is a
reward model that is informative but uncertain, like real ones. Ship it with

    python launch/train_reward_model.py --config=configs/reward_model.py \
        --workdir=workdirs/reward_model --config.export_dir=bpgo_jax/world/assets
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Mirrors bpgo_jax.world.reward_model.RewardModelConfig (saved as JSON beside the weights).
    c.model = ml_collections.ConfigDict(
        {
            "vocab_size": 4096,
            "max_length": 24,
            "image_widths": (32, 48, 64),
            "image_hidden": 128,
            "text_width": 64,
            "text_depth": 1,
            "text_heads": 4,
            "embed_dim": 64,
            "init_logit_scale": 2.302585,  # log(10), as in SigLIP
            "init_logit_bias": -10.0,
        }
    )
    c.batch_size = 128
    c.max_steps = 1500
    c.lr = 2e-3
    c.warmup_steps = 100
    c.weight_decay = 1e-4
    c.grad_clip = 1.0
    # Host-side corruption of a fraction of batches, so scores stay sensible on
    # imperfect generator output.
    c.augment = ml_collections.ConfigDict(
        {"prob": 0.5, "max_noise": 0.05, "max_blur": 0.8, "color_jitter": 0.03}
    )
    c.eval_every = 100
    # Early stopping on fresh train-split scenes (x 3 captions each), so the
    # held-out split stays untouched by model selection.
    c.eval_split = "train"
    c.eval_scenes = 300
    c.target_auc = 0.85  # stop at a modest ROC-AUC: informative, not perfect
    c.export_dir = ""  # also write the weights here (a folder, e.g. bpgo_jax/world/assets, or gs://)
    return c
