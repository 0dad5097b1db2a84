"""FLUX.1 configs from diffusers' `config.json` / `scheduler_config.json`, and its time shift.

`FluxConfig` is `FluxTransformer2DModel`'s constructor with diffusers'
defaults (the real FLUX.1 shape: 19 double-stream and 38 single-stream
blocks of width 24 x 128); a `save_pretrained` config may leave any of them
out. dev and schnell differ in `guidance_embeds` (dev embeds the guidance
value it was distilled with; schnell has no guidance embedder).

The sampling schedule is `FlowMatchEulerDiscreteScheduler`'s: noise levels
`linspace(1, 1/N, N)` time-shifted, then 0. FLUX.1-dev shifts by the image's
length (`use_dynamic_shifting`): `mu` grows linearly from `base_shift` at
`base_image_seq_len` packed tokens to `max_shift` at `max_image_seq_len`
(the pipeline's `calculate_shift`), and the shift is `e^mu`; schnell uses the
fixed `shift` (1.0: no shift). `flux_shift` gives that one number, so the
engine's flow tables (`rollout/schedules.flow_sigmas`, `s' = shift * s /
(1 + (shift - 1) * s)`) equal the pipeline's sigmas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from bpgo_jax.rollout import schedules

TRANSFORMER_CLASS = "FluxTransformer2DModel"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
PACK = 2  # FLUX packs 2x2 latent pixels into one token (`_pack_latents`)

# FlowMatchEulerDiscreteScheduler's defaults, and the values FluxPipeline falls back to.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
# Scheduler options that change the noise levels in ways the engine's tables do not follow.
_SCHEDULER_UNSUPPORTED = {
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
}
# The schedules of the published checkpoints' `scheduler/scheduler_config.json`.
DEV_SCHEDULER = {**SCHEDULER_DEFAULTS, "shift": 3.0, "use_dynamic_shifting": True}
SCHNELL_SCHEDULER = dict(SCHEDULER_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """`FluxTransformer2DModel` hyper-parameters (hashable: a static module field)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if self.patch_size != 1:
            raise ValueError(
                f"patch_size={self.patch_size} is not supported: FLUX.1 has patch_size 1 "
                "(the pipeline packs 2x2 latent pixels into each token)"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope={list(self.axes_dims_rope)} must sum to "
                f"attention_head_dim={self.attention_head_dim}"
            )
        if self.in_channels % (PACK * PACK) or self.out_dim % (PACK * PACK):
            raise ValueError(
                f"in_channels={self.in_channels} / out_channels={self.out_dim} must be 4 x the "
                "latent channels (2x2 packed tokens)"
            )
        for name in ("num_layers", "num_single_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent (the VAE's `latent_channels`)."""
        return self.in_channels // (PACK * PACK)


def flux_config_from_dict(raw: Mapping[str, Any]) -> FluxConfig:
    """A diffusers `transformer/config.json` dict; missing keys take diffusers' defaults."""
    got = raw.get("_class_name", TRANSFORMER_CLASS)
    if got != TRANSFORMER_CLASS:
        raise ValueError(f"transformer config is a {got!r}, expected {TRANSFORMER_CLASS!r}")
    names = {f.name for f in dataclasses.fields(FluxConfig)}
    kw = {k: v for k, v in raw.items() if k in names and v is not None}
    if "axes_dims_rope" in kw:
        kw["axes_dims_rope"] = tuple(int(d) for d in kw["axes_dims_rope"])
    if "guidance_embeds" in kw:
        kw["guidance_embeds"] = bool(kw["guidance_embeds"])
    if raw.get("out_channels") is None:
        kw.pop("out_channels", None)
    return FluxConfig(**kw)


def config_to_dict(cfg: FluxConfig) -> dict[str, Any]:
    """The diffusers `config.json` keys of `cfg` (for random models and round trips)."""
    out = dataclasses.asdict(cfg)
    out["axes_dims_rope"] = list(cfg.axes_dims_rope)
    return out


# ---------------------------------------------------------------- schedule


def scheduler_config_from_dict(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A `scheduler_config.json` dict with FlowMatchEulerDiscreteScheduler's defaults filled in.

    Options that would reshape the noise levels beyond a time shift (Karras /
    exponential / beta sigmas, `shift_terminal`, inverted sigmas) are refused.
    """
    got = raw.get("_class_name", SCHEDULER_CLASS)
    if got != SCHEDULER_CLASS:
        raise ValueError(f"scheduler is a {got!r}, expected {SCHEDULER_CLASS!r}")
    for key, default in _SCHEDULER_UNSUPPORTED.items():
        if raw.get(key) not in (None, default):
            raise ValueError(f"scheduler {key}={raw[key]!r} is not supported")
    out = {**SCHEDULER_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    if out["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(
            f"scheduler time_shift_type={out['time_shift_type']!r} is not 'exponential' or 'linear'"
        )
    return out


def packed_seq_len(latent_shape: Sequence[int]) -> int:
    """Image tokens of a `[h, w, C]` latent after 2x2 packing: the pipeline's `image_seq_len`."""
    h, w = int(latent_shape[0]), int(latent_shape[1])
    return (h // PACK) * (w // PACK)


def flux_shift(scheduler_config: Mapping[str, Any] | None, image_seq_len: int) -> float:
    """The time shift of the pipeline's sigmas at `image_seq_len` packed tokens.

    With `use_dynamic_shifting`: `e^mu` ("exponential" time shift, FLUX.1-dev)
    or `mu` itself ("linear"); otherwise the config's fixed `shift`.
    """
    cfg = scheduler_config_from_dict(dict(scheduler_config or {}))
    if not cfg["use_dynamic_shifting"]:
        return float(cfg["shift"])
    return schedules.dynamic_shift(image_seq_len, cfg)
