"""`videoclip_xl`: VideoCLIP-XL text-video alignment, the paper's text-to-video reward.

    config.rewards.videoclip_xl = {"weight": 1.0, "path": "/path/to/VideoCLIP-XL-flax"}

The reward of a clip `[F, H, W, 3]` in [0, 1] is the cosine of its
VideoCLIP-XL embedding and its prompt's, times `scale` (default 1, so in
[-1, 1]; the reference demo prints 100 x the cosine). It is jittable: frame
pick, resize, both towers and the cosine run inside the sharded rollout.
Frames as the reference: 8, every `F // 8`-th from the first (shorter clips
repeat frames), each resized to the model's 224 x 224, ImageNet-normalised
(`models/videoclip_xl/preprocess.py`); `frames=1` scores the first frame
alone as a one-frame clip (the reference's image path).

Options: `path` (required: a folder made by `bpgo-convert-videoclip-xl`),
`tokenizer_path` (a `CLIPTokenizer` folder; default `path`, where the
converter's `--tokenizer` puts one), `dtype` ("float32" / "bfloat16"),
`scale`, `frames` (the model's 8, or 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from bpgo_jax.errors import ConfigError
from bpgo_jax.models.clip import l2_normalize
from bpgo_jax.models.videoclip_xl import (
    ZeroPaddedTokenizer,
    load_videoclip_xl,
    preprocess_video,
    sample_frames,
)
from bpgo_jax.rewards.base import Reward, register
from bpgo_jax.rewards.clip_rewards import require_path, tokenizer_prepare

NAME = "videoclip_xl"


@register(NAME)
def build_videoclip_xl(cfg: ml_collections.ConfigDict) -> Reward:
    path = require_path(cfg, "path", NAME, "a folder made by bpgo-convert-videoclip-xl")
    module, params = load_videoclip_xl(path, dtype=jnp.dtype(cfg.get("dtype", "float32")))
    model = module.cfg
    frames = cfg.get("frames", model.num_frames)
    if frames not in (model.num_frames, 1) or isinstance(frames, bool):
        raise ConfigError(
            f"config.rewards.{NAME}.frames={frames!r}: the model takes {model.num_frames} "
            "frames (or 1)"
        )
    scale = float(cfg.get("scale", 1.0))
    tokenizer_path = cfg.get("tokenizer_path") or path
    tokenizer = ZeroPaddedTokenizer(
        tokenizer_path, model.text.max_position_embeddings, model.text.vocab_size
    )

    def fn(params, videos: jax.Array, aux: dict) -> jax.Array:
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ConfigError(
                f"reward {NAME!r} scores videos [B, F, H, W, 3], got shape {tuple(videos.shape)}"
            )
        clips = jnp.take(videos, sample_frames(videos.shape[1], frames), axis=1)
        pixels = preprocess_video(clips, model.vision.image_size)
        variables = {"params": params}
        video = module.apply(variables, pixels, method="get_video_features")
        text = module.apply(variables, aux["input_ids"], method="get_text_features")
        return scale * jnp.sum(l2_normalize(video) * l2_normalize(text), axis=-1)

    return Reward(
        name=NAME, jittable=True, fn=fn, params=params, prepare=tokenizer_prepare(tokenizer)
    )
