"""Video logs: rank-5 samples become captioned video grids in GIF / MP4 files, TensorBoard
(an animated GIF image summary) and wandb (a video), each read back from what it wrote."""

from __future__ import annotations

import io
import json
import logging
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image
from test_logs import _tfrecords, _wandb_records  # same tests/ folder

from bpgo_jax.logs import RunLogger, captioned_video, save_sample
from bpgo_jax.logs.video import encode_gif, encode_mp4

FRAMES = 6
CAPTIONS = ["a red circle moving right", "a blue square"]


def _videos() -> np.ndarray:
    """Two 16 x 24 clips whose frames brighten over time (no two frames alike)."""
    level = np.linspace(0.1, 0.9, FRAMES, dtype=np.float32)[None, :, None, None, None]
    colour = np.asarray([[1.0, 0.2, 0.2], [0.2, 0.2, 1.0]], np.float32)[:, None, None, None]
    return np.broadcast_to(level * colour, (2, FRAMES, 16, 24, 3)).copy()


def _gif_frames(data: bytes) -> list[np.ndarray]:
    gif = Image.open(io.BytesIO(data))
    out = []
    for index in range(gif.n_frames):
        gif.seek(index)
        out.append(np.asarray(gif.convert("RGB")))
    return out


def test_captioned_video_keeps_the_aspect_ratio_and_draws_each_frame_and_caption():
    videos = _videos()
    grid = captioned_video(videos, CAPTIONS, tile=48)
    tile_h = 32  # 48 x 16 / 24
    assert grid.dtype == np.uint8 and grid.shape == (FRAMES, tile_h + 40, 2 * 48, 3)
    for t in range(FRAMES):
        want = np.round(videos[:, t, 0, 0] * 255)
        np.testing.assert_allclose(grid[t, tile_h // 2, [24, 72]], want, atol=1)
    captions = grid[:, tile_h:]
    assert (captions < 128).any() and (captions == captions[0]).all()  # drawn once, same text
    with pytest.raises(ValueError, match="N captions"):
        captioned_video(videos, CAPTIONS[:1])


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the MP4 reader's ffmpeg
def test_rank_5_samples_write_gif_and_mp4_beside_the_png_grids(tmp_path):
    import imageio_ffmpeg

    logger = RunLogger(tmp_path, None)
    logger.images("rollout/images", _videos(), CAPTIONS, step=8, fps=8)
    logger.images("eval/images", _videos()[:, 0], CAPTIONS, step=8)  # images: a PNG grid
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval_images_latest.png",
        "rollout_images_latest.gif",
        "rollout_images_latest.mp4",
    ]
    grid = captioned_video(_videos(), CAPTIONS)
    gif = Image.open(tmp_path / "rollout_images_latest.gif")
    assert gif.n_frames == FRAMES and gif.size == grid.shape[2:0:-1]
    assert gif.info["duration"] == 130 and gif.info["loop"] == 0  # 8 fps, in 10 ms units
    for t, frame in enumerate(_gif_frames((tmp_path / "rollout_images_latest.gif").read_bytes())):
        np.testing.assert_allclose(frame[40, 64], grid[t, 40, 64], atol=8)  # palette rounding

    reader = imageio_ffmpeg.read_frames(str(tmp_path / "rollout_images_latest.mp4"))
    meta = next(reader)
    decoded = [np.frombuffer(f, np.uint8).reshape(grid.shape[1:]) for f in reader]
    assert meta["fps"] == 8 and meta["size"] == grid.shape[2:0:-1] and len(decoded) == FRAMES
    np.testing.assert_allclose(decoded[-1][40, 64], grid[-1, 40, 64], atol=12)  # H.264 is lossy


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the MP4 reader's ffmpeg
def test_samples_are_written_as_png_or_as_gif_and_mp4(tmp_path):
    """What launch/sample.py writes for each sample of an image or a video model."""
    import imageio_ffmpeg

    clip = _videos()[0]
    assert save_sample(tmp_path, "00000", clip[0], fps=16) == {"file": "00000.png"}
    png = np.asarray(Image.open(tmp_path / "00000.png"))
    np.testing.assert_array_equal(png, np.round(clip[0] * 255))
    fields = save_sample(tmp_path, "00001", clip, fps=16)
    assert fields == {"file": "00001.gif", "mp4": "00001.mp4", "frames": FRAMES}
    assert Image.open(tmp_path / "00001.gif").n_frames == FRAMES
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "00001.mp4"))
    assert next(reader)["size"] == (24, 16) and sum(1 for _ in reader) == FRAMES
    with pytest.raises(ValueError, match=r"got shape \(16, 24\)"):
        save_sample(tmp_path, "00002", clip[0, ..., 0], fps=16)


def test_without_imageio_ffmpeg_videos_are_gif_only_and_the_log_says_so_once(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if absent
    logger = RunLogger(tmp_path, None)
    with caplog.at_level(logging.INFO, logger="bpgo_jax"):
        for step in (0, 1):
            logger.images("rollout/images", _videos(), CAPTIONS, step=step)
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout_images_latest.gif"]
    assert caplog.text.count("GIF only: MP4 needs `pip install imageio-ffmpeg`") == 1
    assert save_sample(tmp_path, "00000", _videos()[0], fps=16)["mp4"] is None


def test_odd_sized_videos_encode_as_mp4():
    frames = (np.random.default_rng(0).uniform(0, 1, (3, 15, 21, 3))).astype(np.float32)
    data = encode_mp4(frames, fps=4)
    assert data[4:8] == b"ftyp" and len(data) > 100
    assert len(_gif_frames(encode_gif(frames, fps=4))) == 3


def test_tensorboard_holds_the_video_as_an_animated_gif_with_its_prompts(tmp_path):
    from tensorboardX.proto import event_pb2

    logger = RunLogger(tmp_path, ml_collections.ConfigDict({"tensorboard": True}))
    logger.images("rollout/images", _videos(), CAPTIONS, step=32)
    logger.close()
    (events,) = (tmp_path / "tensorboard").iterdir()
    values = {}
    for record in _tfrecords(events):
        event = event_pb2.Event.FromString(record)
        for v in event.summary.value:
            values[v.tag] = (event.step, v)
    step, video = values["rollout/images"]
    grid = captioned_video(_videos(), CAPTIONS)
    assert step == 32 and (video.image.height, video.image.width) == grid.shape[1:3]
    data = video.image.encoded_image_string
    assert data[:6] == b"GIF89a" and len(_gif_frames(data)) == FRAMES
    step, text = values["rollout/images/prompts/text_summary"]
    assert step == 32 and CAPTIONS[0].encode() in text.SerializeToString()


def test_wandb_offline_run_holds_the_video(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    log_cfg = ml_collections.ConfigDict({"wandb": {"enabled": True, "mode": "offline"}})
    workdir = tmp_path / "w"
    logger = RunLogger(workdir, log_cfg)
    run_id = (workdir / "wandb_run_id").read_text().strip()
    logger.images("rollout/images", _videos(), CAPTIONS, step=16)
    logger.close()
    wandb.teardown()  # finish() may return before wandb's service has written the run file

    (run_dir,) = (workdir / "wandb").glob(f"offline-run-*-{run_id}")
    got = {}
    for raw in _wandb_records(run_dir / f"run-{run_id}.wandb"):
        record = wandb_internal_pb2.Record.FromString(raw)
        if record.WhichOneof("record_type") == "history":
            got.update({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    assert json.loads(got["rollout/images/_type"]) == "video-file"
    assert json.loads(got["rollout/images/caption"]) == " | ".join(CAPTIONS)
    (gif,) = (run_dir / "files" / "media" / "videos").rglob("*.gif")
    assert len(_gif_frames(gif.read_bytes())) == FRAMES
