"""diffusers' `SD3Transformer2DModel` (SD3 / SD3.5 MMDiT) in Flax linen, channels last.

    module = SD3Transformer2DModel(cfg, attention="auto", remat="full")
    v = module.apply({"params": p}, latents, timestep, prompt_embeds, pooled)  # [B, h, w, C]

The latent `[B, h, w, C]` is cut into `p x p` patches (`pos_embed`: conv plus
the centre crop of a fixed sin-cos table), the T5 / CLIP states are
projected by `context_embedder`, and `time_text_embed` adds the 0-1000
timestep's and the pooled CLIP embedding's. Each `JointTransformerBlock`
attends over `[image; text]` (diffusers' `JointAttnProcessor2_0` order),
both streams modulated by AdaLN-Zero; the last block is `context_pre_only`
(AdaLN-continuous on the text, no text output), and SD3.5's
`dual_attention_layers` add a second self-attention over the image tokens
only (`attn2`, modulated by `SD35AdaLayerNormZeroX`). `norm_out`
(AdaLN-continuous, chunked (scale, shift)) and `proj_out` end it, and the
patch-major tokens are unpatchified.

Consecutive blocks of one kind are scanned (`models.scan.Stack`, parameters
`<run>/stacked/...` with a layer axis): SD3 has one run, `joint_blocks`;
SD3.5-medium `dual_blocks` (0-12) and `joint_blocks` (13-22). The last block
is an ordinary module, `transformer_blocks_<n-1>`. `stack_map(cfg)` maps the
runs onto the checkpoint's `transformer_blocks.<i>` list for
`weights.read_stacked_params`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from bpgo_jax.errors import WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.dit import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    Attention,
    FeedForward,
    LayerNorm,
    PatchEmbed,
    SD35AdaLayerNormZeroX,
    TimestepTextEmbedding,
    modulate,
    unpatchify,
)
from bpgo_jax.models.scan import Stack, check_remat, remat_policy
from bpgo_jax.models.sd3.config import SD3Config, sd3_config_from_dict

Dtype = Any
_EPS = 1e-6  # every norm of the SD3 transformer
CHECKPOINT_LIST = "transformer_blocks"  # the diffusers name of the blocks' list


class JointTransformerBlock(nn.Module):
    """diffusers `JointTransformerBlock`: `(image, text), temb -> (image, text or None)`.

    `context_pre_only` (the last block): the text is only attended to, so
    it gets AdaLN-continuous instead of AdaLN-Zero and no output branch.
    `dual_attention` (SD3.5): `attn2`, self-attention over the image tokens.
    """

    dim: int
    heads: int
    head_dim: int
    qk_norm: str | None = None
    dual_attention: bool = False
    context_pre_only: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32

    def _attention(self, name: str, **kw) -> Attention:
        return Attention(
            self.heads,
            self.head_dim,
            out_dim=self.dim,
            qk_norm=self.qk_norm,
            eps=_EPS,
            attention=self.attention,
            dtype=self.dtype,
            name=name,
            **kw,
        )

    def _ff(self, name: str, x: jax.Array) -> jax.Array:
        return FeedForward(self.dim, activation_fn="gelu-approximate", dtype=self.dtype, name=name)(
            x
        )

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], temb: jax.Array):
        x, ctx = carry
        if self.dual_attention:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = SD35AdaLayerNormZeroX(
                _EPS, dtype=self.dtype, name="norm1"
            )(x, temb)
        else:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(
                _EPS, dtype=self.dtype, name="norm1"
            )(x, temb)
        if self.context_pre_only:
            nctx = AdaLayerNormContinuous(
                _EPS, affine=False, dtype=self.dtype, name="norm1_context"
            )(ctx, temb)
        else:
            nctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLayerNormZero(
                _EPS, dtype=self.dtype, name="norm1_context"
            )(ctx, temb)
        attn = self._attention(
            "attn",
            joint=True,
            context_first=False,
            context_out_dim=None if self.context_pre_only else self.dim,
        )
        attn_out, ctx_attn_out = attn(nx, nctx)
        x = x + gate_msa[:, None] * attn_out
        if self.dual_attention:
            x = x + gate_msa2[:, None] * self._attention("attn2")(nx2)
        h = modulate(LayerNorm(_EPS, dtype=self.dtype)(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * self._ff("ff", h)
        if self.context_pre_only:
            return x, None
        ctx = ctx + c_gate_msa[:, None] * ctx_attn_out
        h = modulate(LayerNorm(_EPS, dtype=self.dtype)(ctx), c_shift_mlp, c_scale_mlp)
        ctx = ctx + c_gate_mlp[:, None] * self._ff("ff_context", h)
        return x, ctx


@dataclasses.dataclass(frozen=True)
class BlockRun:
    """Consecutive identical blocks `start .. start + length - 1`, scanned under `name`."""

    name: str
    start: int
    length: int
    dual_attention: bool


def block_runs(cfg: SD3Config) -> tuple[BlockRun, ...]:
    """The scanned runs of blocks 0 .. n-2 (the last block is never in a run).

    A kind with one run is named `joint_blocks` / `dual_blocks`; a kind split
    into several runs numbers them (`joint_blocks_0`, `joint_blocks_1`, ...).
    """
    spans: list[tuple[int, int, bool]] = []
    for i in range(cfg.num_layers - 1):
        dual = cfg.is_dual(i)
        if spans and spans[-1][2] == dual:
            start, length, _ = spans[-1]
            spans[-1] = (start, length + 1, dual)
        else:
            spans.append((i, 1, dual))
    counts = {dual: sum(s[2] == dual for s in spans) for dual in (False, True)}
    seen = {False: 0, True: 0}
    runs = []
    for start, length, dual in spans:
        base = "dual_blocks" if dual else "joint_blocks"
        name = base if counts[dual] == 1 else f"{base}_{seen[dual]}"
        seen[dual] += 1
        runs.append(BlockRun(name, start, length, dual))
    return tuple(runs)


def stack_map(cfg: SD3Config) -> dict[str, tuple[str, int]]:
    """`weights.read_stacked_params`' `stacks`: each run's slice of `transformer_blocks`."""
    return {f"{r.name}/stacked": (CHECKPOINT_LIST, r.start) for r in block_runs(cfg)}


class SD3Transformer2DModel(nn.Module):
    """`(latents [B, h, w, C], timestep [B], text [B, L, J], pooled [B, P]) -> [B, h, w, C']`.

    `timestep` is diffusers' 0-1000 value (`1000 * sigma`). The output has
    the module's dtype; `remat` is a `models.scan` policy for every block.
    """

    cfg: SD3Config
    attention: str = "auto"
    remat: str = "none"
    dtype: Dtype = jnp.float32

    def _block_args(self, dual: bool) -> FrozenDict:
        cfg = self.cfg
        return FrozenDict(
            dim=cfg.inner_dim,
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            qk_norm=cfg.qk_norm,
            dual_attention=dual,
            attention=self.attention,
            dtype=self.dtype,
        )

    @nn.compact
    def __call__(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
    ) -> jax.Array:
        cfg = self.cfg
        check_remat(self.remat)
        p = cfg.patch_size
        _, height, width, _ = latents.shape
        x = PatchEmbed(
            cfg.inner_dim,
            p,
            cfg.base_size,
            cfg.pos_embed_max_size,
            dtype=self.dtype,
            name="pos_embed",
        )(latents)
        temb = TimestepTextEmbedding(cfg.inner_dim, dtype=self.dtype, name="time_text_embed")(
            timestep, pooled_projections
        )
        ctx = nn.Dense(cfg.caption_projection_dim, dtype=self.dtype, name="context_embedder")(
            encoder_hidden_states.astype(self.dtype)
        )
        carry = (x, ctx)
        for run in block_runs(cfg):
            carry = Stack(
                JointTransformerBlock,
                run.length,
                self._block_args(run.dual_attention),
                remat=self.remat,
                name=run.name,
            )(carry, temb)
        last = cfg.num_layers - 1
        block = JointTransformerBlock
        if self.remat != "none":
            block = nn.remat(block, policy=remat_policy(self.remat))
        x, _ = block(
            **self._block_args(cfg.is_dual(last)),
            context_pre_only=True,
            name=f"{CHECKPOINT_LIST}_{last}",
        )(carry, temb)
        x = AdaLayerNormContinuous(_EPS, affine=False, dtype=self.dtype, name="norm_out")(x, temb)
        x = nn.Dense(p * p * cfg.out_channels, dtype=self.dtype, name="proj_out")(x)
        return unpatchify(x, (height // p, width // p), (p, p), channels_first=False)


def example_inputs(cfg: SD3Config) -> tuple[jax.Array, ...]:
    """Inputs for init / eval_shape: one patch, one text token."""
    p = cfg.patch_size
    return (
        jnp.zeros((1, p, p, cfg.in_channels), jnp.float32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1, 1, cfg.joint_attention_dim), jnp.float32),
        jnp.zeros((1, cfg.pooled_projection_dim), jnp.float32),
    )


def sd3_rename(key: str) -> str | None:
    """The checkpoint's names are the module's, but for the constant position table."""
    return None if key == "pos_embed.pos_embed" else key


def load_transformer(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
    attention: str = "auto",
    remat: str = "none",
) -> tuple[SD3Transformer2DModel, dict]:
    """A diffusers `transformer/` folder -> `(module, params)`.

    Each tensor is cast to `dtype` and placed on `sharding_fn(path, shape)`
    as it is read, paths starting with "transformer"; a run's per-block
    tensors are stacked on their devices (`weights.read_stacked_params`).
    """
    raw = weights.read_json(os.path.join(folder, "config.json"))
    try:
        cfg = sd3_config_from_dict(raw)
    except ValueError as err:
        raise WeightsError(f"{folder}/config.json: {err}") from None
    module = SD3Transformer2DModel(cfg, attention=attention, remat=remat, dtype=dtype)
    expected = weights.expected_shapes(module, *example_inputs(cfg))
    with weights.open_tensors(folder, variant) as reader:
        params = weights.read_stacked_params(
            reader,
            expected,
            stacks=stack_map(cfg),
            rename=sd3_rename,
            prefix=("transformer",),
            dtype=dtype,
            sharding_fn=sharding_fn,
        )
    return module, params
