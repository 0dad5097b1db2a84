"""The config reaches the update and the DDPO tracker: `advantage.clip` bounds the
tracker's advantages, `train.kl_form` and the CRT mode reach the loss."""

from __future__ import annotations

import numpy as np
from tiny_config import tiny_config

from bpgo_jax.build import build_run, build_training
from bpgo_jax.config import batch_layout
from bpgo_jax.update.step import step_options


def test_tracker_gets_advantage_clip(tmp_path):
    config = tiny_config(
        tmp_path,
        **{"advantage.method": "ddpo_tracker", "advantage.clip": 1.5, "mesh.num_devices": 1},
    )
    training, _ = build_training(*build_run(config))
    # Buffer [0, 0, 0, 10]: the outlier's advantage 1.7320508 is clipped to 1.5.
    out = training.tracker.update(["a"] * 4, np.array([0.0, 0.0, 0.0, 10.0]))
    np.testing.assert_allclose(out, [-0.5773503, -0.5773503, -0.5773503, 1.5], rtol=1e-6)


def _opts(tmp_path, **overrides):
    config = tiny_config(tmp_path, **overrides)
    return step_options(
        config, batch_layout(config, 1), 1, model=None, sampler=None, optimizer=None
    )


def test_step_options_carry_kl_form_and_crt_term(tmp_path):
    assert _opts(tmp_path).kl_form == "gaussian" and _opts(tmp_path).crt_coef == 0.5
    assert _opts(tmp_path, **{"train.kl_form": "flow_grpo"}).kl_form == "flow_grpo"
    # Replace has no CRT surrogate; append keeps crt_coef as its copies' weight.
    assert _opts(tmp_path, **{"advantage.preset": "released"}).crt_coef == 0.0
    append = {"advantage.preset": "custom", "advantage.crt_mode": "append"}
    assert _opts(tmp_path, **append).crt_coef == 0.5
