"""CLIP tower configs, parsed from transformers `config.json` files.

Frozen dataclasses (hashable) so a config can be a static field of a Flax
module. Defaults equal the transformers defaults, because `save_pretrained`
may leave default-valued keys out of `config.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """CLIP text transformer.

    `eos_token_id=None` pools at the argmax of the token ids (the original
    CLIP / OpenCLIP rule, and transformers' rule for legacy configs with
    `eos_token_id == 2`); otherwise pooling takes the first `eos_token_id`.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = 49407
    projection_dim: int = 512

    def __post_init__(self):
        _check_common(self, "text")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision transformer (ViT with a class token)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        _check_common(self, "vision")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Both towers plus the shared projection width of a `CLIPModel`."""

    text: TextConfig
    vision: VisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592


def _check_common(cfg: TextConfig | VisionConfig, tower: str) -> None:
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{tower} hidden_act={cfg.hidden_act!r} is not one of {ACTIVATIONS}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"{tower} hidden_size={cfg.hidden_size} is not divisible by "
            f"num_attention_heads={cfg.num_attention_heads}"
        )


def _pick(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names and v is not None}


def _side(value: Any, name: str) -> int:
    """transformers allows `image_size` / `patch_size` as pairs; we need squares."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision {name}={value} is not square")
        value = value[0]
    return int(value)


def text_config_from_dict(raw: dict[str, Any]) -> TextConfig:
    kw = _pick(TextConfig, raw)
    eos = raw.get("eos_token_id", TextConfig.eos_token_id)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    # transformers keeps the pre-#24773 behaviour for eos_token_id == 2: argmax.
    kw["eos_token_id"] = None if eos in (None, 2) else int(eos)
    return TextConfig(**kw)


def vision_config_from_dict(raw: dict[str, Any]) -> VisionConfig:
    kw = _pick(VisionConfig, raw)
    for name in ("image_size", "patch_size"):
        if name in kw:
            kw[name] = _side(kw[name], name)
    return VisionConfig(**kw)


def _merged(raw: dict[str, Any], key: str) -> dict[str, Any]:
    # Old CLIPModel configs also carry `<tower>_config_dict`, which wins.
    return {**(raw.get(key) or {}), **(raw.get(f"{key}_dict") or {})}


def clip_config_from_dict(raw: dict[str, Any]) -> ClipConfig:
    proj = int(raw.get("projection_dim") or ClipConfig.projection_dim)
    # CLIPModel projects both towers to the top-level width, whatever the sub-configs say.
    text = {**_merged(raw, "text_config"), "projection_dim": proj}
    vision = {**_merged(raw, "vision_config"), "projection_dim": proj}
    return ClipConfig(
        text=text_config_from_dict(text),
        vision=vision_config_from_dict(vision),
        projection_dim=proj,
        logit_scale_init_value=float(
            raw.get("logit_scale_init_value") or ClipConfig.logit_scale_init_value
        ),
    )


def tower_config(raw: dict[str, Any], tower: str) -> TextConfig | VisionConfig:
    """The `tower` ("text" / "vision") config of a tower-only or full CLIPModel config."""
    key = f"{tower}_config"
    if raw.get(key) or raw.get(f"{key}_dict"):
        full = clip_config_from_dict(raw)
        return full.text if tower == "text" else full.vision
    return text_config_from_dict(raw) if tower == "text" else vision_config_from_dict(raw)
