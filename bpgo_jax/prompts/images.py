"""Conditioning images of image-to-video prompt files, read and resized on the host.

A `.jsonl` entry's `image` (a path relative to the prompt file) is checked
when the file is read (`load_prompts` keeps it in `metadata["image"]`); here
each is decoded and resized to the video's size as the Wan I2V pipeline's
`video_processor.preprocess` does (PIL, RGB, Lanczos), and kept as uint8
(a quarter of float32's memory in the model's frozen tree; `signed` gives the
pipeline's [-1, 1] values).

An entry may also carry a `last_image` (first-last-frame models, Wan2.1
FLF2V, the pipeline's `last_image`), kept the same way in
`metadata["last_image"]`: read with `key="last_image"`, where it is optional.
A `metadata` path not made absolute by `load_prompts` is relative to the
prompt file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bpgo_jax.errors import InputFileError
from bpgo_jax.prompts import PromptSet


def read_image(path: str, height: int, width: int, where: str = "image") -> np.ndarray:
    """`path` as uint8 RGB `[height, width, 3]`; unreadable files name `where`."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise InputFileError(f"{where}: cannot read image {path} ({err})") from None
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.LANCZOS)
    return np.asarray(rgb, np.uint8)


def signed(images: Any) -> Any:
    """uint8 images (numpy or jax) -> float32 in [-1, 1], the pipelines' pixel range."""
    return images.astype(np.float32) / 127.5 - 1.0


IMAGE_KEYS = ("image", "last_image")


def _entry_path(name: str, meta: dict, key: str) -> str | None:
    """`meta[key]`, relative to the prompt file `name` unless absolute (None: absent)."""
    path = meta.get(key)
    if path is None or os.path.isabs(str(path)):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(name)), str(path))


def condition_paths(
    sets: Sequence[tuple[str, PromptSet]], key: str = "image"
) -> tuple[list[str], list[str], dict[str, int]]:
    """`(paths, wheres, {prompt: row})` of the conditioning images of every entry of `sets`
    (`(name, prompts)` pairs); `wheres[row]` names the entry ("file: entry N").

    `key` "image" (every entry needs one) or "last_image" (entries without
    one are left out). An entry without an image, or one prompt with two
    different images, is an `InputFileError` naming the file and entry: the
    model finds a prompt's image by its text.
    """
    if key not in IMAGE_KEYS:
        raise ValueError(f"key={key!r} is not one of {IMAGE_KEYS}")
    rows: dict[str, int] = {}
    paths: list[str] = []
    wheres: list[str] = []
    for name, prompt_set in sets:
        for number, (prompt, meta) in enumerate(
            zip(prompt_set.prompts, prompt_set.metadata, strict=True), 1
        ):
            path = _entry_path(name, meta, key)
            if path is None:
                if key == "last_image":
                    continue
                raise InputFileError(
                    f'{name}: entry {number} ({prompt!r}) has no "image"; an image-to-video '
                    "model needs one on every prompt"
                )
            if prompt in rows:
                if paths[rows[prompt]] != path:
                    raise InputFileError(
                        f"{name}: entry {number} ({prompt!r}) repeats a prompt with another "
                        f"{key} ({path}, before {paths[rows[prompt]]})"
                    )
                continue
            rows[prompt] = len(paths)
            paths.append(path)
            wheres.append(f"{name}: entry {number}")
    return paths, wheres, rows


def condition_images(
    sets: Sequence[tuple[str, PromptSet]], height: int, width: int, key: str = "image"
) -> tuple[np.ndarray, dict[str, int]]:
    """`(uint8 images [N, height, width, 3], {prompt: row})` of every entry of `sets`
    (`condition_paths`), each resized to the video's size; `N` may be 0 for
    `key="last_image"`."""
    paths, wheres, rows = condition_paths(sets, key)
    images = [read_image(p, height, width, w) for p, w in zip(paths, wheres, strict=True)]
    if not images:
        return np.zeros((0, height, width, 3), np.uint8), rows
    return np.stack(images), rows


def clip_pixels(path: str, processor: dict, where: str = "image") -> np.ndarray:
    """`path` as CLIP pixel values float32 `[crop, crop, 3]`, as transformers'
    `CLIPImageProcessor` (PIL backend) makes them from the original image: the
    shorter side resized (bicubic) to `size.shortest_edge`, center crop,
    `/ 255`, normalized by `image_mean` / `image_std`. `processor` is an
    `image_processor/preprocessor_config.json` dict."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise InputFileError(f"{where}: cannot read image {path} ({err})") from None
    short = int(processor.get("size", {}).get("shortest_edge", 224))
    crop = processor.get("crop_size", {"height": 224, "width": 224})
    ch, cw = int(crop["height"]), int(crop["width"])
    w, h = rgb.size
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    resample = Image.Resampling(int(processor.get("resample", Image.BICUBIC)))
    x = np.asarray(rgb.resize((nw, nh), resample), np.float32)
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[top : top + ch, left : left + cw] * np.float32(processor.get("rescale_factor", 1 / 255))
    mean = np.asarray(processor.get("image_mean", (0.48145466, 0.4578275, 0.40821073)), np.float32)
    std = np.asarray(processor.get("image_std", (0.26862954, 0.26130258, 0.27577711)), np.float32)
    return (x - mean) / std


def clip_table(
    sets: Sequence[tuple[str, PromptSet]], processor: dict, key: str = "image"
) -> np.ndarray:
    """CLIP pixel values `[N, crop, crop, 3]` of `condition_paths(sets, key)`' images, row
    order."""
    paths, wheres, _ = condition_paths(sets, key)
    return np.stack([clip_pixels(p, processor, w) for p, w in zip(paths, wheres, strict=True)])
