"""Diagnostic: configs/image.py trained on the exact oracle instead of the learned reward.

    python launch/train.py --config=configs/oracle_reward.py --workdir=runs/oracle_reward \
        --config.advantage.method=grpo

A perfect reward bounds what the RL loop can do at a given budget, which
separates "the reward model is too weak" from "the loop does not learn".
Never the default: the oracle is ground truth for evaluation. Results of
earlier bases: docs/status_history.md (linked from docs/results.md).
"""

from bpgo_jax.configs import image


def get_config():
    c = image.get_config()
    c.rewards = {"world_oracle": {"weight": 1.0}}
    return c
