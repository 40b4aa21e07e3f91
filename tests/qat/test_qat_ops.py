"""Every elementwise operation has a torch version, and QAT stays exact around each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fhe_quant.ir import OPS, Node
from fhe_quant.quant.qat import TORCH_ELEMENTWISE, torch_elementwise
from fhe_quant.torch import compile_qat_model, prepare_qat
from fhe_quant.training import fit

#: A node of every elementwise op, with the attributes and constants it needs.
NODES = [
    Node("n", "identity", ("x",)),
    Node("n", "relu", ("x",)),
    Node("n", "relu6", ("x",)),
    Node("n", "hardtanh", ("x",), {"min_val": -0.5, "max_val": 2.0}),
    Node("n", "leaky_relu", ("x",), {"negative_slope": 0.1}),
    Node("n", "prelu", ("x",), {}, {"weight": np.array([0.25, -0.5, 0.1])}),
    Node("n", "sigmoid", ("x",)),
    Node("n", "tanh", ("x",)),
    Node("n", "gelu", ("x",), {"approximate": "none"}),
    Node("n", "gelu", ("x",), {"approximate": "tanh"}),
    Node("n", "silu", ("x",)),
    Node("n", "hardswish", ("x",)),
    Node("n", "hardsigmoid", ("x",)),
    Node("n", "elu", ("x",), {"alpha": 0.7}),
    Node("n", "softplus", ("x",), {"beta": 2.0, "threshold": 5.0}),
    Node("n", "mish", ("x",)),
    Node("n", "softsign", ("x",)),
    Node("n", "add_const", ("x",), {}, {"constant": np.array([1.0, -2.0, 0.5])}),
    Node("n", "mul_const", ("x",), {}, {"constant": np.array(-3.0)}),
    Node("n", "reshape", ("x",), {"shape": (3, 1)}),
]


def test_every_elementwise_op_of_the_table_has_a_torch_version() -> None:
    elementwise = {name for name, spec in OPS.items() if spec.kind == "elementwise"}
    assert elementwise <= set(TORCH_ELEMENTWISE)
    assert elementwise | {"reshape"} == {node.op for node in NODES}


@pytest.mark.parametrize("node", NODES, ids=lambda n: f"{n.op}-{dict(n.attrs)}")
def test_torch_version_matches_the_float_semantics(node: Node) -> None:
    x = np.random.default_rng(0).normal(scale=4.0, size=(16, 3))
    t = torch.tensor(x, requires_grad=True)
    out = torch_elementwise(node, t)
    np.testing.assert_allclose(out.detach().numpy(), node.evaluate(x), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(t.grad).all()


class _Everything(nn.Module):
    """Client-side ops before the first layer and after the last, constants in between."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.bn = nn.BatchNorm1d(6)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x * 0.5)  # pre: runs on the client before quantization
        x = self.act(self.bn(self.fc1(x)))
        x = self.act(self.fc2(x) - 1.0) * 2.0
        return torch.sigmoid(self.fc3(x))  # post: runs on the client after decryption


ACTIVATIONS = [
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.ELU,
    nn.Softplus,
    nn.Hardtanh,
    nn.Mish,
    nn.Softsign,
]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    act=st.sampled_from(ACTIVATIONS),
    bits=st.integers(2, 5),
    scale=st.sampled_from(["lsq", "ema"]),
    mode=st.sampled_from(["uniform", "binary", "binary_stochastic"]),
    seed=st.integers(0, 2**16),
)
def test_forward_is_the_compiled_program_for_every_activation(act, bits, scale, mode, seed):
    torch.manual_seed(seed)
    model = _Everything(act())
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(96, 5))
    y = (x[:, 0] > 0).astype(int)
    qat = prepare_qat(model, n_bits=bits, activation_scale=scale, weight_mode=mode, seed=seed)
    fit(qat, x, y, epochs=1, batch_size=32, verbose=False)
    x_test = np.concatenate([rng.normal(size=(20, 5)), rng.normal(size=(4, 5)) * 50])
    qm = compile_qat_model(qat, x, compile=False)
    with torch.no_grad():
        np.testing.assert_array_equal(qat(x_test).numpy(), qm.forward(x_test))
    np.testing.assert_array_equal(qat.forward_integers(x_test), qm.forward_integers(x_test))
