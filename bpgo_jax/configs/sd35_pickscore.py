"""SD3.5-Medium post-trained for PickScore with BPGO, in Flow-GRPO's PickScore setting.

    python launch/train.py --config=configs/sd35_pickscore.py --workdir=runs/sd35_pickscore \
        --config.model.init=/path/to/stable-diffusion-3.5-medium \
        --config.rewards.pickscore.path=/path/to/PickScore_v1 \
        --config.rewards.pickscore.tokenizer_path=/path/to/CLIP-ViT-H-14-laion2B-s32B-b79K

As Flow-GRPO's `pickscore_sd3` (config/grpo.py, over config/base.py, and
scripts/train_sd3.py's LoRA): 512 px, 10 flow steps with its SDE
(`sample.noise=flow_grpo`, noise level 0.7) on the scheduler's own sigmas
(shift 3 from the folder), classifier-free guidance 4.5, 48 prompts x 24
samples per epoch with advantages over the epoch's std, T5 at 128 tokens,
LoRA rank 32 / alpha 64 on every joint-attention projection, lr 3e-4,
weight decay 1e-4, PPO clip 1e-4, advantages clipped at 5, gradient norm 1,
KL 0.01 (its `beta`), 99 % of the steps trained (timestep_fraction 0.99),
every step stochastic (the SDE window is Flow-GRPO-Fast's). The advantage is
BPGO's with a moving-average prior in place of Flow-GRPO's group statistics.
Append to the command:

  Flow-GRPO-Fast, CPS, no CFG:  --config.sample.noise=cps --config.sample.noise_level=0.8 \
                                --config.sample.sde_window="(0,3)" \
                                --config.sample.guidance_scale=1.0 --config.train.kl_beta=0
  full fine-tune, FSDP:         --config.model.lora.rank=0 --config.mesh.shape="(1,-1)"
  T5 embeddings from a file:    --config.model.text_cache=/path/to/embeddings.safetensors
  GRPO baseline:                --config.advantage.method=grpo
  weight-free throughput:       --config.model.init=random --config.model.preset=sd35_medium
"""

from pathlib import Path

import ml_collections
from ml_collections.config_dict import placeholder

from bpgo_jax.configs.common import base_config

PROMPTS = Path(__file__).resolve().parent / "prompts"
# `sd3.pipeline.SD3_ATTENTION_TARGETS` (Flow-GRPO's `attn.{to_q, ..., to_add_out}`),
# spelled out so that reading a config does not import jax.
ATTENTION_TARGETS = (
    r".*/attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)/kernel",
)


def sd35_config() -> ml_collections.ConfigDict:
    """Everything of an SD3.5 run except its rewards (shared with sd35_tiny_test)."""
    c = base_config()
    c.model = ml_collections.ConfigDict(
        dict(
            name="sd3",
            init="",  # a diffusers StableDiffusion3Pipeline folder; "random" builds `preset`
            preset="sd35_medium",  # only with init="random"
            variant=placeholder(str),
            dtype="bfloat16",  # Flow-GRPO's mixed_precision="bf16"
            resolution=512,
            lora=dict(rank=32, alpha=64.0, targets=ATTENTION_TARGETS),
            attention="auto",
            remat="none",
            max_sequence_length=128,  # Flow-GRPO's T5 length (the pipeline's: 256)
            text_cache="",
            clip_skip=placeholder(int),
        )
    )
    c.prompts.path = str(PROMPTS / "simple_animals.txt")
    c.sample.update(
        kind="flow",
        num_steps=10,
        guidance_scale=4.5,
        negative_prompt="",
        noise="flow_grpo",
        noise_level=0.7,
        sigmas="diffusers",  # StableDiffusion3Pipeline's schedule; shift from the folder
        sde_window=(),
        shared_initial_noise=False,  # Flow-GRPO's same_latent=False
        group_size=24,
        prompts_per_epoch=48,
        batch_size=96,
    )
    c.sample.shift = placeholder(float)  # None: the folder's scheduler shift (3.0 for SD3.5)
    c.advantage.update(method="bpgo", clip=5.0, std="global")  # Flow-GRPO's global_std
    c.prior.update(kind="moving_average", decay=0.9)
    c.train.update(
        num_epochs=300,
        inner_epochs=1,
        batch_size=576,  # two updates per epoch, as Flow-GRPO's accumulation
        micro_batch_size=8,
        timestep_fraction=0.99,
        clip_range=1e-4,
        kl_beta=0.01,
        kl_form="flow_grpo",
        lr=3e-4,
        weight_decay=1e-4,
        max_grad_norm=1.0,
    )
    c.mesh.update(
        shape=(-1, 1),
        axes=("data", "fsdp"),
        rules=((r"transformer/.*/kernel", "fsdp_auto"), (r".*", ())),
    )
    c.eval.update(
        prompts_path=str(PROMPTS / "simple_animals_heldout.txt"),
        num_prompts=16,
        every=10,
        noise="ode",  # Flow-GRPO evaluates with the deterministic sampler
    )
    c.checkpoint.update(every=5, keep=3)
    c.log.update(image_every=5, num_images=8)
    return c


def get_config() -> ml_collections.ConfigDict:
    c = sd35_config()
    c.rewards = dict(
        pickscore=dict(
            weight=1.0,
            path=placeholder(str),  # PickScore_v1 CLIPModel folder
            tokenizer_path=placeholder(str),  # CLIPTokenizer folder; default: `path`
            dtype="bfloat16",
        )
    )
    c.prior.init_value = 21.0  # PickScore of SD samples sits near 20-23
    block = c.rewards.pickscore
    c.eval.rewards = dict(
        pickscore=dict(
            weight=1.0,
            path=block.get_ref("path"),
            tokenizer_path=block.get_ref("tokenizer_path"),
            dtype=block.get_ref("dtype"),
        )
    )
    return c
