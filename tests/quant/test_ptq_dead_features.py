"""A feature that is 0 on every calibration sample must not coarsen the next layer."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fhe_quant.torch import compile_torch_model


def _mlp(dead_weight: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias[2] = -100.0  # hidden channel 2 never fires on the data below
        model[0].weight[2] = 0.0
        model[2].weight[:, 2] = dead_weight
    return model.eval()


def test_dead_channel_weights_do_not_change_the_quantized_model() -> None:
    x = np.random.default_rng(0).normal(size=(64, 2))
    reference = compile_torch_model(_mlp(0.0), x, n_bits=4, compile=False)
    loud = compile_torch_model(_mlp(50.0), x, n_bits=4, compile=False)
    # the float models agree (the channel is 0), and so must the quantized ones, exactly:
    # a dead channel's scale would otherwise be 1.0 and its folded weight 50 would set
    # the whole row's weight scale
    np.testing.assert_array_equal(loud.float_forward(x), reference.float_forward(x))
    np.testing.assert_array_equal(loud.forward_integers(x), reference.forward_integers(x))
    np.testing.assert_array_equal(loud.forward(x), reference.forward(x))
    last = loud.quantized.segments[1].linear
    assert np.all(last.weight_q[:, 2] == 0)
    assert np.any(last.weight_q[:, :2] != 0)


def test_dead_input_feature_is_clipped_to_zero() -> None:
    x = np.random.default_rng(1).normal(size=(64, 3))
    x[:, 1] = 0.0  # a constant input feature (e.g. a pixel that is always blank)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    qm = compile_torch_model(model, x, n_bits=4, compile=False)
    shifted = x.copy()
    shifted[:, 1] = 5.0  # outside its calibrated range [0, 0]: counts as 0
    np.testing.assert_array_equal(qm.forward(shifted), qm.forward(x))


class _Branches(nn.Module):
    """Two branches concatenated: a branching graph (planned by ``quantize_dag``)."""

    def __init__(self, dead_weight: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left, self.right, self.head = nn.Linear(2, 3), nn.Linear(2, 3), nn.Linear(6, 2)
        with torch.no_grad():
            self.left.weight[2] = 0.0
            self.left.bias[2] = -100.0  # left channel 2 never fires
            self.head.weight[:, 2] = dead_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1))


def test_dead_channel_of_a_branching_graph_does_not_change_the_quantized_model() -> None:
    x = np.random.default_rng(2).normal(size=(64, 2))
    reference = compile_torch_model(_Branches(0.0).eval(), x, n_bits=4, compile=False)
    loud = compile_torch_model(_Branches(50.0).eval(), x, n_bits=4, compile=False)
    assert not loud.program.is_chain
    np.testing.assert_array_equal(loud.float_forward(x), reference.float_forward(x))
    np.testing.assert_array_equal(loud.forward(x), reference.forward(x))
