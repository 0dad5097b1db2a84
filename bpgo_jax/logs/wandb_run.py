"""Weights & Biases: the same rows, image grids and videos as the other writers, in one
wandb run per workdir.

`wandb` is an optional dependency, imported only when `log.wandb.enabled`.
The run's id is kept in WORKDIR/wandb_run_id, so every restart of a workdir
logs into the same wandb run (`resume="allow"`); wandb's files go under
WORKDIR/wandb (with `mode="offline"` that is all it writes, for `wandb sync`).
wandb steps only grow: rows a resumed run computes again (the epochs after
its last checkpoint) keep the values first sent, while metrics.jsonl holds
the recomputed ones. wandb writes local files only: for an object-store
workdir (`gs://`) the run id is kept in the workdir as usual and wandb's files
go under ./wandb of the working directory (wandb's default).
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bpgo_jax.checkpoint.paths import is_remote, workdir_path
from bpgo_jax.checkpoint.workdir import atomic_write
from bpgo_jax.errors import ConfigError
from bpgo_jax.logs.video import encode_gif

RUN_ID_FILE = "wandb_run_id"
MODES = ("online", "offline", "disabled")


class WandbWriter:
    """Logs numeric fields (index fields included, to plot against), grids and videos."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        project: str,
        entity: str = "",
        run_name: str = "",
        mode: str = "online",
        run_config: Mapping[str, Any] | None = None,
    ):
        if mode not in MODES:
            raise ConfigError(f"log.wandb.mode={mode!r} is not one of {MODES}")
        try:
            import wandb
        except ImportError as err:
            raise ConfigError(
                "log.wandb.enabled=True needs the wandb package (pip install wandb)"
            ) from err
        workdir = workdir_path(workdir)
        id_file = workdir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(8)
            atomic_write(id_file, run_id + "\n")
        self._wandb = wandb
        self.run = wandb.init(
            project=project or None,
            entity=entity or None,
            name=run_name or None,
            mode=mode,
            dir=None if is_remote(workdir) else str(workdir),
            id=run_id,
            resume="allow",
            config=dict(run_config or {}),
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        numeric = {k: v for k, v in scalars.items() if isinstance(v, int | float)}
        if numeric:
            self.run.log(numeric, step=step)

    def write_images(self, tag: str, grid: np.ndarray, captions: Sequence[str], step: int) -> None:
        image = self._wandb.Image(grid, caption=" | ".join(captions))
        self.run.log({tag: image}, step=step)

    def write_video(
        self, tag: str, frames: np.ndarray, captions: Sequence[str], step: int, fps: float
    ) -> None:
        # Encoded GIF bytes: wandb encodes raw arrays with moviepy, which is not needed here.
        clip = self._wandb.Video(
            io.BytesIO(encode_gif(frames, fps)), caption=" | ".join(captions), format="gif"
        )
        self.run.log({tag: clip}, step=step)

    def close(self) -> None:
        self.run.finish()
