"""Run logs: one `RunLogger` over the metrics writers a config asks for.

Every run writes WORKDIR/metrics.jsonl (one JSON object per row, the file
users plot from) and the newest image grid of each tag as
WORKDIR/<tag>_latest.png (video samples: <tag>_latest.gif and .mp4);
`log.tensorboard` adds TensorBoard event files and `log.wandb.enabled` a
Weights & Biases run, both with the same rows, grids and videos. Each
backend is a `MetricsWriter` (`write_scalars`, `write_images`,
`write_video`, `close`).
Only process 0 writes, so rows and images must already be on the host: a
multi-process run reads its global arrays with `parallel.host.to_host` on
every process (a collective) before handing them to the logger.

The workdir may be an object-store URL (`gs://bucket/run`): metrics.jsonl is
then rewritten whole after each row (`jsonl.JsonlWriter`), grids are
whole-object writes, and TensorBoard's event file is written locally and
uploaded after each row (`tensorboard.TensorBoardWriter`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from bpgo_jax.checkpoint.paths import workdir_path
from bpgo_jax.logs.images import LatestImageWriter, captioned_grid, save_png, save_sample
from bpgo_jax.logs.jsonl import JsonlWriter, jsonable, truncate_jsonl
from bpgo_jax.logs.video import DEFAULT_FPS, captioned_video, save_gif, save_mp4
from bpgo_jax.logs.writer import INDEX_KEYS, MetricsWriter, row_step

__all__ = [
    "INDEX_KEYS",
    "JsonlWriter",
    "LatestImageWriter",
    "MetricsWriter",
    "RunLogger",
    "captioned_grid",
    "captioned_video",
    "jsonable",
    "row_step",
    "save_gif",
    "save_mp4",
    "save_png",
    "save_sample",
    "truncate_jsonl",
]

log = logging.getLogger("bpgo_jax")


class RunLogger:
    """The writers of one run, built from `log_config` (a config's `log` block).

    `log_config` fields: `tensorboard` (bool) and `wandb` (`enabled`,
    `project`, `entity`, `run_name`, `mode`); None writes metrics.jsonl and
    the PNG grids only. `tensorboard`, when given, overrides the config's.
    `run_config` (a plain dict) becomes the wandb run's config.
    `metrics_file` names the JSONL file in `workdir`.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        log_config: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
        *,
        tensorboard: bool | None = None,
        metrics_file: str = "metrics.jsonl",
    ):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir_path(workdir)
        self.metrics_path = self.workdir / metrics_file
        self.writers: list[MetricsWriter] = []
        if not self.enabled:
            return
        log_config = log_config if log_config is not None else {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = JsonlWriter(self.metrics_path)
        self.writers = [self._jsonl, LatestImageWriter(self.workdir)]
        if tensorboard if tensorboard is not None else log_config.get("tensorboard", False):
            from bpgo_jax.logs.tensorboard import TensorBoardWriter

            self.writers.append(TensorBoardWriter(self.workdir / "tensorboard"))
        wandb_cfg = log_config.get("wandb") or {}
        if wandb_cfg.get("enabled", False):
            from bpgo_jax.logs.wandb_run import WandbWriter

            self.writers.append(
                WandbWriter(
                    self.workdir,
                    project=wandb_cfg.get("project", "bpgo-jax"),
                    entity=wandb_cfg.get("entity", ""),
                    run_name=wandb_cfg.get("run_name", ""),
                    mode=wandb_cfg.get("mode", "online"),
                    run_config=run_config,
                )
            )

    def metrics(self, record: Mapping[str, Any], step: int | None = None) -> None:
        """Writes one row; `step` defaults to its samples_seen, step or epoch field."""
        if not self.enabled:
            return
        clean = {k: jsonable(v) for k, v in record.items()}
        step = row_step(clean) if step is None else step
        for writer in self.writers:
            writer.write_scalars(step, clean)

    def images(
        self,
        tag: str,
        images: np.ndarray,
        captions: list[str],
        step: int,
        *,
        fps: float = DEFAULT_FPS,
    ) -> None:
        """A captioned grid of `images` (float [N, H, W, 3] in [0, 1]) to every writer.

        Videos (rank 5, `[N, F, H, W, 3]`) become a captioned video grid, played
        at `fps`.
        """
        if not self.enabled:
            return
        images = np.asarray(images)
        if images.ndim == 5:
            frames = captioned_video(images, captions)
            for writer in self.writers:
                writer.write_video(tag, frames, captions, step, fps)
            return
        grid = captioned_grid(images, captions)
        for writer in self.writers:
            writer.write_images(tag, grid, captions, step)

    def truncate_after(self, value: int, *, key: str = "epoch") -> None:
        """Drops the metrics rows whose `key` is >= `value` (call on every start).

        A run resuming from the checkpoint of epoch E calls `truncate_after(E)`
        (the rows of epochs E, E+1, ... are computed again); a run with no
        checkpoint calls `truncate_after(0)`, dropping the rows of a run
        killed before its first checkpoint. Pre-training, resuming after step
        S, calls `truncate_after(S + 1, key="step")`.
        """
        if self.enabled:
            truncate_jsonl(self.metrics_path, value, key=key)
            self._jsonl.reload()

    def close(self) -> None:
        """Closes every writer, then raises the first error any of them raised."""
        errors = []
        for writer in self.writers:
            try:
                writer.close()
            except Exception as err:  # the others must still be closed
                errors.append(err)
        self.writers = []
        if errors:
            raise errors[0]
