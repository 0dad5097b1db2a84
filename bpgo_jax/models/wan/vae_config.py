"""The Wan video VAE's config (diffusers' `AutoencoderKLWan` `vae/config.json`) and shapes.

`WanVAEConfig` is the constructor of diffusers' class with its defaults (the
Wan2.1 VAE: base width 96, 16 latent channels, 8x spatial and 4x temporal
compression). Wan2.2's TI2V-5B VAE (`WAN22_VAE_ARCH`) has residual down / up blocks
and 2x2 patchified pixels (12 input channels), 48 latent channels, 16x
spatial compression.

The encoder reads frame 0 alone, then chunks of 4 frames, so a video has
`1 + 4k` frames and `1 + 4k / temporal_factor` latent frames (`1 + k` for both
real VAEs); `latent_shape` checks a run's frame count and size against that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from bpgo_jax.errors import ConfigError

VAE_CLASS = "AutoencoderKLWan"
CHUNK = 4  # frames per encoder chunk after the first frame (diffusers' `_encode`)

# diffusers' defaults: the Wan2.1 VAE's per-channel latent statistics.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """`AutoencoderKLWan` hyper-parameters (hashable: a static module field).

    Field names (typos included: `temperal_downsample`) are diffusers', so a
    `config.json` maps onto them one to one.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None

    def __post_init__(self):
        levels = len(self.dim_mult) - 1
        if levels < 0 or min(self.dim_mult, default=0) < 1:
            raise ValueError(f"vae config dim_mult={list(self.dim_mult)} must be positive integers")
        if len(self.temperal_downsample) < levels:
            raise ValueError(
                f"vae config temperal_downsample={list(self.temperal_downsample)} needs an entry "
                f"per downsampling level, len(dim_mult) - 1 = {levels}"
            )
        if CHUNK % self.temporal_factor or CHUNK % self.decoder_temporal_factor:
            raise ValueError(
                f"vae config temperal_downsample={list(self.temperal_downsample)}: at most 2 "
                f"temporal resamplings fit the encoder's {CHUNK}-frame chunks"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(
                    f"vae config {name} has {len(getattr(self, name))} entries, z_dim is "
                    f"{self.z_dim}"
                )
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"vae config patch_size={self.patch_size} must be >= 1")
        if self.in_channels % (self.patch * self.patch):
            raise ValueError(
                f"vae config in_channels={self.in_channels} must be a multiple of "
                f"patch_size^2 = {self.patch * self.patch} (patchified pixels)"
            )
        if self.is_residual:
            self._check_shortcuts()

    def _check_shortcuts(self) -> None:
        """Wan2.2's shortcuts regroup `in x factor` channels into `out` (and back)."""
        mult, last = self.dim_mult, len(self.dim_mult) - 1
        enc = [self.base_dim * u for u in (1, *mult)]
        dec = [self.decoder_dim * u for u in (mult[-1], *mult[::-1])]
        for i in range(last + 1):
            down = 2 * 2 * (2 if self.temperal_downsample[i] else 1) if i < last else 1
            up = 2 * 2 * (2 if self.temperal_upsample[i] else 1) if i < last else 0
            if enc[i] * down % enc[i + 1] or dec[i + 1] * up % dec[i]:
                raise ValueError(
                    f"vae config base_dim={self.base_dim} / decoder_base_dim={self.decoder_dim} "
                    f"with dim_mult={list(mult)}: level {i}'s channels do not regroup "
                    "evenly through the residual shortcuts"
                )

    @property
    def patch(self) -> int:
        """Pixels per side folded into channels before the encoder (1: none)."""
        return self.patch_size or 1

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        """The decoder's per-level flags: the encoder's list reversed, as diffusers builds
        them (a list longer than the levels thus gives the decoder other flags)."""
        return self.temperal_downsample[::-1]

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame in the encoder (4 for the real VAEs)."""
        return 2 ** sum(self.temperal_downsample[: len(self.dim_mult) - 1])

    @property
    def decoder_temporal_factor(self) -> int:
        """Frames the decoder makes of each latent frame after the first (4 for the real VAEs;
        it differs from `temporal_factor` only for configs diffusers builds lopsided)."""
        return 2 ** sum(self.temperal_upsample[: len(self.dim_mult) - 1])

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along each side (patchify included)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def pixel_channels(self) -> int:
        """Channels of the video the caller gives and gets (3 for RGB)."""
        return self.in_channels // (self.patch * self.patch)


# Wan2.2 TI2V-5B's VAE architecture (`vae/config.json`), for shapes and benchmarks: its
# latent statistics are identity placeholders (a checkpoint's config.json has the real ones).
WAN22_VAE_ARCH = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    temperal_downsample=(False, True, True),
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    latents_mean=(0.0,) * 48,
    latents_std=(1.0,) * 48,
)


def wan_vae_config_from_dict(raw: Mapping[str, Any]) -> WanVAEConfig:
    """A diffusers `vae/config.json` dict; missing keys take diffusers' defaults."""
    got = raw.get("_class_name", VAE_CLASS)
    if got != VAE_CLASS:
        raise ValueError(f"vae config is a {got!r}, expected {VAE_CLASS!r}")
    names = {f.name for f in dataclasses.fields(WanVAEConfig)}
    kw = {k: v for k, v in raw.items() if k in names and v is not None}
    for key, kind in (
        ("dim_mult", int),
        ("attn_scales", float),
        ("temperal_downsample", bool),
        ("latents_mean", float),
        ("latents_std", float),
    ):
        if key in kw:
            kw[key] = tuple(kind(v) for v in kw[key])
    ints = ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "patch_size")
    for key in (*ints, "in_channels", "out_channels"):
        if key in kw:
            kw[key] = int(kw[key])
    if "is_residual" in kw:
        kw["is_residual"] = bool(kw["is_residual"])
    return WanVAEConfig(**kw)


def latent_frames(cfg: WanVAEConfig, num_frames: int) -> int:
    """Latent frames of a `num_frames` video; a count other than `1 + 4k` is a ConfigError."""
    if num_frames < 1 or (num_frames - 1) % CHUNK:
        raise ConfigError(
            f"num_frames={num_frames} must be 1 + {CHUNK}k (1, 5, 9, ..., 81): the Wan VAE "
            f"encodes frame 0 alone, then chunks of {CHUNK} frames"
        )
    return 1 + (num_frames - 1) // CHUNK * (CHUNK // cfg.temporal_factor)


def latent_shape(
    cfg: WanVAEConfig, num_frames: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """`(frames, h, w, z_dim)` of the latents of a `num_frames x height x width` video."""
    s = cfg.spatial_factor
    if height % s or width % s or height < s or width < s:
        raise ConfigError(
            f"resolution={height}x{width} must be a positive multiple of {s} (the Wan VAE's "
            "spatial compression)"
        )
    return latent_frames(cfg, num_frames), height // s, width // s, cfg.z_dim


def decoded_frames(cfg: WanVAEConfig, frames: int) -> int:
    """Video frames that `frames` latent frames decode to (the inverse of `latent_frames`)."""
    if frames < 1:
        raise ConfigError(f"latent frames={frames} must be >= 1")
    return 1 + (frames - 1) * cfg.decoder_temporal_factor
