"""Wan2.2-TI2V-5B image-to-video post-trained with BPGO and the first-frame prior.

    python launch/train.py --config=configs/wan_ti2v.py --workdir=runs/wan_ti2v \
        --config.model.init=/path/to/Wan2.2-TI2V-5B-Diffusers \
        --config.prompts.path=/path/to/i2v_prompts.jsonl \
        --config.rewards.videoclip_xl.path=/path/to/VideoCLIP-XL-flax

configs/wan_i2v.py's run (the prompt file's `image` on every entry, BPGO with
the first-frame prior, groups of 8, VideoCLIP-XL text alignment, 20
Flow-GRPO SDE steps, LoRA rank 32 / alpha 64, lr 1e-4) on the 5B model of
Wan2.2: one transformer reading the 48-channel latents of the Wan2.2 VAE
(16x spatial compression). WanImageToVideoPipeline with `expand_timesteps`:
the conditioning image's VAE latent is the first latent frame, held there at
every step (no step noise, not in the log-probs), and the transformer sees
those tokens at timestep 0. 704 x 1280 pixels (the pipeline's size for the
5B; 9 latent frames of 44 x 80 at 33 frames), guidance 5.0 with the negative
prompt "", the folder's flow shift (`sample.shift=None`, 5.0 for TI2V-5B).

  the pipeline's 121 frames: --config.model.num_frames=121
  GRPO baseline:             --config.advantage.method=grpo
  weight-free throughput:    --config.model.init=random --config.model.preset=wan22_ti2v_5b

docs/video.md covers the TI2V layout and what is held fixed.
"""

import ml_collections

from bpgo_jax.configs.wan_i2v import wan_i2v_config
from bpgo_jax.configs.wan_t2v import videoclip_xl_rewards


def wan_ti2v_config() -> ml_collections.ConfigDict:
    """Everything of a TI2V-5B run except its rewards (shared with wan_ti2v_tiny_test)."""
    c = wan_i2v_config()
    c.model.update(preset="wan22_ti2v_5b", resolution=(704, 1280), num_frames=33)
    c.model.guidance_scales = (5.0,)  # one transformer
    c.mesh.update(rules=((r"transformer/.*/kernel", "fsdp_auto"), (r".*", ())))
    return c


def get_config() -> ml_collections.ConfigDict:
    c = wan_ti2v_config()
    c.rewards = videoclip_xl_rewards()
    c.prior.init_value = 0.25
    return c
