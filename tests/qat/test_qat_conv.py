"""QAT for convolutional chains: exact parity with the compiled model, per-channel
quantizers, batch-norm folding, pooling, accumulator budgets, training."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.ir import OPS, ConvGeometry, Node
from fhe_quant.lower import LinearStep, TableStep
from fhe_quant.quant.qat import torch_linear
from fhe_quant.torch import compile_qat_model, prepare_qat
from fhe_quant.training import fit

#: Per-lookup error probability for exactness tests: any mismatch is then a real bug.
TINY_P_ERROR = 1e-12


def test_eval_forward_is_the_compiled_program(trained_cnn, digit_images) -> None:
    _, x_test, _, y_test = digit_images
    qm = compile_qat_model(trained_cnn, x_test, compile=False)
    np.testing.assert_array_equal(
        trained_cnn.forward_integers(x_test), qm.forward_integers(x_test, fhe="disable")
    )
    logits_qat = trained_cnn(x_test).detach().numpy()
    logits_qm = qm.forward(x_test, fhe="disable")
    np.testing.assert_array_equal(logits_qat.argmax(axis=1), logits_qm.argmax(axis=1))
    # Within one quantization step of the last layer's output, and in fact bit for bit.
    assert np.all(np.abs(logits_qat - logits_qm) < qm.program.output_step.scale)
    assert np.array_equal(logits_qat, logits_qm)
    assert np.mean(logits_qm.argmax(axis=1) == y_test) > 0.6  # chance: 0.1


def test_program_shape_convolution_pooling_dense(trained_cnn) -> None:
    program = trained_cnn.integer_program()
    linear = [step for step in program.steps if isinstance(step, LinearStep)]
    assert [step.op for step in linear] == ["conv", "avg_pool", "linear"]
    tables = [step for step in program.steps if isinstance(step, TableStep)]
    assert [step.table.shape[0] for step in tables] == [4 * 6 * 6, 4 * 3 * 3]
    # The pooling sums 4 codes of 3 bits: weights exactly 1.
    assert np.all(linear[1].weight == 1) and int(linear[1].acc_max.max()) == 4 * 7


def test_per_channel_step_sizes_on_the_channel_axis(trained_cnn) -> None:
    conv_q, pool_q, dense_q = (layer.input_quantizer for layer in trained_cnn.layers)
    assert (conv_q.n_features, conv_q.axis) == (1, 1)
    assert (pool_q.n_features, pool_q.axis) == (4, 1)
    assert (dense_q.n_features, dense_q.axis) == (36, -1)
    assert trained_cnn.to_quantized_graph().segments[1].linear.input_quantizer.axis == 1
    assert trained_cnn.layers[1].weight is None  # pooling: nothing to train


def test_disable_equals_simulate_exactly(trained_cnn, digit_images) -> None:
    x_train, x_test, _, _ = digit_images
    qm = compile_qat_model(trained_cnn, x_train[:100], p_error=TINY_P_ERROR)
    x = x_test[:12]
    np.testing.assert_array_equal(
        qm.forward_integers(x, fhe="simulate"), qm.forward_integers(x, fhe="disable")
    )
    np.testing.assert_array_equal(qm.forward(x, fhe="simulate"), trained_cnn(x).detach().numpy())


def test_step_sizes_and_weights_change_in_training(make_cnn, digit_images) -> None:
    x_train, _, y_train, _ = digit_images
    qat = prepare_qat(make_cnn(), n_bits=3, X_sample=x_train)
    qat.initialize(x_train[:64])
    before = copy.deepcopy(qat.state_dict())
    fit(qat, x_train[:256], y_train[:256], epochs=2, lr=1e-2, verbose=False)
    after = qat.state_dict()
    for index in range(3):
        key = f"layers.{index}.input_quantizer.scale"
        assert not torch.equal(before[key], after[key]), key
    assert not torch.equal(before["layers.0.weight"], after["layers.0.weight"])


def test_state_dict_copy_and_pickle_give_the_same_program(
    trained_cnn, make_cnn, digit_images
) -> None:
    x_train, x_test, _, _ = digit_images
    fresh = prepare_qat(make_cnn(), n_bits=3, X_sample=x_train)
    fresh.load_state_dict(trained_cnn.state_dict())
    expected = trained_cnn(x_test).detach().numpy()
    np.testing.assert_array_equal(fresh.eval()(x_test).detach().numpy(), expected)
    for clone in (copy.deepcopy(trained_cnn), pickle.loads(pickle.dumps(trained_cnn))):
        np.testing.assert_array_equal(clone(x_test).detach().numpy(), expected)


def test_gradients_reach_conv_weights_and_every_step_size(make_cnn, digit_images) -> None:
    x_train, _, y_train, _ = digit_images
    qat = prepare_qat(make_cnn(), n_bits=3, X_sample=x_train)
    loss = nn.functional.cross_entropy(qat(x_train[:128]), torch.as_tensor(y_train[:128]))
    loss.backward()
    for name, parameter in qat.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- geometry

GEOMETRIES = [
    ConvGeometry((1, 1), ((0, 0), (0, 0)), (1, 1)),
    ConvGeometry((2, 1), ((1, 1), (0, 2)), (1, 1)),
    ConvGeometry((1, 1), ((1, 2), (1, 2)), (2, 1)),
    ConvGeometry((1, 2), ((1, 1), (1, 1)), (1, 1), groups=2),
    ConvGeometry((2,), ((1, 0),), (2,), groups=2),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_torch_convolution_matches_the_op_table(geometry) -> None:
    # The STE surrogate computes the same map as the integer program (exact on small
    # integers in float64), so gradients follow the real padding, strides and groups.
    rng = np.random.default_rng(0)
    nd = geometry.ndim
    x = rng.integers(0, 8, size=(2, 4) + (7,) * nd)
    weight = rng.integers(-3, 4, size=(6, 4 // geometry.groups) + (3,) * nd)
    node = Node("c", "conv", ("x",), geometry.to_attrs(), {"weight": weight})
    expected = OPS["conv"].linear_apply(x, weight, node.attrs, None)
    got = torch_linear(node, torch.tensor(x, dtype=torch.float64), torch.tensor(weight * 1.0))
    np.testing.assert_array_equal(got.numpy(), expected)


class _Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding="same", dilation=2)
        self.conv2 = nn.Conv1d(4, 4, 2, stride=2, groups=2, padding=1)
        self.pool = nn.AdaptiveAvgPool1d(2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.nn.functional.silu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _conv2d_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, (3, 2), padding="same"),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
        nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


MODELS = {
    "conv1d-same-dilated-grouped-adaptive": (_Conv1dNet, (2, 10)),
    "conv2d-even-same-bn-depthwise-adaptive": (_conv2d_bn, (2, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(
    ("scale", "mode"),
    [("lsq", "uniform"), ("ema", "uniform"), ("lsq", "binary"), ("ema", "binary_stochastic")],
)
def test_every_geometry_stays_exact(name, scale, mode) -> None:
    factory, shape = MODELS[name]
    torch.manual_seed(1)
    model = factory()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64,) + shape)
    y = (x.reshape(64, -1).mean(axis=1) > 0).astype(int)
    qat = prepare_qat(model, n_bits=3, X_sample=x, activation_scale=scale, weight_mode=mode, seed=0)
    fit(qat, x, y, epochs=2, batch_size=16, verbose=False)
    x_test = np.concatenate([rng.normal(size=(10,) + shape), rng.normal(size=(3,) + shape) * 30])
    qm = compile_qat_model(qat, x, compile=False)
    with torch.no_grad():
        np.testing.assert_array_equal(qat(x_test).numpy(), qm.forward(x_test))
    np.testing.assert_array_equal(qat.forward_integers(x_test), qm.forward_integers(x_test))
    if mode != "uniform":
        # Binary weights on every trainable layer but the last (pooling stays exact 1s).
        segments = qm.quantized.segments
        for segment in segments[:-1]:
            codes = segment.linear.weight_q
            if OPS[segment.linear.node.op].unit_weights:
                assert np.all(codes == 1)
            else:
                assert set(np.unique(codes)) <= {-1, 1}


def test_batch_norm_folds_into_the_convolution_from_its_running_statistics() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    model.train()  # folding reads the running statistics, not the batch's
    x = np.random.default_rng(0).normal(size=(8, 2, 4, 4))
    qat = prepare_qat(model, n_bits=3, X_sample=x)
    gain = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    expected_w = conv.weight.detach().double() * gain.reshape(-1, 1, 1, 1)
    expected_b = (conv.bias.detach().double() - bn.running_mean.double()) * gain + bn.bias.detach()
    layer = qat.layers[0]
    torch.testing.assert_close(layer.weight.detach(), expected_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.bias.detach(), expected_b.double(), rtol=1e-6, atol=1e-7)
    assert len(qat.layers) == 2  # conv (with the batch norm) and the dense layer
    with torch.no_grad():
        reference = model.eval().double()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(qat.float_graph()(x), reference, rtol=1e-9, atol=1e-9)


def test_accumulator_budget_bounds_every_conv_accumulator(make_cnn, digit_images) -> None:
    x_train, _, y_train, _ = digit_images
    qat = prepare_qat(make_cnn(), n_bits=3, accumulator_bits=7, X_sample=x_train)
    fit(qat, x_train[:256], y_train[:256], epochs=1, verbose=False)
    program = qat.integer_program()
    widths = [step.acc_bits for step in program.steps if isinstance(step, LinearStep)]
    assert max(widths) <= 7, widths
    conv_codes = qat.to_quantized_graph().segments[0].linear.weight_q
    # fan-in = in_channels / groups * kernel area = 9: 7 * sum|codes| <= 127 per channel
    assert conv_codes.shape[1:] == (1, 3, 3)
    assert (np.abs(conv_codes).reshape(4, -1).sum(axis=1) * 7).max() <= 127


@pytest.mark.slow
@pytest.mark.execute
def test_execute_equals_the_qat_module() -> None:
    # A tiny CNN (32 + 8 lookups), so that the real encrypted run stays short.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 2)
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 6, 6))
    y = (x[:, 0, 2:4, 2:4].mean(axis=(1, 2)) > 0).astype(int)
    qat = prepare_qat(model, n_bits=3, X_sample=x)
    fit(qat, x, y, epochs=2, batch_size=16, verbose=False)
    qat.eval()
    qm = compile_qat_model(qat, x, p_error=TINY_P_ERROR)
    x_test = x[:1]
    expected = qat(x_test).detach().numpy()
    np.testing.assert_array_equal(qm.forward(x_test, fhe="execute"), expected)
