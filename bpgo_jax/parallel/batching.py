"""Splitting a sharded batch into chunks without moving data between devices.

A global batch `[B]` sharded over D devices holds rows `d*B/D ... (d+1)*B/D`
on device d. Naively reshaping it to `[n, B/n]` would give every chunk to a few
devices and make XLA shuffle data. Reshaping to `[D, n, c]` and swapping the
first two axes gives chunks of `[D*c]` with `c` rows from *every* device, so
each device keeps computing on its own rows, and every model call sees exactly
`c` rows per device, whatever the size of the surrounding batch. That fixed
per-device shape is what makes rollout and training log-probs bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def split_chunks(tree: PyTree, num_chunks: int, num_shards: int) -> PyTree:
    """`[B, ...] -> [num_chunks, B / num_chunks, ...]`, each chunk spread over shards."""

    def split(x):
        if x.shape[0] % (num_chunks * num_shards):
            raise ValueError(
                f"batch of {x.shape[0]} does not split into "
                f"{num_chunks} chunks x {num_shards} shards"
            )
        x = x.reshape(num_shards, num_chunks, -1, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(num_chunks, -1, *x.shape[3:])

    return jax.tree.map(split, tree)


def merge_chunks(tree: PyTree, num_shards: int) -> PyTree:
    """Inverse of `split_chunks`."""

    def merge(x):
        n = x.shape[0]
        x = x.reshape(n, num_shards, -1, *x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[3:])

    return jax.tree.map(merge, tree)


def map_in_chunks(
    fn: Callable[[PyTree], PyTree], tree: PyTree, num_chunks: int, num_shards: int
) -> PyTree:
    """`fn` over `num_chunks` sequential chunks of the batch (one call if 1)."""
    if num_chunks == 1:
        return fn(tree)
    out = jax.lax.map(fn, split_chunks(tree, num_chunks, num_shards))
    return merge_chunks(out, num_shards)
