"""configs/study.py's study trained on a weaker learned reward: the noisy-reward condition.

    python launch/study.py --config=configs/study_noisy.py --outdir=docs/study_powered/noisy_reward

BPGO's claim is about unreliable rewards; this condition makes the reward
less reliable and changes nothing else: the same methods, grid, seeds,
prompt sets and evaluations, with `world_clip` (trained on and logged as
`eval_world_clip`) read from the weak reward model, shipped in
bpgo_jax/world/assets/reward_model_weak/ (made by configs/reward_model_weak.py).
Every method is tuned again, on the dev sets, under this reward. The oracle
still judges. Another reward model:
`--config=configs/study_noisy.py:PATH/reward_model.msgpack`.
"""

from bpgo_jax.configs import study
from bpgo_jax.configs.common import ASSETS

WEAK_REWARD_MODEL = str(ASSETS / "reward_model_weak" / "reward_model.msgpack")


def get_config(reward_model: str = WEAK_REWARD_MODEL):
    c = study.get_config()
    c.rewards.world_clip.path = reward_model
    # The learned-reward curve is the reward the runs are trained on.
    c.eval.rewards.world_clip.path = reward_model
    return c
