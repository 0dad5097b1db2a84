"""Run logs: metrics.jsonl's format, its truncation on resume, and the backends
(TensorBoard, wandb offline) read back from the files they write."""

from __future__ import annotations

import json
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bpgo_jax.errors import WorkdirError
from bpgo_jax.logs import RunLogger, captioned_grid, truncate_jsonl


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_lines_are_byte_for_byte_the_documented_format(tmp_path):
    """One JSON object per line, json.dumps' default spacing, non-finite -> null."""
    logger = RunLogger(tmp_path, None)
    logger.metrics(
        {
            "epoch": 3,
            "samples_seen": np.int64(64),
            "reward_mean": np.float32(0.5),
            "loss": jnp.asarray(float("nan")),
            "grad_norm": float("inf"),
            "per_group": np.asarray([1.0, float("-inf")]),
            "name": "bpgo",
        }
    )
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"epoch": 3, "samples_seen": 64, "reward_mean": 0.5, "loss": null, '
        '"grad_norm": null, "per_group": [1.0, null], "name": "bpgo"}\n'
    )


def _write_epochs(path: Path, epochs) -> None:
    path.write_text("".join(json.dumps({"epoch": e, "reward_mean": e / 10}) + "\n" for e in epochs))


def test_truncate_after_drops_rows_from_the_resumed_epoch_and_without_a_checkpoint(tmp_path):
    logger = RunLogger(tmp_path, None)
    _write_epochs(logger.metrics_path, [0, 0, 1, 2, 3])  # epoch 0: eval row + first epoch
    logger.truncate_after(2)
    assert [r["epoch"] for r in rows(logger.metrics_path)] == [0, 0, 1]
    # A run killed before its first checkpoint: the re-run starts at epoch 0.
    logger.truncate_after(0)
    assert logger.metrics_path.read_text() == ""
    step_rows = tmp_path / "pretrain.jsonl"
    step_rows.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n')
    truncate_jsonl(step_rows, 3, key="step")
    assert rows(step_rows) == [{"step": 2, "loss": 1.0}]


def test_truncate_drops_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')  # killed mid-write
    truncate_jsonl(path, 5)
    assert path.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'
    assert "dropped 1 line" in caplog.text


def test_truncation_that_cannot_be_written_leaves_the_file_whole(tmp_path):
    """The rewrite goes through a temporary file and os.replace: a write refused
    half-way (here a file-size limit; a full disk alike) keeps every row."""
    path = tmp_path / "metrics.jsonl"
    _write_epochs(path, range(400))
    before = path.read_text()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(WorkdirError, match=f"cannot write {path}: File too large"):
            truncate_jsonl(path, 300)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def _images() -> tuple[np.ndarray, list[str]]:
    images = np.stack([np.full((8, 8, 3), v, np.float32) for v in (0.1, 0.9)])
    return images, ["a red circle", "a blue square"]


def _tfrecords(path: Path) -> list[bytes]:
    """The records of a TFRecord file (TensorBoard's event file format)."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
    return out


def test_tensorboard_gets_the_scalars_against_samples_seen_and_the_grid(tmp_path):
    from tensorboardX.proto import event_pb2

    logger = RunLogger(tmp_path, ml_collections.ConfigDict({"tensorboard": True}))
    logger.images("rollout/images", *_images(), step=32)
    logger.metrics({"epoch": 1, "samples_seen": 32, "reward_mean": 0.25, "loss": float("nan")})
    logger.close()
    (events,) = (tmp_path / "tensorboard").iterdir()
    values = {}
    for record in _tfrecords(events):
        event = event_pb2.Event.FromString(record)
        for v in event.summary.value:
            values[v.tag] = (event.step, v.simple_value if v.HasField("simple_value") else v)
    assert values["reward_mean"] == (32, 0.25)
    assert "epoch" not in values and "samples_seen" not in values and "loss" not in values
    step, image = values["rollout/images"]
    assert step == 32 and image.image.height == captioned_grid(*_images()).shape[0]
    assert (tmp_path / "rollout_images_latest.png").is_file()


def test_tensorboard_writer_leaves_torch_unimported(tmp_path):
    """tensorboardX imports PyTorch where it is installed (seconds of every run's
    start-up) unless kept out; the writer still writes its event file."""
    pytest.importorskip("torch")
    code = (
        "import sys\n"
        "from bpgo_jax.logs.tensorboard import TensorBoardWriter\n"
        f"w = TensorBoardWriter({str(tmp_path)!r})\n"
        "w.write_scalars(1, {'reward_mean': 0.5})\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"  # importable afterwards as ever
        "print(torch.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "torch", proc.stderr[-2000:]
    (events,) = tmp_path.iterdir()
    assert len(_tfrecords(events)) == 2  # the file version, then the scalar


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a wandb transaction log: a 7-byte header, then LevelDB's log
    format (32 KiB blocks of [crc32, length, type] chunks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, out, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            out.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            out.append(pending + chunk)
    return out


def test_wandb_offline_run_holds_the_scalars_and_the_grid_and_keeps_its_id(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    log_cfg = ml_collections.ConfigDict(
        {
            "tensorboard": False,
            "wandb": {
                "enabled": True,
                "project": "bpgo-test",
                "entity": "",
                "run_name": "tiny",
                "mode": "offline",
            },
        }
    )
    workdir = tmp_path / "w"
    logger = RunLogger(workdir, log_cfg, run_config={"advantage": {"method": "bpgo"}})
    run_id = (workdir / "wandb_run_id").read_text().strip()
    logger.images("eval/images", *_images(), step=16)
    logger.metrics({"epoch": 0, "samples_seen": 16, "reward_mean": 0.375, "kl": float("nan")})
    logger.metrics({"epoch": 1, "samples_seen": 32, "reward_mean": 0.625})
    logger.close()
    wandb.teardown()  # finish() may return before wandb's service has written the run file

    (run_dir,) = (workdir / "wandb").glob(f"offline-run-*-{run_id}")
    history, config = [], {}
    for raw in _wandb_records(run_dir / f"run-{run_id}.wandb"):
        record = wandb_internal_pb2.Record.FromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = record.history.item
            history.append({i.key or "/".join(i.nested_key): i.value_json for i in items})
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: i.value_json for i in updates})
    got = {(int(h["_step"]), k): v for h in history for k, v in h.items() if not k.startswith("_")}
    assert json.loads(got[(16, "reward_mean")]) == 0.375
    assert json.loads(got[(32, "reward_mean")]) == 0.625
    assert json.loads(got[(32, "epoch")]) == 1 and (16, "kl") not in got
    assert json.loads(got[(16, "eval/images/_type")]) == "image-file"
    assert json.loads(got[(16, "eval/images/caption")]) == "a red circle | a blue square"
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == 1
    assert json.loads(config["advantage"]) == {"method": "bpgo"}

    again = RunLogger(workdir, log_cfg)  # a restart logs into the same wandb run
    assert again.writers[-1].run.id == run_id
    again.close()


def test_only_process_zero_writes(tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    logger = RunLogger(tmp_path / "w", ml_collections.ConfigDict({"tensorboard": True}))
    logger.metrics({"epoch": 0, "reward_mean": 1.0})
    logger.images("rollout/images", *_images(), step=0)
    logger.truncate_after(0)
    logger.close()
    assert not logger.enabled and not (tmp_path / "w").exists()
