"""Model registry: `config.model.name` -> a `DiffusionModel` and its parameters.

`config.model.init` is "random" (seeded by `config.seed`) or a path to
weights: a `.msgpack` params file for the built-in model (written by
`launch/pretrain.py`), a diffusers folder for Stable Diffusion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import serialization

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
        trainable, frozen = model.init(rng)
        if cfg.init != "random":
            try:
                trainable, frozen = load_params(cfg.init, (trainable, frozen))
            except ValueError as err:
                raise ValueError(f"config.model.init: {err}") from None
        return model, *with_lora(cfg, trainable, frozen, jax.random.fold_in(rng, 1))
    if cfg.name == "sd":
        from bpgo_jax.models.sd.pipeline import sd_from_config

        return sd_from_config(cfg, rng, sharding_fn=sharding_fn)
    raise ValueError(f"config.model.name={cfg.name!r} is not one of: tiny_unet, sd")


def save_params(path: str | Path, trainable: Params, frozen: Params) -> None:
    data = serialization.to_bytes({"trainable": trainable, "frozen": frozen})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)


def load_params(path: str | Path, like: tuple[Params, Params]) -> tuple[Params, Params]:
    """Reads `save_params` output into the structure of `like`, checking shapes."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    target = {"trainable": like[0], "frozen": like[1]}
    raw = serialization.msgpack_restore(path.read_bytes())
    expected = jax.tree_util.tree_flatten_with_path(target)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(raw)[0])
    for key_path, leaf in expected:
        if key_path not in got:
            raise ValueError(f"{path}: missing tensor {jax.tree_util.keystr(key_path)}")
        if got[key_path].shape != leaf.shape:
            raise ValueError(
                f"{path}: tensor {jax.tree_util.keystr(key_path)} has shape "
                f"{got[key_path].shape}, the model config expects {leaf.shape}"
            )
    out = serialization.from_state_dict(target, raw)
    return out["trainable"], out["frozen"]
