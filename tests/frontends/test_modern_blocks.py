"""Modern CNN blocks (issue 17 part 3): the product of two encrypted tensors
(squeeze-and-excitation), ``ceil_mode`` pooling, channel shuffle and other moves of
values (transpose, permute, slicing, chunk), nearest upsampling.

Each block traces to the op the module computes (the frontend checks the graph against
torch), quantizes, and runs bit for bit the same in ``disable`` and ``simulate``; moves
of values cost no lookup, a product two per element, and every proven bound holds on
worst-case inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shared_helpers import all_values, extreme_codes
from torch import nn

from fhe_quant.errors import UnsupportedOpError
from fhe_quant.frontends.torch import ceil_mode_extra, trace_module
from fhe_quant.lower import GatherStep, ProductStep, product_scale
from fhe_quant.passes import simplify
from fhe_quant.torch import compile_torch_model

TINY_P_ERROR = 1e-12


def _float(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


def _ops(model: nn.Module, x: np.ndarray) -> list[str]:
    return [n.op for n in simplify(trace_module(model, x)).nodes]


def _extreme_codes(qm, rng: np.random.Generator, n: int = 16) -> np.ndarray:
    return extreme_codes(qm, rng, n)


# --------------------------------------------------------------------------- models


class SqueezeExcite(nn.Module):
    """``x * hardsigmoid(fc2(relu(fc1(pool(x)))))`` after a convolution (MobileNetV3)."""

    def __init__(self, channels: int = 4, gate=F.hardsigmoid) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, channels, 3, padding=1)
        self.fc1 = nn.Conv2d(channels, 2, 1)
        self.fc2 = nn.Conv2d(2, channels, 1)
        self.project = nn.Conv2d(channels, 3, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.conv(x))
        s = self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return torch.flatten(F.adaptive_avg_pool2d(self.project(x * s), 1), 1)


class TwoBranchProduct(nn.Module):
    """``relu(conv_a(x)) * relu(conv_b(x))``: each operand read by the product only."""

    def __init__(self, product: bool = True) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 4 * 4, 2)
        self.product = product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.a(x)), torch.sigmoid(self.b(x))
        y = a * b if self.product else a + b
        return self.head(torch.flatten(y, 1))


def _channel_shuffle_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
    x = x.view(n, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, c, h, w)


class Shuffle(nn.Module):
    """Grouped convolutions around a channel shuffle, in one of three forms."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1, groups=2)
        self.b = nn.Conv2d(6, 6, 1, groups=3)
        self.head = nn.Linear(6 * 4 * 4, 3)
        self.form = form
        self.shuffle = nn.ChannelShuffle(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        if self.form == "view":
            x = _channel_shuffle_view(x, 3)
        elif self.form == "module":
            x = self.shuffle(x)
        elif self.form == "permute":
            n = x.shape[0]
            x = x.reshape(n, 3, 2, 4, 4).permute(0, 2, 1, 3, 4).flatten(1, 2)
        x = torch.relu(self.b(x))
        return self.head(torch.flatten(x, 1))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: chunk, one branch, cat, shuffle; a transposed head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.branch = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.head = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        left, right = x.chunk(2, dim=1)
        x = _channel_shuffle_view(torch.cat([left, torch.relu(self.branch(right))], 1), 2)
        return self.head(torch.flatten(x.permute(0, 2, 3, 1), 1))


class Pools(nn.Module):
    """``ceil_mode=True`` max and average pooling where the last window hangs over."""

    def __init__(
        self, kernel: int, stride: int, padding: int, avg: bool, ceil: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        pool = nn.AvgPool2d if avg else nn.MaxPool2d
        self.pool = pool(kernel, stride, padding, ceil_mode=ceil)
        self.head = nn.LazyLinear(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(torch.relu(self.pool(torch.relu(self.conv(x)))), 1))


class Upsample(nn.Module):
    """Nearest upsampling (module, scale factor, size) between convolutions."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Linear(2 * 6 * 6, 2)
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        if self.form == "module":
            x = self.up(x)
        elif self.form == "scale":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = F.interpolate(x, size=(6, 6))
        return self.head(torch.flatten(torch.relu(self.b(x)), 1))


def _built(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = model.eval()
    with torch.no_grad():
        model(torch.zeros((1, *shape)))  # materializes lazy layers
    return model


CASES = {
    "se": (lambda: SqueezeExcite(), (2, 4, 4)),
    "se_sigmoid": (lambda: SqueezeExcite(gate=torch.sigmoid), (2, 4, 4)),
    "product": (lambda: TwoBranchProduct(), (1, 4, 4)),
    "shuffle_view": (lambda: Shuffle("view"), (2, 4, 4)),
    "shuffle_module": (lambda: Shuffle("module"), (2, 4, 4)),
    "shuffle_permute": (lambda: Shuffle("permute"), (2, 4, 4)),
    "shuffle_unit": (lambda: ShuffleUnit(), (1, 4, 4)),
    "max_ceil": (lambda: Pools(2, 2, 0, avg=False), (1, 5, 5)),
    "max_ceil_3x3": (lambda: Pools(3, 2, 1, avg=False), (1, 6, 6)),
    "avg_ceil": (lambda: Pools(2, 2, 0, avg=True), (1, 5, 5)),
    "avg_ceil_3x3": (lambda: Pools(3, 2, 1, avg=True), (1, 6, 6)),
    "upsample_module": (lambda: Upsample("module"), (1, 6, 6)),
    "upsample_scale": (lambda: Upsample("scale"), (1, 6, 6)),
    "upsample_size": (lambda: Upsample("size"), (1, 6, 6)),
}


def _case(name: str) -> tuple[nn.Module, np.ndarray]:
    make, shape = CASES[name]
    model = _built(make(), shape)
    x = np.random.default_rng(0).normal(size=(120, *shape))
    return model, x


# --------------------------------------------------------------------------- graphs


def test_each_block_traces_to_its_op() -> None:
    expected = {
        "se": "mul",
        "product": "mul",
        "shuffle_view": "gather",
        "shuffle_module": "gather",
        "shuffle_permute": "gather",
        "shuffle_unit": "gather",
        "max_ceil": "max_pool",
        "upsample_module": "gather",
        "upsample_scale": "gather",
        "upsample_size": "gather",
    }
    for name, op in expected.items():
        model, x = _case(name)
        assert op in _ops(model, x), name
    # A channel shuffle and its reshapes are one gather, in all three forms.
    for form in ("view", "module", "permute"):
        model, x = _case(f"shuffle_{form}")
        assert _ops(model, x) == ["input", "conv", "relu", "gather", "conv", "relu"] + [
            "reshape",
            "linear",
        ]


def test_ceil_mode_is_padding_at_the_end() -> None:
    for n in range(3, 12):
        for k, s, p in [(2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 3, 1), (2, 1, 0)]:
            if n + 2 * p < k:
                continue
            pool = nn.MaxPool1d(k, s, p, ceil_mode=True)
            out = pool(torch.zeros(1, 1, n)).shape[-1]
            (extra,) = ceil_mode_extra((n,), (k,), (s,), (p,))
            assert (n + 2 * p + extra - k) // s + 1 == out
            assert 0 <= extra < k


@pytest.mark.parametrize("name", sorted(CASES))
def test_quantized_block_follows_the_float_model(name: str) -> None:
    model, x = _case(name)
    # NOTE: no budget (the default before accumulator_bits='auto'): 8-bit tracking
    qm = compile_torch_model(model, x, n_bits=8, accumulator_bits=None, compile=False)
    expected = _float(model, x)
    got = qm.forward(x)
    centred = np.corrcoef(expected.ravel() - expected.mean(), got.ravel() - got.mean())[0, 1]
    assert centred > 0.98, centred


def test_moving_values_costs_no_lookup() -> None:
    # The same convolutions with and without the shuffle: the same lookups.
    # NOTE: no budget on either (accumulator_bits='auto' applies to chains only, and the
    # gather makes the shuffled model a DAG)
    model, x = _case("shuffle_view")
    shuffled = compile_torch_model(model, x, n_bits=6, accumulator_bits=None, compile=False)
    model.form = "none"
    plain = compile_torch_model(model, x, n_bits=6, accumulator_bits=None, compile=False)
    assert shuffled.program.lookups_by_width() == plain.program.lookups_by_width()
    assert sum(isinstance(s, GatherStep) for s in shuffled.program.steps) == 1
    assert not any(isinstance(s, GatherStep) for s in plain.program.steps)


def test_product_costs_two_lookups_per_element() -> None:
    model, x = _case("product")
    qm = compile_torch_model(model, x, n_bits=6, compile=False)
    model.product = False
    summed = compile_torch_model(model, x, n_bits=6, compile=False)
    (product,) = [s for s in qm.program.steps if isinstance(s, ProductStep)]
    lookups, plain = qm.program.lookups_by_width(), summed.program.lookups_by_width()
    extra = {w: n - plain.get(w, 0) for w, n in lookups.items() if n != plain.get(w, 0)}
    assert extra == {product.sum_bits: 2 * 2 * 4 * 4}
    # the model's statistics (and so its report) count the product as a layer
    (row,) = [r for r in qm.statistics["layers"] if r["layer"] == product.name]
    assert row["lookups"] == 2 * 2 * 4 * 4 and row["table_input_bits"] == product.sum_bits
    assert row["accumulator_bits"] == product.acc_bits


# --------------------------------------------------------------------------- integers


def test_quarter_squares_are_within_one_unit_of_the_product() -> None:
    assert product_scale(14, 8) == 0.25  # exact: floor(t**2 / 4) differences
    for bits in (3, 6):
        model, x = _case("product")
        qm = compile_torch_model(model, x, n_bits=bits, compile=False)
        (index,) = [k for k, s in enumerate(qm.program.steps) if isinstance(s, ProductStep)]
        step = qm.program.steps[index]
        values = all_values(qm.program, _extreme_codes(qm, np.random.default_rng(1)))
        a, b = (values[i] for i in step.inputs)
        za = qm.quantized.dag.tables["relu"].zero_point_array(4)
        zb = qm.quantized.dag.tables["sigmoid"].zero_point_array(4)
        exact = 4 * step.factor * (a - za) * (b - zb)
        error = values[index + 1] - step.offset - exact
        assert np.abs(error).max() < 1, bits
        if step.factor == 0.25:
            np.testing.assert_array_equal(values[index + 1] - step.offset, exact)
        # the real value is the product of the operands' real values
        real = qm.quantized.dag.tables["relu"].dequantize(a) * qm.quantized.dag.tables[
            "sigmoid"
        ].dequantize(b)
        unit = np.max(step.scale)
        assert np.abs(step.dequantize(values[index + 1]) - real).max() <= unit


@pytest.mark.parametrize("name", ["se", "se_sigmoid", "shuffle_unit", "max_ceil_3x3", "avg_ceil"])
def test_proven_bounds_hold_on_worst_case_inputs(name: str) -> None:
    model, x = _case(name)
    # NOTE: no budget (the default before accumulator_bits='auto'): 8-bit tracking
    qm = compile_torch_model(model, x, n_bits=8, accumulator_bits=None, compile=False)
    values = all_values(qm.program, _extreme_codes(qm, np.random.default_rng(2)))
    for step, value in zip(qm.program.steps, values[1:], strict=True):
        assert value.min() >= 0, step.name
        if hasattr(step, "acc_max"):
            assert np.all(value <= step.acc_max), step.name
        elif hasattr(step, "out_max"):
            assert np.all(value <= step.out_max), step.name


@pytest.mark.parametrize(
    "name", ["se", "shuffle_unit", "max_ceil_3x3", "avg_ceil_3x3", "upsample_scale"]
)
def test_simulate_equals_disable(name: str) -> None:
    model, x = _case(name)
    qm = compile_torch_model(model, x, n_bits=3, p_error=TINY_P_ERROR)
    np.testing.assert_array_equal(
        qm.forward_integers(x[:3], fhe="simulate"), qm.forward_integers(x[:3])
    )


def test_compiled_product_costs_what_the_program_says() -> None:
    model, x = _case("product")
    qm = compile_torch_model(model, x, n_bits=3, p_error=TINY_P_ERROR)
    model.product = False
    summed = compile_torch_model(model, x, n_bits=3, p_error=TINY_P_ERROR)
    # Measured from Concrete's own count: the product adds 2 bootstraps per element.
    added = qm.circuit.programmable_bootstrap_count - summed.circuit.programmable_bootstrap_count
    assert added == 2 * 2 * 4 * 4
    np.testing.assert_array_equal(
        qm.forward_integers(x[:4], fhe="simulate"), qm.forward_integers(x[:4])
    )


@pytest.mark.slow
@pytest.mark.execute
def test_product_execute_equals_disable() -> None:
    model, x = _case("product")
    qm = compile_torch_model(model, x, n_bits=3, p_error=TINY_P_ERROR)
    np.testing.assert_array_equal(
        qm.forward_integers(x[:1], fhe="execute"), qm.forward_integers(x[:1])
    )


# --------------------------------------------------------------------------- refusals


class Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class Fractional(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(5, 5))


class BatchPermute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(1, 0, 2, 3)


class Quotient(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (torch.relu(x) + 1)


class FancyIndex(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, x.shape[1] - 1]


class LayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class FunctionalLayerNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (4,))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (LayerNorm(), r"LayerNorm.*DESIGN-NOTES.md section 16"),
        (FunctionalLayerNorm(), r"layer_norm.*DESIGN-NOTES.md section 16"),
        (Bilinear(), "mode='bilinear'"),
        (Fractional(), "integer scale factor"),
        (BatchPermute(), "permute of the batch axis"),
        (Quotient(), "div of two encrypted tensors"),
        (FancyIndex(), "indexing an encrypted tensor"),
    ],
    ids=[
        "layer-norm",
        "functional-layer-norm",
        "bilinear",
        "fractional",
        "batch-permute",
        "quotient",
        "index",
    ],
)
def test_refusals_name_the_operation(model: nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedOpError, match=match):
        trace_module(model, np.zeros((2, 2, 4, 4)))


class ProductOfASum(nn.Module):
    """``(relu(a(x)) + relu(b(x))) * sigmoid(c(x))``: a factor that is a sum of codes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)
        self.d = nn.Linear(3, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        total = torch.relu(self.a(t)) + torch.relu(self.b(t))
        return self.d(total * torch.sigmoid(self.c(t)))


def test_a_product_of_a_sum_is_refused_when_quantized() -> None:
    # the product's squares are planned from its factors' quantizers; a sum of codes has
    # none of its own (the message says how to give it one)
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(120, 4))
    with pytest.raises(UnsupportedOpError, match=r"a product of an encrypted add.*activation"):
        compile_torch_model(ProductOfASum(), x, n_bits=4, compile=False)
