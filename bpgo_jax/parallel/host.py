"""Moving values between the host and the mesh, in one process or many.

Host code (metrics, rewards computed in Python, files a tool writes) needs
whole arrays. In a multi-process run a global array is split over devices of
other processes, where `np.asarray` and `jax.device_get` fail; `to_host`
gathers it. Every command reads device results through it, so a tool that
runs on one host also runs as one process of a pod. `from_host` is the way
back for values every process holds alike.
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


def from_host(tree: Any, shardings: Any) -> Any:
    """`tree` placed on `shardings` (a matching tree, or one sharding for all), for
    values every process holds alike (a seeded init, config constants, the
    epoch's prompt ids): the inverse of `to_host`.

    One process: `jax.device_put`. Several: each process fills its own
    devices' shards; `jax.device_put` would first compare the value across
    processes with an all-gather per leaf (a collective and a compilation
    each). Leaves that are already global arrays are resharded.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)
