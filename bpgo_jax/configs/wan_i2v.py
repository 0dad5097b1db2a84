"""Wan2.2-I2V-A14B post-trained with BPGO and the first-frame prior: the paper's I2V setting.

    python launch/train.py --config=configs/wan_i2v.py --workdir=runs/wan_i2v \
        --config.model.init=/path/to/Wan2.2-I2V-A14B-Diffusers \
        --config.prompts.path=/path/to/i2v_prompts.jsonl \
        --config.rewards.videoclip_xl.path=/path/to/VideoCLIP-XL-flax

The prompt file is `.jsonl` with an `image` on every entry (a path relative
to the file): the conditioning first frame, read and resized to the video's
size on the host (`prompts.images`); `model.condition_prompts` follows
`prompts.path` (set `prompts.path`, not it), and an eval file with images goes
in `model.extra_condition_prompts` too.

From the paper: Wan2.2 image-to-video, BPGO whose per-prompt prior is the
text alignment of the conditioning first frame (`prior.kind=first_frame`:
the reward of a static clip of that frame, computed once at the start and
checkpointed), groups of 8, the text-alignment reward of the T2V setting
(VideoCLIP-XL, as configs/wan_t2v.py says, where its conversion is).

From WanImageToVideoPipeline and the Wan2.2-I2V-A14B folder: 480 x 832
pixels, the two experts switched at the folder's `boundary_ratio` (0.9: the
high-noise `transformer` while t >= 900, then `transformer_2`), guidance
5.0 for both (the pipeline's `guidance_scale`, with `guidance_scale_2`
defaulting to it; `model.guidance_scales` = (high, low), applied by the
model, hence `sample.guidance_scale=1.0`), the negative prompt "" and the
folder's flow shift (`sample.shift=None`). Here 33 frames (the pipeline's 81
with `--config.model.num_frames=81`). The rest is the T2V config's
(Flow-GRPO's settings): 20 flow steps with Flow-GRPO's SDE (noise level
0.7), LoRA rank 32 / alpha 64 on the attention projections of both experts
(`model.lora.experts`), lr 1e-4, PPO clip 1e-4, bf16, rematerialised blocks.

  81 frames:                --config.model.num_frames=81
  train the low-noise expert only: --config.model.lora.experts="('transformer_2',)"
  GRPO baseline:            --config.advantage.method=grpo

docs/video.md covers the folder layout, the conditioning and the experts.
"""

import ml_collections

from bpgo_jax.configs.wan_t2v import ATTENTION_TARGETS, videoclip_xl_rewards, wan_config

# The attention projections of both experts' blocks (`transformer/`, `transformer_2/`).
EXPERT_KERNELS = r"transformer(_2)?/.*/kernel"


def wan_i2v_config() -> ml_collections.ConfigDict:
    """Everything of a Wan2.2 I2V run except its rewards (shared with wan_i2v_tiny_test)."""
    c = wan_config()
    c.prompts.path = ""  # a .jsonl file with an "image" on every entry
    c.model.update(preset="wan22_i2v_a14b", num_frames=33)
    c.model.condition_prompts = c.prompts.get_ref("path")  # override prompts.path instead
    c.model.extra_condition_prompts = ()  # e.g. (eval.prompts_path,)
    c.model.guidance_scales = (5.0, 5.0)  # (high-noise, low-noise expert)
    c.model.negative_prompt = ""
    c.model.lora = dict(rank=32, alpha=64.0, targets=ATTENTION_TARGETS, experts=())
    c.sample.update(guidance_scale=1.0)  # the model guides each expert with its own scale
    c.prior.update(kind="first_frame")
    c.mesh.update(rules=((EXPERT_KERNELS, "fsdp_auto"), (r".*", ())))
    c.eval.update(prompts_path="")
    return c


def get_config() -> ml_collections.ConfigDict:
    c = wan_i2v_config()
    c.rewards = videoclip_xl_rewards()
    c.prior.init_value = 0.25
    return c
