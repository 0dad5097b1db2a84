"""`SD3Transformer2DModel` hyper-parameters, parsed from a diffusers `transformer/config.json`.

Missing keys take diffusers' defaults (`save_pretrained` may leave
default-valued keys out). A frozen dataclass, so the config can be a static
field of a Flax module. SD3-medium: 24 blocks, no q-k norm; SD3.5-large: 38
blocks with RMS q-k norms; SD3.5-medium: 24 blocks, RMS q-k norms, dual
attention (a second, image-only self-attention) in blocks 0-12 and a
384-patch position table. Options the model would silently get wrong are
refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

CLASS_NAME = "SD3Transformer2DModel"
QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class SD3Config:
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        if self.qk_norm not in QK_NORMS:
            raise ValueError(
                f"transformer config qk_norm={self.qk_norm!r} is not one of {QK_NORMS}"
            )
        if self.num_layers < 1:
            raise ValueError(f"transformer config num_layers={self.num_layers} must be >= 1")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"transformer config dual_attention_layers {bad} are not block indices "
                f"(0 .. {self.num_layers - 1})"
            )
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"transformer config caption_projection_dim={self.caption_projection_dim} must "
                f"equal num_attention_heads * attention_head_dim = {self.inner_dim} (the joint "
                "attention projects the context at the image width)"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def base_size(self) -> int:
        """diffusers' `PatchEmbed.base_size`: the native patch grid side."""
        return self.sample_size // self.patch_size

    def is_dual(self, index: int) -> bool:
        return index in self.dual_attention_layers


def sd3_config_from_dict(raw: dict[str, Any]) -> SD3Config:
    """Resolves a diffusers `transformer/config.json` dict (`_`-prefixed keys are ignored)."""
    cls = raw.get("_class_name", CLASS_NAME)
    if cls != CLASS_NAME:
        raise ValueError(f"transformer config is a {cls!r}, expected {CLASS_NAME!r}")
    fields = {f.name: f.default for f in dataclasses.fields(SD3Config)}
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in fields)
    if unknown:
        raise ValueError(f"transformer config keys {unknown} are not supported")
    kw = {**fields, **{k: v for k, v in raw.items() if k in fields}}
    ints = [
        k for k in fields if k not in ("pos_embed_max_size", "dual_attention_layers", "qk_norm")
    ]
    if kw["out_channels"] is None:  # diffusers: `out_channels or in_channels`
        kw["out_channels"] = kw["in_channels"]
    for key in ints:
        if kw[key] is None:
            raise ValueError(f"transformer config {key}=None is not supported")
        kw[key] = int(kw[key])
    if kw["pos_embed_max_size"] is not None:
        kw["pos_embed_max_size"] = int(kw["pos_embed_max_size"])
    kw["dual_attention_layers"] = tuple(int(i) for i in kw["dual_attention_layers"] or ())
    return SD3Config(**kw)
