"""Pieces every model family shares: activations by checkpoint name, timestep embeddings.

The UNets, CLIP towers and the DiTs / T5 encoders to come name their
activations in config files (`"silu"`, `"quick_gelu"`, `"gelu_pytorch_tanh"`)
and embed diffusion timesteps the same sinusoidal way; one copy of each keeps
their numerics identical.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _quick_gelu(x: jax.Array) -> jax.Array:  # OpenAI CLIP / SD1's text encoder
    return x * jax.nn.sigmoid(1.702 * x)


def _mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


_EXACT_GELU = functools.partial(jax.nn.gelu, approximate=False)
_TANH_GELU = functools.partial(jax.nn.gelu, approximate=True)
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,  # diffusers
    "swish": jax.nn.silu,
    "mish": _mish,
    "relu": jax.nn.relu,
    "gelu": _EXACT_GELU,  # erf GELU: torch's default, OpenCLIP / SD2
    "quick_gelu": _quick_gelu,  # transformers' names ...
    "gelu_new": _TANH_GELU,
    "gelu_pytorch_tanh": _TANH_GELU,
    "gelu-approximate": _TANH_GELU,  # ... and diffusers' for the tanh approximation
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """diffusers' `get_activation` / transformers' `ACT2FN` for the names their configs use."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10_000.0,
) -> jax.Array:
    """Sinusoidal embedding of (float) timesteps, `[B] -> [B, dim]` float32.

    diffusers' `get_timestep_embedding`: frequencies
    `exp(-log(max_period) * i / (dim // 2 - downscale_freq_shift))`, sines then
    cosines, or cosines first with `flip_sin_to_cos` (the defaults here are the
    built-in model's and the DiTs' (FLUX, SD3, Wan): cosines first, no shift;
    diffusers' own function defaults to `False, 1`). An odd `dim` is padded with
    one zero column.
    """
    half = dim // 2
    exponent = (
        -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    )
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    first, second = (jnp.cos, jnp.sin) if flip_sin_to_cos else (jnp.sin, jnp.cos)
    emb = jnp.concatenate([first(args), second(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
