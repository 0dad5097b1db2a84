"""Matmul and convolution FLOPs of a jaxpr, loops multiplied out.

XLA's `compiled.cost_analysis()` counts a while loop's body once, so a
network whose blocks are scanned (`models/scan.py`) shows one block's FLOPs
per stack there. Counting the jaxpr's dots and convolutions, each scan body
`length` times, gives the FLOPs the program really runs (MFU's numerator).
"""

from __future__ import annotations

import numpy as np


def _dot_flops(eqn) -> int:
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    contract = int(np.prod([lhs[d] for d in lc]))
    batch = int(np.prod([lhs[d] for d in lb]))
    free_l = int(np.prod(lhs)) // (contract * batch)
    free_r = int(np.prod(rhs)) // (contract * batch)
    return 2 * batch * free_l * free_r * contract


def _conv_flops(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    kernel_out = rhs[dn.rhs_spec[0]]
    per_output = int(np.prod(rhs)) // kernel_out  # in-channels / groups x window
    return 2 * int(np.prod(out)) * per_output


def matmul_flops(jaxpr) -> int:
    """Multiply-add FLOPs (x2) of every dot and convolution of a closed jaxpr.

    Scan bodies count `length` times, `cond` its costliest branch, a
    `while` body once (its trip count is not static).
    """
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * matmul_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(matmul_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            for value in eqn.params.values():
                sub = getattr(value, "jaxpr", value)
                if hasattr(sub, "eqns"):
                    total += matmul_flops(sub)
    return total
