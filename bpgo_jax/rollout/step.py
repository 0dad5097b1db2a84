"""The rollout stage: sample with log-probs, decode, score the jittable rewards.

`rollout_step` is the device program of one rollout batch; `generate` calls it
over the batches of a prompt list and adds the host rewards (e.g. JPEG size),
so the rest of the loop sees one `Rollout` of global, batch-sharded arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tqdm import tqdm

from bpgo_jax.parallel.batching import map_in_chunks
from bpgo_jax.parallel.host import to_host
from bpgo_jax.parallel.mesh import on_mesh
from bpgo_jax.prompts import PromptSet, sample_prompts
from bpgo_jax.rewards import RewardSet
from bpgo_jax.rollout import samplers

Params = Any


class Rollout(NamedTuple):
    """Samples of a prompt list; device leaves are global, batch-major arrays."""

    latents: jax.Array  # [B, T + 1, *latent] the input of every step, then the sample
    outputs: jax.Array  # [B, T, *latent] the behaviour policy's network outputs
    cond: Any  # text conditioning pytree, leading axis B
    scores: dict[str, jax.Array]  # reward name -> [B]
    images: np.ndarray  # this host's decoded samples, float [b, H, W, 3] in [0, 1]
    prompts: list[str]  # this host's prompt of each of its samples


def rollout_step(
    trainable: Params,
    frozen: Params,
    reward_params: dict,
    tokens: jax.Array,
    uncond_tokens: jax.Array,
    sample_idx: jax.Array,
    epoch_key: jax.Array,
    aux: dict,
    *,
    model,
    sampler: samplers.Sampler,
    reward_set: RewardSet,
    num_chunks: int,
    num_shards: int,
    init_group: int = 1,
):
    """One rollout batch: `(latents, outputs, cond, images, jittable scores)`.

    Sample i's noise comes from `fold_in(epoch_key, sample_idx[i])` alone, so it
    does not depend on the batch size or the mesh. `init_group` > 1:
    consecutive blocks of that many samples (a GRPO group) share their first
    sample's initial noise (DanceGRPO).
    """
    key = jax.random.wrap_key_data(epoch_key)
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))
    keys = sample_keys(sample_idx)
    init_keys = None if init_group == 1 else sample_keys(sample_idx - sample_idx % init_group)
    cond = model.encode_text(frozen, tokens)
    uncond = model.encode_text(frozen, uncond_tokens)
    traj = samplers.sample(
        model,
        sampler,
        trainable,
        frozen,
        cond,
        uncond,
        keys,
        num_chunks=num_chunks,
        num_shards=num_shards,
        init_keys=init_keys,
    )
    images = map_in_chunks(
        lambda z: model.decode(frozen, z), traj.latents[:, -1], num_chunks, num_shards
    )
    scores = reward_set.score_jittable(reward_params, images, aux)
    return traj.latents, traj.outputs, cond, images, scores


def jit_rollout_step(
    *,
    model,
    sampler: samplers.Sampler,
    reward_set: RewardSet,
    num_chunks: int,
    num_shards: int,
    batch_sharding: NamedSharding,
    init_group: int = 1,
):
    """`rollout_step` compiled with every output split over the batch axes, traced on
    their mesh (`parallel.mesh.on_mesh`)."""
    step = functools.partial(
        rollout_step,
        model=model,
        sampler=sampler,
        reward_set=reward_set,
        num_chunks=num_chunks,
        num_shards=num_shards,
        init_group=init_group,
    )
    return jax.jit(
        on_mesh(step, batch_sharding.mesh),
        out_shardings=batch_sharding,
    )


def to_global(local: np.ndarray, batch_sharding: NamedSharding) -> jax.Array:
    """A batch-sharded global array from this host's rows (`local_rows` order)."""
    return jax.make_array_from_process_local_data(batch_sharding, np.asarray(local))


def to_local(arr: jax.Array, batch_sharding: NamedSharding) -> np.ndarray:
    """This host's rows of a batch-sharded global array (`local_rows` order)."""
    if jax.process_count() == 1:
        return np.asarray(arr)
    local = multihost_utils.global_array_to_host_local_array(
        arr, batch_sharding.mesh, batch_sharding.spec
    )
    return np.asarray(local)


def all_hosts_images(
    images: np.ndarray, batch_sharding: NamedSharding, batch_size: int
) -> np.ndarray:
    """`generate`'s `images` (this host's rows of each `batch_size` call) -> every host's
    samples, in the order of the global arrays. A collective: every process calls it."""
    if jax.process_count() == 1:
        return images
    per_call = len(local_rows(batch_sharding, batch_size))
    calls = [images[i : i + per_call] for i in range(0, len(images), per_call)]
    return np.concatenate([to_host(to_global(c, batch_sharding)) for c in calls])


def local_rows(batch_sharding: NamedSharding, num_rows: int) -> np.ndarray:
    """The global rows of a `[num_rows]` batch-sharded array that this host's devices
    hold, ascending (the order of `to_global`'s and `to_local`'s host arrays).

    Read from the sharding, not assumed to be one contiguous block per host:
    a topology-aware mesh may interleave the hosts' devices along its axes.
    """
    indices = batch_sharding.addressable_devices_indices_map((num_rows,)).values()
    starts = sorted({index[0].indices(num_rows)[:2] for index in indices})
    return np.concatenate([np.arange(lo, hi) for lo, hi in starts]).astype(np.int32)


def generate(
    step_fn,
    prompt_set: PromptSet,
    ids: np.ndarray,
    *,
    per_prompt: int,
    batch_size: int,
    tokenize,
    reward_set: RewardSet,
    reward_params: dict,
    trainable: Params,
    frozen: Params,
    uncond_tokens: jax.Array,
    epoch_key: jax.Array,
    batch_sharding: NamedSharding,
    progress: bool = False,
    desc: str = "rollout",
) -> Rollout:
    """`per_prompt` samples of each prompt `ids` (global ids), `batch_size` per call.

    Sample j of the list is prompt `ids[j // per_prompt]` (a prompt's samples,
    its group, are consecutive) with noise from its index j; call c computes
    samples `c * batch_size ...`, each host its rows of that batch
    (`local_rows`). So the global arrays hold the samples in the same order,
    with the same values, whatever the number of hosts. `len(ids) *
    per_prompt` must be a multiple of `batch_size`.
    """
    rows = local_rows(batch_sharding, batch_size)
    glob = functools.partial(to_global, batch_sharding=batch_sharding)
    device_out, host_scores, images, prompts = [], [], [], []
    starts = range(0, len(ids) * per_prompt, batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
        index = start + rows
        prompt_index = sample_prompts(ids, per_prompt, index)
        texts: Sequence[str] = [prompt_set.prompts[i] for i in prompt_index]
        meta = [prompt_set.metadata[i] for i in prompt_index]
        out = step_fn(
            trainable,
            frozen,
            reward_params,
            glob(tokenize(texts)),
            uncond_tokens,
            glob(index),
            epoch_key,
            jax.tree.map(glob, reward_set.prepare(texts, meta)),
        )
        batch_images = to_local(out[3], batch_sharding)
        scores = reward_set.score_host(batch_images, texts, meta)
        device_out.append(out)
        host_scores.append({k: glob(v) for k, v in scores.items()})
        images.append(batch_images)
        prompts.extend(texts)
    cat = lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0]
    latents, outputs, cond, _, jit_scores = jax.tree.map(cat, *device_out)
    scores = {**jit_scores, **jax.tree.map(cat, *host_scores)}
    return Rollout(latents, outputs, cond, scores, np.concatenate(images), prompts)
