"""Video rewards: the frame-sampling wrapper against the image reward it wraps, and the
remote reward against a real HTTP server started on a free local port."""

from __future__ import annotations

import base64
import io
import json
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from bpgo_jax import rewards
from bpgo_jax.errors import ConfigError
from bpgo_jax.prompts import load_prompts
from bpgo_jax.rewards import base, remote
from bpgo_jax.rewards.remote import RemoteRewardError
from bpgo_jax.rewards.video import frame_indices

HELDOUT = "bpgo_jax/world/assets/prompts_heldout.jsonl"


def _cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"weight": 1.0, **kw})


def _videos(b: int = 8, f: int = 5, size: int = 32, seed: int = 0) -> np.ndarray:
    """Clips whose frames differ (colour and brightness drift over time)."""
    rng = np.random.default_rng(seed)
    base_frames = rng.uniform(0, 1, (b, 1, size, size, 3))
    drift = np.linspace(0, 1, f)[None, :, None, None, None] * rng.uniform(
        -0.5, 0.5, (b, 1, 1, 1, 3)
    )
    return np.clip(base_frames + drift, 0, 1).astype(np.float32)


def _prompts(n: int) -> tuple[list[str], list[dict]]:
    prompt_set = load_prompts(HELDOUT)
    return list(prompt_set.prompts[:n]), list(prompt_set.metadata[:n])


def test_frame_indices_are_evenly_spaced_from_first_to_last():
    assert frame_indices(81, 4).tolist() == [0, 27, 53, 80]
    assert frame_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert frame_indices(9, 1).tolist() == [0]
    with pytest.raises(ConfigError, match=r"rewards.video_frames.frames=6 exceeds the 5 frames"):
        frame_indices(5, 6)


def test_jittable_wrapper_equals_the_wrapped_reward_on_its_frames_under_sharded_jit():
    """world_clip reads prompt tokens (prepare's aux): each frame must be scored with
    its own clip's prompt, inside jit, on a batch split over 8 devices."""
    rewards.load_plugins()
    videos = _videos()
    prompts, meta = _prompts(len(videos))
    inner = base.build("world_clip", _cfg())
    video = base.build("video_world_clip", _cfg(frames=3))
    assert video.jittable
    aux = video.prepare(prompts, meta)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    put = lambda x: jax.device_put(x, rows)
    score = jax.jit(video.fn, out_shardings=rows)
    got = score(inner.params, put(videos), jax.tree.map(put, aux))
    assert got.shape == (8,) and got.sharding == rows

    image_score = jax.jit(inner.fn)
    per_frame = [image_score(inner.params, videos[:, t], aux) for t in (0, 2, 4)]
    np.testing.assert_allclose(got, np.mean(per_frame, axis=0), rtol=1e-5, atol=1e-6)
    # The prompts matter: scoring every clip with the first prompt changes the scores.
    same = jax.tree.map(lambda a: np.repeat(a[:1], len(a), axis=0), aux)
    assert not np.allclose(score(inner.params, put(videos), jax.tree.map(put, same)), got)

    first = base.build("video_frames", _cfg(reward="world_clip", reduce="first"))
    np.testing.assert_allclose(
        jax.jit(first.fn)(inner.params, videos, aux), per_frame[0], rtol=1e-5, atol=1e-6
    )


def test_host_wrapper_passes_each_clip_s_prompt_and_metadata_to_its_frames():
    """world_oracle is a host reward that reads metadata; jpeg has no per-sample input."""
    rewards.load_plugins()
    videos = _videos(b=4, f=9)
    prompts, meta = _prompts(4)
    video = base.build("video_frames", _cfg(reward="world_oracle", frames=2))
    assert not video.jittable
    oracle = base.build("world_oracle", _cfg())
    expected = (oracle.fn(videos[:, 0], prompts, meta) + oracle.fn(videos[:, 8], prompts, meta)) / 2
    np.testing.assert_array_equal(video.fn(videos, prompts, meta), expected)

    jpeg = base.build("jpeg_incompressibility", _cfg())
    for reduce, frames, picked in (("mean", 4, [0, 3, 5, 8]), ("first", 1, [0])):
        wrapped = base.build("video_jpeg_incompressibility", _cfg(frames=frames, reduce=reduce))
        want = np.mean([jpeg.fn(videos[:, t], prompts, meta) for t in picked], axis=0)
        np.testing.assert_allclose(wrapped.fn(videos, prompts, meta), want, rtol=1e-6)


def test_the_wrapped_reward_s_options_pass_through_and_bad_configs_are_named():
    videos = _videos(b=2, f=3)
    low = base.build("video_jpeg_compressibility", _cfg(frames=1, quality=10))
    high = base.build("video_jpeg_compressibility", _cfg(frames=1, quality=95))
    assert np.all(low.fn(videos, ["a", "b"], [{}, {}]) > high.fn(videos, ["a", "b"], [{}, {}]))

    cases = [
        (_cfg(frames=4), "video_frames.reward is missing"),
        (_cfg(reward="nope"), r"video_frames.reward='nope' is not an image reward"),
        (_cfg(reward="video_saturation"), "is not an image reward"),
        (_cfg(reward="saturation", reduce="max"), r"reduce='max' is not one of"),
        (_cfg(reward="saturation", frames=0), r"frames=0 must be a positive integer"),
        (_cfg(reward="saturation", frames=4, reduce="first"), "frames=4 must be 1"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            base.build("video_frames", cfg)
    images = base.build("video_saturation", _cfg(frames=2))
    with pytest.raises(ConfigError, match=r"scores videos \[B, F, H, W, 3\], got .*\(2, 8, 8, 3\)"):
        images.fn(None, jnp.zeros((2, 8, 8, 3)), {})


# --- remote -----------------------------------------------------------------------------


def _decode(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def _mean_scores(handler: BaseHTTPRequestHandler, request: dict) -> tuple[int, bytes]:
    """A judge: the mean pixel value of each clip (0-255) plus the length of its prompt."""
    scores = [
        float(np.mean([_decode(f) for f in clip])) + len(prompt)
        for clip, prompt in zip(request["frames"], request["prompts"], strict=True)
    ]
    return 200, json.dumps({"scores": scores}).encode()


@pytest.fixture
def server():
    """A local HTTP judge whose behaviour each test sets; records every request."""
    state = {"behaviour": _mean_scores, "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(request)
            status, body = state["behaviour"](self, request)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                pass

        def log_message(self, *args):  # keep pytest's output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/score"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _remote(url: str, **kw) -> base.Reward:
    return base.build("remote", _cfg(**{"url": url, "retries": 0, "timeout": 5.0, **kw}))


def test_remote_reward_posts_frames_prompts_metadata_in_batches(server):
    videos = _videos(b=5, f=9, size=16)
    prompts, meta = _prompts(5)
    reward = _remote(server["url"], batch_size=2, frames=3, options={"dimension": "TA"})
    assert not reward.jittable
    got = reward.fn(videos, prompts, meta)
    pixels = (videos * 255).round().astype(np.uint8)[:, [0, 4, 8]]
    lengths = np.array([len(p) for p in prompts])
    want = pixels.reshape(5, -1).mean(axis=1) + lengths
    np.testing.assert_allclose(got, want, rtol=1e-6)  # PNG is lossless
    requests = server["requests"]
    assert [len(r["frames"]) for r in requests] == [2, 2, 1]
    assert requests[0]["prompts"] == prompts[:2] and requests[2]["metadata"] == meta[4:]
    assert requests[0]["shape"] == [3, 16, 16] and requests[0]["format"] == "png"
    assert requests[0]["options"] == {"dimension": "TA"}
    assert all(len(clip) == 3 for r in requests for clip in r["frames"])
    # Images (rank 4) go as one-frame clips; JPEG is lossy but close.
    jpeg = _remote(server["url"], format="jpeg").fn(videos[:, 0], prompts, meta)
    np.testing.assert_allclose(jpeg, pixels[:, 0].reshape(5, -1).mean(1) + lengths, atol=2.0)
    assert server["requests"][-1]["shape"] == [1, 16, 16]


def test_remote_reward_retries_server_errors_with_backoff(server):
    calls = []

    def flaky(handler, request):
        calls.append(time.monotonic())
        return (503, b"busy") if len(calls) < 3 else _mean_scores(handler, request)

    server["behaviour"] = flaky
    reward = _remote(server["url"], retries=2, backoff=0.05)
    scores = reward.fn(_videos(b=2, f=1, size=8), ["a", "b"], [{}, {}])
    assert scores.shape == (2,) and len(calls) == 3
    assert calls[2] - calls[1] >= 0.09 and calls[1] - calls[0] >= 0.045  # 0.05 s, then 0.1 s


def test_remote_reward_errors_name_the_url(server):
    videos, prompts, meta = _videos(b=2, f=1, size=8), ["a", "b"], [{}, {}]
    url = server["url"]
    answers = {
        "answered malformed JSON": lambda h, r: (200, b"{'scores': [1, 2]"),
        "answered without a 'scores' list": lambda h, r: (200, b'{"score": [1, 2]}'),
        "answered 3 scores for 2 samples": lambda h, r: (200, b'{"scores": [1, 2, 3]}'),
        "answered a score that is not a number: 'high'": lambda h, r: (
            200,
            b'{"scores": [1, "high"]}',
        ),
        "answered HTTP 400: 'no prompts'": lambda h, r: (400, b"no prompts"),
    }
    for message, behaviour in answers.items():
        server["behaviour"] = behaviour
        with pytest.raises(RemoteRewardError, match=f"reward server {url} {message}"):
            _remote(url, retries=2, backoff=0).fn(videos, prompts, meta)
    server["behaviour"] = lambda h, r: (200, b'{"scores": [null, 2.5]}')
    np.testing.assert_array_equal(_remote(url).fn(videos, prompts, meta), [np.nan, 2.5])

    def slow(handler, request):
        time.sleep(0.5)
        return _mean_scores(handler, request)

    server["behaviour"] = slow
    with pytest.raises(RemoteRewardError, match=rf"{url} did not answer \(timed out\) after 2"):
        base.build("remote", _cfg(url=url, timeout=0.1, retries=1, backoff=0)).fn(
            videos, prompts, meta
        )


def test_remote_reward_reports_a_server_that_is_down():
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        url = f"http://127.0.0.1:{probe.server_address[1]}/score"  # closed below: refused
    reward = base.build("remote", _cfg(url=url, retries=1, backoff=0.01, timeout=2.0))
    with pytest.raises(RemoteRewardError, match=rf"{url} did not answer \(.*refused.*\) after 2"):
        reward.fn(_videos(b=1, f=1, size=8), ["a"], [{}])
    for cfg, message in (
        (_cfg(), r"remote.url=None must be the scoring endpoint"),
        (_cfg(url="localhost:8000"), "must be the scoring endpoint"),
        (_cfg(url=url, format="webp"), r"format='webp' is not one of"),
        (_cfg(url=url, batch_size=0), r"batch_size=0 must be a number >= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            base.build("remote", cfg)


def test_the_documented_example_server_scores_what_the_reward_sends():
    """The module docstring's example server, run as written (on a free port)."""
    doc = remote.__doc__
    start = doc.index("    import base64")
    end = doc.index("ThreadingHTTPServer((")
    namespace: dict = {}
    exec(textwrap.dedent(doc[start:end]), namespace)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), namespace["Handler"])
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/score"
        videos = _videos(b=3, f=4, size=8)
        got = base.build("remote", _cfg(url=url)).fn(videos, ["a", "b", "c"], [{}] * 3)
    finally:
        httpd.shutdown()
        httpd.server_close()
    want = (videos * 255).round().reshape(3, -1).mean(axis=1) / 255
    np.testing.assert_allclose(got, want, rtol=1e-6)
