"""Model registry: `config.model.name` -> a `DiffusionModel` and its parameters.

`config.model.init` is "random" (seeded by `config.seed`) or a path to
weights: a `.msgpack` params file for the built-in model (written by
`launch/pretrain.py`), a diffusers folder for Stable Diffusion, FLUX.1, SD3 and Wan2.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections

from bpgo_jax.errors import ConfigError, WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.interface import DiffusionModel

Params = Any


def build_model(
    cfg: ml_collections.ConfigDict, rng: jax.Array, sharding_fn=None
) -> tuple[DiffusionModel, Params, Params]:
    """Returns `(model, trainable, frozen)`.

    Loaded real weights are placed tensor by tensor with `sharding_fn(path,
    shape)` (paths as in the returned trees, e.g. `("unet", "conv_in",
    "kernel")`), so a large model never sits whole on one device; the built-in
    model and random initialisations land on the default device.
    """
    if cfg.name == "tiny_unet":
        from bpgo_jax.models.tiny import tiny_model, with_lora

        model = tiny_model(cfg)
        if cfg.init == "random":
            trainable, frozen = model.init(rng)
        else:  # only the shapes of a random init are needed
            try:
                trainable, frozen = load_params(cfg.init, jax.eval_shape(model.init, rng))
            except WeightsError as err:
                raise WeightsError(f"config.model.init: {err}") from None
        return model, *with_lora(cfg, trainable, frozen, jax.random.fold_in(rng, 1))
    if cfg.name == "sd":
        from bpgo_jax.models.sd.pipeline import sd_from_config

        return sd_from_config(cfg, rng, sharding_fn=sharding_fn)
    if cfg.name == "flux":
        from bpgo_jax.models.flux.pipeline import flux_from_config

        return flux_from_config(cfg, rng, sharding_fn=sharding_fn)
    if cfg.name == "sd3":
        from bpgo_jax.models.sd3.pipeline import sd3_from_config

        return sd3_from_config(cfg, rng, sharding_fn=sharding_fn)
    if cfg.name == "wan":
        from bpgo_jax.models.wan.pipeline import wan_from_config

        return wan_from_config(cfg, rng, sharding_fn=sharding_fn)
    raise ConfigError(
        f"config.model.name={cfg.name!r} is not one of: tiny_unet, sd, flux, sd3, wan"
    )


def save_params(path: str | Path, trainable: Params, frozen: Params) -> None:
    """Writes `(trainable, frozen)` as one msgpack params file (read by `load_params`);
    a write cut short leaves the previous file (see `weights.write_msgpack`)."""
    weights.write_msgpack(path, {"trainable": trainable, "frozen": frozen})


def load_params(path: str | Path, like: tuple[Params, Params]) -> tuple[Params, Params]:
    """Reads `save_params` output into the structure of `like`, checking every tensor's shape.

    Raises `WeightsError` naming the file and what is wrong with it: missing,
    a directory, a pickle / torch file, not msgpack, truncated, or the
    params of another model or config (a missing, extra or mis-shaped tensor).
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(
            f"weights file {path} is a directory (the built-in model reads a .msgpack file; "
            "diffusers folders are for model.name=sd)"
        )
    out = weights.load_msgpack(path, {"trainable": like[0], "frozen": like[1]})
    return out["trainable"], out["frozen"]
