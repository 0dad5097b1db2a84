"""The run config of tests/test_multiprocess.py, for its launched processes and itself.

    python launch/train.py --config=tests/multiprocess_job.py:DIR --workdir=W ...

`DIR/prompts.txt` is the prompt file (`write_prompts`; the config only reads
it, as every process of a job loads the config at once). A one-level tiny
model, two rollout calls and two updates per epoch and reference priors, so
the order of samples across calls and hosts, and the priors' host reads, are
exercised. The
`sigterm_process` reward (weight 0: it changes no result) sends SIGTERM to
process `process` of the job the first time that process scores a batch,
when `marker` names a file that does not exist yet (it is created).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_config import PROMPTS, tiny_config  # noqa: E402

from bpgo_jax.rewards.base import Reward, register  # noqa: E402

SIGTERM_REWARD = "sigterm_process"


@register(SIGTERM_REWARD)
def _sigterm_reward(cfg) -> Reward:
    process, marker = int(cfg.process), str(cfg.marker)

    def score(images, prompts, metadata):
        del prompts, metadata
        import jax

        if marker and jax.process_index() == process and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGTERM)
        return np.zeros(len(images), np.float32)

    return Reward(name=SIGTERM_REWARD, jittable=False, fn=score)


def write_prompts(directory: str | Path) -> None:
    (Path(directory) / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")


def get_config(directory: str):
    with tempfile.TemporaryDirectory() as scratch:  # tiny_config writes a prompt file there
        config = tiny_config(
            Path(scratch),
            **{
                # One UNet level, no attention there: the smallest programs to compile.
                "model.channels": (8,),
                "model.attn_levels": (),
                "sample.batch_size": 8,
                "train.batch_size": 8,
                "train.micro_batch_size": 8,
                # Adam divides by sqrt(v): with the default eps, float noise in a
                # near-zero gradient (another summation order) moves a weight by a
                # whole learning-rate step; this eps keeps such steps as small as the noise.
                "train.adam_eps": 1e-4,
                "prior.kind": "reference",
                "log.progress": False,
                "rewards": {
                    "saturation": {"weight": 1.0},
                    SIGTERM_REWARD: {"weight": 0.0, "process": 1, "marker": ""},
                },
            },
        )
    config.prompts.path = str(Path(directory) / "prompts.txt")
    return config
