"""Converts the released VideoCLIP-XL checkpoint into a folder the `videoclip_xl` reward loads.

    python launch/convert_videoclip_xl.py --checkpoint=/path/to/VideoCLIP-XL.bin \
        --tokenizer=/path/to/clip-vit-large-patch14 --out=/path/to/VideoCLIP-XL-flax

Reads the torch state dict (`.bin` / `.pt` / `.pth`, with torch's
`weights_only=True` loader: torch is needed for this one-time conversion
only) or a `.safetensors` file with the same key names, and writes
`config.json` + `model.safetensors` (names and layouts of
`bpgo_jax/models/videoclip_xl/convert.py`). `--tokenizer` copies a
transformers `CLIPTokenizer` folder (CLIP's vocabulary, e.g. OpenAI's
clip-vit-large-patch14) into the folder with 248 positions, so
`config.rewards.videoclip_xl.path` alone names the reward.
"""

from absl import flags

from bpgo_jax import runtime

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "VideoCLIP-XL.bin (a torch state dict) or a .safetensors of its keys."
)
_OUT = flags.DEFINE_string("out", None, "The folder to write (created if missing).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "A CLIPTokenizer folder to copy into --out ('' = none)."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored dtype.")
_TEXT_HEADS = flags.DEFINE_integer(
    "text_heads", 0, "Text attention heads (0 = width / 64: 12).", lower_bound=0
)
_VISION_HEADS = flags.DEFINE_integer(
    "vision_heads", 0, "Vision attention heads (0 = width / 64: 16).", lower_bound=0
)
flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
    del argv
    from bpgo_jax.models.videoclip_xl import convert_checkpoint

    cfg = convert_checkpoint(
        _CHECKPOINT.value,
        _OUT.value,
        tokenizer=_TOKENIZER.value,
        text_heads=_TEXT_HEADS.value,
        vision_heads=_VISION_HEADS.value,
        dtype=_DTYPE.value,
    )
    v, t = cfg.vision, cfg.text
    print(
        f"wrote {_OUT.value}: video tower {v.num_hidden_layers} x {v.hidden_size} over "
        f"{cfg.num_frames} frames of {v.image_size}px, text tower {t.num_hidden_layers} x "
        f"{t.hidden_size} over {t.max_position_embeddings} tokens, embeddings "
        f"{cfg.projection_dim}" + ("" if _TOKENIZER.value else " (no tokenizer copied)")
    )


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
