"""What the flow-DiT pipelines (FLUX.1, SD3 / SD3.5, Wan2.1) share as `DiffusionModel`s.

Each family's `pipeline.py` keeps what is its own (its modules, how the
transformer is called, its VAE's decode, its scheduler file) and builds on
these pieces, so the parameter layout and the ways of building a model are
one code path:

- trees: trainable = {"transformer": params}, or {"lora": factors} with the
  transformer's weights in frozen["transformer"]; frozen also holds "vae" and
  either "text" (the encoders of `models.text_stacks`) or "text_cache" (a
  precomputed table per output field, `models.text_cache`);
- `flow_model`: the `DiffusionModel` of a family's `predict` / `decode`,
  with `text_functions` (the `tokenize` / `encode_text` pair of a text stack
  or of text-cache tables) and `init_fn`; `param_shapes`: the abstract trees;
- `BuildOptions`: the keywords every family's builders and loaders take;
- `Family` + `load_components`: a diffusers pipeline folder's transformer,
  VAE, scheduler config and text encoders, each tensor placed as it is read;
- `assemble`: `(model, trainable, frozen)` from config dicts (random init) or
  a folder (loaded weights, optionally a text cache in place of the encoders);
- `image_size`: a `model.resolution` as (height, width);
- `model_from_config`: the `config.model` fields every family reads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bpgo_jax.errors import ConfigError, UserError, WeightsError
from bpgo_jax.models import lora as lora_lib
from bpgo_jax.models import text_cache as text_cache_lib
from bpgo_jax.models import text_stacks, weights
from bpgo_jax.models.clip import CLIPTextModel
from bpgo_jax.models.clip.loaders import text_inputs
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.lora import LoraSpec
from bpgo_jax.models.t5 import example_inputs as t5_example_inputs
from bpgo_jax.models.text import Tokenizer

Params = Any
# (module, example inputs for init / eval_shape)
Part = tuple[nn.Module, Sequence[Any]]


# ---------------------------------------------------------------- parameter trees


def split_params(
    transformer: Params, frozen: Params, spec: LoraSpec | None, rng: jax.Array
) -> tuple[Params, Params]:
    """`lora.split_params` under the key "transformer"."""
    return lora_lib.split_params(transformer, frozen, spec, rng, key="transformer")


def transformer_params(trainable: Params, frozen: Params, spec: LoraSpec | None) -> Params:
    """The transformer's weights as `predict` applies them (LoRA factors merged in)."""
    return lora_lib.unet_params(trainable, frozen, spec, key="transformer")


def flow_model(
    name: str,
    modules: Any,
    parts: tuple[Part, Part],
    functions: tuple[tuple[int, ...], Callable[..., jax.Array], Callable[..., jax.Array]],
    lora: LoraSpec | None,
    text: tuple[dict[str, jax.Array] | None, Tokenizer | None] = (None, None),
    cls: type[DiffusionModel] = DiffusionModel,
) -> DiffusionModel:
    """A flow-velocity `DiffusionModel` (`cls`) of a family's modules (`.text`,
    `.scheduler`), `parts` (transformer, VAE: `Part`s) and `functions` (latent
    shape, `predict`, `decode`), with the shared text functions and random init.

    `text` = (cache tables, tokenize) stands in for a missing text stack
    (`text_functions`).
    """
    stack, (cache_tables, tokenize) = modules.text, text
    tokenize, encode_text = text_functions(stack, cache_tables, tokenize)
    latent_shape, predict, decode = functions
    return cls(
        name=name,
        latent_shape=tuple(latent_shape),
        prediction_type="flow",
        tokenize=tokenize,
        encode_text=encode_text,
        predict=predict,
        decode=decode,
        init=init_fn(*parts, stack, cache_tables, lora, parts[0][0].dtype),
        scheduler_config=dict(modules.scheduler),
    )


def text_functions(
    stack: text_stacks.TextStack | None,
    cache_tables: dict[str, jax.Array] | None,
    tokenize: Tokenizer | None,
) -> tuple[Tokenizer, Callable[[Params, jax.Array], dict[str, jax.Array]]]:
    """`(tokenize, encode_text)` of a text stack, or of text-cache tables (`stack` None:
    `cache_tables` `{field: [P, ...]}` and `tokenize`, prompts -> table rows)."""
    if (stack is None) != (cache_tables is not None):
        raise ValueError("give either a text stack or text-cache tables, not both or neither")

    def encode_text(frozen: Params, tokens: jax.Array) -> dict[str, jax.Array]:
        if stack is not None:
            return stack.encode(frozen["text"], tokens)
        return text_cache_lib.gather(frozen["text_cache"], tokens)

    return (stack.tokenizer if stack is not None else tokenize), encode_text


def init_fn(
    transformer: Part,
    vae: Part,
    stack: text_stacks.TextStack | None,
    cache_tables: dict[str, jax.Array] | None,
    lora: LoraSpec | None,
    dtype: Any,
) -> Callable[[jax.Array], tuple[Params, Params]]:
    """`DiffusionModel.init`: random transformer, VAE and text weights (host-drawn,
    `sd.pipeline.random_params`), or the given cache tables in place of the text."""
    from bpgo_jax.models.sd.pipeline import random_params

    def init(rng: jax.Array) -> tuple[Params, Params]:
        k_text, k_transformer, k_vae, k_lora = jax.random.split(rng, 4)
        net = random_params(transformer[0], k_transformer, dtype, *transformer[1])
        frozen = {"vae": random_params(vae[0], k_vae, dtype, *vae[1])}
        if stack is not None:
            frozen["text"] = stack.init(k_text, dtype)
        else:
            frozen["text_cache"] = dict(cache_tables)
        return split_params(net, frozen, lora, k_lora)

    return init


def _text_inputs(module: nn.Module) -> tuple[Any, ...]:
    if isinstance(module, CLIPTextModel):
        return (text_inputs(module.cfg),)
    return t5_example_inputs()


def param_shapes(
    transformer: Part,
    vae: Part,
    stack: text_stacks.TextStack | None,
    lora: LoraSpec | None,
    dtype: Any,
) -> tuple[Params, Params]:
    """`(trainable, frozen)` as `ShapeDtypeStruct`s in `dtype`, nothing drawn or read.

    For memory and FLOP estimates of the real-size presets (`init` draws
    every weight on the host); text-cache tables are not included.
    """
    dtype = jnp.dtype(dtype)

    def shapes(module: nn.Module, *inputs: Any) -> Params:
        tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)

    net = shapes(transformer[0], *transformer[1])
    frozen = {"vae": shapes(vae[0], *vae[1])}
    if stack is not None:
        frozen["text"] = {name: shapes(m, *_text_inputs(m)) for name, m in stack.encoders}
    return jax.eval_shape(lambda n, f: split_params(n, f, lora, jax.random.key(0)), net, frozen)


# ---------------------------------------------------------------- folders


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a flow DiT's modules are built and its weights read: the keywords that every
    family's `*_model` and `load_*` take (`**options`).

    `sharding_fn(path, shape)` places each loaded tensor (paths start with
    "transformer", "vae", "text"); `variant` picks `*.<variant>.safetensors`;
    `attention` / `remat` are the kernel and rematerialisation policy;
    `max_sequence_length` the T5 / UMT5 tokens (None: the pipeline's).
    """

    dtype: Any = jnp.float32
    sharding_fn: weights.ShardingFn | None = None
    variant: str | None = None
    attention: str = "auto"
    remat: str = "none"
    max_sequence_length: int | None = None

    def modules(self) -> dict[str, Any]:
        """The keywords of `modules_from_configs(configs, dtype, **...)` (random init)."""
        return dict(
            attention=self.attention,
            remat=self.remat,
            max_sequence_length=self.max_sequence_length,
        )


def options_of(options: dict[str, Any]) -> BuildOptions:
    """`BuildOptions(**options)`, naming a keyword that is not one of its fields."""
    try:
        return BuildOptions(**options)
    except TypeError:
        known = [f.name for f in dataclasses.fields(BuildOptions)]
        unknown = sorted(set(options) - set(known))
        raise TypeError(f"unexpected keyword(s) {unknown}; options are {known}") from None


def check_folder(folder: str, components: dict[str, str], family: str) -> None:
    """`folder` is a diffusers pipeline folder whose model_index.json names `components`;
    a pickle file given instead is refused with its hint."""
    if os.path.isfile(folder):
        if folder.endswith(weights.PICKLE_SUFFIXES) or weights.is_pickle_data(folder):
            weights.refuse_pickle(folder)
        raise WeightsError(f"{folder} is a file; {family} loads a diffusers pipeline folder")
    if not os.path.isdir(folder):
        raise WeightsError(f"missing folder {folder} (a {family} diffusers pipeline folder)")
    weights.check_pipeline_index(folder, components, family)


@dataclasses.dataclass(frozen=True)
class Family:
    """What a flow-DiT family's folder loader and builders need to know of it.

    `load_transformer(folder, dtype=, sharding_fn=, variant=, attention=,
    remat=)` and `load_vae(folder, dtype=, sharding_fn=, variant=)` read its
    modules from the pipeline folder (`in_subfolder` for loaders of a
    component folder); `parse_scheduler(raw, where)` checks
    `scheduler/scheduler_config.json`; `modules(transformer, vae, stack,
    scheduler)` is its modules dataclass and `check(modules)` raises
    ValueError for components that do not fit together.
    """

    kind: str  # the text-stack kind (`text_stacks.KINDS`), also the model name
    name: str  # how messages name it
    components: dict[str, str]  # model_index.json entries the loader reads, and their classes
    load_transformer: Callable[..., tuple[nn.Module, Params]]
    load_vae: Callable[..., tuple[nn.Module, Params]]
    parse_scheduler: Callable[[dict, str], dict]
    modules: Callable[..., Any]
    check: Callable[[Any], None] | None = None


def load_components(
    family: Family, folder: str, *, with_text: bool = True, text_kw: dict | None = None, **options
) -> tuple[Any, dict]:
    """`(modules, params)` of a diffusers pipeline folder of `family`.

    `params` = {"transformer", "vae"[, "text"]}, each tensor placed as read
    (`options`: `BuildOptions`). A scheduler config the family refuses and
    components that do not fit are `WeightsError`s. `with_text=False` skips
    the encoders; `text_kw` goes to `text_stacks.load_text_stack` (e.g.
    SD3's `clip_skip`).
    """
    check_folder(folder, family.components, family.name)
    o = options_of(options)
    transformer, t_params = family.load_transformer(
        folder,
        dtype=o.dtype,
        sharding_fn=o.sharding_fn,
        variant=o.variant,
        attention=o.attention,
        remat=o.remat,
    )
    vae, v_params = family.load_vae(
        folder, dtype=o.dtype, sharding_fn=o.sharding_fn, variant=o.variant
    )
    where = os.path.join(folder, "scheduler", "scheduler_config.json")
    try:
        sched = family.parse_scheduler(weights.read_json(where), where)
    except (ValueError, ConfigError) as err:
        message = str(err)
        raise WeightsError(message if where in message else f"{where}: {message}") from None
    stack, text = load_text(
        family.kind,
        folder,
        with_text=with_text,
        sharding_fn=o.sharding_fn,
        max_sequence_length=o.max_sequence_length,
        dtype=o.dtype,
        variant=o.variant,
        attention=o.attention,
        **(text_kw or {}),
    )
    mods = family.modules(transformer, vae, stack, sched)
    if family.check is not None:
        try:
            family.check(mods)
        except ValueError as err:
            raise WeightsError(f"{folder}: {err}") from None
    return mods, {"transformer": t_params, "vae": v_params, **text}


def in_subfolder(load: Callable[..., Any], name: str) -> Callable[..., Any]:
    """`load` of a component folder as a loader of the pipeline folder's `name/`."""
    return lambda folder, **kw: load(os.path.join(folder, name), **kw)


def load_text(
    kind: str,
    folder: str,
    *,
    with_text: bool,
    sharding_fn: weights.ShardingFn | None = None,
    **kw: Any,
) -> tuple[text_stacks.TextStack | None, dict]:
    """`(stack, {"text": params})` of a folder's encoders, or `(None, {})` without them
    (a run reading a text cache); `kw` goes to `text_stacks.load_text_stack`."""
    if not with_text:
        return None, {}
    stack, params = text_stacks.load_text_stack(
        kind, folder, sharding_fn=weights.prefixed(sharding_fn, "text"), **kw
    )
    return stack, {"text": params}


# ---------------------------------------------------------------- building


def assemble(
    kind: str,
    source: str | dict,
    from_configs: Callable[..., Any],
    load: Callable[..., tuple[Any, dict]],
    make: Callable[..., DiffusionModel],
    *,
    rng: jax.Array | None = None,
    lora: LoraSpec | None = None,
    clip_skip: int | None = None,
    text_cache: str | None = None,
    **options: Any,
) -> tuple[DiffusionModel, Params, Params]:
    """`(model, trainable, frozen)` from config dicts or a diffusers folder.

    Config dicts: `from_configs(source, dtype, attention=, remat=, max_sequence_length=)` ->
    modules, `make(modules)` -> the model, random weights from `rng` (which
    also seeds the LoRA factors). A folder: `load(source, with_text=...,
    **options)` -> `(modules, {"transformer", "vae"[, "text"]})`; `options`
    are `BuildOptions`.
    `text_cache` (a folder's only) is a `launch/embed_prompts.py` file read
    instead of the text encoders: it must have been written for this folder,
    T5 length and `clip_skip`, and hold every prompt the run uses; `make(
    modules, cache_tables=..., tokenize=...)` then gets its tables.
    """
    rng = jax.random.key(0) if rng is None else rng
    opts = options_of(options)
    if not isinstance(source, str):
        if text_cache:
            raise ConfigError("model.text_cache needs model.init to be the diffusers folder")
        model = make(from_configs(source, opts.dtype, **opts.modules()))
        return (model, *model.init(rng))
    mods, params = load(source, with_text=not text_cache, **options)
    frozen = {"vae": params["vae"]}
    if text_cache:
        length = opts.max_sequence_length
        expect = text_cache_lib.stack_identity(kind, source, length, clip_skip)
        with text_cache_lib.TextCache(text_cache, expect=expect) as cache:
            tables = text_cache_lib.cache_tables(cache, opts.sharding_fn)
            model = make(mods, cache_tables=tables, tokenize=text_cache_lib.CacheTokenizer(cache))
        frozen["text_cache"] = tables
    else:
        model = make(mods)
        frozen["text"] = params["text"]
    trainable, frozen = split_params(params["transformer"], frozen, lora, rng)
    return model, trainable, frozen


def image_size(resolution: Any, default: tuple[int, int]) -> tuple[int, int]:
    """`resolution` (a side, or (height, width); None: `default`) as (height, width) pixels."""
    if resolution is None:
        return default
    if isinstance(resolution, tuple | list):
        if len(resolution) != 2:
            raise ConfigError(f"resolution={resolution!r} must be a side or (height, width)")
        return int(resolution[0]), int(resolution[1])
    return int(resolution), int(resolution)


def _override(config: Any, changes: dict) -> Any:
    """A preset entry with `config.model.<key>` applied: a dict updated, a dataclass replaced."""
    if dataclasses.is_dataclass(config):
        try:
            return dataclasses.replace(config, **changes)
        except TypeError as err:
            raise ConfigError(f"config.model: {err}") from None
    return {**config, **changes}


def model_from_config(
    cfg: ml_collections.ConfigDict,
    rng: jax.Array,
    sharding_fn: weights.ShardingFn | None,
    *,
    family: str,
    targets: tuple[str, ...],
    preset: Callable[[str], dict],
    build: Callable[..., tuple[DiffusionModel, Params, Params]],
    overrides: Iterable[str] = ("transformer", "vae"),
    **extra: Any,
) -> tuple[DiffusionModel, Params, Params]:
    """`config.model` -> `build(source, **fields)` for a flow DiT `family` (FLUX, SD3, Wan).

    The fields every family reads: `init` ("random": the `preset` (default
    "tiny") with `config.model.<key>` dicts of `overrides` applied; else a
    diffusers folder), `dtype`, `resolution`, `variant`, `lora` = {rank,
    alpha, targets (default `targets`)}, `attention`, `remat`,
    `max_sequence_length` (0 or unset: the pipeline's), `text_cache` ("":
    run the encoders). `extra` are the family's own keywords. A
    `prediction_type` other than "flow" is refused; a config dict the
    modules refuse is a `ConfigError`.
    """
    asked = cfg.get("prediction_type", None)
    if asked not in (None, "flow"):
        raise ConfigError(
            f"config.model.prediction_type={asked!r}: {family} predicts the flow velocity ('flow')"
        )
    kw = dict(
        rng=rng,
        dtype=text_cache_lib.jnp_dtype(cfg.get("dtype", "float32")),
        resolution=cfg.get("resolution", None),
        lora=lora_lib.spec_from_config(cfg.get("lora", None), targets),
        attention=cfg.get("attention", "auto"),
        remat=cfg.get("remat", "none"),
        max_sequence_length=cfg.get("max_sequence_length", None) or None,
        text_cache=cfg.get("text_cache", None) or None,
        **extra,
    )
    init = cfg.get("init", "random")
    if init == "random":
        try:
            configs = preset(cfg.get("preset", "tiny"))
        except ValueError as err:
            raise ConfigError(f"config.model.preset: {err}") from None
        for key in overrides:
            changes = dict(cfg.get(key, None) or {})
            if changes:
                configs[key] = _override(configs[key], changes)
        try:
            return build(configs, **kw)
        except UserError:
            raise
        except ValueError as err:  # a config dict the modules refuse
            raise ConfigError(f"config.model: {err}") from None
    if not os.path.isdir(init):
        raise WeightsError(f"config.model.init={init!r} is neither 'random' nor a diffusers folder")
    return build(init, sharding_fn=sharding_fn, variant=cfg.get("variant", None), **kw)
