"""A seconds-fast run config shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

from bpgo_jax.configs.common import base_config

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small yellow cross"]


def tiny_config(tmp_path: Path, **overrides):
    """8x8 images, 3 flow steps, 4 prompts x group 4 per epoch."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    c = base_config()
    c.model.update(
        resolution=8,
        channels=(8, 16),
        attn_levels=(1,),
        heads=2,
        vocab_size=256,
        max_length=8,
        text_width=16,
        text_depth=1,
    )
    c.prompts.path = str(prompt_file)
    c.sample.update(num_steps=3, group_size=4, prompts_per_epoch=4, batch_size=16)
    c.rewards = {"saturation": {"weight": 1.0}}
    c.train.update(num_epochs=2, batch_size=16, micro_batch_size=8, lr=1e-3)
    c.log.update(tensorboard=False, image_every=100)
    c.checkpoint.use_async = False
    return apply_overrides(c, overrides)


def apply_overrides(config, overrides: dict):
    """`config` with dotted-key overrides (`{"train.lr": 1e-3}`) set in place."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
