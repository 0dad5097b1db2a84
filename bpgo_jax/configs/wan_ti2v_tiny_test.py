"""A CPU-sized Wan2.2 TI2V run: configs/wan_ti2v.py shrunk, with the frame-saturation reward.

    python launch/train.py --config=configs/wan_ti2v_tiny_test.py --workdir=/tmp/wan_ti2v \
        --config.model.init=/path/to/tiny-wan-ti2v-folder \
        --config.prompts.path=/path/to/prompts_with_images.jsonl

Used by tests/test_wan_ti2v.py on a tiny random TI2V folder (one transformer
on the Wan2.2 VAE's latents, `expand_timesteps`) and PNG frames written by
the test: load, encode the first frames, sample 5-frame clips with the first
latent frame held at the image's, decode, score, update, on a data x fsdp
mesh in seconds. Everything except sizes, float32, the reward (the
file-free `video_saturation` on 2 frames) and the prior (`first_frame`
kept; a test may pick another) is wan_ti2v's.
"""

import ml_collections

from bpgo_jax.configs.wan_ti2v import wan_ti2v_config


def get_config() -> ml_collections.ConfigDict:
    c = wan_ti2v_config()
    c.model.update(dtype="float32", resolution=(32, 32), num_frames=5, max_sequence_length=8)
    c.model.remat = "none"
    c.sample.update(num_steps=2, group_size=2, prompts_per_epoch=4, batch_size=8)
    c.train.update(num_epochs=2, batch_size=8, micro_batch_size=8, lr=1e-3, timestep_fraction=1.0)
    c.rewards = dict(video_saturation=dict(weight=1.0, frames=2))
    c.mesh.shape = (2, 4)  # data 2 x fsdp 4: sharded kernels and a split batch
    c.checkpoint.update(every=1, keep=2)
    c.log.update(image_every=1, num_images=2)
    return c
