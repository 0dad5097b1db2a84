"""The released VideoCLIP-XL state dict -> a `config.json` + `model.safetensors` folder.

The release is one torch state dict (`VideoCLIP-XL.bin`) of the reference's
`VideoCLIP_XL` module: `text_model.*` (LongCLIP's text CLIP) and
`vision_model.vision_encoder.*` (the video ViT; its keys are listed in the
reference's `model_parameters.txt`). What changes on the way:

- `attn.in_proj_weight` / `in_proj_bias` (`nn.MultiheadAttention`'s fused
  `[q; k; v]` rows) are split into `q_proj`, `k_proj`, `v_proj`;
- `proj` and `text_projection`, stored as `x @ W` matrices, are transposed
  into Linear weights;
- the two text position tables become one: `positional_embedding` rows 0-19,
  `positional_embedding_res` from row 20 (what the reference adds through its
  `mask1` / `mask2`);
- the Conv3d patch kernel `[D, 3, 1, p, p]` loses its temporal axis, the
  temporal table `[1, T, D]` its batch axis;
- `text_model.logit_scale` and `vision_model.temp` are dropped (the score
  does not use them).

Names become transformers' CLIP names in torch layout, so the folder loads
through `weights.read_params`. Sizes are read from the shapes; head counts
are not in the shapes and default to width / 64 (the release's 12 and 16).
Reading a `.bin` / `.pth` needs torch (`torch.load(weights_only=True)`),
only here, once; a `.safetensors` file with the same key names needs none.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

from bpgo_jax.errors import WeightsError
from bpgo_jax.models.clip.config import TextConfig, VisionConfig
from bpgo_jax.models.clip.openclip import RESBLOCK_TENSORS, resblock_parts
from bpgo_jax.models.videoclip_xl.model import RELEASED, VideoClipXLConfig

TEXT = "text_model."
VISION = "vision_model.vision_encoder."
UNUSED = ("text_model.logit_scale", "vision_model.temp")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
HEAD_WIDTH = 64
LONGCLIP_KEPT_POSITIONS = 20  # rows of `positional_embedding` kept; `_res` serves the rest
_DTYPES = {"float32": np.float32, "float16": np.float16}


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A torch state dict file as numpy arrays (float32 for bfloat16 tensors)."""
    try:
        import torch
    except ModuleNotFoundError:
        raise WeightsError(
            f"reading the torch checkpoint {path} needs torch (`pip install "
            "'bpgo-jax[convert]'`, the CPU build is enough; only this one-time conversion uses "
            "it), or give a .safetensors file with the same key names"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises many kinds for a bad file)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"{path} is not a torch state dict that torch.load(weights_only=True) reads "
            f"(it may hold more than tensors): {first}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and set(state) == {key}:
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[name] = tensor.numpy()
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    from bpgo_jax.models import weights

    with weights.open_tensors(path) as reader:
        return {name: reader.get(name) for name in reader}


def read_released(path: str) -> dict[str, np.ndarray]:
    """The released checkpoint (`.bin` / `.pt` / `.pth`, or `.safetensors`) as numpy arrays."""
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint {path} does not exist (or is not a file)")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return read_torch(path)
    raise WeightsError(
        f"checkpoint {path}: expected a torch state dict ({', '.join(TORCH_SUFFIXES)}) or a "
        ".safetensors file"
    )


class _Tensors:
    """The checkpoint's tensors, each taken once; what is never taken is unexpected."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
        self.source = source
        self.left = {k.removeprefix("module."): v for k, v in tensors.items()}

    def take(self, name: str) -> np.ndarray:
        if name not in self.left:
            raise WeightsError(f"missing tensor {name!r} in {self.source}")
        return np.asarray(self.left.pop(name))

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.left:
            raise WeightsError(f"missing tensor {name!r} in {self.source}")
        return tuple(np.shape(self.left[name]))

    def num_layers(self, prefix: str) -> int:
        pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
        found = {int(m[1]) for name in self.left if (m := pattern.match(name))}
        if not found:
            raise WeightsError(f"no {prefix}transformer.resblocks.* tensors in {self.source}")
        return max(found) + 1

    def finish(self) -> None:
        for name in UNUSED:
            self.left.pop(name, None)
        if self.left:
            names = ", ".join(repr(k) for k in sorted(self.left)[:8])
            more = f" and {len(self.left) - 8} more" if len(self.left) > 8 else ""
            raise WeightsError(f"unexpected tensor(s) {names}{more} in {self.source}")


def _blocks(src: _Tensors, prefix: str, dest: str, layers: int) -> dict[str, np.ndarray]:
    out = {}
    for i in range(layers):
        block, layer = f"{prefix}transformer.resblocks.{i}.", f"{dest}encoder.layers.{i}."
        for rest in RESBLOCK_TENSORS:
            stored = src.take(block + rest)
            for part, fn in resblock_parts(rest):
                out[layer + part] = stored if fn is None else fn(stored)
    return out


def _heads(width: int, heads: int, tower: str) -> int:
    heads = heads or max(width // HEAD_WIDTH, 1)
    if width % heads:
        raise WeightsError(f"{tower} width {width} is not divisible by {heads} heads")
    return heads


def _text(src: _Tensors, heads: int) -> tuple[TextConfig, dict[str, np.ndarray]]:
    vocab, width = src.shape(f"{TEXT}token_embedding.weight")
    layers = src.num_layers(TEXT)
    cfg = TextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=src.shape(f"{TEXT}transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=layers,
        num_attention_heads=_heads(width, heads, "text"),
        max_position_embeddings=src.shape(f"{TEXT}positional_embedding")[0],
        hidden_act=RELEASED.text.hidden_act,
        eos_token_id=None,
        projection_dim=src.shape(f"{TEXT}text_projection")[1],
    )
    pos = src.take(f"{TEXT}positional_embedding")
    res = src.take(f"{TEXT}positional_embedding_res")
    if res.shape != pos.shape:
        raise WeightsError(
            f"{TEXT}positional_embedding_res has shape {res.shape}, expected {pos.shape} (as "
            f"{TEXT}positional_embedding) in {src.source}"
        )
    kept = LONGCLIP_KEPT_POSITIONS
    out = {
        "text_model.embeddings.token_embedding.weight": src.take(f"{TEXT}token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": np.concatenate([pos[:kept], res[kept:]]),
        **_blocks(src, TEXT, "text_model.", layers),
        "text_model.final_layer_norm.weight": src.take(f"{TEXT}ln_final.weight"),
        "text_model.final_layer_norm.bias": src.take(f"{TEXT}ln_final.bias"),
        "text_projection.weight": src.take(f"{TEXT}text_projection").T,
    }
    return cfg, out


def _vision(src: _Tensors, heads: int) -> tuple[VisionConfig, int, dict[str, np.ndarray]]:
    conv = src.take(f"{VISION}conv1.weight")
    if conv.ndim != 5 or conv.shape[2] != 1 or conv.shape[3] != conv.shape[4]:
        raise WeightsError(
            f"{VISION}conv1.weight has shape {conv.shape}, expected [width, 3, 1, p, p] (a "
            f"per-frame patch kernel) in {src.source}"
        )
    width, channels, _, patch, _ = conv.shape
    positions = src.shape(f"{VISION}positional_embedding")[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise WeightsError(
            f"{VISION}positional_embedding has {positions} rows, not a square grid plus the "
            f"class token, in {src.source}"
        )
    temporal = src.take(f"{VISION}temporal_positional_embedding")
    if temporal.ndim != 3 or temporal.shape[0] != 1 or temporal.shape[2] != width:
        raise WeightsError(
            f"{VISION}temporal_positional_embedding has shape {temporal.shape}, expected "
            f"[1, frames, {width}] in {src.source}"
        )
    layers = src.num_layers(VISION)
    cfg = VisionConfig(
        hidden_size=width,
        intermediate_size=src.shape(f"{VISION}transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=layers,
        num_attention_heads=_heads(width, heads, "vision"),
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act=RELEASED.vision.hidden_act,
        projection_dim=src.shape(f"{VISION}proj")[1],
    )
    out = {
        "vision_model.embeddings.patch_embedding.weight": conv[:, :, 0],
        "vision_model.embeddings.class_embedding": src.take(f"{VISION}class_embedding"),
        "vision_model.embeddings.position_embedding.weight": src.take(
            f"{VISION}positional_embedding"
        ),
        "vision_model.temporal_embedding": temporal[0],
        "vision_model.pre_layrnorm.weight": src.take(f"{VISION}ln_pre.weight"),
        "vision_model.pre_layrnorm.bias": src.take(f"{VISION}ln_pre.bias"),
        **_blocks(src, VISION, "vision_model.", layers),
        "vision_model.post_layernorm.weight": src.take(f"{VISION}ln_post.weight"),
        "vision_model.post_layernorm.bias": src.take(f"{VISION}ln_post.bias"),
        "visual_projection.weight": src.take(f"{VISION}proj").T,
    }
    return cfg, temporal.shape[1], out


def convert_state_dict(
    tensors: Mapping[str, np.ndarray],
    *,
    text_heads: int = 0,
    vision_heads: int = 0,
    source: str = "the checkpoint",
) -> tuple[VideoClipXLConfig, dict[str, np.ndarray]]:
    """Released names and layouts -> (config, tensors under our torch-layout names).

    `text_heads` / `vision_heads` 0: width / 64. Every tensor of `tensors`
    must be used (but for `UNUSED`), and every one the model needs present.
    """
    src = _Tensors(tensors, source)
    text_cfg, text = _text(src, text_heads)
    vision_cfg, frames, vision = _vision(src, vision_heads)
    src.finish()
    if text_cfg.projection_dim != vision_cfg.projection_dim:
        raise WeightsError(
            f"text_projection maps to {text_cfg.projection_dim} dims but proj to "
            f"{vision_cfg.projection_dim} in {source}"
        )
    cfg = VideoClipXLConfig(
        text=text_cfg,
        vision=vision_cfg,
        num_frames=frames,
        projection_dim=text_cfg.projection_dim,
    )
    return cfg, {**text, **vision}


def save_tokenizer(folder: str, out: str, cfg: TextConfig) -> None:
    """A transformers `CLIPTokenizer` folder, written into `out` with the model's positions."""
    import transformers

    from bpgo_jax.models.videoclip_xl.loader import check_tokenizer, check_tokenizer_folder

    if not os.path.isdir(folder):
        raise WeightsError(f"tokenizer folder {folder} does not exist")
    check_tokenizer_folder(folder)
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{folder} is not a CLIPTokenizer folder ({err})") from None
    check_tokenizer(tokenizer, cfg.vocab_size, folder)
    tokenizer.model_max_length = cfg.max_position_embeddings
    tokenizer.save_pretrained(out)


def convert_checkpoint(
    checkpoint: str,
    out: str,
    *,
    tokenizer: str = "",
    text_heads: int = 0,
    vision_heads: int = 0,
    dtype: str = "float32",
) -> VideoClipXLConfig:
    """Writes `out/config.json` and `out/model.safetensors` (and the tokenizer, if given)."""
    from safetensors.numpy import save_file

    if dtype not in _DTYPES:
        raise WeightsError(f"dtype={dtype!r} is not one of {tuple(_DTYPES)}")
    cfg, tensors = convert_state_dict(
        read_released(checkpoint),
        text_heads=text_heads,
        vision_heads=vision_heads,
        source=checkpoint,
    )
    if tokenizer:
        save_tokenizer(tokenizer, out, cfg.text)  # checked before the weights are written
    os.makedirs(out, exist_ok=True)
    cast = {k: np.ascontiguousarray(v, dtype=_DTYPES[dtype]) for k, v in tensors.items()}
    save_file(cast, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    return cfg
