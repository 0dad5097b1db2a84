"""Stable Diffusion post-trained for PickScore (human preference) with BPGO.

    python launch/train.py --config=configs/sd_pickscore.py --workdir=runs/sd_pickscore \
        --config.model.init=/path/to/stable-diffusion-v1-5 \
        --config.rewards.pickscore.path=/path/to/PickScore_v1 \
        --config.rewards.pickscore.tokenizer_path=/path/to/CLIP-ViT-H-14-laion2B-s32B-b79K

PickScore_v1 is a transformers CLIPModel (ViT-H/14) folder; its tokenizer is
the one of the CLIP-H processor it was fine-tuned from (pass that folder as
`tokenizer_path` when the PickScore folder has no tokenizer files). The score
is `exp(logit_scale) * cos(image, prompt)`: about 20-23 for reasonable images
(papers often report it divided by 100).
Sampling, LoRA, optimiser and sharding are those of configs/sd_aesthetic.py
(its docstring lists the bf16, full fine-tune, baseline and SD 2.x variants;
for bf16 here: --config.model.dtype=bfloat16 --config.rewards.pickscore.dtype=bfloat16).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from bpgo_jax.configs.sd_aesthetic import sd_config


def get_config() -> ml_collections.ConfigDict:
    c = sd_config()
    c.rewards = dict(
        pickscore=dict(
            weight=1.0,
            path=placeholder(str),  # PickScore_v1 CLIPModel folder
            tokenizer_path=placeholder(str),  # CLIPTokenizer folder; default: `path`
            dtype="float32",
        )
    )
    c.prior.init_value = 21.0  # the anchor before any group is seen (first epoch only)
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
