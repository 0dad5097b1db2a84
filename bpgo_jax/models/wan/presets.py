"""Weight-free Wan architectures: transformer configs (diffusers `config.json` spelling) and shapes.

Each preset is `{"transformer": config dict[, "transformer_2": config dict],
"boundary_ratio": float | None, "expand_timesteps": bool, "vae": WanVAEConfig}`:
the transformer(s) of the published `*-Diffusers` folders (Wan2.2 A14B has
two experts of one architecture: `transformer` denoises above the boundary
timestep `boundary_ratio * 1000`, `transformer_2` below it), the VAE whose
compression gives the latent shape, and whether the pipeline passes per-token timesteps
(Wan2.2 TI2V-5B); Wan2.1 I2V / FLF2V presets add their CLIP `image_encoder`
(a `VisionConfig` dict) and `image_processor` settings. `tiny` is a small model
of the T2V structure for tests and CPU smoke runs, `tiny_i2v_21` / `tiny_flf2v`
the same with Wan2.1's image branch. `param_shapes` describes a preset's parameter trees and
`abstract_call` a transformer call at a video size, nothing allocated (for
memory and FLOP estimates, e.g. `benchmarks/model_step.py`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bpgo_jax.models.wan.config import IMAGE_LEN, TEXT_LEN
from bpgo_jax.models.wan.transformer import (
    EXPERTS,
    WanTransformer3DModel,
    example_inputs,
    wan_transformer,
)
from bpgo_jax.models.wan.vae_config import WAN22_VAE_ARCH, WanVAEConfig
from bpgo_jax.models.wan.vae_config import latent_shape as vae_latent_shape

_14B = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)
_I2V_21 = dict(_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)  # + CLIP ViT-H
# Wan2.1 I2V's image encoder, CLIP ViT-H/14 as transformers' CLIPVisionModel (the
# folders' image_encoder/config.json), and its CLIPImageProcessor settings.
_VIT_H14 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1024,
)
_CLIP_PROCESSOR = dict(
    size={"shortest_edge": 224},
    crop_size={"height": 224, "width": 224},
    resample=3,
    rescale_factor=1 / 255,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)
_TINY = dict(
    _14B,
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
)
# A 24-wide CLIP tower on 32 px crops: 17 tokens (16 patches + class) per frame.
_TINY_VIT = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=16,
)
_TINY_PROCESSOR = dict(
    _CLIP_PROCESSOR, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
)
_TINY_I2V_21 = dict(_TINY, in_channels=36, image_dim=24, added_kv_proj_dim=32)
_I2V_22 = dict(_14B, in_channels=36)  # no image branch in Wan2.2
_VAE_21 = WanVAEConfig()  # AutoencoderKLWan (2.1): 4x temporal, 8x spatial, 16 channels
_VAE_22 = WanVAEConfig(**WAN22_VAE_ARCH)  # Wan2.2's residual, patchified VAE: 16x, 48 channels


def _preset(transformer: dict, vae: WanVAEConfig, **extra: Any) -> dict:
    """A preset: one transformer (or `transformer_2=` too), its VAE, pipeline options."""
    out = dict(transformer=transformer, vae=vae, boundary_ratio=None, expand_timesteps=False)
    return {**out, **extra}


PRESETS: dict[str, dict] = {
    "wan21_t2v_1_3b": _preset(
        dict(_14B, num_attention_heads=12, ffn_dim=8960, num_layers=30), _VAE_21
    ),
    "wan21_t2v_14b": _preset(_14B, _VAE_21),
    "wan21_i2v_14b": _preset(
        _I2V_21, _VAE_21, image_encoder=_VIT_H14, image_processor=_CLIP_PROCESSOR
    ),
    # FLF2V: the image embedder's learned position table over both frames' 257 tokens.
    "wan21_flf2v_14b": _preset(
        dict(_I2V_21, pos_embed_seq_len=2 * 257),
        _VAE_21,
        image_encoder=_VIT_H14,
        image_processor=_CLIP_PROCESSOR,
    ),
    "wan22_t2v_a14b": _preset(_14B, _VAE_21, transformer_2=_14B, boundary_ratio=0.875),
    "wan22_i2v_a14b": _preset(_I2V_22, _VAE_21, transformer_2=_I2V_22, boundary_ratio=0.9),
    "wan22_ti2v_5b": _preset(
        dict(
            _14B,
            num_attention_heads=24,
            in_channels=48,
            out_channels=48,
            ffn_dim=14336,
            num_layers=30,
        ),
        _VAE_22,
        expand_timesteps=True,
    ),
    "tiny": _preset(_TINY, _VAE_21),
    "tiny_i2v_21": _preset(
        _TINY_I2V_21, _VAE_21, image_encoder=_TINY_VIT, image_processor=_TINY_PROCESSOR
    ),
    "tiny_flf2v": _preset(
        dict(_TINY_I2V_21, pos_embed_seq_len=2 * 17),
        _VAE_21,
        image_encoder=_TINY_VIT,
        image_processor=_TINY_PROCESSOR,
    ),
}


def preset(name: str) -> dict:
    """A deep copy of preset `name` (callers may update it)."""
    if name not in PRESETS:
        raise ValueError(f"Wan preset {name!r} is not one of {tuple(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def experts(configs: dict) -> tuple[str, ...]:
    """The transformer components of a preset: `("transformer",)` or both A14B experts."""
    return tuple(e for e in EXPERTS if configs.get(e) is not None)


def latent_shape(configs: dict, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """`(F, H, W, C)` of a `frames x height x width` video under the preset's VAE (81 frames
    at 480 x 832 with Wan2.1's VAE: (21, 60, 104, 16))."""
    return vae_latent_shape(configs["vae"], frames, height, width)


def _shapes(module: WanTransformer3DModel, dtype: Any) -> dict:
    tree = jax.eval_shape(
        lambda: module.init(jax.random.key(0), *example_inputs(module.cfg))["params"]
    )
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), tree)


def param_shapes(name_or_configs: str | dict, dtype: Any = jnp.bfloat16) -> dict:
    """`{expert: params as ShapeDtypeStructs}` of a preset (a name or its dict), nothing drawn."""
    configs = preset(name_or_configs) if isinstance(name_or_configs, str) else name_or_configs
    return {e: _shapes(wan_transformer(configs[e]), dtype) for e in experts(configs)}


@dataclasses.dataclass(frozen=True)
class AbstractCall:
    """One transformer call, abstract: `module.apply({"params": params}, *args)` traces it.

    `args` are `(latents, timestep, text[, image])` ShapeDtypeStructs; `latent`
    is the `(F, H, W, C)` latent and `tokens` its patch-token count.
    """

    module: WanTransformer3DModel
    params: dict
    args: tuple[jax.ShapeDtypeStruct, ...]
    latent: tuple[int, int, int, int]
    tokens: int


def abstract_call(
    name_or_configs: str | dict,
    *,
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
    dtype: Any = jnp.bfloat16,
    attention: str = "auto",
    remat: str = "none",
    expert: str = "transformer",
    text_len: int = TEXT_LEN,
) -> AbstractCall:
    """The preset's `expert` called on `batch` videos of `frames x height x width` pixels:
    the pipeline's 512 UMT5 tokens, 257 CLIP tokens for the 2.1 I2V image branch, and per-token
    timesteps `[B, L]` where the pipeline expands them (TI2V-5B)."""
    configs = preset(name_or_configs) if isinstance(name_or_configs, str) else name_or_configs
    if expert not in experts(configs):
        raise ValueError(f"expert={expert!r} is not one of this preset's {experts(configs)}")
    module = wan_transformer(configs[expert], dtype=dtype, attention=attention, remat=remat)
    cfg = module.cfg
    latent = latent_shape(configs, frames, height, width)
    if latent[-1] > cfg.in_channels:
        raise ValueError(f"latent channels {latent[-1]} exceed in_channels={cfg.in_channels}")
    grid = cfg.grid(latent[:3])
    tokens = grid[0] * grid[1] * grid[2]
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    t_shape = (batch, tokens) if configs.get("expand_timesteps") else (batch,)
    args = [
        sds(batch, *latent[:3], cfg.in_channels),
        sds(*t_shape),
        sds(batch, text_len, cfg.text_dim),
    ]
    if cfg.has_image_branch:
        args.append(sds(batch, cfg.pos_embed_seq_len or IMAGE_LEN, cfg.image_dim))
    return AbstractCall(module, _shapes(module, dtype), tuple(args), latent, tokens)
