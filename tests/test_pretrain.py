"""Pre-training: the flow loss and step, the data pipeline, the shipped generator."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from commands import ROOT, last_line, run_launch  # noqa: E402

from bpgo_jax import pretrain  # noqa: E402
from bpgo_jax.configs.image import get_config as image_config  # noqa: E402
from bpgo_jax.configs.pretrain import get_config as pretrain_config  # noqa: E402
from bpgo_jax.models import build_model  # noqa: E402
from bpgo_jax.models.text import BOS_ID, PAD_ID  # noqa: E402
from bpgo_jax.models.tiny import tiny_model  # noqa: E402
from bpgo_jax.prompts import load_prompts  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "bpgo_jax" / "world" / "assets"


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


@pytest.mark.parametrize("patch", [1, 2])
def test_train_step_reduces_loss_and_trains_text_encoder(patch):
    cfg = tiny_cfg()
    cfg.patch = patch
    model = tiny_model(cfg)
    opt = pretrain.make_optimizer(train_cfg(steps=30, lr=1e-2, warmup_steps=2))
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
    step = pretrain.make_train_step(model, opt, ema_decay=0.5)
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
    opt = pretrain.make_optimizer(train_cfg(steps=5, lr=1e-2, warmup_steps=1, freeze_text=True))
    state = pretrain.init_state(model, opt, jax.random.key(0))
    before = jax.tree.map(np.asarray, state.params)
    batch = pretrain.sample_batch(np.random.default_rng(0), 4, model.tokenize, 0.0)
    images = jax.image.resize(jnp.asarray(batch["images"]), (4, 8, 8, 3), "linear")
    step = pretrain.make_train_step(model, opt)
    for _ in range(3):
        state, _ = step(state, images, jnp.asarray(batch["tokens"]), jax.random.key(1))
    same = lambda a, b: bool(np.array_equal(a, np.asarray(b)))
    assert all(jax.tree.leaves(jax.tree.map(same, before["frozen"], state.params["frozen"])))
    unchanged = jax.tree.map(same, before["trainable"], state.params["trainable"])
    assert not any(jax.tree.leaves(unchanged)), "every UNet tensor should have moved"


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


def test_guidance_distillation_targets_the_teachers_guided_velocity():
    model = tiny_model(tiny_cfg())
    trainable, frozen = model.init(jax.random.key(0))
    student = {"trainable": jax.tree.map(lambda p: p + 0.05, trainable), "frozen": frozen}
    t_trainable, t_frozen = model.init(jax.random.key(7))
    teacher = {"trainable": jax.tree.map(lambda p: p - 0.03, t_trainable), "frozen": t_frozen}
    x0 = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
    tokens = jnp.asarray(model.tokenize(["a red circle", "", "a blue box on the left"]))
    empty = jnp.asarray(model.tokenize([""]))
    rng = jax.random.key(2)
    k_noise, k_time = jax.random.split(rng)
    noise = np.asarray(jax.random.normal(k_noise, x0.shape))
    s = np.asarray(jax.random.uniform(k_time, (3,), minval=1e-3, maxval=1.0))
    x_s = jnp.asarray(
        (1 - s[:, None, None, None]) * np.asarray(x0) + s[:, None, None, None] * noise
    )

    def velocity(p, toks):
        cond = model.encode_text(p["frozen"], toks)
        return model.predict(p["trainable"], p["frozen"], x_s, jnp.asarray(1000 * s), cond)

    @jax.jit
    def run(student, teacher):
        loss = pretrain.flow_matching_loss(
            model, student, x0, tokens, rng, teacher=teacher, empty_tokens=empty, guidance_scale=3.0
        )
        v_t_cond = velocity(teacher, tokens)
        v_t_empty = velocity(teacher, jnp.repeat(empty, 3, axis=0))
        return loss, velocity(student, tokens), v_t_cond, v_t_empty

    loss, v_s, v_c, v_e = (np.asarray(a) for a in run(student, teacher))
    target = v_e + 3.0 * (v_c - v_e)
    np.testing.assert_allclose(loss, np.mean((v_s - target) ** 2), rtol=1e-5)
    # An empty caption's target is the teacher's unconditional velocity.
    np.testing.assert_allclose(target[1], v_e[1], atol=1e-5)
    # Gradients flow into the student only; a step moves it towards the teacher.
    opt = pretrain.make_optimizer(train_cfg(steps=20, lr=3e-3, warmup_steps=1))
    state = pretrain.init_state(model, opt, jax.random.key(0), (student["trainable"], frozen))
    step = pretrain.make_train_step(model, opt, guidance_scale=3.0)
    for _ in range(20):
        state, metrics = step(state, x0, tokens, rng, teacher=teacher, empty_tokens=empty)
    after = float(run(state.params, teacher)[0])
    assert after < 0.5 * float(loss), (float(loss), after)
    with pytest.raises(ValueError, match="guidance_scale"):
        pretrain.make_train_step(model, opt, guidance_scale=0.5)


def test_time_shift_moves_training_to_high_noise():
    rng = jax.random.key(0)
    base = np.asarray(pretrain.sample_times(rng, 4096, "uniform"))
    shifted = np.asarray(pretrain.sample_times(rng, 4096, "uniform", 3.0))
    np.testing.assert_allclose(shifted, 3 * base / (1 + 2 * base), rtol=1e-6)  # s=0.5 -> 0.75
    assert base.min() > 0.0 and base.max() <= 1.0 and shifted.max() <= 1.0
    assert abs(np.mean(base > 0.6) - 0.4) < 0.03 and abs(np.mean(shifted > 0.6) - 2 / 3) < 0.03
    logit = np.asarray(pretrain.sample_times(rng, 4096, "logit_normal"))
    assert abs(np.median(logit) - 0.5) < 0.03


def test_make_train_step_rejects_bad_settings():
    model = tiny_model(tiny_cfg())
    opt = pretrain.make_optimizer(train_cfg())
    with pytest.raises(ValueError, match="ema_decay"):
        pretrain.make_train_step(model, opt, ema_decay=1.0)
    with pytest.raises(ValueError, match="time_sampling"):
        pretrain.make_train_step(model, opt, time_sampling="cosine")
    with pytest.raises(ValueError, match="time_shift"):
        pretrain.make_train_step(model, opt, time_shift=0.0)


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


def test_shipped_generator_loads_and_matches_documented_accuracy():
    info = json.loads((ASSETS / "generator.json").read_text())
    weights = ASSETS / "generator.msgpack"
    assert weights.stat().st_size <= 20 * 2**20
    cfg = image_config()
    assert Path(cfg.model.init) == weights  # the base configs/image.py post-trains
    # init (where) and lora (how RL trains them) are not properties of the weights.
    skip = ("init", "lora")
    shipped = {k: v for k, v in info["model"].items() if k not in skip}
    here = json.loads(json.dumps({k: v for k, v in cfg.model.to_dict().items() if k not in skip}))
    assert shipped == here, "generator.json's model block must be configs/image.py's"
    documented = info["heldout_oracle_accuracy"]
    # Headroom for RL: the 30-70% band of held-out oracle accuracy (0.391 on 256 prompts).
    assert 0.3 <= documented <= 0.7, documented

    model, trainable, frozen = build_model(cfg.model, jax.random.key(123))
    heldout = load_prompts(ASSETS / info["heldout_prompts"])
    n = 48
    cons = [m["constraints"] for m in heldout.metadata[:n]]
    acc, _, images = pretrain.evaluate_oracle(
        model,
        trainable,
        frozen,
        pretrain_config().sample,  # the sampler generator.json was measured with
        heldout.prompts[:n],
        cons,
        seed=info["eval_seed"],
        batch_size=n,
    )
    assert images.shape == (n, 32, 32, 3)
    assert abs(acc - documented) <= 0.15, (acc, documented)  # ~3 binomial std at n=48


def model_flags(cfg: ml_collections.ConfigDict) -> list[str]:
    """`--config.model.*` flags that give a launcher the model `cfg` describes."""
    sizes = ("resolution", "channels", "attn_levels", "heads", "vocab_size", "max_length")
    return [f"--config.model.{k}={cfg[k]}" for k in (*sizes, "text_width", "text_depth", "patch")]


def test_pretrain_command_over_two_cpu_devices_from_a_clip_tower(tmp_path):
    """A few steps of launch/pretrain.py, each batch split over 2 CPU devices, the
    text encoder taken (frozen) from a WorldCLIP file: metrics, checkpoints and
    generator.json are written, the shipped text encoder is the tower's, and a
    tower that does not fit the model is one error line."""
    from bpgo_jax.models import load_params
    from bpgo_jax.world import reward_model

    cfg = tiny_cfg()
    cfg.resolution = 32  # the oracle reads 32x32 scenes
    rm_cfg = reward_model.RewardModelConfig(
        vocab_size=cfg.vocab_size,
        max_length=cfg.max_length,
        text_width=cfg.text_width,
        text_depth=1,
        text_heads=cfg.heads,
        embed_dim=8,
    )
    tower = tmp_path / "clip.msgpack"
    reward_model.save(tower, reward_model.init_params(rm_cfg, jax.random.key(5)), rm_cfg)
    small = [f"--config.train.{k}" for k in ("steps=4", "batch_size=4", "warmup_steps=1")]
    small += [f"--config.eval.{k}" for k in ("every=2", "num_prompts=4", "final_num_prompts=4")]
    small += ["--config.eval.batch_size=4", "--config.eval.num_images=2", "--config.log_every=2"]
    base = [f"--config={ROOT / 'configs' / 'pretrain.py'}", *model_flags(cfg), *small]
    base += ["--config.sample.num_steps=2", "--config.train.freeze_text=True", "--cpu_devices=2"]
    out = run_launch(
        "pretrain.py", *base, f"--workdir={tmp_path / 'w'}", f"--config.text_init={tower}"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data-parallel over 2 cpu device(s)" in out.stdout
    info = json.loads((tmp_path / "w" / "generator.json").read_text())
    assert [e["step"] for e in info["evaluations"]] == [2, 4]
    assert info["text_init"] == {"path": str(tower), "command": None}  # no run.json beside it
    metrics = (tmp_path / "w" / "pretrain_metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == [2, 2, 4, 4]  # loss and eval lines
    _, frozen = load_params(
        tmp_path / "w" / "generator.msgpack", tiny_model(cfg).init(jax.random.key(0))
    )
    want, _ = reward_model.load(tower)
    np.testing.assert_allclose(  # shipped weights are the EMA: equal up to its rounding
        frozen["text"]["token_embedding"]["embedding"],
        want["text_tower"]["token_embedding"]["embedding"],
        rtol=1e-5,
    )
    shipped = ROOT / "bpgo_jax" / "world" / "assets" / "reward_model.msgpack"  # 64 wide, not 16
    bad = run_launch(
        "pretrain.py", *base, f"--workdir={tmp_path / 'b'}", f"--config.text_init={shipped}"
    )
    assert bad.returncode != 0
    assert last_line(bad.stderr).startswith("error: config.text_init="), bad.stderr[-500:]
    assert "does not match" in last_line(bad.stderr)


def test_evaluate_generator_command(tmp_path):
    """launch/evaluate_generator.py on small random weights: JSON out, clear errors."""
    from bpgo_jax.models import save_params

    cfg = tiny_cfg()
    cfg.resolution = 32  # the oracle and the reward model read 32x32 scenes
    trainable, frozen = tiny_model(cfg).init(jax.random.key(0))
    weights = tmp_path / "g.msgpack"
    save_params(weights, trainable, frozen)
    base = ["--config", str(ROOT / "configs" / "pretrain.py"), *model_flags(cfg)]
    base += ["--config.sample.num_steps=2", "--num_prompts=3", "--group_size=2"]
    out = run_launch("evaluate_generator.py", *base, f"--weights={weights}")
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(last_line(out.stdout))
    assert (got["num_prompts"], got["group_size"], got["num_steps"]) == (3, 2, 2)
    assert 0.0 <= got["oracle_accuracy"] <= 1.0
    assert set(got["reward_model"]) == {
        "auc",
        "within_group_auc",
        "mixed_group_fraction",
        "advantage_gap",
    }
    cov = got["coverage"]
    assert cov["never_right"] + cov["mixed"] + cov["always_right"] == pytest.approx(1.0, abs=1e-3)
    # Per-kind accuracies over the first three held-out prompts average to the overall one.
    lines = (ASSETS / "prompts_heldout.jsonl").read_text()
    kinds = [json.loads(line)["metadata"]["kind"] for line in lines.splitlines()[:3]]
    assert set(got["accuracy_by_kind"]) == set(kinds)
    by_kind = np.mean([got["accuracy_by_kind"][k] for k in kinds])
    assert by_kind == pytest.approx(got["oracle_accuracy"], abs=1e-3)
    bad = run_launch("evaluate_generator.py", *base, f"--weights={tmp_path / 'none.msgpack'}")
    assert bad.returncode != 0 and "is not a file" in bad.stderr
    assert cfg.patch == 2  # configs/image.py's model: weights of another layout are one line
    other = run_launch(
        "evaluate_generator.py", *base, "--config.model.patch=1", f"--weights={weights}"
    )
    line = last_line(other.stderr)
    assert other.returncode != 0 and line.startswith("error: --weights: "), other.stderr[-500:]
    assert "has shape" in line and "--config.model.*" in line


def test_weight_errors_name_the_field_that_gave_the_path(tmp_path):
    """load_params serves several fields; only build_model knows it read model.init."""
    from bpgo_jax.models import load_params, save_params

    cfg = tiny_cfg()
    cfg.init = str(tmp_path / "missing.msgpack")
    with pytest.raises(ValueError, match=r"^config\.model\.init: weights file .* does not exist"):
        build_model(cfg, jax.random.key(0))
    model = tiny_model(cfg)
    trainable, frozen = model.init(jax.random.key(0))
    path = tmp_path / "w.msgpack"
    save_params(path, trainable, frozen)
    bigger = tiny_cfg()
    bigger.channels = (8, 32)
    with pytest.raises(ValueError, match=r"^\S*w\.msgpack: tensor .* has shape"):
        load_params(path, tiny_model(bigger).init(jax.random.key(0)))


def test_pretrain_command_missing_init_exits_with_one_line(tmp_path):
    """A bare file name as model.init (no grandparent run.json to look up): one error line."""
    run = run_launch(
        "pretrain.py",
        f"--config={ROOT / 'configs' / 'pretrain.py'}",
        f"--workdir={tmp_path / 'w'}",
        "--config.model.init=missing.msgpack",
        cwd=tmp_path,
    )
    last = last_line(run.stderr)
    assert run.returncode != 0, run.stderr
    assert last == "error: config.model.init: weights file missing.msgpack does not exist", last


@pytest.mark.parametrize("script", ["train.py", "study.py", "pretrain.py"])
def test_launchers_list_their_shared_flags_in_help(script):
    """--cpu_devices / --compile_cache are defined in bpgo_jax.runtime; each
    launcher adopts them, so plain --help shows them."""
    out = run_launch(script, "--help")
    assert "--cpu_devices" in out.stdout and "--compile_cache" in out.stdout, out.stdout[-1500:]
