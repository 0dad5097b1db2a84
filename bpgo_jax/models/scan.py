"""Identical blocks stacked under `nn.scan`, with the rematerialisation policies of `model.remat`.

A 57-block FLUX or a 40-block Wan unrolled into one XLA program compiles in
time proportional to its depth; scanned, the program holds one block and a
loop, so compile time and program size do not depend on the depth.
`Stack(Block, n, dict(dim=...), remat=..., name="transformer_blocks")(x, *args)`
applies `n` blocks in sequence: each block's `__call__(carry, *args)` returns
the next carry (a pytree of the same structure, e.g. `(text, image)`), and
`args` (time embedding, rotary tables, masks) are broadcast to every block.

Parameters get a leading layer axis, under a path segment `stacked`:
`transformer_blocks/stacked/attn/to_q/kernel` has shape `[n, in, out]`.
The segment is how the rest of the library recognises a stacked tensor: the
mesh rules never shard its layer axis and apply to the per-layer dims
(`parallel/mesh.py`), LoRA factors get the layer axis too (`models/lora.py`),
and `weights.read_stacked_params` fills it from per-index checkpoint
tensors (`transformer_blocks.3.attn.to_q.weight`; blocks that differ, like
SD3's last, stay outside the stack, and two stacks can share one checkpoint
list through its `stacks` map).

`model.remat`: "none" keeps every intermediate for the backward pass;
"full" keeps only each block's input (one more forward per block in the
backward pass, the least memory); "dots" keeps matmul outputs without batch
dimensions (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`);
"names" keeps only values tagged with `checkpoint_name(x, name)` for a name
in `SAVED_NAMES`: every attention output (`models/attention.py` tags them)
and the splash kernel's logsumexp residuals, whose backward kernel then needs
no forward pass; the projections and MLPs are recomputed (XLA's attention
also recomputes its softmax from q and k).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.core import FrozenDict

from bpgo_jax.errors import ConfigError

STACKED = "stacked"  # the path segment of a scanned stack's parameters
REMAT_POLICIES = ("none", "full", "dots", "names")
# checkpoint_name tags (`jax.ad_checkpoint.checkpoint_name`) that remat="names" saves.
ATTENTION_OUT = "attention_out"  # the output of every `models.attention.attention` call
ATTENTION_RESIDUALS = "attention_residuals"  # the splash kernel's logsumexp residuals
SAVED_NAMES = (ATTENTION_OUT, ATTENTION_RESIDUALS)


def check_remat(name: str) -> None:
    if name not in REMAT_POLICIES:
        raise ConfigError(f"model.remat={name!r} is not one of {REMAT_POLICIES}")


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy of `model.remat=name` ("none" has none: no remat at all)."""
    check_remat(name)
    return {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "names": jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES),
    }[name]


def num_layer_axes(path: str | tuple[str, ...]) -> int:
    """Leading layer axes of the tensor at `path` ('/'-joined or a tuple): one per `stacked`."""
    parts = path.split("/") if isinstance(path, str) else path
    return sum(part == STACKED for part in parts)


def _body(block: nn.Module, carry: Any, *args: Any) -> tuple[Any, None]:
    return block(carry, *args), None


class Stack(nn.Module):
    """`length` copies of `block(**block_args)` applied in sequence, scanned.

    `block` is a Module class whose `__call__(carry, *args)` returns the next
    carry; its parameters live under `<name>/stacked/...` with a leading axis
    of size `length`. Blocks are initialised with independent random keys.
    `remat` is one of `REMAT_POLICIES`; `unroll` is `nn.scan`'s (blocks per
    loop iteration: more can run faster and compiles longer).
    """

    block: type[nn.Module]
    length: int
    block_args: Mapping[str, Any] = FrozenDict()
    remat: str = "none"
    unroll: int = 1

    @nn.compact
    def __call__(self, carry: Any, *args: Any) -> Any:
        if self.length < 1:
            raise ValueError(f"Stack of {self.block.__name__} needs length >= 1, got {self.length}")
        body = _body
        if self.remat != "none":
            # Inside a scan, CSE across iterations cannot happen: prevent_cse=False
            # lets XLA optimise the recomputation (the jax.checkpoint advice for scans).
            body = nn.remat(_body, policy=remat_policy(self.remat), prevent_cse=False)
        else:
            check_remat(self.remat)
        scan = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=self.length,
            unroll=self.unroll,
        )
        carry, _ = scan(self.block(**dict(self.block_args), name=STACKED), carry, *args)
        return carry
