"""Pre-training and reward-model runs: the commands, resuming a killed run, the
shipped generator and the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from commands import ROOT, last_line, run_launch
from test_pretrain import tiny_cfg

from bpgo_jax import pretrain
from bpgo_jax.configs.image import get_config as image_config
from bpgo_jax.configs.pretrain import get_config as pretrain_config
from bpgo_jax.errors import WorkdirError
from bpgo_jax.models import build_model
from bpgo_jax.models.tiny import tiny_model
from bpgo_jax.prompts import load_prompts

ASSETS = ROOT / "bpgo_jax" / "world" / "assets"
PRETRAIN_CONFIG = ROOT / "bpgo_jax" / "configs" / "pretrain.py"


def test_shipped_generator_loads_and_matches_documented_accuracy():
    info = json.loads((ASSETS / "generator.json").read_text())
    weights = ASSETS / "generator.msgpack"
    assert weights.stat().st_size <= 20 * 2**20
    cfg = image_config()
    assert Path(cfg.model.init) == weights  # the base configs/image.py post-trains
    # The fields `models.tiny.tiny_model` builds the network from; init (where)
    # and lora (how RL trains them) are not properties of the weights, and the
    # other models' fields (attention, remat, the flow DiTs') do not apply.
    fields = (
        *("name", "prediction_type", "dtype", "resolution", "channels", "attn_levels"),
        *("heads", "vocab_size", "max_length", "text_width", "text_depth", "patch", "scheduler"),
    )
    assert set(fields) <= set(info["model"]), "generator.json lacks a built-in model field"
    shipped = {k: info["model"][k] for k in fields}
    here = json.loads(json.dumps({k: cfg.model.to_dict()[k] for k in fields}))
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
    base = [f"--config={PRETRAIN_CONFIG}", *model_flags(cfg), *small]
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
    base = ["--config", str(PRETRAIN_CONFIG), *model_flags(cfg)]
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
        f"--config={PRETRAIN_CONFIG}",
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


@pytest.mark.parametrize("script", ["evaluate_generator.py", "train_reward_model.py"])
def test_world_model_commands_take_the_compile_cache_flag(script):
    out = run_launch(script, "--help")
    assert "--compile_cache" in out.stdout, out.stdout[-1500:]


def small_pretrain_config(**overrides) -> ml_collections.ConfigDict:
    """configs/pretrain.py on a tiny 32x32 model: 4 steps, evaluations at 2 and 4."""
    c = pretrain_config()
    c.model.update(tiny_cfg().to_dict() | {"resolution": 32})
    c.train.update(steps=4, batch_size=8, warmup_steps=1)
    c.eval.update(every=2, num_prompts=8, final_num_prompts=8, batch_size=8, num_images=2)
    c.sample.num_steps = 2
    c.log_every = 1
    c.update(overrides)
    return c


def _rows(workdir: Path) -> list[dict]:
    lines = (workdir / pretrain.METRICS_FILE).read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def test_pretraining_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch
):
    """Killed during step 4 (after the step-2 checkpoint and step 3's row), the
    re-run resumes at step 2 and ends with the weights, metrics rows and
    generator.json of an uninterrupted run."""
    cfg = small_pretrain_config()
    whole = pretrain.train(cfg, tmp_path / "whole", command="test")

    real, calls = pretrain.sample_batch, []

    def dies_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "sample_batch", dies_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain.train(cfg, tmp_path / "cut", command="test")
    assert [r["step"] for r in _rows(tmp_path / "cut")] == [1, 2, 2, 3]
    assert not (tmp_path / "cut" / "generator.json").exists()
    monkeypatch.setattr(pretrain, "sample_batch", real)
    resumed = pretrain.train(cfg, tmp_path / "cut", command="test")

    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")
    assert [r["step"] for r in _rows(tmp_path / "whole")] == [1, 2, 2, 3, 4, 4]
    for name in ("generator.msgpack", "checkpoints/step_4.msgpack"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert {k: v for k, v in resumed.items() if k != "train_seconds"} == {
        k: v for k, v in whole.items() if k != "train_seconds"
    }
    # A finished workdir re-run ships the same pick again without training, into
    # export_dir too (a neutral field).
    cfg.export_dir = str(tmp_path / "assets")
    again = pretrain.train(cfg, tmp_path / "cut", command="test")
    assert again["heldout_oracle_accuracy"] == whole["heldout_oracle_accuracy"]
    assert len(_rows(tmp_path / "cut")) == 6
    for name in ("generator.msgpack", "generator.json"):
        assert (tmp_path / "assets" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()
    # The schedule spans train.steps: resuming with another is refused before any work.
    longer = small_pretrain_config()
    longer.train.steps = 8
    with pytest.raises(WorkdirError, match=r"different config: train\.steps 4 -> 8 \(pass"):
        pretrain.train(longer, tmp_path / "cut", command="test")


def small_reward_model_config() -> ml_collections.ConfigDict:
    from bpgo_jax.configs.reward_model import get_config

    c = get_config()
    c.model.update(image_widths=(8, 16), image_hidden=16, text_width=16, embed_dim=8)
    c.model.update(vocab_size=256, max_length=8, text_heads=2)
    c.update(batch_size=8, max_steps=4, warmup_steps=1, eval_every=2, eval_scenes=8)
    c.target_auc = 1.1  # never stops early
    return c


def test_reward_model_training_killed_after_a_checkpoint_resumes_to_the_same_weights(
    tmp_path, monkeypatch
):
    from bpgo_jax.cli import train_reward_model as trm
    from bpgo_jax.world import reward_model

    cfg = small_reward_model_config()
    cfg.export_dir = str(tmp_path / "assets")
    whole = trm.train(cfg, tmp_path / "whole", command="test")
    assert whole["step"] == 4 and 0.0 <= whole["auc_all"] <= 1.0
    for name in ("reward_model.msgpack", "reward_model.json"):
        assert (tmp_path / "assets" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()

    real, calls = trm.sample_pairs, []

    def dies_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(trm, "sample_pairs", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        trm.train(cfg, tmp_path / "cut", command="test")
    monkeypatch.setattr(trm, "sample_pairs", real)
    resumed = trm.train(cfg, tmp_path / "cut", command="test")

    strip = lambda row: {k: v for k, v in row.items() if k != "seconds"}
    assert strip(resumed) == strip(whole)
    rows = [
        [strip(json.loads(x)) for x in (tmp_path / run / "metrics.jsonl").open()]
        for run in ("whole", "cut")
    ]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [2, 4]
    for name in ("reward_model.msgpack", "reward_model.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    reward_model.load(tmp_path / "cut" / "reward_model.msgpack")
    assert json.loads((tmp_path / "cut" / "run.json").read_text()) == {"command": "test"}


def test_pretraining_and_reward_model_refuse_a_locked_or_unusable_workdir(tmp_path):
    """Both loops take the workdir lock and check the workdir before any model work."""
    from bpgo_jax.checkpoint import WorkdirLock
    from bpgo_jax.cli import train_reward_model as trm

    runs = {
        "pretrain": lambda w: pretrain.train(small_pretrain_config(), w, command="test"),
        "reward_model": lambda w: trm.train(small_reward_model_config(), w, command="test"),
    }
    for name, run in runs.items():
        (tmp_path / name).mkdir()
        in_use = pytest.raises(WorkdirError, match=f"{tmp_path / name} is in use by pid ")
        with WorkdirLock(tmp_path / name), in_use:
            run(tmp_path / name)
        assert not (tmp_path / name / "config.json").exists()
        afile = tmp_path / f"{name}.txt"
        afile.write_text("")
        with pytest.raises(WorkdirError, match="exists and is not a directory"):
            run(afile)
