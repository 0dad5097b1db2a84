"""Orbax checkpoints of the whole run: device state plus host-side metadata.

The device state (`TrainState`: params, optimiser, EMA, priors, RNG, step) is
saved asynchronously; the host metadata (epoch, data position, samples seen,
fault counters, host-side trackers) goes beside it as JSON. Restoring takes
the target shardings from an abstract state, so a run can resume on another
mesh shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int, use_async: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, create=True
        )
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, epoch: int, state: Any, meta: dict, *, force: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(epoch, args=args, force=force)

    def restore(self, epoch: int, like: Any) -> tuple[Any, dict]:
        """Restores onto the shapes, dtypes and shardings of the arrays in `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return out.state, dict(out.meta)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
