"""A CPU-sized Wan2.1 T2V run: configs/wan_t2v.py shrunk, with the frame-saturation reward.

    python launch/train.py --config=configs/wan_tiny_test.py --workdir=/tmp/wan_tiny \
        --config.model.init=/path/to/tiny-wan-folder

Used by tests/test_wan_pipeline.py on a tiny random WanPipeline folder to
run the launcher end to end on a data x fsdp mesh (load, sample 5-frame
clips with CFG, decode, score, update, checkpoint, resume) in seconds.
Everything except sizes, float32 and the reward (the file-free
`video_saturation` on 2 frames, so no reward model is loaded) is wan_t2v's,
the reference-model prior included (each new prompt's base-model rollouts).
"""

import ml_collections

from bpgo_jax.configs.wan_t2v import wan_config


def get_config() -> ml_collections.ConfigDict:
    c = wan_config()
    c.model.update(dtype="float32", resolution=(16, 16), num_frames=5, max_sequence_length=8)
    c.model.remat = "none"
    c.sample.update(num_steps=2, group_size=2, prompts_per_epoch=4, batch_size=8)
    c.train.update(num_epochs=2, batch_size=8, micro_batch_size=8, lr=1e-3, timestep_fraction=1.0)
    c.rewards = dict(video_saturation=dict(weight=1.0, frames=2))
    c.eval.update(prompts_path="")  # no held-out evaluation
    c.mesh.shape = (2, 4)  # data 2 x fsdp 4: sharded kernels and a split batch
    c.checkpoint.update(every=1, keep=2)
    c.log.update(image_every=1, num_images=2)
    return c
