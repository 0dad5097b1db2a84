"""Wan2.1-T2V-1.3B post-trained with BPGO: the paper's text-to-video setting.

    python launch/train.py --config=configs/wan_t2v.py --workdir=runs/wan_t2v \
        --config.model.init=/path/to/Wan2.1-T2V-1.3B-Diffusers \
        --config.rewards.videoclip_xl.path=/path/to/VideoCLIP-XL-flax

From the paper: Wan2.1-T2V-1.3B, BPGO with the reference-model prior (each
prompt's prior is the mean reward of the frozen base model's samples of it,
`prior.kind=reference`), groups of 8, and VideoCLIP-XL text alignment as the
reward (`rewards/videoclip_xl.py`: the cosine of the clip's and the prompt's
embeddings, 8 frames as the reference picks them). Make its folder once from
the released `VideoCLIP-XL.bin` (needs torch, for this step only):

  python launch/convert_videoclip_xl.py --checkpoint=/path/to/VideoCLIP-XL.bin \
      --tokenizer=/path/to/clip-vit-large-patch14 --out=/path/to/VideoCLIP-XL-flax

(`--tokenizer`: any transformers CLIPTokenizer folder of CLIP's vocabulary.)

Video: 480 x 832 pixels (WanPipeline's size) at 33 frames (9 latent frames,
14,040 transformer tokens a clip; WanPipeline's 81 frames, 32,760 tokens, with
`--config.model.num_frames=81`). Sampling as WanPipeline: classifier-free
guidance 5.0 with its default negative prompt "", and the folder's flow
shift (`sample.shift=None`: the scheduler's `flow_shift`, 3.0 for the 480p
folders). The rest follows the image configs (configs/sd35_pickscore.py,
Flow-GRPO's settings): 20 flow steps with Flow-GRPO's SDE (noise level
0.7), LoRA rank 32 / alpha 64 on the attention projections, lr 1e-4, PPO
clip 1e-4, advantages clipped at 5, gradient norm 1, bf16 with
rematerialised blocks. Append to the command:

  81 frames:                 --config.model.num_frames=81
  720p folders:              --config.model.resolution="(720,1280)"   (flow_shift 5.0)
  UMT5 embeddings from file: --config.model.text_cache=/path/to/embeddings.safetensors
  GRPO baseline:             --config.advantage.method=grpo
  weight-free throughput:    --config.model.init=random --config.model.preset=wan21_t2v_1_3b

docs/video.md covers the folder layout, the pipeline and memory knobs.
"""

from pathlib import Path

import ml_collections
from ml_collections.config_dict import placeholder

from bpgo_jax.configs.common import base_config

PROMPTS = Path(__file__).resolve().parent / "prompts"
# `wan.pipeline.WAN_ATTENTION_TARGETS` (self- and cross-attention q, k, v, out of every
# block), spelled out so that reading a config does not import jax.
ATTENTION_TARGETS = (r".*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel",)


def wan_config() -> ml_collections.ConfigDict:
    """Everything of a Wan2.1 T2V run except its rewards (shared with wan_tiny_test)."""
    c = base_config()
    c.model = ml_collections.ConfigDict(
        dict(
            name="wan",
            init="",  # a diffusers WanPipeline folder; "random" builds `preset`
            preset="wan21_t2v_1_3b",  # only with init="random"
            variant=placeholder(str),
            dtype="bfloat16",
            resolution=(480, 832),  # (height, width) in pixels
            num_frames=33,  # 1 + 4k
            vae_batch_chunk=0,
            lora=dict(rank=32, alpha=64.0, targets=ATTENTION_TARGETS),
            attention="auto",
            remat="full",
            max_sequence_length=0,  # UMT5 tokens; 0: the pipeline's 512
            text_cache="",
        )
    )
    c.prompts.path = str(PROMPTS / "simple_animals.txt")
    c.sample.shift = placeholder(float)  # None: the folder's flow_shift
    c.sample.update(
        kind="flow",
        num_steps=20,
        guidance_scale=5.0,  # WanPipeline's
        negative_prompt="",  # WanPipeline's default
        noise="flow_grpo",
        noise_level=0.7,
        sigmas="shifted_linear",
        sde_window=(),
        shared_initial_noise=False,
        group_size=8,
        prompts_per_epoch=4,
        batch_size=8,
    )
    c.advantage.update(method="bpgo", clip=5.0)
    c.prior.update(kind="reference")
    c.train.update(
        num_epochs=300,
        inner_epochs=1,
        batch_size=32,
        micro_batch_size=8,  # global: one clip a device on 8 accelerators
        timestep_fraction=0.6,
        clip_range=1e-4,
        lr=1e-4,
        weight_decay=1e-4,
        max_grad_norm=1.0,
    )
    c.mesh.update(
        shape=(-1, 1),
        axes=("data", "fsdp"),
        rules=((r"transformer/.*/kernel", "fsdp_auto"), (r".*", ())),
    )
    c.eval.update(prompts_path=str(PROMPTS / "simple_animals_heldout.txt"), num_prompts=8, every=10)
    c.checkpoint.update(every=5, keep=3)
    c.log.update(image_every=5, num_images=4)
    return c


def videoclip_xl_rewards() -> dict:
    """VideoCLIP-XL text alignment: the paper's video reward (wan_t2v and wan_i2v)."""
    return dict(
        videoclip_xl=dict(
            weight=1.0,
            path=placeholder(str),  # a folder made by launch/convert_videoclip_xl.py
            tokenizer_path="",  # "": the converted folder's (--tokenizer)
            dtype="bfloat16",
        )
    )


def get_config() -> ml_collections.ConfigDict:
    c = wan_config()
    c.rewards = videoclip_xl_rewards()
    c.prior.init_value = 0.25  # a text-video cosine of a matching clip, CLIP-like
    block = c.rewards.videoclip_xl
    c.eval.rewards = dict(
        videoclip_xl=dict(
            weight=1.0,
            path=block.get_ref("path"),
            tokenizer_path=block.get_ref("tokenizer_path"),
            dtype=block.get_ref("dtype"),
        )
    )
    return c
