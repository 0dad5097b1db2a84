"""A CPU-sized SD run: the sd_* configs shrunk, with a CLIP-score reward.

    python launch/train.py --config=configs/sd_tiny_test.py --workdir=/tmp/sd_tiny \
        --config.model.init=/path/to/tiny-sd-folder \
        --config.rewards.clip_score.path=/path/to/tiny-clip-folder

Used by tests/test_sd_train.py with tiny random diffusers / transformers
folders, to run the real launcher end to end (load, sample, score, update,
checkpoint, resume) in seconds; also a smoke test for a new checkpoint
layout before a long run. Everything except sizes is configs/sd_aesthetic.py's.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from bpgo_jax.configs.sd_aesthetic import sd_config


def get_config() -> ml_collections.ConfigDict:
    c = sd_config()
    c.sample.update(num_steps=2, group_size=2, prompts_per_epoch=2, batch_size=4)
    c.train.update(num_epochs=2, batch_size=4, micro_batch_size=2, lr=1e-3)
    c.rewards = dict(
        clip_score=dict(
            weight=1.0,
            path=placeholder(str),  # transformers CLIPModel folder
            tokenizer_path=placeholder(str),  # default: `path`
            scale=1.0,
            dtype="float32",
        )
    )
    c.prior.init_value = 0.0
    c.mesh.shape = (1, -1)  # FSDP over every device, so sharded kernels are exercised
    c.checkpoint.update(every=1, keep=2)
    c.log.update(image_every=1, num_images=2)
    return c
