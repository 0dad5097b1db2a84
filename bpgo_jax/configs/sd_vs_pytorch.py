"""The side-by-side benchmark's run: one DDPO-sized RL epoch of a small SD model.

    python benchmarks/vs_pytorch.py
    python launch/train.py --config=configs/sd_vs_pytorch.py --workdir=runs/vs_pytorch \
        --config.model.init=/path/to/sd-folder

benchmarks/vs_pytorch.py writes a random SD-layout folder and runs this
config against an eager PyTorch DDPO loop doing the same work: 4 prompts x 4
samples, 10 DDIM steps with eta 1 and no guidance, rollout batches of 8, then
one optimiser update over all 16 samples and all 10 steps in micro-batches
of 8 (a full fine-tune with AdamW, GRPO's group-normalised advantages), JPEG
compressibility as the reward. No evaluation, no images, no checkpoint until
the end: the epoch's stages only.
"""

import ml_collections

from bpgo_jax.configs.sd_jpeg import get_config as sd_jpeg_config


def get_config() -> ml_collections.ConfigDict:
    c = sd_jpeg_config()
    c.model.init = ""  # the benchmark's folder
    c.model.lora.rank = 0
    c.advantage.method = "grpo"  # the peer's loss: PPO clip on group-normalised rewards
    c.sample.update(
        num_steps=10, eta=1.0, guidance_scale=1.0, group_size=4, prompts_per_epoch=4, batch_size=8
    )
    c.train.update(
        num_epochs=3,
        inner_epochs=1,
        batch_size=16,
        micro_batch_size=8,
        timestep_fraction=1.0,
        lr=1e-5,
        kl_beta=0.0,
        ema_decay=0.0,
    )
    c.mesh.shape = (1, 1)
    c.mesh.num_devices = 1
    c.eval.rewards = ml_collections.ConfigDict()
    c.eval.prompts_path = ""
    c.checkpoint.update(every=1000, keep=1, use_async=False)
    c.log.update(tensorboard=False, image_every=1000, num_images=1, progress=False)
    return c
