"""A CPU-sized Wan2.2 I2V run: configs/wan_i2v.py shrunk, with the frame-saturation reward.

    python launch/train.py --config=configs/wan_i2v_tiny_test.py --workdir=/tmp/wan_i2v \
        --config.model.init=/path/to/tiny-wan-i2v-folder \
        --config.prompts.path=/path/to/prompts_with_images.jsonl

Used by tests/test_wan_i2v.py on a tiny random WanImageToVideoPipeline
folder (two 36-channel experts) and PNG frames written by the test, to run
the launcher end to end on a data x fsdp mesh (load, encode the first
frames, sample 5-frame clips with both experts' guidance, decode, score,
update, checkpoint, resume) in seconds. Everything except sizes, float32,
the reward (the file-free `video_saturation` on 2 frames) and the prior is
wan_i2v's; the prior is `fixed`, read from the prompt file's `prior` fields
(the first-frame priors written by `launch/estimate_priors.py --first_frame`),
so the test checks them against the `first_frame` kind computed at the start.
"""

import ml_collections

from bpgo_jax.configs.wan_i2v import wan_i2v_config


def get_config() -> ml_collections.ConfigDict:
    c = wan_i2v_config()
    c.model.update(dtype="float32", resolution=(16, 16), num_frames=5, max_sequence_length=8)
    c.model.remat = "none"
    c.model.guidance_scales = (5.0, 3.0)
    c.prior.kind = "fixed"
    c.sample.update(num_steps=2, group_size=2, prompts_per_epoch=4, batch_size=8)
    c.train.update(num_epochs=2, batch_size=8, micro_batch_size=8, lr=1e-3, timestep_fraction=1.0)
    c.rewards = dict(video_saturation=dict(weight=1.0, frames=2))
    c.mesh.shape = (2, 4)  # data 2 x fsdp 4: sharded kernels and a split batch
    c.checkpoint.update(every=1, keep=2)
    c.log.update(image_every=1, num_images=2)
    return c
