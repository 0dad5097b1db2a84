"""`WanTransformer3DModel` hyper-parameters, parsed from a diffusers `transformer/config.json`.

Missing keys take diffusers' defaults (the 14B shape: 40 blocks of 40 heads
x 128, FFN 13824, UMT5-XXL text states of width 4096). A frozen dataclass, so
the config can be a static field of a Flax module. The variants differ only
in these numbers: 2.1 T2V (16 channels in), 2.1 I2V (36 channels in: noise,
mask and image latents; `image_dim` 1280 CLIP features through the image
branch with `added_kv_proj_dim` = the model width), FLF2V (as I2V, plus a
learned `pos_embed_seq_len` table over two frames' features), 2.2 A14B (two
experts of the 2.1 14B shape; I2V has 36 channels in and no image branch)
and 2.2 TI2V-5B (48 channels in and out). Options the model would get wrong
silently are refused by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

CLASS_NAME = "WanTransformer3DModel"
# diffusers' WanTransformerBlock always normalises q and k by an RMS norm over all heads.
QK_NORM = "rms_norm_across_heads"
TEXT_LEN = 512  # UMT5 tokens the Wan pipelines pad every prompt to
IMAGE_LEN = 257  # CLIP ViT-H/14 tokens (class + 16 x 16 patches) of the 2.1 I2V image branch


@dataclasses.dataclass(frozen=True)
class WanConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = QK_NORM
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(
                f"transformer config patch_size={list(self.patch_size)} must be 3 positive "
                "sizes (frames, height, width)"
            )
        if self.qk_norm != QK_NORM:
            raise ValueError(
                f"transformer config qk_norm={self.qk_norm!r} is not supported: diffusers' "
                f"Wan blocks apply {QK_NORM!r} whatever this says, and every Wan checkpoint "
                "says so"
            )
        if self.num_layers < 1:
            raise ValueError(f"transformer config num_layers={self.num_layers} must be >= 1")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                f"transformer config image_dim={self.image_dim} and added_kv_proj_dim="
                f"{self.added_kv_proj_dim}: the image branch needs both or neither"
            )
        if self.image_dim is not None and self.added_kv_proj_dim != self.inner_dim:
            raise ValueError(
                f"transformer config added_kv_proj_dim={self.added_kv_proj_dim} must equal "
                f"num_attention_heads * attention_head_dim = {self.inner_dim} (the image "
                "embedder's output width)"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError(
                f"transformer config pos_embed_seq_len={self.pos_embed_seq_len} needs image_dim "
                "(it is the image embedder's position table)"
            )
        if self.attention_head_dim < 6 or self.attention_head_dim % 2:
            raise ValueError(
                f"transformer config attention_head_dim={self.attention_head_dim} must be even "
                "and >= 6 (split into rotary t, h, w channel pairs)"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_image_branch(self) -> bool:
        """Wan2.1 I2V / FLF2V: CLIP image features attended beside the text."""
        return self.image_dim is not None

    def grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The patch grid `(f, h, w)` of a `[F, H, W, ...]` latent; refuses sizes that do not
        divide into patches or exceed the rotary tables' `rope_max_seq_len` positions."""
        sizes = tuple(int(s) for s in latent_shape[:3])
        if any(s % p or s < p for s, p in zip(sizes, self.patch_size, strict=True)):
            raise ValueError(
                f"latent frames x height x width {sizes} must be positive multiples of "
                f"patch_size {list(self.patch_size)}"
            )
        grid = tuple(s // p for s, p in zip(sizes, self.patch_size, strict=True))
        if max(grid) > self.rope_max_seq_len:
            raise ValueError(
                f"patch grid {grid} exceeds rope_max_seq_len={self.rope_max_seq_len} "
                "positions per axis"
            )
        return grid  # type: ignore[return-value]


_TUPLES = ("patch_size",)
_OPTIONAL_INTS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


def wan_config_from_dict(raw: Mapping[str, Any]) -> WanConfig:
    """Resolves a diffusers `transformer/config.json` dict (`_`-prefixed keys are ignored).

    Unknown keys are refused (a newer architecture option would otherwise be
    dropped); `out_channels` None means `in_channels`, as in diffusers.
    """
    cls = raw.get("_class_name", CLASS_NAME)
    if cls != CLASS_NAME:
        raise ValueError(f"transformer config is a {cls!r}, expected {CLASS_NAME!r}")
    fields = {f.name: f.default for f in dataclasses.fields(WanConfig)}
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in fields)
    if unknown:
        raise ValueError(f"transformer config keys {unknown} are not supported")
    kw = {**fields, **{k: v for k, v in raw.items() if k in fields}}
    if kw["out_channels"] is None:
        kw["out_channels"] = kw["in_channels"]
    for key in fields:
        if key in ("qk_norm", *_OPTIONAL_INTS):
            continue
        if kw[key] is None:
            raise ValueError(f"transformer config {key}=None is not supported")
    kw["patch_size"] = tuple(int(p) for p in kw["patch_size"])
    for key in _OPTIONAL_INTS:
        kw[key] = None if kw[key] is None else int(kw[key])
    for key, default in fields.items():
        if isinstance(default, bool):
            kw[key] = bool(kw[key])
        elif isinstance(default, int) and key not in _TUPLES:
            kw[key] = int(kw[key])
    kw["eps"] = float(kw["eps"])
    return WanConfig(**kw)


def config_to_dict(cfg: WanConfig) -> dict[str, Any]:
    """The diffusers `config.json` keys of `cfg` (for random models and round trips)."""
    out = dataclasses.asdict(cfg)
    out["patch_size"] = list(cfg.patch_size)
    return out
