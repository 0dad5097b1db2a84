"""Stable Diffusion post-trained for the LAION aesthetic score with BPGO (DDPO's setting).

    python launch/train.py --config=configs/sd_aesthetic.py --workdir=runs/sd_aesthetic \
        --config.model.init=/path/to/stable-diffusion-v1-5 \
        --config.rewards.aesthetic.path=/path/to/clip-vit-large-patch14 \
        --config.rewards.aesthetic.head_path=/path/to/aesthetic_head.safetensors

DDIM with eta = 1 over 50 steps, classifier-free guidance 5.0, LoRA rank 4 on
the UNet attention projections at lr 3e-4, PPO clip 1e-4, 32 prompts x 8
samples = 256 samples and 2 optimiser updates per epoch, every step trained.
The noise schedule and prediction type come from the folder's
`scheduler/scheduler_config.json`; change them with
`--config.model.scheduler.prediction_type=...` (there is no
`config.model.prediction_type` for SD). Append to the command:

  bf16 weights and activations:  --config.model.dtype=bfloat16 \
                                 --config.rewards.aesthetic.dtype=bfloat16
  full fine-tune, FSDP:          --config.model.lora.rank=0 --config.train.lr=1e-5 \
                                 --config.mesh.shape="(1,-1)"
  GRPO / DDPO baselines:         --config.advantage.method=grpo  (or ddpo_tracker)
  SD 2.x (768 px, v-prediction): nothing: resolution and schedule follow the folder
  fewer accelerators:            --config.train.micro_batch_size=8  (per-device
                                 memory; must stay divisible by the device count)

A weight-free run of the same setting (random model, JPEG reward): configs/sd_jpeg.py.
docs/models.md covers the folder layout, converting .bin/.ckpt weights,
LoRA, sharding rules and bf16.
"""

from pathlib import Path

import ml_collections
from ml_collections.config_dict import placeholder

from bpgo_jax.configs.common import base_config

PROMPTS = Path(__file__).resolve().parent / "prompts"


def sd_config() -> ml_collections.ConfigDict:
    """Everything of an SD run except its rewards (shared by the sd_* configs)."""
    c = base_config()
    # A fresh block: the tiny built-in model's fields (and its prediction_type,
    # which SD reads from the scheduler config) would only mislead here.
    c.model = ml_collections.ConfigDict(
        dict(
            name="sd",
            init="",  # a diffusers folder; "random" builds `preset` with random weights
            preset="sd15",  # only with init="random": sd15, sd21 or tiny
            variant=placeholder(str),  # e.g. "fp16" for *.fp16.safetensors files
            dtype="float32",  # or "bfloat16": weights and activations of UNet/VAE/text
            resolution=placeholder(int),  # image side in pixels; default: the model's own
            lora=dict(
                rank=4,  # 0 trains the full UNet instead
                alpha=4.0,
                targets=(r".*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel",),
            ),
            # Attention kernel: auto | xla | blocked | cudnn | splash; models/attention.py.
            attention="auto",
            remat="none",  # the UNet is not scanned: "none" only
            # Overrides of the folder's scheduler config; None keeps the folder's value.
            scheduler=dict(
                prediction_type=placeholder(str),
                timestep_spacing=placeholder(str),
                rescale_betas_zero_snr=placeholder(bool),
            ),
        )
    )
    c.prompts.path = str(PROMPTS / "simple_animals.txt")
    c.sample.update(
        kind="ddim",
        num_steps=50,
        eta=1.0,
        guidance_scale=5.0,
        negative_prompt="",
        group_size=8,
        prompts_per_epoch=32,
        batch_size=64,
    )
    c.advantage.update(method="bpgo", alpha=0.5, k=1.0, lam=1.0, crt_coef=0.5, clip=5.0)
    c.prior.update(kind="moving_average", decay=0.9)
    c.train.update(
        num_epochs=100,
        inner_epochs=1,
        batch_size=128,
        micro_batch_size=16,
        timestep_fraction=1.0,
        clip_range=1e-4,
        lr=3e-4,
        weight_decay=1e-4,
        max_grad_norm=1.0,
    )
    # Data parallel by default (a LoRA run's frozen UNet fits on one device).
    # With an fsdp axis (`mesh.shape="(1,-1)"`), UNet kernels - trainable or
    # the frozen LoRA base - are split over it on their largest divisible
    # dimension; LoRA factors, text encoder and VAE stay replicated.
    c.mesh.update(
        shape=(-1, 1),
        axes=("data", "fsdp"),
        rules=((r"unet/.*/kernel", "fsdp_auto"), (r".*", ())),
    )
    c.eval.update(
        prompts_path=str(PROMPTS / "simple_animals_heldout.txt"), num_prompts=16, every=10
    )
    c.checkpoint.update(every=5, keep=3)
    c.log.update(image_every=5, num_images=8)
    return c


def get_config() -> ml_collections.ConfigDict:
    c = sd_config()
    c.rewards = dict(
        aesthetic=dict(
            weight=1.0,
            path=placeholder(str),  # transformers CLIP ViT-L/14 folder
            head_path=placeholder(str),  # LAION aesthetic MLP as .safetensors
            dtype="float32",
        )
    )
    # The anchor before any group is seen (first epoch only): the predictor
    # scores on a 1-10 scale and SD samples sit around 5.
    c.prior.init_value = 5.0
    block = c.rewards.aesthetic
    # Held-out animals, scored with the same reward (paths follow the training block).
    c.eval.rewards = dict(
        aesthetic=dict(
            weight=1.0,
            path=block.get_ref("path"),
            head_path=block.get_ref("head_path"),
            dtype=block.get_ref("dtype"),
        )
    )
    return c
