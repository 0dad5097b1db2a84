"""UNet and VAE configs parsed from diffusers `config.json` dicts, with diffusers' semantics.

Frozen (hashable) dataclasses, so a config can be a static field of a Flax
module. Per-block settings are resolved here exactly as diffusers'
`UNet2DConditionModel.__init__` resolves them; most notably the historical
misnomer: `attention_head_dim` holds the *number of heads* (SD1: 8 heads per
block; SD2: [5, 10, 20, 20] heads, i.e. 64 channels each). Options that would
change the network but that we do not implement are refused by name rather
than silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")

# UNet keys whose non-default values select features this implementation lacks.
_UNET_UNSUPPORTED: dict[str, Any] = {
    "num_attention_heads": None,  # diffusers itself refuses it for UNet2DConditionModel
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """`UNet2DConditionModel` hyper-parameters; tuples hold one entry per down block."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: tuple[int, ...] = (1280, 1280, 1280, 1280)
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    center_input_sample: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """`AutoencoderKL` hyper-parameters (SD1/SD2 layout)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


def _per_block(raw: dict, key: str, default: Any, n: int, kind: type) -> tuple:
    value = raw.get(key, default)
    if value is None:
        value = default
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"unet config {key}={value} needs one entry per down block ({n})")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"unet config {key}={value}: nested (asymmetric) values unsupported")
        return tuple(kind(v) for v in value)
    return (kind(value),) * n


def _check_act(name: str | None, key: str, optional: bool = False) -> None:
    if name is None and optional:
        return
    if name not in ACTIVATIONS:
        raise ValueError(f"{key}={name!r} is not one of {ACTIVATIONS}")


def unet_config_from_dict(raw: dict[str, Any]) -> UNetConfig:
    """Resolves a diffusers `unet/config.json` dict (missing keys take diffusers' defaults)."""
    for key, default in _UNET_UNSUPPORTED.items():
        if raw.get(key) is not None and raw[key] != default:
            raise ValueError(f"unet config {key}={raw[key]!r} is not supported")
    d = UNetConfig()
    down = tuple(raw.get("down_block_types", d.down_block_types))
    up = tuple(raw.get("up_block_types", d.up_block_types))
    channels = tuple(int(c) for c in raw.get("block_out_channels", d.block_out_channels))
    n = len(down)
    if len(up) != n or len(channels) != n:
        raise ValueError(
            f"unet config: down_block_types ({n}), up_block_types ({len(up)}) and "
            f"block_out_channels ({len(channels)}) differ in length"
        )
    for name in down:
        if name not in DOWN_BLOCKS:
            raise ValueError(f"unet config down block {name!r} is not one of {DOWN_BLOCKS}")
    for name in up:
        if name not in UP_BLOCKS:
            raise ValueError(f"unet config up block {name!r} is not one of {UP_BLOCKS}")
    mid = raw.get("mid_block_type", d.mid_block_type)
    if mid not in MID_BLOCKS:
        raise ValueError(f"unet config mid_block_type={mid!r} is not one of {MID_BLOCKS}")
    if raw.get("norm_num_groups", 32) is None:
        raise ValueError("unet config norm_num_groups=None is not supported")
    # diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
    heads = _per_block(raw, "attention_head_dim", 8, n, int)
    cfg = UNetConfig(
        in_channels=int(raw.get("in_channels", d.in_channels)),
        out_channels=int(raw.get("out_channels", d.out_channels)),
        sample_size=int(raw.get("sample_size") or d.sample_size),
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid,
        layers_per_block=_per_block(raw, "layers_per_block", 2, n, int),
        transformer_layers_per_block=_per_block(raw, "transformer_layers_per_block", 1, n, int),
        num_heads=heads,
        cross_attention_dim=_per_block(raw, "cross_attention_dim", 1280, n, int),
        only_cross_attention=_per_block(raw, "only_cross_attention", False, n, bool),
        use_linear_projection=bool(raw.get("use_linear_projection", False)),
        upcast_attention=bool(raw.get("upcast_attention", False)),
        norm_num_groups=int(raw.get("norm_num_groups", 32)),
        norm_eps=float(raw.get("norm_eps", 1e-5)),
        act_fn=str(raw.get("act_fn", "silu")).lower(),
        flip_sin_to_cos=bool(raw.get("flip_sin_to_cos", True)),
        freq_shift=float(raw.get("freq_shift", 0)),
        time_embedding_dim=raw.get("time_embedding_dim"),
        time_embedding_act_fn=raw.get("time_embedding_act_fn"),
        timestep_post_act=raw.get("timestep_post_act"),
        center_input_sample=bool(raw.get("center_input_sample", False)),
        downsample_padding=int(raw.get("downsample_padding", 1)),
        mid_block_scale_factor=float(raw.get("mid_block_scale_factor", 1.0)),
        conv_in_kernel=int(raw.get("conv_in_kernel", 3)),
        conv_out_kernel=int(raw.get("conv_out_kernel", 3)),
    )
    _check_act(cfg.act_fn, "unet config act_fn")
    _check_act(cfg.time_embedding_act_fn, "unet config time_embedding_act_fn", optional=True)
    _check_act(cfg.timestep_post_act, "unet config timestep_post_act", optional=True)
    for c in channels:
        if c % cfg.norm_num_groups:
            raise ValueError(
                f"unet config block_out_channels entry {c} is not divisible by "
                f"norm_num_groups={cfg.norm_num_groups}"
            )
    return cfg


def vae_config_from_dict(raw: dict[str, Any]) -> VAEConfig:
    """Resolves a diffusers `vae/config.json` dict of an `AutoencoderKL`."""
    for key, allowed in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        for name in raw.get(key, (allowed,)):
            if name != allowed:
                raise ValueError(f"vae config {key} entry {name!r} is not {allowed!r}")
    for key in ("latents_mean", "latents_std"):
        if raw.get(key) is not None:
            raise ValueError(f"vae config {key} is not supported")
    d = VAEConfig()
    sample = raw.get("sample_size", d.sample_size)
    cfg = VAEConfig(
        in_channels=int(raw.get("in_channels", d.in_channels)),
        out_channels=int(raw.get("out_channels", d.out_channels)),
        block_out_channels=tuple(
            int(c) for c in raw.get("block_out_channels", d.block_out_channels)
        ),
        layers_per_block=int(raw.get("layers_per_block", d.layers_per_block)),
        act_fn=str(raw.get("act_fn", d.act_fn)).lower(),
        latent_channels=int(raw.get("latent_channels", d.latent_channels)),
        norm_num_groups=int(raw.get("norm_num_groups", d.norm_num_groups)),
        sample_size=int(sample[0] if isinstance(sample, (list, tuple)) else sample),
        scaling_factor=float(raw.get("scaling_factor", d.scaling_factor)),
        shift_factor=None if raw.get("shift_factor") is None else float(raw["shift_factor"]),
        use_quant_conv=bool(raw.get("use_quant_conv", True)),
        use_post_quant_conv=bool(raw.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(raw.get("mid_block_add_attention", True)),
    )
    _check_act(cfg.act_fn, "vae config act_fn")
    if len(raw.get("down_block_types", cfg.block_out_channels)) != len(cfg.block_out_channels):
        raise ValueError("vae config: down_block_types and block_out_channels differ in length")
    return cfg
