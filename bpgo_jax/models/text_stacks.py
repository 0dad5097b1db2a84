"""The prompt encoders of the flow DiTs (FLUX.1, SD3 / SD3.5, Wan), as diffusers runs them.

    stack, params = load_text_stack("flux", "/path/to/FLUX.1-dev")
    tokens = stack.tokenizer(prompts)               # host: int32 [B, sum of lengths]
    cond = jax.jit(stack.encode)(params, tokens)    # {"prompt_embeds": ..., ...}

A stack's tokenizers write their ids side by side in one int32 array (CLIP's
77, then T5's `max_sequence_length`), so the engine's `tokenize -> [B, L]`
contract holds for several encoders; `encode` splits it at static offsets.
What each stack returns (float32, leading batch axis):

- flux: `prompt_embeds [B, L_t5, d_t5]` (T5, no attention mask) and
  `pooled_prompt_embeds [B, 768]` (CLIP-L's pooler output, NOT projected).
  `max_sequence_length` 512 for dev, 256 for schnell.
- sd3: `prompt_embeds [B, 77 + L_t5, d_t5]`: CLIP-L and CLIP-G penultimate
  hidden states (before the final layer norm) concatenated on channels,
  zero-padded to the T5 width, then T5's states (no mask) after them on the
  sequence; `pooled_prompt_embeds [B, 768 + 1280]`, both projected
  `text_embeds`. Without T5 (`text_encoder_3` None) its part is zeros of the
  transformer's `joint_attention_dim`, as diffusers does. L_t5 default 256.
- wan: `prompt_embeds [B, L, d]`: UMT5 with the attention mask, states past
  each prompt's length zeroed; prompts cleaned first (HTML unescaped,
  whitespace collapsed; see `clean_prompt`). L default 512.

Params are `{"clip_l": ..., "clip_g": ..., "t5": ...}` (the encoders a stack
has); `sharding_fn` receives paths under those names.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.errors import ConfigError, WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.clip import CLIPTextModel, load_clip_text
from bpgo_jax.models.clip.loaders import text_inputs
from bpgo_jax.models.t5 import T5EncoderModel, example_inputs, load_t5
from bpgo_jax.models.text import PretrainedTokenizer, Tokenizer

Params = Any

KINDS = ("flux", "sd3", "wan")
DEFAULT_MAX_SEQUENCE_LENGTH = {"flux": 512, "sd3": 256, "wan": 512}
# kind -> encoder name -> (weights folder, tokenizer folder, transformers tokenizer class)
LAYOUT: dict[str, dict[str, tuple[str, str, str]]] = {
    "flux": {
        "clip_l": ("text_encoder", "tokenizer", "CLIPTokenizer"),
        "t5": ("text_encoder_2", "tokenizer_2", "AutoTokenizer"),
    },
    "sd3": {
        "clip_l": ("text_encoder", "tokenizer", "CLIPTokenizer"),
        "clip_g": ("text_encoder_2", "tokenizer_2", "CLIPTokenizer"),
        "t5": ("text_encoder_3", "tokenizer_3", "AutoTokenizer"),
    },
    "wan": {"t5": ("text_encoder", "tokenizer", "AutoTokenizer")},
}

# The released encoders' configs (transformers config.json fields): CLIP ViT-L/14's
# text tower (FLUX and SD3's `text_encoder`) and T5-v1.1-XXL (FLUX's `text_encoder_2`,
# SD3's `text_encoder_3`), for random-weight presets of those pipelines.
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    eos_token_id=2,
    projection_dim=768,
)
T5_XXL = dict(
    model_type="t5",
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
)


def clean_prompt(text: str) -> str:
    """diffusers' Wan `prompt_clean`: HTML unescaped twice, whitespace collapsed.

    diffusers also applies `ftfy.fix_text` when ftfy happens to be installed
    (straightened quotes, NFC); that is left out here, so a prompt's tokens
    do not depend on what else is installed.
    """
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class StackTokenizer:
    """Several tokenizers' ids side by side: `tokenizer(prompts) -> int32 [B, sum L_i]`.

    `max_length` and `count` are those of the `primary` encoder's tokenizer
    (T5: the one whose truncation a prompt-length check should report); the
    CLIP parts truncate at 77 tokens as diffusers does.
    """

    def __init__(
        self, parts: Sequence[tuple[str, Tokenizer]], primary: str, *, clean: bool = False
    ):
        self.parts = tuple(parts)
        self.names = tuple(name for name, _ in self.parts)
        if primary not in self.names:
            raise ValueError(f"primary tokenizer {primary!r} is not one of {self.names}")
        self._primary = dict(self.parts)[primary]
        self.clean = clean
        self.lengths = {name: tok.max_length for name, tok in self.parts}

    @property
    def max_length(self) -> int:
        return self._primary.max_length

    def _cleaned(self, prompts: Sequence[str]) -> list[str]:
        return [clean_prompt(p) for p in prompts] if self.clean else list(prompts)

    def count(self, prompt: str) -> int:
        return self._primary.count(self._cleaned([prompt])[0])

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        prompts = self._cleaned(prompts)
        return np.concatenate([tok(prompts) for _, tok in self.parts], axis=1).astype(np.int32)

    def split(self, tokens: jax.Array) -> dict[str, jax.Array]:
        """`[B, sum L_i]` -> `{name: [B, L_i]}` (static slices: works inside jit)."""
        out, start = {}, 0
        for name in self.names:
            out[name] = tokens[:, start : start + self.lengths[name]]
            start += self.lengths[name]
        if tokens.shape[1] != start:
            raise ValueError(f"tokens have {tokens.shape[1]} columns, the stack expects {start}")
        return out


def length_mask(ids: jax.Array, pad_id: int = 0) -> jax.Array:
    """1 up to each row's last non-pad token (right padding), 0 after: the tokenizer's
    attention mask, also for prompts that spell the pad token themselves."""
    pos = jnp.arange(ids.shape[1])
    last = jnp.max(jnp.where(ids != pad_id, pos[None, :], -1), axis=1)
    return (pos[None, :] <= last[:, None]).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TextStack:
    """One DiT family's frozen prompt encoders: host tokenizer + pure `encode(params, tokens)`."""

    kind: str
    encoders: tuple[tuple[str, nn.Module], ...]  # (name, module), in token order
    tokenizer: StackTokenizer
    max_sequence_length: int
    clip_skip: int | None = None  # sd3: hidden_states[-(clip_skip + 2)]
    joint_attention_dim: int | None = None  # sd3 without T5: width of its zero states
    t5_pad_id: int = 0  # wan: the mask ends after each row's last non-pad token

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"text stack kind={self.kind!r} is not one of {KINDS}")

    @property
    def modules(self) -> dict[str, nn.Module]:
        return dict(self.encoders)

    def encode(self, params: Mapping[str, Params], tokens: jax.Array) -> dict[str, jax.Array]:
        ids = self.tokenizer.split(tokens)
        mods = self.modules
        if self.kind == "flux":
            _, pooled = mods["clip_l"].apply({"params": params["clip_l"]}, ids["clip_l"])
            states = mods["t5"].apply({"params": params["t5"]}, ids["t5"])
            return {"prompt_embeds": _f32(states), "pooled_prompt_embeds": _f32(pooled)}
        if self.kind == "sd3":
            return self._encode_sd3(params, ids)
        mask = length_mask(ids["t5"], self.t5_pad_id)
        states = mods["t5"].apply({"params": params["t5"]}, ids["t5"], mask)
        return {"prompt_embeds": _f32(states) * mask[..., None].astype(jnp.float32)}

    def _encode_sd3(self, params: Mapping[str, Params], ids: Mapping[str, jax.Array]) -> dict:
        mods = self.modules
        layer = -((self.clip_skip or 0) + 2)
        states, pooled = [], []
        for name in ("clip_l", "clip_g"):
            _, p, hidden = mods[name].apply(
                {"params": params[name]}, ids[name], output_hidden_states=True
            )
            states.append(_f32(hidden[layer]))
            pooled.append(_f32(p))
        clip = jnp.concatenate(states, axis=-1)
        if "t5" in mods:
            t5 = _f32(mods["t5"].apply({"params": params["t5"]}, ids["t5"]))
        else:
            shape = (clip.shape[0], self.max_sequence_length, self.joint_attention_dim)
            t5 = jnp.zeros(shape, jnp.float32)
        if t5.shape[-1] < clip.shape[-1]:
            raise ValueError(
                f"sd3: T5 width {t5.shape[-1]} is smaller than the CLIP states' {clip.shape[-1]}"
            )
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return {
            "prompt_embeds": jnp.concatenate([clip, t5], axis=1),
            "pooled_prompt_embeds": jnp.concatenate(pooled, axis=-1),
        }

    def example_tokens(self, batch: int = 1) -> jax.Array:
        return jnp.zeros((batch, sum(self.tokenizer.lengths.values())), jnp.int32)

    def output_shapes(self, params: Mapping[str, Params]) -> dict[str, jax.ShapeDtypeStruct]:
        """Per-prompt shapes of `encode`'s outputs (no leading batch axis), without running it."""
        out = jax.eval_shape(self.encode, params, self.example_tokens())
        return {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in out.items()}

    def init(self, rng: jax.Array, dtype: Any = jnp.float32) -> dict[str, Params]:
        """Random weights drawn on the host (`sd.pipeline.random_params`), for weight-free runs."""
        from bpgo_jax.models.sd.pipeline import random_params

        out = {}
        for i, (name, module) in enumerate(self.encoders):
            inputs = (
                (text_inputs(module.cfg),)
                if isinstance(module, CLIPTextModel)
                else example_inputs()
            )
            out[name] = random_params(module, jax.random.fold_in(rng, i), dtype, *inputs)
        return out


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


# ---------------------------------------------------------------- loading


def _component(folder: str, index: Mapping[str, Any], name: str) -> str | None:
    """A component's subfolder, or None where `model_index.json` sets it to null."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and (len(entry) < 2 or entry[1] is None):
        return None
    path = os.path.join(folder, name)
    if not os.path.isdir(path):
        raise WeightsError(f"missing folder {path}")
    return path


def _check_source(folder: str) -> dict[str, Any]:
    if not os.path.isdir(folder):
        raise WeightsError(f"missing folder {folder} (a diffusers pipeline folder)")
    return weights.read_json(os.path.join(folder, "model_index.json"))


def resolve_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"text stack kind={kind!r} is not one of {KINDS}")
    return kind


def resolve_max_sequence_length(kind: str, max_sequence_length: int | None) -> int:
    """The T5 length: the given one, or the pipeline default of `kind`."""
    n = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[resolve_kind(kind)]
    if n < 1:
        raise ConfigError(f"max_sequence_length={n} must be positive")
    return int(n)


def encoder_folders(kind: str, folder: str) -> dict[str, tuple[str, str] | None]:
    """`{name: (weights folder, tokenizer folder)}` of a pipeline folder; None: left out."""
    kind = resolve_kind(kind)
    index = _check_source(folder)
    out: dict[str, tuple[str, str] | None] = {}
    for name, (enc, tok, _) in LAYOUT[kind].items():
        enc_path = _component(folder, index, enc)
        if enc_path is None:
            if not (kind == "sd3" and name == "t5"):
                raise WeightsError(f"{folder}/model_index.json sets the required {enc!r} to null")
            out[name] = None
            continue
        tok_path = os.path.join(folder, tok)
        if not os.path.isdir(tok_path):
            raise WeightsError(f"missing folder {tok_path}")
        out[name] = (enc_path, tok_path)
    return out


def load_text_stack(
    kind: str,
    folder: str,
    *,
    max_sequence_length: int | None = None,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
    clip_skip: int | None = None,
    attention: str = "auto",
) -> tuple[TextStack, dict[str, Params]]:
    """The text encoders and tokenizers of a diffusers FLUX / SD3 / Wan pipeline folder.

    Each tensor is cast to `dtype` and placed on `sharding_fn(path, shape)` as
    it is read (`path` starts with the encoder name: `("t5", "encoder",
    ...)`), so a T5-XXL is never held twice. SD3 requires the projected CLIP
    towers (`CLIPTextModelWithProjection`); FLUX reads CLIP-L without its
    projection, as its pipeline uses `pooler_output`. `attention` is the
    encoders' kernel (`models.attention`; T5's position bias runs on cuDNN
    and XLA, not on the splash kernel).
    """
    kind = resolve_kind(kind)
    length = resolve_max_sequence_length(kind, max_sequence_length)
    folders = encoder_folders(kind, folder)
    encoders, params, tokenizers, pad_id = [], {}, [], 0
    for name, paths in folders.items():
        if paths is None:
            continue
        enc_path, tok_path = paths
        sub = None
        if sharding_fn is not None:
            sub = lambda path, shape, name=name: sharding_fn((name, *path), shape)
        if name.startswith("clip"):
            module, p = load_clip_text(
                enc_path,
                dtype=dtype,
                sharding_fn=sub,
                with_projection=kind == "sd3",
                attention=attention,
                variant=variant,
            )
            tok_len = module.cfg.max_position_embeddings
        else:
            module, p = load_t5(
                enc_path, dtype=dtype, sharding_fn=sub, variant=variant, attention=attention
            )
            tok_len = length
            raw = weights.read_json(os.path.join(enc_path, "config.json"))
            pad_id = int(raw.get("pad_token_id") or 0)
        encoders.append((name, module))
        params[name] = p
        tokenizers.append((name, PretrainedTokenizer(tok_path, tok_len, LAYOUT[kind][name][2])))
    joint = None
    if kind == "sd3" and folders["t5"] is None:
        joint = joint_attention_dim(folder)
    stack = TextStack(
        kind=kind,
        encoders=tuple(encoders),
        tokenizer=StackTokenizer(
            tokenizers, primary="t5" if "t5" in params else "clip_l", clean=kind == "wan"
        ),
        max_sequence_length=length,
        clip_skip=clip_skip,
        joint_attention_dim=joint,
        t5_pad_id=pad_id,
    )
    return stack, params


def joint_attention_dim(folder: str) -> int:
    raw = weights.read_json(os.path.join(folder, "transformer", "config.json"))
    if "joint_attention_dim" not in raw:
        raise WeightsError(f"{folder}/transformer/config.json has no 'joint_attention_dim'")
    return int(raw["joint_attention_dim"])


def stack_from_modules(
    kind: str,
    encoders: Mapping[str, nn.Module],
    tokenizers: Mapping[str, Tokenizer],
    *,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
    joint_attention_dim: int | None = None,
) -> TextStack:
    """A stack of given modules and tokenizers (random-weight runs, benchmarks).

    `encoders` / `tokenizers` are keyed by the kind's names (`LAYOUT`); CLIP
    modules must have their projection for sd3 and none for flux.
    """
    kind = resolve_kind(kind)
    names = [n for n in LAYOUT[kind] if n in encoders]
    missing = [n for n in LAYOUT[kind] if n not in encoders and not (kind == "sd3" and n == "t5")]
    if missing or set(encoders) - set(LAYOUT[kind]):
        raise ConfigError(f"{kind} needs encoders {sorted(LAYOUT[kind])}, got {sorted(encoders)}")
    for name in names:
        module = encoders[name]
        if isinstance(module, CLIPTextModel) and module.with_projection != (kind == "sd3"):
            raise ConfigError(f"{kind}: {name} with_projection must be {kind == 'sd3'}")
        if not isinstance(module, (CLIPTextModel, T5EncoderModel)):
            raise ConfigError(f"{kind}: {name} is a {type(module).__name__}")
    if kind == "sd3" and "t5" not in encoders and not joint_attention_dim:
        raise ConfigError("sd3 without T5 needs joint_attention_dim")
    length = resolve_max_sequence_length(kind, max_sequence_length)
    for name in names:
        want = encoders[name].cfg.max_position_embeddings if name.startswith("clip") else length
        if tokenizers[name].max_length != want:
            raise ConfigError(
                f"{kind}: the {name} tokenizer pads to {tokenizers[name].max_length} tokens, "
                f"the encoder takes {want}"
            )
    return TextStack(
        kind=kind,
        encoders=tuple((n, encoders[n]) for n in names),
        tokenizer=StackTokenizer(
            [(n, tokenizers[n]) for n in names],
            primary="t5" if "t5" in encoders else "clip_l",
            clean=kind == "wan",
        ),
        max_sequence_length=length,
        clip_skip=clip_skip,
        joint_attention_dim=joint_attention_dim,
    )
