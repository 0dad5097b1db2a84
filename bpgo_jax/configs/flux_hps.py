"""FLUX.1-dev post-trained for HPSv2 (human preference) with BPGO: the paper's T2I setting.

    python launch/train.py --config=configs/flux_hps.py --workdir=runs/flux_hps \
        --config.model.init=/path/to/FLUX.1-dev \
        --config.rewards.hpsv2.path=/path/to/HPS_v2.1_compressed.safetensors \
        --config.rewards.hpsv2.tokenizer_path=/path/to/CLIP-ViT-H-14-laion2B-s32B-b79K

From the paper: FLUX.1-dev, the HPSv2 reward, BPGO with a moving-average
prior, groups of 12, LoRA on the attention projections, bf16 with
rematerialised blocks. FLUX.1-dev is guidance-distilled: its guidance
embedding gets 3.5 and there is no classifier-free guidance
(`sample.guidance_scale=1`). What the paper does not give follows
DanceGRPO's FLUX script (scripts/finetune/finetune_flux_grpo.sh): 16 flow
steps with its SDE (`sample.noise=dance`, eta 0.3), shift 3, 720 px, one
initial noise per group, 60 % of the steps trained, lr 1e-5, PPO clip
1e-4, advantages clipped at 5, gradient norm 1. DanceGRPO fine-tunes FLUX fully; the LoRA rank 32 /
alpha 64 are Flow-GRPO's (its FLUX and SD3 scripts). Append to the command:

  full fine-tune, FSDP:      --config.model.lora.rank=0 --config.mesh.shape="(1,-1)"
  T5 embeddings from a file: --config.model.text_cache=/path/to/embeddings.safetensors
                             (written by launch/embed_prompts.py for this folder)
  GRPO baseline:             --config.advantage.method=grpo
  weight-free throughput:    --config.model.init=random --config.model.preset=dev

docs/models.md covers the folder layout, converting Black Forest Labs
checkpoints, memory knobs and sharding rules.
"""

from pathlib import Path

import ml_collections
from ml_collections.config_dict import placeholder

from bpgo_jax.configs.common import base_config

PROMPTS = Path(__file__).resolve().parent / "prompts"
# Every projection of the double blocks' joint attention and the single blocks'
# attention (`flux.pipeline.FLUX_ATTENTION_TARGETS`; spelled out so that reading
# a config does not import jax).
ATTENTION_TARGETS = (
    r".*/attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)/kernel",
)


def flux_config() -> ml_collections.ConfigDict:
    """Everything of a FLUX run except its rewards (shared with flux_tiny_test)."""
    c = base_config()
    c.model = ml_collections.ConfigDict(
        dict(
            name="flux",
            init="",  # a diffusers FluxPipeline folder; "random" builds `preset`
            preset="dev",  # only with init="random": dev, schnell or tiny
            variant=placeholder(str),
            dtype="bfloat16",
            resolution=(720, 720),  # (height, width) in pixels: DanceGRPO's 720 x 720
            lora=dict(rank=32, alpha=64.0, targets=ATTENTION_TARGETS),
            attention="auto",
            remat="full",
            guidance=3.5,  # FLUX.1-dev's embedded guidance (FluxPipeline's default)
            max_sequence_length=0,  # T5 tokens; 0: the pipeline's 512
            text_cache="",
        )
    )
    c.prompts.path = str(PROMPTS / "simple_animals.txt")
    c.sample.update(
        kind="flow",
        num_steps=16,
        guidance_scale=1.0,  # guidance distillation, not CFG
        noise="dance",
        noise_level=0.3,  # DanceGRPO's eta
        shift=3.0,
        sigmas="shifted_linear",
        shared_initial_noise=True,  # DanceGRPO's --init_same_noise
        group_size=12,
        prompts_per_epoch=4,
        batch_size=48,
    )
    c.advantage.update(method="bpgo", clip=5.0)
    c.prior.update(kind="moving_average", decay=0.9)
    c.train.update(
        num_epochs=300,
        inner_epochs=1,
        batch_size=48,
        micro_batch_size=8,  # global: one sample a device on 8 accelerators
        timestep_fraction=0.6,
        clip_range=1e-4,
        lr=1e-5,
        weight_decay=1e-4,
        max_grad_norm=1.0,
    )
    # Data parallel; with an fsdp axis the transformer's kernels (trainable or
    # the frozen LoRA base) split over it, the rest stays replicated.
    c.mesh.update(
        shape=(-1, 1),
        axes=("data", "fsdp"),
        rules=((r"transformer/.*/kernel", "fsdp_auto"), (r".*", ())),
    )
    c.eval.update(
        prompts_path=str(PROMPTS / "simple_animals_heldout.txt"), num_prompts=16, every=10
    )
    c.checkpoint.update(every=5, keep=3)
    c.log.update(image_every=5, num_images=8)
    return c


def get_config() -> ml_collections.ConfigDict:
    c = flux_config()
    c.rewards = dict(
        hpsv2=dict(
            weight=1.0,
            path=placeholder(str),  # OpenCLIP ViT-H-14 HPSv2 .safetensors
            tokenizer_path=placeholder(str),  # CLIPTokenizer folder (CLIP-ViT-H-14)
            dtype="bfloat16",
        )
    )
    c.prior.init_value = 0.25  # HPSv2 cosines of FLUX samples sit near 0.25-0.3
    block = c.rewards.hpsv2
    c.eval.rewards = dict(
        hpsv2=dict(
            weight=1.0,
            path=block.get_ref("path"),
            tokenizer_path=block.get_ref("tokenizer_path"),
            dtype=block.get_ref("dtype"),
        )
    )
    return c
