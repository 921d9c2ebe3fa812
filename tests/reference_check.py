"""A compiled float64 network against the NumPy reference (runtime/reference.py), which
computes layer by layer and shares no code with the generated kernels."""

from __future__ import annotations

import numpy as np
import pytest

import convdsl
from convdsl.runtime.gradcheck import random_targets
from convdsl.runtime.reference import ReferenceNetwork


def assert_matches_reference(compiled: convdsl.CompiledNetwork) -> None:
    """Outputs, loss, input and parameter gradients agree, training then inference, and
    so do the running statistics after both. Same parameters and dropout seed."""
    network, batch = compiled.network, compiled.batch
    reference = ReferenceNetwork(network, params=compiled.state_dict(), seed=0)
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((batch, *shape))
              for name, shape in network.input_shapes.items()}
    targets = random_targets(compiled, rng)
    for train in (True, False):
        mode = "train" if train else "eval"
        y1, y2 = (net.forward(inputs, train=train, step=1) for net in (compiled, reference))
        np.testing.assert_allclose(y1, y2, rtol=1e-9, atol=1e-12, err_msg=f"output ({mode})")
        assert compiled.loss(targets) == pytest.approx(reference.loss(targets), rel=1e-9)
        g1, g2 = compiled.backward(), reference.backward()
        grads1 = g1 if isinstance(g1, dict) else {"input": g1}
        grads2 = g2 if isinstance(g2, dict) else {"input": g2}
        for name in grads2:
            np.testing.assert_allclose(grads1[name], grads2[name], rtol=1e-8, atol=1e-12,
                                       err_msg=f"gradient of {name} ({mode})")
        assert set(compiled.grads) == set(reference.grads)
        for name, grad in reference.grads.items():
            np.testing.assert_allclose(compiled.grads[name], grad, rtol=1e-8, atol=1e-11,
                                       err_msg=f"{name} ({mode})")
    for name, value in reference.params.items():  # running statistics moved the same way
        np.testing.assert_allclose(compiled.params[name], value, rtol=1e-12, err_msg=name)
