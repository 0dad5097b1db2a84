"""configs/study.py's study trained on a weaker learned reward: the noisy-reward condition.

    python launch/train_reward_model.py --config=configs/reward_model_weak.py \
        --workdir=workdirs/reward_model_weak
    python launch/study.py --config=configs/study_noisy.py --outdir=docs/study_powered/noisy_reward

BPGO's claim is about unreliable rewards; this condition makes the reward
less reliable and changes nothing else: the same methods, grid, seeds,
prompt sets and evaluations, with `world_clip` (trained on and logged as
`eval_world_clip`) read from the weak reward model. Every method is tuned
again, on the dev sets, under this reward. The oracle still judges.
Another path: `--config=configs/study_noisy.py:PATH/reward_model.msgpack`.
"""

from bpgo_jax.configs import study

WEAK_REWARD_MODEL = "workdirs/reward_model_weak/reward_model.msgpack"


def get_config(reward_model: str = WEAK_REWARD_MODEL):
    c = study.get_config()
    c.rewards.world_clip.path = reward_model
    # The learned-reward curve is the reward the runs are trained on.
    c.eval.rewards.world_clip.path = reward_model
    return c
