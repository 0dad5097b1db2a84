"""The first-frame prior of image-to-video runs (BPGO's I2V setting).

Each prompt's prior is the configured reward of a static clip made of its
conditioning frame: the frame repeated `num_frames` times, in the decoded
space the rewards read (`[B, F, H, W, 3]` in [0, 1]), scored by the same
reward code as the samples (jittable rewards under jit, host rewards on the
host), weighted into the total. It is computed once, at the fresh start of
a run (a resumed run restores it: `build.build_training(resuming=True)`),
and then kept like a `fixed` prior (`state.KINDS`): a checkpointed
`PriorState` that no epoch updates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bpgo_jax.parallel.host import from_host, to_host
from bpgo_jax.parallel.mesh import on_mesh
from bpgo_jax.prompts import PromptSet
from bpgo_jax.rewards import RewardSet

log = logging.getLogger("bpgo_jax")


def static_clips(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """uint8 frames `[B, H, W, 3]` (`prompts.images`) -> clips `[B, F, H, W, 3]` in [0, 1]."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    if np.asarray(frames).dtype != np.uint8:
        raise ValueError(f"frames must be uint8 images, got {np.asarray(frames).dtype}")
    still = np.asarray(frames, np.float32) / 255.0
    return np.repeat(still[:, None], num_frames, axis=1)


def first_frame_priors(
    frames: np.ndarray,
    prompt_set: PromptSet,
    reward_set: RewardSet,
    reward_params: dict,
    *,
    num_frames: int,
    batch_size: int = 8,
    ids: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """float32 `[P]`: the total reward of each prompt's static clip of `frames[i]`.

    `frames` uint8 `[P, H, W, 3]` are the prompts' conditioning frames in
    `prompt_set` order (or of the prompts `ids`), scored `batch_size` at a time;
    `mesh`: the one `reward_params` are placed on (its attention kernels are traced
    for it, `parallel.mesh.on_mesh`).
    """
    ids = np.arange(len(prompt_set)) if ids is None else np.asarray(ids)
    if len(frames) != len(ids):
        raise ValueError(f"{len(frames)} frames for {len(ids)} prompts")
    score = jax.jit(on_mesh(reward_set.score_jittable, mesh))
    # Every process computes every clip: inputs replicated on the mesh the params are on
    # (in a multi-process run a host array would sit on this process's devices only).
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    place = lambda tree: jax.device_put(tree) if mesh is None else from_host(tree, replicated)
    out = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        clips = static_clips(frames[start : start + batch_size], num_frames)
        prompts = [prompt_set.prompts[i] for i in rows]
        metadata = [prompt_set.metadata[i] for i in rows]
        aux = jax.tree.map(np.asarray, reward_set.prepare(prompts, metadata))
        parts = to_host(score(reward_params, place(clips), place(aux)))
        parts.update(reward_set.score_host(clips, prompts, metadata))
        out.append(np.asarray(reward_set.total(parts), np.float32))
    return np.concatenate(out)


def run_first_frame_priors(run, n: int | None = None) -> np.ndarray:
    """`first_frame_priors` of the first `n` (default: all) prompts of a `build.Run`, each
    prompt's conditioning image read at the run's resolution."""
    from bpgo_jax.models.dit.pipeline import image_size
    from bpgo_jax.models.wan.pipeline import DEFAULT_FRAMES, DEFAULT_SIZE
    from bpgo_jax.prompts.images import condition_images

    config, prompts = run.config, run.prompts
    n = len(prompts) if n is None else n
    height, width = image_size(config.model.get("resolution", None), DEFAULT_SIZE)
    frames, rows = condition_images([(config.prompts.path, prompts)], height, width)
    frames = frames[[rows[prompts.prompts[i]] for i in range(n)]]
    log.info("first-frame priors: scoring the static clips of %d prompts", n)
    return first_frame_priors(
        frames,
        prompts,
        run.rewards,
        run.reward_params,
        num_frames=int(config.model.get("num_frames", DEFAULT_FRAMES)),
        batch_size=config.sample.batch_size,
        ids=range(n),
        mesh=run.mesh,
    )
