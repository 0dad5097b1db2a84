"""Checkpoints and the workdir: nothing a run writes is lost, damaged or mixed up.

Real Orbax checkpoints of a small pytree throughout; faults are real ones
(truncated and deleted files, a file-size limit that makes the kernel refuse
writes, a second process holding the lock, a process killed while holding it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_config import apply_overrides

from bpgo_jax.checkpoint import (
    Checkpointer,
    WorkdirLock,
    check_run_config,
    lock_workdir,
    prepare_workdir,
)
from bpgo_jax.checkpoint.checkpointer import _one_line
from bpgo_jax.configs.common import base_config
from bpgo_jax.errors import WorkdirError


class State(NamedTuple):
    params: dict
    step: jax.Array


def make_state(value: float, size: int = 6) -> State:
    params = {"w": jnp.full((size,), value), "b": {"c": jnp.full((2, 3), -value)}}
    return State(params, jnp.asarray(int(value), jnp.int32))


def saved(directory: Path, steps=(1, 2, 3), **kw) -> Checkpointer:
    ckpt = Checkpointer(directory, keep=kw.pop("keep", 5), use_async=kw.pop("use_async", False))
    for step in steps:
        ckpt.save(step, make_state(float(step)), {"epoch": step, "big": 2**70}, force=True)
    ckpt.close()
    return Checkpointer(directory, keep=5, use_async=False)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """The kernel refuses writes past `nbytes` in any file (EFBIG), as a full disk would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# --------------------------------------------------------------- Checkpointer
@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused(tmp_path, keep):
    """Orbax's max_to_keep=0 deletes every checkpoint, the final one included."""
    with pytest.raises(WorkdirError, match=r"checkpoint\.keep"):
        Checkpointer(tmp_path / "c", keep=keep)
    assert not (tmp_path / "c").exists()


def test_round_trip_of_a_namedtuple_state_and_a_partial_read(tmp_path):
    ckpt = saved(tmp_path, steps=(4,))
    step, state, meta = ckpt.restore_latest(make_state(0.0))
    assert step == 4 and meta == {"epoch": 4, "big": 2**70}
    np.testing.assert_array_equal(state.params["w"], np.full(6, 4.0))
    assert int(state.step) == 4
    # PLACEHOLDER leaves are not read (read-only tools skip the optimiser state).
    like = State({"w": jax.ShapeDtypeStruct((6,), jnp.float32), "b": {"c": ocp.PLACEHOLDER}}, 0)
    like = like._replace(step=ocp.PLACEHOLDER)
    reader = Checkpointer(tmp_path, keep=1, use_async=False, read_only=True)
    _, part, _ = reader.restore_latest(like)
    np.testing.assert_array_equal(part.params["w"], np.full(6, 4.0))
    assert part.params["b"]["c"] is ocp.PLACEHOLDER
    assert Checkpointer(tmp_path / "empty", keep=1).restore_latest(make_state(0.0)) is None


def _truncate_arrays(step_dir: Path) -> None:
    for f in (step_dir / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _empty_metadata(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").write_text("")


def _delete_files(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "state" / "d")
    (step_dir / "state" / "manifest.ocdbt").unlink()


@pytest.mark.parametrize("damage", [_truncate_arrays, _empty_metadata, _delete_files])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_readable(tmp_path, caplog, damage):
    ckpt = saved(tmp_path)
    damage(tmp_path / "3")
    with caplog.at_level(logging.WARNING, logger="bpgo_jax"):
        step, state, meta = ckpt.restore_latest(make_state(0.0))
    assert step == 2 and meta["epoch"] == 2
    np.testing.assert_array_equal(state.params["w"], np.full(6, 2.0))
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(tmp_path / "3") in warned and "damaged" in warned
    # Moved aside, not deleted; a later save of that step does not collide with it.
    assert (tmp_path / "3.damaged").is_dir() and not (tmp_path / "3").exists()
    assert ckpt.all_steps() == [1, 2]
    ckpt.save(3, make_state(30.0), {"epoch": 3})
    ckpt.close()
    again = Checkpointer(tmp_path, keep=5, use_async=False)
    assert again.restore_latest(make_state(0.0))[0] == 3
    assert (tmp_path / "3.damaged").is_dir()


def test_no_readable_checkpoint_is_one_error_naming_the_directory(tmp_path):
    ckpt = saved(tmp_path, steps=(1, 2))
    for step in ("1", "2"):
        _empty_metadata(tmp_path / step)
    with pytest.raises(WorkdirError, match="no readable checkpoint in " + str(tmp_path)) as err:
        ckpt.restore_latest(make_state(0.0))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing moved


def test_a_state_of_another_shape_is_not_mistaken_for_damage(tmp_path):
    ckpt = saved(tmp_path, steps=(1, 2))
    fits = r"does not fit this run's state \(params/w: stored \(6,\), expected \(7,\)\)"
    with pytest.raises(WorkdirError, match=fits):
        ckpt.restore_latest(make_state(0.0, size=7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


@pytest.mark.parametrize("use_async", [True, False])
def test_a_failed_save_is_one_line_at_that_save_and_keeps_the_older(tmp_path, use_async):
    """A write the kernel refuses (EFBIG here; ENOSPC on a full disk) surfaces as
    WorkdirError naming the step directory at `wait()`, with keep=1 too."""
    ckpt = Checkpointer(tmp_path, keep=1, use_async=use_async)
    ckpt.save(1, make_state(1.0), {"epoch": 1})
    ckpt.wait()
    noise = jax.random.uniform(jax.random.key(0), (1 << 20,))  # 4 MiB that do not compress
    big = make_state(2.0)._replace(params={"w": noise, "b": {"c": jnp.zeros((2, 3))}})
    with file_size_limit(1 << 20), pytest.raises(WorkdirError) as err:
        ckpt.save(2, big, {"epoch": 2})
        ckpt.wait()
    message = str(err.value)
    assert message.startswith(f"checkpoint 2 could not be written to {tmp_path / '2'}: ")
    assert "File too large" in message and "\n" not in message
    ckpt.close()
    assert (tmp_path / "1").is_dir()
    step, state, _ = Checkpointer(tmp_path, keep=1).restore_latest(make_state(0.0))
    assert step == 1 and float(state.params["w"][0]) == 1.0


def test_a_save_error_keeps_the_os_reason_and_drops_the_tensorstore_spec():
    """TensorStore writes the OS's reason mid-message, then a JSON spec longer
    than the line limit; a long workdir path must not push the reason out."""
    path = "/w/" + "deep/" * 80 + "2.orbax-checkpoint-tmp"
    spec = "{" + ",".join(f'\\"k{i}\\":{{}}' for i in range(200)) + "}"
    err = ValueError(
        f'OUT_OF_RANGE: Error writing "step/.zarray" at local file "{path}": Failed to '
        f"write 2649884 bytes to file 14: File too large [os_error_code='27'] "
        f"[tensorstore_spec='{spec}']"
    )
    line = _one_line(err)
    assert "File too large" in line and "tensorstore_spec" not in line and "\n" not in line
    assert len(line) < 450
    spec_only = ValueError(f"x [os_error_code='28'] [tensorstore_spec='{spec}'] " + "y" * 900)
    assert os.strerror(28) in _one_line(spec_only)


# ----------------------------------------------------------------- workdir
def test_prepare_workdir_names_the_path_of_an_unusable_workdir(tmp_path):
    assert prepare_workdir(tmp_path / "a" / "b") == (tmp_path / "a" / "b").absolute()
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(WorkdirError, match=f"workdir {afile} exists and is not a directory"):
        prepare_workdir(afile)
    with pytest.raises(WorkdirError, match=f"cannot create workdir {afile / 'w'}"):
        prepare_workdir(afile / "w")
    with file_size_limit(0), pytest.raises(WorkdirError) as err:  # as on a full disk
        prepare_workdir(tmp_path / "a")
    assert str(err.value) == f"workdir {tmp_path / 'a'} is not writable: File too large"


def test_prepare_workdir_refuses_a_read_only_directory(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user writes read-only directories (root)")
        with pytest.raises(WorkdirError, match=f"workdir {locked} is not writable"):
            prepare_workdir(locked)
    finally:
        locked.chmod(0o700)


HOLDER = """
import sys, time
from bpgo_jax.checkpoint.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_is_refused_and_a_killed_ones_lock_is_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError) as err:
            WorkdirLock(tmp_path).acquire()
        message = str(err.value)
        assert message.startswith(
            f"{tmp_path} is in use by pid {holder.pid} on host {socket.gethostname()} (started "
        ), message
        assert "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL left its owner file behind; the OS lock went with the process.
    assert json.loads((tmp_path / ".lock.owner").read_text())["pid"] == holder.pid
    with lock_workdir(tmp_path) as lock:
        assert lock.held
        owner = json.loads((tmp_path / ".lock.owner").read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(WorkdirError, match=f"in use by pid {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / ".lock.owner").exists()
    WorkdirLock(tmp_path).acquire().release()  # free again after the block


# -------------------------------------------------------------- run config
def _config(**overrides):
    return apply_overrides(base_config(), overrides)


def test_resuming_with_a_config_that_changes_results_is_refused(tmp_path, caplog):
    check_run_config(tmp_path, _config(), allow_change=False)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["sample"]["group_size"] == 8 and stored["mesh"]["shape"] == [-1, 1]
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # a checkpoint to resume from
    check_run_config(tmp_path, _config(), allow_change=False)  # same config
    assert not (tmp_path / "config_history.jsonl").exists()

    changed = _config(**{"sample.group_size": 4, "advantage.method": "grpo", "log.progress": False})
    with pytest.raises(WorkdirError) as err:
        check_run_config(tmp_path, changed, allow_change=False)
    assert str(err.value) == (
        f"{tmp_path} was trained with a different config: advantage.method 'bpgo' -> 'grpo', "
        "sample.group_size 8 -> 4 (pass --allow_config_change to resume anyway)"
    )
    assert json.loads((tmp_path / "config.json").read_text()) == stored  # untouched

    with caplog.at_level(logging.WARNING, logger="bpgo_jax"):
        check_run_config(tmp_path, changed, allow_change=True)
    assert "advantage.method 'bpgo' -> 'grpo'" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["sample"]["group_size"] == 4
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").open()]
    assert len(history) == 1 and history[0]["config"] == stored
    assert history[0]["changes"] == ["advantage.method", "log.progress", "sample.group_size"]


def test_fields_that_do_not_change_results_may_differ_on_resume(tmp_path):
    check_run_config(tmp_path, _config(), allow_change=False)
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    neutral = {
        "train.num_epochs": 40,
        "log.tensorboard": False,
        "log.wandb.enabled": True,
        "checkpoint.keep": 1,
        "checkpoint.use_async": False,
        "mesh.num_devices": 2,
        "distributed.initialize": True,
    }
    check_run_config(tmp_path, _config(**neutral), allow_change=False)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_epochs"] == 40


def test_a_workdir_without_a_checkpoint_takes_the_new_config(tmp_path):
    """A run that failed before its first checkpoint can be fixed and re-run."""
    check_run_config(tmp_path, _config(), allow_change=False)
    (tmp_path / "checkpoints").mkdir()
    check_run_config(tmp_path, _config(**{"model.init": "fixed.msgpack"}), allow_change=False)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["init"] == "fixed.msgpack"
