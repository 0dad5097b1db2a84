"""VideoCLIP-XL (text-video alignment, the paper's text-to-video reward) in Flax.

    module, params = load_videoclip_xl("VideoCLIP-XL-flax")   # made by bpgo-convert-videoclip-xl
    video = module.apply({"params": params}, pixels, method="get_video_features")

What the released model computes (VideoCLIP-XL's `demo.py`, its
`utils/vision_encoder/clip_vision.py` and LongCLIP's text encoder):

- Frames: 8 of a clip, every `F // 8`-th from the first (`frames[::F // 8][:8]`;
  the last `F mod 8` frames are never seen), each resized to 224 x 224 with
  OpenCV's default bilinear filter (no aspect-preserving resize, no crop),
  then `(x / 255 - mean) / std` with the ImageNet mean/std (0.485, 0.456,
  0.406) / (0.229, 0.224, 0.225), not CLIP's.
- Video tower: a CLIP ViT-L/14 at 224 (width 1024, 24 layers, 16 heads,
  QuickGELU) run on all frames at once. Each frame is patchified (a Conv3d of
  temporal kernel 1, i.e. per frame), gets the class token and CLIP's spatial
  position table; its patch tokens then get that frame's row of a learned
  temporal position table `[8, 1024]` (a clip of one frame gets the table's
  mean; any other count than 8 or 1 does not run: there is no interpolation).
  One class token (class embedding + the first spatial position) and the
  8 x 256 patch tokens, patch-major and frame-minor, form one sequence of 2049
  tokens that attends jointly (no mask); `ln_pre`, the transformer, `ln_post`
  on the class token, then `@ proj` to 768.
- Text tower: LongCLIP's, CLIP-L's text transformer (width 768, 12 layers,
  12 heads, causal mask, QuickGELU) over 248 positions, whose position
  embedding is `positional_embedding` for the first 20 positions and
  `positional_embedding_res` after; `ln_final`, the state at the EOT token
  (the argmax of the ids), then `@ text_projection` to 768.
- Tokens: CLIP's byte-pair vocabulary (49408 ids), `[SOT] + text + [EOT]`,
  truncated to 248 with EOT kept last, zero-padded (`ZeroPaddedTokenizer`
  gives the same ids with transformers' `CLIPTokenizer`).
- Score: the cosine of the L2-normalised video and text embeddings; `demo.py`
  prints it times 100 (a fixed `Tmp = 100.`; the stored `logit_scale` and the
  vision tower's `temp` are training-time values the score does not use).

`convert.py` maps the released state dict (`VideoCLIP-XL.bin`) onto this
module's names; `model.py` reuses the CLIP transformer of `models.clip`.
"""

from bpgo_jax.models.videoclip_xl.convert import convert_checkpoint, convert_state_dict
from bpgo_jax.models.videoclip_xl.loader import ZeroPaddedTokenizer, load_videoclip_xl
from bpgo_jax.models.videoclip_xl.model import (
    RELEASED,
    VideoCLIPXL,
    VideoClipXLConfig,
    VideoVisionTransformer,
    tiny_config,
)
from bpgo_jax.models.videoclip_xl.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess_video,
    sample_frames,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RELEASED",
    "VideoCLIPXL",
    "VideoClipXLConfig",
    "VideoVisionTransformer",
    "ZeroPaddedTokenizer",
    "convert_checkpoint",
    "convert_state_dict",
    "load_videoclip_xl",
    "preprocess_video",
    "sample_frames",
    "tiny_config",
]
