"""Fast checks of the engine's host-side pieces: config validation, prompts,
rewards, sampler tables, batching and sharding rules."""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tiny_config import tiny_config

from bpgo_jax.config import ConfigError, validate
from bpgo_jax.parallel import batching
from bpgo_jax.parallel import mesh as mesh_lib
from bpgo_jax.prompts import host_slice, load_prompts, prompt_ids
from bpgo_jax.rewards import build_reward_set
from bpgo_jax.rewards.jpeg import jpeg_kilobytes
from bpgo_jax.rollout import samplers, schedules


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"sample.group_size": 3}, "sample.batch_size=16 must be a multiple of sample.group_size"),
        ({"sample.group_size": 1}, "sample.group_size=1"),
        ({"train.micro_batch_size": 3}, "train.micro_batch_size=3"),
        ({"rewards": {"no_such_reward": {"weight": 1.0}}}, "config.rewards.no_such_reward"),
        ({"advantage.method": "ppo"}, "advantage.method='ppo'"),
        ({"advantage.alpha": 1.5}, "advantage.alpha=1.5"),
        ({"prior.kind": "oracle"}, "prior.kind='oracle'"),
        ({"sample.kind": "ddim", "sample.eta": 0.0}, "sample.eta=0.0"),
        ({"train.timestep_fraction": 0.0}, "train.timestep_fraction=0.0"),
        ({"train.warmup_updates": -1}, "train.warmup_updates=-1"),
        ({"train.timestep_window": (2, 2)}, "train.timestep_window=(2, 2)"),
        ({"train.timestep_window": (0, 4)}, "train.timestep_window=(0, 4)"),
        ({"eval.noise": "sde"}, "eval.noise='sde'"),
        ({"model.patch": 0}, "model.patch=0"),
        ({"model.patch": 8}, "model.resolution=8 must be a multiple of model.patch"),
        ({"eval.extra_prompts": {"ood": "x.txt"}}, "config.eval.extra_prompts.ood"),
    ],
)
def test_validation_names_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError) as err:
        validate(tiny_config(tmp_path, **override), num_devices=8)
    assert field in str(err.value)
    assert "\n" not in str(err.value)


def test_validation_checks_mesh_against_devices():
    with pytest.raises(ValueError, match=r"mesh.shape \(3, 1\) needs 3 devices, 8 are available"):
        mesh_lib.make_mesh((3, 1))
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        mesh_lib.make_mesh((-1, 3))
    assert mesh_lib.make_mesh((-1, 2)).shape == {"data": 4, "fsdp": 2}


def test_layout(tmp_path):
    lay = validate(tiny_config(tmp_path, **{"train.batch_size": 8}), num_devices=8)
    assert lay == {
        "samples_per_epoch": 16,
        "rollout_calls": 1,
        "rollout_chunks": 2,
        "updates_per_inner_epoch": 2,
        "micro_per_update": 1,
        "trained_steps": 3,
        "timestep_window": (0, 3),
    }


def test_prompt_files(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(
        '{"prompt": "a", "prior": 0.2}\n\n{"prompt": "b", "prior": 0.4, "metadata": {"x": 1}}\n'
    )
    ps = load_prompts(good)
    assert ps.prompts == ("a", "b") and ps.metadata[1] == {"x": 1}
    np.testing.assert_allclose(ps.priors, [0.2, 0.4])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: needs a string field"):
        load_prompts(bad)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "prior": 1}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match="entry 2 lacks"):
        load_prompts(mixed)


def test_prompt_order_is_resumable_and_covers_every_prompt():
    stream = prompt_ids(7, seed=3, position=0, count=21)
    for p in range(3):
        assert sorted(stream[7 * p : 7 * p + 7]) == list(range(7))  # each pass a permutation
    np.testing.assert_array_equal(prompt_ids(7, 3, 5, 9), stream[5:14])  # resume mid-pass
    np.testing.assert_array_equal(host_slice(np.arange(8), 1, 4), [2, 3])


def test_jpeg_reward_matches_pil_and_orders_images():
    rng = np.random.default_rng(0)
    noise = rng.uniform(size=(1, 32, 32, 3)).astype(np.float32)
    flat = np.full((1, 32, 32, 3), 0.5, np.float32)
    sizes = jpeg_kilobytes(np.concatenate([noise, flat]))
    buf = io.BytesIO()
    Image.fromarray((noise[0] * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=95)
    assert sizes[0] == pytest.approx(buf.tell() / 1000)
    assert sizes[0] > sizes[1]
    import ml_collections

    cfg = ml_collections.ConfigDict(
        {"jpeg_compressibility": {"weight": 2.0}, "saturation": {"weight": 1.0}}
    )
    rs = build_reward_set(cfg)
    host = rs.score_host(np.concatenate([noise, flat]), ["a", "b"], [{}, {}])
    np.testing.assert_allclose(host["jpeg_compressibility"], -sizes)
    jit = rs.score_jittable(
        rs.params(), jnp.asarray(np.concatenate([noise, flat])), {"saturation": {}}
    )
    np.testing.assert_allclose(
        rs.total({**host, **jit}), 2 * -sizes + np.asarray(jit["saturation"])
    )
    assert float(jit["saturation"][1]) == 0.0  # grey has no saturation


def test_flow_tables_match_the_sde_formula():
    tab = schedules.flow_tables(4, 1.0, "flow_grpo", 0.7)
    s = np.array([1.0, 0.75, 0.5, 0.25])
    dt = -0.25
    std_t = 0.7 * np.sqrt(s / (1 - np.where(s == 1.0, 0.75, s)))
    np.testing.assert_allclose(tab["cx"], 1 + std_t**2 / (2 * s) * dt, rtol=1e-6)
    np.testing.assert_allclose(tab["cv"], (1 + std_t**2 * (1 - s) / (2 * s)) * dt, rtol=1e-6)
    np.testing.assert_allclose(tab["std"], std_t * math.sqrt(0.25), rtol=1e-6)
    np.testing.assert_allclose(tab["model_t"], 1000 * s)
    dance = schedules.flow_tables(4, 1.0, "dance", 0.3)
    np.testing.assert_allclose(dance["std"], 0.3 * 0.5, rtol=1e-6)
    ode = schedules.flow_tables(4, 1.0, "ode", 0.0)
    np.testing.assert_allclose(ode["cx"], 1.0)  # Euler step x + v dt
    np.testing.assert_allclose(ode["cv"], dt)


def test_gaussian_logprob():
    x = jnp.array([[0.5, -1.0]])
    mean = jnp.array([[0.0, 0.0]])
    std = jnp.array([[2.0]])
    want = np.mean([-(v**2) / 8 - math.log(2) - 0.5 * math.log(2 * math.pi) for v in (0.5, -1)])
    assert float(samplers.gaussian_logprob(x, mean, std)[0]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("kind", ["flow", "ddim_eps", "ddim_v"])
def test_log_ratio_equals_difference_of_log_probs(kind):
    if kind == "flow":
        sampler = samplers.Sampler(
            "flow", "flow", 4, 1.0, schedules.flow_tables(4, 1.0, "flow_grpo", 0.7)
        )
    else:
        pred = "epsilon" if kind == "ddim_eps" else "v_prediction"
        tables = schedules.ddim_tables(schedules.DEFAULT_DDPM, 4, 1.0)
        sampler = samplers.Sampler("ddim", pred, 4, 1.0, tables)
    keys = jax.random.split(jax.random.key(0), 4)
    x, x_next, out, old = (jax.random.normal(key, (2, 3, 3, 2)) for key in keys)
    k = jnp.array([0, 2])
    lr, mean, std = samplers.log_ratio(sampler, k, x, x_next, out, old)
    new_mean, new_std = samplers.transition(sampler, k, x, out)
    old_mean, _ = samplers.transition(sampler, k, x, old)
    direct = samplers.gaussian_logprob(x_next, new_mean, new_std) - samplers.gaussian_logprob(
        x_next, old_mean, new_std
    )
    np.testing.assert_allclose(lr, direct, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(mean, new_mean, rtol=1e-5, atol=1e-6)
    same, _, _ = samplers.log_ratio(sampler, k, x, x_next, out, out)
    assert np.all(np.asarray(same) == 0.0)


def test_sample_draws_each_samples_noise_from_its_own_key():
    """A trajectory's step noise is `step_noise` of the sample's key, whatever else is
    in the batch, so results do not depend on batch size or sharding."""
    from types import SimpleNamespace

    model = SimpleNamespace(
        latent_shape=(4, 4, 3),
        prediction_type="flow",
        predict=lambda trainable, frozen, x, t, cond: (
            0.5 * x + trainable * cond[:, None, None, None]
        ),
    )
    cfg = SimpleNamespace(
        kind="flow", num_steps=3, shift=1.0, noise="flow_grpo", noise_level=0.7, guidance_scale=1.0
    )
    sampler = samplers.make_sampler(cfg, model)
    keys = jax.random.split(jax.random.key(2), 3)
    traj = samplers.sample(model, sampler, jnp.float32(0.3), None, jnp.ones(3), None, keys)
    for k in range(3):
        steps = jnp.full((3,), k)
        x, x_next = traj.latents[:, k], traj.latents[:, k + 1]
        mean, std = samplers.transition(sampler, steps, x, traj.outputs[:, k])
        np.testing.assert_allclose(
            (x_next - mean) / std, samplers.step_noise(keys, k, (4, 4, 3)), rtol=1e-4, atol=1e-4
        )
    pair = samplers.sample(model, sampler, jnp.float32(0.3), None, jnp.ones(2), None, keys[:2])
    np.testing.assert_array_equal(pair.latents, traj.latents[:2])


def test_split_chunks_keeps_rows_on_their_shard():
    x = jnp.arange(16)
    chunks = batching.split_chunks(x, num_chunks=2, num_shards=4)
    # chunk 0 takes the first 2 rows of each of the 4 shards of 4 rows
    np.testing.assert_array_equal(chunks[0], [0, 1, 4, 5, 8, 9, 12, 13])
    np.testing.assert_array_equal(batching.merge_chunks(chunks, 4), x)
    doubled = batching.map_in_chunks(lambda v: 2 * v, x, 2, 4)
    np.testing.assert_array_equal(doubled, 2 * x)


def test_sharding_rules():
    mesh = mesh_lib.make_mesh((2, 4))
    params = {"unet": {"kernel": np.zeros((3, 16)), "bias": np.zeros((3,))}}
    specs = mesh_lib.tree_shardings(params, mesh, ((".*kernel", "fsdp_auto"), (".*", ())))
    assert specs["unet"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert specs["unet"]["bias"].spec == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="does not divide it"):
        mesh_lib.tree_shardings(params, mesh, ((".*kernel", ("fsdp", None)),))


def test_optimizer_warmup_ramps_the_step_size():
    """Adam's step is ~lr per weight from the first update; warm-up scales it by k/N."""
    import ml_collections
    import optax

    from bpgo_jax.update.step import make_optimizer

    def steps(warmup: int, n: int = 5) -> list[float]:
        cfg = ml_collections.ConfigDict(
            dict(
                lr=1e-2,
                warmup_updates=warmup,
                b1=0.9,
                b2=0.999,
                adam_eps=1e-8,
                weight_decay=0.0,
                max_grad_norm=1e9,
            )
        )
        opt, params = make_optimizer(cfg), {"w": jnp.zeros(3)}
        state, out = opt.init(params), []
        for _ in range(n):
            upd, state = opt.update({"w": jnp.ones(3)}, state, params)
            params = optax.apply_updates(params, upd)
            out.append(float(jnp.abs(upd["w"][0])))
        return out

    np.testing.assert_allclose(steps(0), [1e-2] * 5, rtol=1e-4)
    np.testing.assert_allclose(steps(4), [2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2], rtol=1e-4)
    np.testing.assert_allclose(steps(1), steps(0), rtol=1e-6)


@pytest.mark.parametrize(("window", "fraction", "expected"), [((1, 3), 1.0, 2), ((0, 3), 0.5, 2)])
def test_trained_steps_come_from_the_window(tmp_path, window, fraction, expected):
    """Each sample trains on `expected` distinct steps, all inside `train.timestep_window`."""
    from types import SimpleNamespace

    from bpgo_jax.config import batch_layout
    from bpgo_jax.update import step
    from bpgo_jax.update.loss import PolicyBatch

    cfg = tiny_config(
        tmp_path, **{"train.timestep_window": window, "train.timestep_fraction": fraction}
    )
    lay = batch_layout(cfg, 1)
    assert lay["trained_steps"] == expected and lay["timestep_window"] == window
    opts = step.step_options(cfg, lay, 1, model=None, sampler=None, optimizer=None)
    b, t = 64, cfg.sample.num_steps
    batch = PolicyBatch(
        *(jnp.zeros((b, t, 1)) for _ in range(3)), *(jnp.zeros(b) for _ in range(3))
    )
    state = SimpleNamespace(rng=jax.random.key_data(jax.random.key(0)))
    _, order, _ = step._prepare(state, batch, opts)
    order = np.asarray(order).reshape(-1, expected)
    assert order.min() >= window[0] and order.max() < window[1]
    assert all(len(set(row)) == expected for row in order)
    assert len(np.unique(order)) == window[1] - window[0]  # every window step gets drawn


def test_samplers_differing_only_in_noise_are_distinct():
    """Jitted functions take the sampler as a static argument: equal means one program."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        kind="flow", num_steps=4, shift=1.0, noise="flow_grpo", noise_level=0.7, guidance_scale=1.0
    )
    model = SimpleNamespace(prediction_type="flow")
    sde = samplers.make_sampler(cfg, model)
    ode = samplers.make_sampler(SimpleNamespace(**{**vars(cfg), "noise": "ode"}), model)
    assert sde == samplers.make_sampler(cfg, model)
    assert hash(sde) == hash(samplers.make_sampler(cfg, model))
    assert sde != ode and hash(sde) != hash(ode)


def test_gradient_signal_recovers_the_share_of_the_expected_gradient():
    """Draws g + noise with |g|^2 = s * E|g_b|^2: the estimate finds s; pure noise gives ~0."""
    from bpgo_jax.update.signal import gradient_signal

    rng = np.random.default_rng(0)
    k, p = 400, 2000
    mean = rng.normal(size=p)
    for share in (0.0, 0.2, 0.7):
        # E|n_b|^2 = p * sigma^2 = |g|^2 (1 - s) / s for s > 0.
        sigma = 1.0 if share == 0 else np.sqrt(mean @ mean * (1 - share) / share / p)
        g = (0.0 if share == 0 else mean) + sigma * rng.normal(size=(k, p))
        got = gradient_signal(g)
        assert got["signal_share"] == pytest.approx(share, abs=0.03)
        assert got["cosine_mean"] == pytest.approx(share, abs=0.03)  # E cos ~ s for equal norms
        assert got["noise_only"] == 1 / k
    with pytest.raises(ValueError, match="K >= 2"):
        gradient_signal(np.ones((1, 3)))
