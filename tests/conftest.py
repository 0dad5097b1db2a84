"""Test setup: 8 fake CPU devices, so sharded code runs here as on a pod slice.

The tests' programs are tiny: compiling them, not running them, is most of the
suite's time, and XLA:CPU's backend optimisation level 0 compiles them about
twice as fast. Every property the tests check (on-policy ratio exactly 1,
sharded = unsharded, resume = uninterrupted) holds at every level; the
default level users run is checked by tests/test_onpolicy_ratio.py and
tests/test_package.py, whose subprocesses set their own XLA flags.
"""

import os

OPT_LEVEL = "--xla_backend_optimization_level=0"

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), OPT_LEVEL, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiled functions are shared across tests, xdist workers and the commands the
# tests launch through JAX's persistent cache: runs with identical shapes
# (baseline, resume) compile once. Every program is kept: a train run's many
# sub-second programs add up to seconds per run.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
