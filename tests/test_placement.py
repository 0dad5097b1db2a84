"""Weights placed shard by shard: each process builds only its devices' shards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file

from bpgo_jax.models import weights


def test_loaded_tensors_equal_the_file_and_carry_the_requested_sharding(tmp_path):
    rng = np.random.default_rng(0)
    stored = {
        "dense.weight": rng.normal(size=(16, 4)).astype(np.float32),  # torch [out, in]
        "dense.bias": rng.normal(size=(16,)).astype(np.float32),
        "scale": np.asarray(3.5, np.float32),  # 0-d
    }
    path = str(tmp_path / "w.safetensors")
    save_file(stored, path)
    expected = {
        ("dense", "kernel"): jax.ShapeDtypeStruct((4, 16), jnp.float32),
        ("dense", "bias"): jax.ShapeDtypeStruct((16,), jnp.float32),
        ("scale",): jax.ShapeDtypeStruct((), jnp.float32),
    }
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    specs = {
        ("net", "dense", "kernel"): PartitionSpec("y", "x"),
        ("net", "dense", "bias"): PartitionSpec("x"),  # split 4 ways, replicated over y
        ("net", "scale"): PartitionSpec(),
    }
    sharding_fn = lambda p, shape: NamedSharding(mesh, specs[p])
    with weights.open_tensors(path) as reader:
        params = weights.read_params(
            reader, expected, prefix=("net",), dtype=jnp.bfloat16, sharding_fn=sharding_fn
        )
    want = {
        ("dense", "kernel"): stored["dense.weight"].T,
        ("dense", "bias"): stored["dense.bias"],
        ("scale",): stored["scale"],
    }
    for p, value in want.items():
        got = params[p[0]][p[1]] if len(p) == 2 else params[p[0]]
        host = value.astype(jnp.bfloat16)
        assert got.sharding == sharding_fn(("net", *p), value.shape)
        assert got.dtype == jnp.bfloat16 and got.shape == value.shape
        np.testing.assert_array_equal(np.asarray(got), host)
        for shard in got.addressable_shards:  # each device holds its own slice
            np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
