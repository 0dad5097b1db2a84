"""Pre-training's parts: the flow loss and step, the data pipeline.

Whole runs (the commands, resuming, the shipped generator): test_pretrain_runs.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bpgo_jax import pretrain
from bpgo_jax.configs.image import get_config as image_config
from bpgo_jax.configs.pretrain import get_config as pretrain_config
from bpgo_jax.models.text import BOS_ID, PAD_ID
from bpgo_jax.models.tiny import tiny_model


def tiny_cfg() -> ml_collections.ConfigDict:
    c = image_config().model
    c.update(
        init="random",
        resolution=8,
        channels=(8, 16),
        attn_levels=(1,),
        heads=2,
        vocab_size=256,
        max_length=8,
        text_width=16,
        text_depth=1,
    )
    return c


def train_cfg(**kw) -> ml_collections.ConfigDict:
    c = pretrain_config().train
    c.update(kw)
    return c


def test_flow_loss_matches_hand_computation():
    model = tiny_model(tiny_cfg())
    trainable, frozen = model.init(jax.random.key(0))
    # Non-zero output layer, so the prediction is not trivially zero.
    trainable = jax.tree.map(lambda p: p + 0.05, trainable)
    params = {"trainable": trainable, "frozen": frozen}
    x0 = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
    tokens = jnp.asarray(model.tokenize(["a red circle", "", "a blue box on the left"]))
    rng = jax.random.key(2)
    # The same draws the loss makes: noise, then s ~ U(1e-3, 1).
    k_noise, k_time = jax.random.split(rng)
    noise = np.asarray(jax.random.normal(k_noise, x0.shape))
    s = np.asarray(jax.random.uniform(k_time, (3,), minval=1e-3, maxval=1.0))
    x_s = (1 - s[:, None, None, None]) * np.asarray(x0) + s[:, None, None, None] * noise

    @jax.jit  # one compile for both: the loss and the raw network output at x_s, 1000 s
    def both(p):
        cond = model.encode_text(p["frozen"], tokens)
        v = model.predict(
            p["trainable"], p["frozen"], jnp.asarray(x_s), jnp.asarray(1000 * s), cond
        )
        return pretrain.flow_matching_loss(model, p, x0, tokens, rng), v

    got, v = both(params)
    want = np.mean((np.asarray(v) - (noise - np.asarray(x0))) ** 2)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_space_to_depth_round_trip_keeps_patches_together():
    from bpgo_jax.models.tiny import depth_to_space, space_to_depth

    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 2, 3, 12)
    # position (i, j) holds the 2x2 pixel patch at rows 2i..2i+1, columns 2j..2j+1
    np.testing.assert_array_equal(y[1, 1, 2].reshape(2, 2, 3), x[1, 2:4, 4:6])
    np.testing.assert_array_equal(depth_to_space(y, 2), x)


def test_train_step_reduces_loss_and_trains_text_encoder():
    cfg = tiny_cfg()
    cfg.patch = 2  # the shipped generator's 2x2 pixel patches (patch 1: the other tests)
    model = tiny_model(cfg)
    opt = pretrain.pretrain_optimizer(train_cfg(steps=30, lr=1e-2, warmup_steps=2))
    state = pretrain.init_state(model, opt, jax.random.key(0))
    text_before = jax.tree.map(np.asarray, state.params["frozen"])
    batch = pretrain.sample_batch(np.random.default_rng(0), 8, model.tokenize, 0.0)
    images = jax.image.resize(jnp.asarray(batch["images"]), (8, 8, 8, 3), "linear")
    tokens = jnp.asarray(batch["tokens"])

    @jax.jit
    def eval_loss(params):  # fixed noise draws, so before/after compare like for like
        keys = jax.random.split(jax.random.key(99), 8)
        loss = lambda k: pretrain.flow_matching_loss(model, params, images, tokens, k)
        return jax.vmap(loss)(keys).mean()

    before = float(eval_loss(state.params))
    step = pretrain.make_pretrain_step(model, opt, ema_decay=0.5)
    for _ in range(30):
        state, metrics = step(state, images, tokens, jax.random.key(1))
    after = float(eval_loss(state.params))
    assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 30
    # 1.43 -> ~1.06: zero output at init gives E|noise - x0|^2; learning lowers it.
    assert after < 0.85 * before, (before, after)
    changed = jax.tree.map(
        lambda a, b: bool(np.any(a != np.asarray(b))), text_before, state.params["frozen"]
    )
    assert all(jax.tree.leaves(changed)), "text encoder must be trained too"
    assert float(eval_loss(state.ema)) < 0.9 * before  # the EMA tracks the weights


def test_freeze_text_trains_the_unet_only():
    model = tiny_model(tiny_cfg())
    opt = pretrain.pretrain_optimizer(train_cfg(steps=5, lr=1e-2, warmup_steps=1, freeze_text=True))
    state = pretrain.init_state(model, opt, jax.random.key(0))
    before = jax.tree.map(np.asarray, state.params)
    batch = pretrain.sample_batch(np.random.default_rng(0), 4, model.tokenize, 0.0)
    images = jax.image.resize(jnp.asarray(batch["images"]), (4, 8, 8, 3), "linear")
    step = pretrain.make_pretrain_step(model, opt)
    for _ in range(3):
        state, _ = step(state, images, jnp.asarray(batch["tokens"]), jax.random.key(1))
    same = lambda a, b: bool(np.array_equal(a, np.asarray(b)))
    assert all(jax.tree.leaves(jax.tree.map(same, before["frozen"], state.params["frozen"])))
    unchanged = jax.tree.map(same, before["trainable"], state.params["trainable"])
    assert not any(jax.tree.leaves(unchanged)), "every UNet tensor should have moved"


def test_time_shift_moves_training_to_high_noise():
    rng = jax.random.key(0)
    base = np.asarray(pretrain.sample_times(rng, 4096, "uniform"))
    shifted = np.asarray(pretrain.sample_times(rng, 4096, "uniform", 3.0))
    np.testing.assert_allclose(shifted, 3 * base / (1 + 2 * base), rtol=1e-6)  # s=0.5 -> 0.75
    assert base.min() > 0.0 and base.max() <= 1.0 and shifted.max() <= 1.0
    assert abs(np.mean(base > 0.6) - 0.4) < 0.03 and abs(np.mean(shifted > 0.6) - 2 / 3) < 0.03
    logit = np.asarray(pretrain.sample_times(rng, 4096, "logit_normal"))
    assert abs(np.median(logit) - 0.5) < 0.03


def test_make_pretrain_step_rejects_bad_settings():
    model = tiny_model(tiny_cfg())
    opt = pretrain.pretrain_optimizer(train_cfg())
    with pytest.raises(ValueError, match="ema_decay"):
        pretrain.make_pretrain_step(model, opt, ema_decay=1.0)
    with pytest.raises(ValueError, match="time_sampling"):
        pretrain.make_pretrain_step(model, opt, time_sampling="cosine")
    with pytest.raises(ValueError, match="time_shift"):
        pretrain.make_pretrain_step(model, opt, time_shift=0.0)


def test_caption_dropout_rate_and_batches():
    rng = np.random.default_rng(0)
    caps = [f"caption {i}" for i in range(4000)]
    assert pretrain.drop_captions(caps, rng, 0.0) == caps
    assert set(pretrain.drop_captions(caps, rng, 1.0)) == {""}
    dropped = np.mean([c == "" for c in pretrain.drop_captions(caps, rng, 0.1)])
    assert 0.08 < dropped < 0.12
    with pytest.raises(ValueError, match="caption_dropout"):
        pretrain.drop_captions(caps, rng, 1.5)

    model = tiny_model(tiny_cfg())
    batch = pretrain.sample_batch(np.random.default_rng(1), 16, model.tokenize, 1.0)
    assert batch["images"].shape == (16, 32, 32, 3)
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    # Background is dark grey, so most pixels sit well below zero.
    assert np.median(batch["images"]) < -0.5
    # Dropped captions are the empty prompt: BOS then padding, as the sampler's uncond.
    assert np.all(batch["tokens"][:, 0] == BOS_ID) and np.all(batch["tokens"][:, 1:] == PAD_ID)


def test_pick_checkpoint_keeps_headroom():
    evals = [{"step": s, "oracle_accuracy": a} for s, a in ((1, 0.1), (2, 0.5), (3, 0.8))]
    assert pretrain.pick_checkpoint(evals, 0.7)["step"] == 2
    assert pretrain.pick_checkpoint(evals, 0.9)["step"] == 3
    assert pretrain.pick_checkpoint(evals, 0.05)["step"] == 1
    with pytest.raises(ValueError):
        pretrain.pick_checkpoint([], 0.7)


def test_text_encoder_from_clip_tower_starts_as_the_towers_features():
    """A deeper generator encoder over copied weights computes the donor's layers
    exactly (its extra layer starts as the identity); the donor's own layers
    and embeddings are copied, not re-initialised."""
    from bpgo_jax.world import reward_model

    rm_cfg = reward_model.RewardModelConfig(
        vocab_size=256, max_length=8, text_width=16, text_depth=1, text_heads=2, embed_dim=8
    )
    tower = reward_model.init_params(rm_cfg, jax.random.key(3))["text_tower"]
    tower = jax.tree.map(lambda p: p + 0.1, tower)  # non-trivial norms and biases
    cfg1, cfg2 = tiny_cfg(), tiny_cfg()
    cfg2.text_depth = 2
    one, two = tiny_model(cfg1), tiny_model(cfg2)
    text1 = pretrain.text_from_clip(one.init(jax.random.key(0))[1]["text"], tower)
    text2 = pretrain.text_from_clip(two.init(jax.random.key(1))[1]["text"], tower)
    np.testing.assert_array_equal(
        text1["token_embedding"]["embedding"], tower["token_embedding"]["embedding"]
    )
    np.testing.assert_array_equal(
        text2["attn_0"]["query"]["kernel"], tower["attn_0"]["query"]["kernel"]
    )
    assert np.abs(np.asarray(text2["attn_1"]["query"]["kernel"])).sum() > 0  # kept its init
    tokens = jnp.asarray(one.tokenize(["a red circle", "two shapes: a blue box and a dot"]))
    h1 = one.encode_text({"text": text1}, tokens)["hidden"]
    h2 = two.encode_text({"text": text2}, tokens)["hidden"]
    np.testing.assert_allclose(np.asarray(h2), np.asarray(h1), atol=1e-6)
    bad = {"proj": tower["proj"]}
    with pytest.raises(ValueError, match="does not match"):
        pretrain.text_from_clip(text1, bad)


def test_evaluate_oracle_does_not_depend_on_batch_size():
    cfg = tiny_cfg()
    cfg.resolution = 32  # the oracle reads world-sized images only
    model = tiny_model(cfg)
    trainable, frozen = model.init(jax.random.key(0))
    prompts = ["a red circle", "a blue square", "a small green cross"]
    cons = [{"objects": [{"color": "red", "shape": "circle"}], "relation": None, "count": None}]
    cons = cons * 3
    sample_cfg = image_config().sample
    acc, ok, a = pretrain.evaluate_oracle(
        model, trainable, frozen, sample_cfg, prompts, cons, batch_size=2
    )
    _, _, b = pretrain.evaluate_oracle(
        model, trainable, frozen, sample_cfg, prompts, cons, batch_size=3
    )
    assert a.shape == (3, 32, 32, 3) and ok.shape == (3,) and acc == 0.0  # untrained noise
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="constraints"):
        pretrain.evaluate_oracle(model, trainable, frozen, sample_cfg, prompts, cons[:2])
