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
from bpgo_jax.prompts import PromptSet, host_slice
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
    """`rollout_step` compiled with every output split over the batch axes."""
    return jax.jit(
        functools.partial(
            rollout_step,
            model=model,
            sampler=sampler,
            reward_set=reward_set,
            num_chunks=num_chunks,
            num_shards=num_shards,
            init_group=init_group,
        ),
        out_shardings=batch_sharding,
    )


def to_global(local: np.ndarray, batch_sharding: NamedSharding) -> jax.Array:
    """A batch-sharded global array from this host's rows."""
    return jax.make_array_from_process_local_data(batch_sharding, np.asarray(local))


def to_local(arr: jax.Array, batch_sharding: NamedSharding) -> np.ndarray:
    """This host's rows of a batch-sharded global array."""
    if jax.process_count() == 1:
        return np.asarray(arr)
    local = multihost_utils.global_array_to_host_local_array(
        arr, batch_sharding.mesh, batch_sharding.spec
    )
    return np.asarray(local)


def to_host(arr: jax.Array) -> np.ndarray:
    """The whole of a global array on every host (its rows from all processes)."""
    if jax.process_count() == 1:
        return np.asarray(arr)
    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))


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

    Each host samples its share of the prompts; `len(ids) * per_prompt` must be
    a multiple of `batch_size`.
    """
    pc, pi = jax.process_count(), jax.process_index()
    local_ids = host_slice(ids, pi, pc)
    prompts = [prompt_set.prompts[i] for i in local_ids for _ in range(per_prompt)]
    metadata = [prompt_set.metadata[i] for i in local_ids for _ in range(per_prompt)]
    first_index = pi * len(prompts)
    per_call = batch_size // pc
    glob = functools.partial(to_global, batch_sharding=batch_sharding)
    device_out, host_scores, images = [], [], []
    starts = range(0, len(prompts), per_call)
    for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
        texts: Sequence[str] = prompts[start : start + per_call]
        meta = metadata[start : start + per_call]
        index = np.arange(first_index + start, first_index + start + len(texts), dtype=np.int32)
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
    cat = lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0]
    latents, outputs, cond, _, jit_scores = jax.tree.map(cat, *device_out)
    scores = {**jit_scores, **jax.tree.map(cat, *host_scores)}
    return Rollout(latents, outputs, cond, scores, np.concatenate(images), prompts)
