"""VideoCLIP-XL's towers: our CLIP text transformer, and a video ViT built from CLIP's parts.

Parameter names follow transformers' `CLIPModel` (`text_model/...`,
`vision_model/encoder/layers_3/self_attn/q_proj`, `visual_projection`) plus
`vision_model/temporal_embedding`, so the converted checkpoint loads through
`weights.read_params` like any transformers CLIP folder.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bpgo_jax.models.clip.config import (
    TextConfig,
    VisionConfig,
    text_config_from_dict,
    vision_config_from_dict,
)
from bpgo_jax.models.clip.modules import (
    Encoder,
    TextTransformer,
    VisionEmbeddings,
    l2_normalize,
)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VideoClipXLConfig:
    """Both towers, the frames the video tower takes and the shared embedding width."""

    text: TextConfig
    vision: VisionConfig
    num_frames: int = 8
    projection_dim: int = 768

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames} must be positive")
        for tower in (self.text, self.vision):
            if tower.projection_dim != self.projection_dim:
                raise ValueError(
                    f"tower projection_dim={tower.projection_dim} differs from "
                    f"projection_dim={self.projection_dim}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": "videoclip_xl",
            "num_frames": self.num_frames,
            "projection_dim": self.projection_dim,
            "text_config": dataclasses.asdict(self.text),
            "vision_config": dataclasses.asdict(self.vision),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VideoClipXLConfig:
        return cls(
            text=text_config_from_dict(raw["text_config"]),
            vision=vision_config_from_dict(raw["vision_config"]),
            num_frames=int(raw["num_frames"]),
            projection_dim=int(raw["projection_dim"]),
        )


# The released model: LongCLIP-L's text tower and a ViT-L/14 video tower over 8 frames.
RELEASED = VideoClipXLConfig(
    text=TextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=248,
        hidden_act="quick_gelu",
        eos_token_id=None,  # pools at the argmax id, EOT
        projection_dim=768,
    ),
    vision=VisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
    num_frames=8,
    projection_dim=768,
)


def tiny_config(vocab_size: int = 80, num_frames: int = 8) -> VideoClipXLConfig:
    """A few-kilobyte model of the released shape, for tests."""
    proj = 16
    return VideoClipXLConfig(
        text=dataclasses.replace(
            RELEASED.text,
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=proj,
        ),
        vision=dataclasses.replace(
            RELEASED.vision,
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
            projection_dim=proj,
        ),
        num_frames=num_frames,
        projection_dim=proj,
    )


class VideoVisionTransformer(nn.Module):
    """`pixels [B, T, S, S, C] -> (last_hidden_state [B, 1 + N*T, D], pooled [B, D])`.

    T is `num_frames`, or 1 (an image: the temporal table's mean is added).
    Tokens are ordered as the released model orders them (class token, then
    patch-major, frame-minor); the pooled class token does not depend on that
    order, as attention is unmasked and positions are added before it.
    """

    cfg: VisionConfig
    num_frames: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        if pixels.ndim != 5 or pixels.shape[1] not in (1, self.num_frames):
            raise ValueError(
                f"video pixels must be [B, {self.num_frames} (or 1), H, W, C], got shape "
                f"{pixels.shape}"
            )
        b, t = pixels.shape[:2]
        d = self.cfg.hidden_size
        x = VisionEmbeddings(self.cfg, self.dtype, name="embeddings")(
            pixels.reshape(b * t, *pixels.shape[2:])
        )
        x = x.reshape(b, t, *x.shape[1:])
        # Every frame's class token is the class embedding plus the first position: keep one.
        cls = x[:, 0, :1]
        temporal = self.param(
            "temporal_embedding", nn.initializers.zeros, (self.num_frames, d)
        ).astype(x.dtype)
        if t == 1:
            temporal = temporal.mean(axis=0, keepdims=True)
        patches = x[:, :, 1:] + temporal[None, :, None]
        patches = patches.transpose(0, 2, 1, 3).reshape(b, -1, d)  # patch-major, frame-minor
        x = jnp.concatenate([cls, patches], axis=1)
        ln = functools.partial(nn.LayerNorm, epsilon=self.cfg.layer_norm_eps, dtype=self.dtype)
        x = ln(name="pre_layrnorm")(x)
        x = Encoder(self.cfg, False, self.dtype, self.attention, name="encoder")(x)
        return x, ln(name="post_layernorm")(x[:, 0])


class VideoCLIPXL(nn.Module):
    """Both towers and their projections.

    `method="get_text_features"` (ids `[B, 248]`) / `"get_video_features"`
    (normalised pixels `[B, T, S, S, 3]`, see `preprocess.py`) give one
    tower's `[B, projection_dim]` embedding; calling the module gives both,
    L2-normalised, and their cosine matrix `[B_text, B_video]`.
    """

    cfg: VideoClipXLConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def setup(self):
        dense = functools.partial(
            nn.Dense, self.cfg.projection_dim, use_bias=False, dtype=self.dtype
        )
        self.text_model = TextTransformer(self.cfg.text, self.dtype, self.attention)
        self.text_projection = dense()
        self.vision_model = VideoVisionTransformer(
            self.cfg.vision, self.cfg.num_frames, self.dtype, self.attention
        )
        self.visual_projection = dense()

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        return self.text_projection(self.text_model(input_ids)[1])

    def get_video_features(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels)[1])

    def __call__(self, input_ids: jax.Array, pixels: jax.Array) -> dict[str, jax.Array]:
        text = l2_normalize(self.get_text_features(input_ids))
        video = l2_normalize(self.get_video_features(pixels))
        return {"text_embeds": text, "video_embeds": video, "cosine": text @ video.T}


def example_inputs(cfg: VideoClipXLConfig) -> tuple[jax.Array, jax.Array]:
    """Zero inputs of the model's shapes (for `weights.expected_shapes`)."""
    s, c = cfg.vision.image_size, cfg.vision.num_channels
    return (
        jnp.zeros((1, cfg.text.max_position_embeddings), jnp.int32),
        jnp.zeros((1, cfg.num_frames, s, s, c), jnp.float32),
    )
