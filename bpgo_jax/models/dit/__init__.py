"""Shared building blocks of the flow DiTs (FLUX.1, SD3 / SD3.5, Wan2.x), numerically diffusers'.

Channels last throughout; parameter names mirror diffusers' state dicts so
`models.weights` converts checkpoints by its generic rename. Modules:
`norms` (RMSNorm, q-k norms, AdaLN-Zero / -single / -continuous, SD3.5's
AdaLN-Zero-X, Wan's tables), `embeddings` (timestep / guidance / pooled-text
embedders, patchify, conv patch embeddings, SD3's `PatchEmbed`), `rope`
(N-axis rotary tables on the host, FLUX and Wan ids), `posembed` (fixed 2D
sin-cos tables with centre crop), `blocks` (`Attention`, `FeedForward`).
Stack identical blocks with `models.scan.Stack`; attention kernels are
`models.attention`'s.
"""

from bpgo_jax.models.dit.blocks import GELU, Attention, FeedForward
from bpgo_jax.models.dit.embeddings import (
    TIME_FREQ_DIM,
    PatchEmbed,
    TextProjection,
    TimestepEmbedding,
    TimestepTextEmbedding,
    conv_tokens,
    patch_conv,
    patchify,
    unpatchify,
)
from bpgo_jax.models.dit.norms import (
    QK_NORMS,
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    LayerNorm,
    QKNorm,
    RMSNorm,
    SD35AdaLayerNormZeroX,
    layer_normalize,
    modulate,
    rms_normalize,
    scale_shift_table_init,
    table_modulation,
)
from bpgo_jax.models.dit.posembed import cropped_sincos_2d, sincos_1d, sincos_2d
from bpgo_jax.models.dit.rope import (
    FLUX_AXES_DIMS,
    apply_rope,
    axis_table,
    flux_ids,
    grid_ids,
    rope_tables,
    wan_axes_dims,
)

__all__ = [
    "FLUX_AXES_DIMS",
    "GELU",
    "QK_NORMS",
    "TIME_FREQ_DIM",
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "Attention",
    "FeedForward",
    "LayerNorm",
    "PatchEmbed",
    "QKNorm",
    "RMSNorm",
    "SD35AdaLayerNormZeroX",
    "TextProjection",
    "TimestepEmbedding",
    "TimestepTextEmbedding",
    "apply_rope",
    "axis_table",
    "conv_tokens",
    "cropped_sincos_2d",
    "flux_ids",
    "grid_ids",
    "layer_normalize",
    "modulate",
    "patch_conv",
    "patchify",
    "rms_normalize",
    "rope_tables",
    "scale_shift_table_init",
    "sincos_1d",
    "sincos_2d",
    "table_modulation",
    "unpatchify",
    "wan_axes_dims",
]
