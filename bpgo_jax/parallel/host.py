"""Reading device results on the host, in one process or many.

Host code (metrics, rewards computed in Python, files a tool writes) needs
whole arrays. In a multi-process run a global array is split over devices of
other processes, where `np.asarray` and `jax.device_get` fail; `to_host`
gathers it. Every command reads device results through it, so a tool that
runs on one host also runs as one process of a pod.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(tree: Any) -> Any:
    """Every array of `tree` whole, as numpy, on every host: the one way host code
    reads device results.

    A leaf split over other hosts' devices is all-gathered, a collective that
    every process must reach at the same point of the program (the loop runs
    the same host code everywhere, so it does). Replicated and single-host
    leaves are read from a local device.
    """

    def gather(x: Any) -> Any:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(np.asarray, jax.device_get(jax.tree.map(gather, tree)))
