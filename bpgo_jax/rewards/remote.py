"""`remote`: a host reward scored by an HTTP server, for judges with no JAX port.

VLM judges such as VideoAlign run in their own process (PyTorch, another
machine); the run POSTs them its decoded frames and reads the scores back.

    config.rewards.remote = {"url": "http://judge:8000/score", "weight": 1.0}

Protocol: one POST of JSON per batch of at most `batch_size` samples:

    {"prompts": [str, ...], "metadata": [{...}, ...], "format": "png",
     "shape": [F, H, W], "options": {...},
     "frames": [[<base64 PNG of frame 0>, ...], ...]}

`frames[i]` holds sample i's frames in order (one for an image model, F or
`cfg.frames` for a video); `metadata` is each prompt file row's metadata and
`options` the config's `options` dict, unchanged. The server answers
`{"scores": [float or null, ...]}`, one per sample (null: no score, NaN). An
example server to adapt (replace `judge`):

    import base64, io, json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import numpy as np
    from PIL import Image

    def judge(frames: np.ndarray, prompt: str) -> float:  # uint8 [F, H, W, 3]
        return float(frames.mean() / 255)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            load = lambda s: np.asarray(Image.open(io.BytesIO(base64.b64decode(s))))
            clips = [np.stack([load(f) for f in clip]) for clip in req["frames"]]
            out = json.dumps({"scores": [judge(c, p) for c, p in zip(clips, req["prompts"])]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out.encode())

    ThreadingHTTPServer(("", 8000), Handler).serve_forever()

Options: `url` (required), `timeout` (seconds per request, default 120),
`retries` (default 3: a refused connection, a timeout, HTTP 429 or 5xx is
tried again after `backoff` seconds, doubling each time, default 1),
`batch_size` (samples per request, default 8), `format` ("png" lossless, the
default, or "jpeg" at `quality`, default 95: smaller requests), `frames` (0,
the default, sends every frame; K sends K evenly spaced ones, first and last
included), `options` (a dict sent with each request), `headers` (extra HTTP
headers, e.g. `{"Authorization": "Bearer ..."}`). A server that stays down,
an HTTP error, malformed JSON or the wrong number of scores is a one-line
`RemoteRewardError` naming the URL. The client is the standard library's
urllib (no dependency); requests go one at a time.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from bpgo_jax.errors import ConfigError, UserError
from bpgo_jax.rewards.base import Reward, register
from bpgo_jax.rewards.video import frame_indices

log = logging.getLogger("bpgo_jax")

FORMATS = {"png": "PNG", "jpeg": "JPEG"}
_SNIPPET = 120  # characters of a bad answer quoted in an error


class RemoteRewardError(UserError):
    """The reward server is unreachable or answered something that is not scores."""


def encode_frame(frame: np.ndarray, fmt: str = "png", quality: int = 95) -> str:
    """A float [H, W, 3] frame in [0, 1] as base64 PNG / JPEG text."""
    pixels = (np.clip(np.asarray(frame, np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt == "jpeg" else {}
    Image.fromarray(pixels).save(buffer, format=FORMATS[fmt], **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plain(value: Any) -> Any:
    """JSON for numpy values in metadata."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


class RemoteScorer:
    """POSTs batches to `url` and returns their scores; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 8,
        fmt: str = "png",
        quality: int = 95,
        frames: int = 0,
        options: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.batch_size = batch_size
        self.fmt = fmt
        self.quality = quality
        self.frames = frames
        self.options = dict(options or {})
        self.headers = {"Content-Type": "application/json", **dict(headers or {})}

    def __call__(
        self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]
    ) -> np.ndarray:
        """Scores of images `[B, H, W, 3]` or videos `[B, F, H, W, 3]` (float, [0, 1])."""
        clips = np.asarray(images)
        if clips.ndim == 4:
            clips = clips[:, None]
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ConfigError(
                f"reward 'remote' ({self.url}) scores [B, H, W, 3] images or [B, F, H, W, 3] "
                f"videos, got shape {np.shape(images)}"
            )
        if self.frames:
            clips = clips[:, frame_indices(clips.shape[1], self.frames, "remote")]
        scores = [
            self._score(
                clips[i : i + self.batch_size],
                prompts[i : i + self.batch_size],
                metadata[i : i + self.batch_size],
            )
            for i in range(0, len(clips), self.batch_size)
        ]
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)

    def _score(self, clips: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]):
        body = {
            "prompts": list(prompts),
            "metadata": list(metadata),
            "format": self.fmt,
            "shape": list(clips.shape[1:4]),
            "options": self.options,
            "frames": [[encode_frame(f, self.fmt, self.quality) for f in clip] for clip in clips],
        }
        raw = self._post(json.dumps(body, default=_plain).encode())
        return self._parse(raw, len(clips))

    def _post(self, data: bytes) -> bytes:
        request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500:
                    text = err.read().decode("utf-8", "replace")[:_SNIPPET]
                    raise RemoteRewardError(
                        f"reward server {self.url} answered HTTP {err.code}: {text!r}"
                    ) from None
                reason = f"HTTP {err.code}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                cause = getattr(err, "reason", err)
                timed_out = isinstance(cause, TimeoutError)
                reason = (
                    "timed out" if timed_out else getattr(cause, "strerror", None) or str(cause)
                )
            if attempt + 1 < attempts:
                wait = self.backoff * 2**attempt
                log.warning("reward server %s: %s; retrying in %.1f s", self.url, reason, wait)
                time.sleep(wait)
        raise RemoteRewardError(
            f"reward server {self.url} did not answer ({reason}) after {attempts} attempt(s)"
        )

    def _parse(self, raw: bytes, count: int) -> np.ndarray:
        text = raw.decode("utf-8", "replace")
        try:
            answer = json.loads(text)
        except ValueError:
            raise RemoteRewardError(
                f"reward server {self.url} answered malformed JSON: {text[:_SNIPPET]!r}"
            ) from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list):
            raise RemoteRewardError(
                f"reward server {self.url} answered without a 'scores' list: {text[:_SNIPPET]!r}"
            )
        if len(scores) != count:
            raise RemoteRewardError(
                f"reward server {self.url} answered {len(scores)} scores for {count} samples"
            )
        bad = [s for s in scores if s is not None and (isinstance(s, bool) or not _is_number(s))]
        if bad:
            raise RemoteRewardError(
                f"reward server {self.url} answered a score that is not a number: {bad[0]!r}"
            )
        return np.asarray([math.nan if s is None else s for s in scores], np.float32)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)


def _positive(cfg: ml_collections.ConfigDict, key: str, default, kind=float, minimum=0):
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(f"config.rewards.remote.{key}={value!r} must be a number >= {minimum}")
    if kind is int and value != int(value):
        raise ConfigError(f"config.rewards.remote.{key}={value!r} must be an integer")
    return kind(value)


@register("remote")
def build_remote(cfg: ml_collections.ConfigDict) -> Reward:
    url = cfg.get("url")
    if not url or not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"config.rewards.remote.url={url!r} must be the scoring endpoint, "
            "e.g. 'http://localhost:8000/score'"
        )
    fmt = cfg.get("format", "png")
    if fmt not in FORMATS:
        raise ConfigError(f"config.rewards.remote.format={fmt!r} is not one of {tuple(FORMATS)}")
    options, headers = cfg.get("options") or {}, cfg.get("headers") or {}
    scorer = RemoteScorer(
        url,
        timeout=_positive(cfg, "timeout", 120.0, minimum=1e-3),
        retries=_positive(cfg, "retries", 3, int),
        backoff=_positive(cfg, "backoff", 1.0),
        batch_size=_positive(cfg, "batch_size", 8, int, 1),
        fmt=fmt,
        quality=_positive(cfg, "quality", 95, int, 1),
        frames=_positive(cfg, "frames", 0, int),
        options=options.to_dict() if hasattr(options, "to_dict") else dict(options),
        headers=headers.to_dict() if hasattr(headers, "to_dict") else dict(headers),
    )
    return Reward(name="remote", jittable=False, fn=scorer)
