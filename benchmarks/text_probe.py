"""How well does a text encoder's pooled output name an object's colour and shape?

    python benchmarks/text_probe.py \
        bpgo_jax/world/assets/generator.msgpack bpgo_jax/world/assets/reward_model.msgpack

A generator can only draw what its text features tell apart. For each file (a
built-in generator, config from the .json beside it, or a WorldCLIP reward
model, whose text tower has the same layers) this fits a linear probe
(multinomial logistic regression, L-BFGS) on the masked mean of the text
encoder's per-token output over the single-object captions of the train and
val prompt files that name both a colour and a shape, 3/4 to fit, 1/4 to
score (fixed split), and prints the held-out accuracy per attribute.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app

from bpgo_jax import runtime
from bpgo_jax.configs.common import ASSETS
from bpgo_jax.models import load_params
from bpgo_jax.models.text import HashTokenizer
from bpgo_jax.models.tiny import TextEncoder, tiny_model
from bpgo_jax.world import reward_model


def captions() -> tuple[list[str], dict[str, list[str]]]:
    """Single-object captions naming colour and shape, with those labels."""
    texts, labels = [], {"color": [], "shape": []}
    for split in ("train", "val"):
        for line in (ASSETS / f"prompts_{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            objects = record["metadata"]["constraints"]["objects"]
            if len(objects) == 1 and {"color", "shape"} <= objects[0].keys():
                texts.append(record["prompt"])
                for key in labels:
                    labels[key].append(objects[0][key])
    return texts, labels


def text_features(path: Path, texts: list[str]) -> np.ndarray:
    """Masked mean of the per-token text features a UNet would attend to."""
    generator_cfg = path.with_suffix(".json")
    info = json.loads(generator_cfg.read_text()) if generator_cfg.is_file() else {}
    if "model" in info:  # a built-in generator
        cfg = ml_collections.ConfigDict(info["model"])
        model = tiny_model(cfg)
        _, frozen = load_params(path, model.init(jax.random.key(0)))
        tokens = jnp.asarray(model.tokenize(texts))
        hidden = model.encode_text(frozen, tokens)["hidden"]
    else:  # a WorldCLIP reward model: its text tower through the same layers
        params, cfg = reward_model.load(path)
        encoder = TextEncoder(
            cfg.vocab_size, cfg.max_length, cfg.text_width, cfg.text_depth, cfg.text_heads
        )
        tokens = jnp.asarray(HashTokenizer(cfg.vocab_size, cfg.max_length)(texts))
        tower = {k: v for k, v in params["text_tower"].items() if k != "proj"}
        hidden = encoder.apply({"params": tower}, tokens)
    mask = (tokens != 0)[..., None]
    return np.asarray((hidden * mask).sum(1) / mask.sum(1))


def probe_accuracy(x: np.ndarray, y: np.ndarray, fit: np.ndarray, l2: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted on rows `fit`."""
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = jnp.asarray((x - mean) / std)
    classes = int(y.max()) + 1
    params = (jnp.zeros((x.shape[1], classes)), jnp.zeros(classes))

    def loss(p):
        logits = x[fit] @ p[0] + p[1]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y[fit]).mean()
        return nll + l2 * (p[0] ** 2).sum()

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    params, _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=200)[0])(params)
    pred = np.asarray(jnp.argmax(x @ params[0] + params[1], -1))
    return float((pred[~fit] == y[~fit]).mean())


def main(argv: list[str]) -> None:
    weights = [Path(a) for a in argv[1:]]
    if not weights:
        raise app.UsageError("give one or more generator or WorldCLIP .msgpack files")
    texts, labels = captions()
    fit = np.zeros(len(texts), bool)
    fit[np.random.default_rng(0).permutation(len(texts))[: 3 * len(texts) // 4]] = True
    print(f"{len(texts)} captions, {fit.sum()} fit, {(~fit).sum()} scored")
    for path in weights:
        x = text_features(path, texts)
        scores = {}
        for key, names in labels.items():
            y = np.unique(names, return_inverse=True)[1]
            scores[key] = round(probe_accuracy(x, y, fit), 3)
        print(json.dumps({"weights": str(path), **scores}))


if __name__ == "__main__":
    runtime.run(main, __doc__)
