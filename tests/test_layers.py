"""Shared model pieces vs. the PyTorch references they stand in for."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")

from bpgo_jax.models.layers import activation, timestep_embedding  # noqa: E402


@pytest.mark.parametrize("dim", [8, 9, 256])
@pytest.mark.parametrize("flip,shift", [(True, 0.0), (False, 1.0), (True, 1.0), (False, 0.0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    ref = diffusers_embeddings.get_timestep_embedding(
        torch.tensor(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    )
    assert ours.shape == (4, dim)
    # sin / cos of float32 arguments near 1000 differ by their ulp (6e-5) across libraries.
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "name,reference",
    [
        ("silu", torch.nn.functional.silu),
        ("gelu", torch.nn.functional.gelu),
        ("gelu_pytorch_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
        ("gelu-approximate", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
        ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
        ("mish", torch.nn.functional.mish),
    ],
)
def test_activations_match_torch(name, reference):
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(activation(name)(x)), reference(torch.tensor(x)).numpy(), atol=1e-6
    )
    with pytest.raises(ValueError, match="unsupported activation 'swiglu'"):
        activation("swiglu")
