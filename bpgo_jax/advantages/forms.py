"""Which BPGO forms a run uses: the named presets and the config's form fields.

`advantage.preset` names a combination of the four form fields (`ras`, `crt`,
`crt_mode`, `ras_on`; bpgo.py says what each value computes):

    paper     ras=paper  crt=paper   crt_mode=auxiliary  ras_on=raw          (Eq. 2-4)
    released  ras=bayes  crt=binary  crt_mode=replace    ras_on=transformed  (authors' code)
    custom    any combination; a form left unset is the paper's

A form field left empty ("") takes the preset's value. Under `paper` or
`released` a form field set to anything else is refused with one line (a run
named after a preset runs exactly its forms); `custom` combines them freely.
Presets choose forms only: every hyper-parameter has its own field and is
never overwritten (Eq. 2-4's `alpha, k, lam, crt_coef`; the released forms'
`bayes.*`, `sign_std.*`, `binary.*`; `ras_clamp` and `max_exp` are shared).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from bpgo_jax.advantages import bpgo
from bpgo_jax.errors import ConfigError


class Forms(NamedTuple):
    """The four form fields of `config.advantage`, resolved."""

    ras: str
    crt: str
    crt_mode: str
    ras_on: str


PRESETS: dict[str, Forms] = {
    "paper": Forms(ras="paper", crt="paper", crt_mode="auxiliary", ras_on="raw"),
    "released": Forms(ras="bayes", crt="binary", crt_mode="replace", ras_on="transformed"),
}
PRESET_NAMES = (*PRESETS, "custom")
CHOICES = Forms(bpgo.RAS_FORMS, bpgo.CRT_FORMS, bpgo.CRT_MODES, bpgo.RAS_ON)


def resolve_forms(adv: ml_collections.ConfigDict) -> Forms:
    """The forms `config.advantage` selects; ConfigError naming the field at fault."""
    preset = adv.get("preset", "paper")
    if preset not in PRESET_NAMES:
        raise ConfigError(f"advantage.preset={preset!r} is not one of {PRESET_NAMES}")
    base = PRESETS.get(preset, PRESETS["paper"])
    values = {}
    for field, default, choices in zip(Forms._fields, base, CHOICES, strict=True):
        value = adv.get(field, "")
        if value == "":
            values[field] = default
            continue
        if value not in choices:
            raise ConfigError(
                f"advantage.{field}={value!r} is not one of {choices} ('' = the preset's)"
            )
        if preset != "custom" and value != default:
            raise ConfigError(
                f"advantage.{field}={value!r} contradicts advantage.preset={preset!r}, which "
                f"sets {field}={default!r}; set advantage.preset='custom' to combine forms"
            )
        values[field] = value
    forms = Forms(**values)
    if forms.crt == "none" and forms.ras_on == "transformed":
        if adv.get("ras_on", "") == "transformed":
            raise ConfigError(
                "advantage.ras_on='transformed' needs a CRT transform, but advantage.crt='none'"
            )
        forms = forms._replace(ras_on="raw")
    return forms


def reward_key(seed: int, rewards: jax.Array) -> jax.Array:
    """A PRNG key from the run's seed and this epoch's rewards (their bits).

    The advantage stage takes no key; rewards differ every epoch, so this draws
    afresh each epoch and again identically on a resumed run.
    """
    bits = jax.lax.bitcast_convert_type(jnp.asarray(rewards, jnp.float32), jnp.uint32).reshape(-1)
    odd = 2 * jnp.arange(bits.shape[0], dtype=jnp.uint32) + 1
    return jax.random.fold_in(jax.random.key(seed), jnp.sum(bits * odd, dtype=jnp.uint32))


def _clamp(adv: ml_collections.ConfigDict) -> tuple[float, float] | None:
    return tuple(adv.ras_clamp) if adv.get("ras_clamp", None) else None


def ras_function(
    adv: ml_collections.ConfigDict, forms: Forms, key: jax.Array | None = None
) -> bpgo.GroupFn | None:
    """(rewards, priors) -> RAS weights of `forms.ras`, None for "none".

    `key` feeds `sign_std.magnitude='random'` only.
    """
    clamp = _clamp(adv)
    if forms.ras == "paper":
        return functools.partial(bpgo.ras_weights, alpha=adv.alpha, k=adv.k, clamp=clamp)
    if forms.ras == "bayes":
        b = adv.bayes
        return functools.partial(
            bpgo.bayes_weights,
            alpha=b.alpha,
            prior_var=b.prior_var,
            weight_range=tuple(b.range),
            clamp=clamp,
        )
    if forms.ras == "sign_std":
        s = adv.sign_std
        return functools.partial(
            bpgo.sign_std_weights,
            alpha=s.alpha,
            magnitude=s.magnitude,
            value=s.value,
            key=key,
            clamp=clamp,
        )
    if forms.ras == "none":
        return None
    raise ValueError(f"advantage.ras={forms.ras!r} is not one of {bpgo.RAS_FORMS}")


def crt_function(adv: ml_collections.ConfigDict, forms: Forms) -> bpgo.GroupFn | None:
    """(rewards, priors) -> CRT rewards of `forms.crt`, None for "none"."""
    if forms.crt == "paper":
        return functools.partial(bpgo.crt_rewards, lam=adv.lam, max_exp=adv.max_exp)
    if forms.crt == "binary":
        b = adv.binary
        return functools.partial(bpgo.binary_crt_rewards, a=b.a, tau=b.tau, max_exp=adv.max_exp)
    if forms.crt == "none":
        return None
    raise ValueError(f"advantage.crt={forms.crt!r} is not one of {bpgo.CRT_FORMS}")


def loss_crt_coef(config: ml_collections.ConfigDict) -> float:
    """The coefficient s of the loss's CRT surrogate: `advantage.crt_coef` where the
    run has that term (BPGO with CRT in auxiliary or append mode), else 0."""
    adv = config.advantage
    if adv.method != "bpgo":
        return 0.0
    forms = resolve_forms(adv)
    if forms.crt == "none" or forms.crt_mode == "replace":
        return 0.0
    return float(adv.crt_coef)
