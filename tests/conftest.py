"""Test setup: 8 fake CPU devices, so sharded code runs here as on a pod slice.

The tests' programs are tiny: compiling them, not running them, is most of the
suite's time, and XLA:CPU's backend optimisation level 0 compiles them about
twice as fast. The properties the tests check (on-policy ratio exactly 1,
sharded = unsharded, resume = uninterrupted) hold at both levels, with one
exception seen: the 4-device run of tests/test_multiprocess.py on an AVX2-only
CPU misses ratio 1 by one float32 step at level 0 only. The default level
users run is checked by tests/test_onpolicy_ratio.py, whose subprocess sets
its own XLA flags.
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


import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_in_memory_programs():
    """Each xdist worker runs hundreds of tests: their traced and compiled programs,
    kept in memory, make every later garbage collection (and so every later test)
    slower. Programs are dropped after each test file; one still needed reloads
    from the persistent cache."""
    yield
    jax.clear_caches()
    gc.collect()
