"""A weight-free Stable Diffusion run: a randomly drawn SD model, the JPEG reward.

    python launch/train.py --config=configs/sd_jpeg.py --workdir=runs/sd_jpeg
    python launch/train.py --config=configs/sd_jpeg.py --workdir=runs/sd_jpeg_sd15 \
        --config.model.preset=sd15

Nothing is read or downloaded: `model.init=random` draws the UNet, VAE and
CLIP text encoder of `model.preset` (tiny, sd15 or sd21) at random, and DDPO's
JPEG compressibility (minus the kilobytes of each image saved at quality 95)
needs no weights. For benchmarks, throughput and memory checks and smoke runs
of the SD path; sampling, update and mesh are configs/sd_aesthetic.py's (DDIM
eta 1, 50 steps, CFG 5, 256 samples, LoRA rank 4). Append to the command:

  a CPU smoke run:      --config.sample.num_steps=4 --config.sample.batch_size=16 \
                        --config.sample.prompts_per_epoch=8 --config.train.batch_size=16
  full fine-tune:       --config.model.lora.rank=0 --config.train.lr=1e-5
  bf16:                 --config.model.dtype=bfloat16
"""

import ml_collections

from bpgo_jax.configs.sd_aesthetic import sd_config


def get_config() -> ml_collections.ConfigDict:
    c = sd_config()
    c.model.init = "random"
    c.model.preset = "tiny"
    c.rewards = dict(jpeg_compressibility=dict(weight=1.0, quality=95))
    c.eval.rewards = dict(jpeg_compressibility=dict(weight=1.0, quality=95))
    # The anchor before any group is seen (first epoch only): the tiny preset's
    # random-weight samples save to about 1 kB.
    c.prior.init_value = -1.0
    return c
