"""OpenCLIP checkpoints (e.g. HPSv2's ViT-H-14) loaded into our `CLIPModel`.

OpenCLIP stores fused attention `in_proj_weight` `[3D, D]`, projections as
`x @ proj` matrices and its own names. `OpenClipReader`, a
`weights.TensorView`, presents such a file under transformers names and
layouts (splitting q/k/v, transposing the projections), so the one loader
(`weights.read_params`) does the rest. The architecture is read from tensor
shapes; only head counts are not visible in shapes and come from OpenCLIP's
model configs (`_VISION_HEAD_WIDTH`) unless given.

HPSv2 ships a pickle (`HPS_v2_compressed.pt`, a dict with `state_dict`);
convert it once, where torch is installed:

    sd = torch.load("HPS_v2_compressed.pt", map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "hpsv2.safetensors")
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from bpgo_jax.errors import WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.clip.config import ClipConfig, TextConfig, VisionConfig
from bpgo_jax.models.clip.loaders import clip_module_and_shapes
from bpgo_jax.models.clip.modules import CLIPModel

# OpenCLIP vision towers use 64-wide heads except these (ViT-H, ViT-g, ViT-bigG).
_VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
_TEXT_HEAD_WIDTH = 64

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_DIRECT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_IN_PROJ = re.compile(r"^attn\.in_proj_(weight|bias)$")
_PARAM = re.compile(r"^(.+)\.(weight|bias)$")


# The tensors of one residual block, by their name after `transformer.resblocks.N.`.
RESBLOCK_TENSORS = (
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    *(f"{name}.{kind}" for name in _BLOCK for kind in ("weight", "bias")),
)

Transform = Callable[[np.ndarray], np.ndarray] | None


def resblock_parts(rest: str) -> list[tuple[str, Transform]] | None:
    """Transformers' names within `encoder.layers.N.` of one residual-block tensor
    (`rest`, e.g. "attn.in_proj_weight"), each with the transform of the stored
    tensor into it (the fused q/k/v rows split); None when `rest` is no block tensor."""
    if in_proj := _IN_PROJ.match(rest):
        return [
            (f"self_attn.{qkv}.{in_proj[1]}", _qkv_part(i))
            for i, qkv in enumerate(("q_proj", "k_proj", "v_proj"))
        ]
    if (p := _PARAM.match(rest)) and p[1] in _BLOCK:
        return [(f"{_BLOCK[p[1]]}.{p[2]}", None)]
    return None


def _transposed(arr: np.ndarray) -> np.ndarray:  # `x @ proj` [in, out] -> torch Linear [out, in]
    return arr.T


def _qkv_part(i: int) -> Callable[[np.ndarray], np.ndarray]:  # row block i of fused [q; k; v]
    return lambda arr: np.split(arr, 3, axis=0)[i]


class OpenClipReader(weights.TensorView):
    """An OpenCLIP state dict seen through transformers names and layouts."""

    def __init__(self, reader: weights.TensorReader):
        super().__init__(reader, f"{reader.source} (OpenCLIP layout)")
        self.raw: dict[str, str] = {}  # stripped OpenCLIP name -> stored name
        for stored in reader:
            name = stored.removeprefix("module.")  # saved from DistributedDataParallel
            if name.endswith("attn_mask"):
                continue  # a causal-mask buffer, not a weight
            self.raw[name] = stored
            self._add(name, stored)

    def _add(self, name: str, stored: str) -> None:
        if name in _DIRECT:
            self.add(_DIRECT[name], stored)
        elif name in _TRANSPOSED:
            self.add(_TRANSPOSED[name], stored, _transposed)
        elif m := _RESBLOCK.match(name):
            tower = "vision_model" if m[1] else "text_model"
            parts = resblock_parts(m[3])
            if parts is None:
                raise WeightsError(f"unexpected tensor {name!r} in {self.source}")
            for part, fn in parts:
                self.add(f"{tower}.encoder.layers.{m[2]}.{part}", stored, fn)
        else:
            raise WeightsError(f"unexpected tensor {name!r} in {self.source}")

    def shape(self, openclip_name: str) -> tuple[int, ...]:
        """Shape of a tensor by its OpenCLIP name, in the OpenCLIP layout."""
        if openclip_name not in self.raw:
            raise WeightsError(f"missing tensor {openclip_name!r} in {self.source}")
        return self.reader.shape(self.raw[openclip_name])

    def num_layers(self, prefix: str) -> int:
        pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
        return len({m[1] for name in self.raw if (m := pattern.match(name))})


def openclip_config(
    reader: OpenClipReader,
    *,
    text_heads: int | None = None,
    vision_heads: int | None = None,
    hidden_act: str = "gelu",
) -> ClipConfig:
    """The architecture, read from tensor shapes (heads from OpenCLIP's configs)."""
    vocab, text_width = reader.shape("token_embedding.weight")
    context = reader.shape("positional_embedding")[0]
    proj_dim = reader.shape("text_projection")[1]  # `x @ text_projection`: [in, out]
    width, channels, patch, _ = reader.shape("visual.conv1.weight")
    grid = round((reader.shape("visual.positional_embedding")[0] - 1) ** 0.5)
    text = TextConfig(
        vocab_size=vocab,
        hidden_size=text_width,
        intermediate_size=reader.shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=reader.num_layers(""),
        num_attention_heads=text_heads or text_width // _TEXT_HEAD_WIDTH,
        max_position_embeddings=context,
        hidden_act=hidden_act,
        eos_token_id=None,  # OpenCLIP pools at the argmax token id (EOT)
        projection_dim=proj_dim,
    )
    vision = VisionConfig(
        hidden_size=width,
        intermediate_size=reader.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=reader.num_layers("visual."),
        num_attention_heads=vision_heads or width // _VISION_HEAD_WIDTH.get(width, 64),
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act=hidden_act,
        projection_dim=proj_dim,
    )
    return ClipConfig(text=text, vision=vision, projection_dim=proj_dim)


def load_openclip(
    path: str,
    *,
    text_heads: int | None = None,
    vision_heads: int | None = None,
    hidden_act: str = "gelu",
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    attention: str = "auto",
) -> tuple[CLIPModel, dict]:
    """An OpenCLIP `.safetensors` state dict -> our `CLIPModel` and its params.

    `hidden_act` is "gelu" for LAION-trained models, "quick_gelu" for OpenAI's;
    `attention` is the kernel of `models.attention`.
    """
    with weights.open_tensors(path) as raw:
        reader = OpenClipReader(raw)
        cfg = openclip_config(
            reader, text_heads=text_heads, vision_heads=vision_heads, hidden_act=hidden_act
        )
        module, expected = clip_module_and_shapes(cfg, dtype, attention)
        params = weights.read_params(reader, expected, dtype=dtype, sharding_fn=sharding_fn)
    return module, params
