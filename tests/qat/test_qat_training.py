"""Training behaviour: LSQ and EMA step sizes, binarization, accumulator budgets, fit."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fhe_quant.errors import NotFittedError
from fhe_quant.lower import LinearStep, TableStep
from fhe_quant.qat_module import INIT_SAMPLES
from fhe_quant.quant.qat import DEAD_FEATURE_SCALE, quantize_weight
from fhe_quant.torch import compile_qat_model, prepare_qat
from fhe_quant.training import fit


def _accuracy(module, x, y) -> float:
    with torch.no_grad():
        return float(np.mean(module.eval()(x).numpy().argmax(axis=1) == y))


def test_lsq_step_sizes_change_during_training(make_mlp, digits) -> None:
    x_train, _, y_train, _ = digits
    qat = prepare_qat(make_mlp(), n_bits=3)
    qat.initialize(x_train)
    before = [layer.input_quantizer.scale.detach().clone() for layer in qat.layers]
    fit(qat, x_train, y_train, epochs=1, lr=1e-2, verbose=False)
    for layer, initial in zip(qat.layers, before, strict=True):
        changed = ~torch.isclose(layer.input_quantizer.scale.detach(), initial)
        assert changed.sum() > len(initial) // 2


def test_ema_ranges_move_in_training_and_freeze_in_eval(make_mlp, digits) -> None:
    x_train, x_test, y_train, _ = digits
    qat = prepare_qat(make_mlp(), n_bits=3, activation_scale="ema")
    assert not any(True for name, _ in qat.named_parameters() if "scale" in name)
    fit(qat, x_train[:256], y_train[:256], epochs=1, verbose=False)
    hidden = qat.layers[1].input_quantizer
    frozen = hidden.running_max.clone()
    qat.train()
    qat(x_train[256:512])
    assert not torch.equal(hidden.running_max, frozen)
    moved = hidden.running_max.clone()
    qat.eval()
    qat(x_test)
    assert torch.equal(hidden.running_max, moved)
    qm = compile_qat_model(qat, x_test, compile=False)
    np.testing.assert_array_equal(qm.forward(x_test), qat(x_test).detach().numpy())


def _binary_run(make_mlp, digits, seed: int) -> tuple[list[torch.Tensor], np.ndarray]:
    x_train, x_test, y_train, _ = digits
    qat = prepare_qat(make_mlp(), n_bits=3, weight_mode="binary_stochastic", seed=seed)
    fit(qat, x_train[:512], y_train[:512], epochs=1, verbose=False)
    weights = [p.detach().clone() for p in qat.parameters()]
    return weights, qat(x_test).detach().numpy()


def test_stochastic_binarization_is_reproducible_under_a_seed(make_mlp, digits) -> None:
    weights_a, out_a = _binary_run(make_mlp, digits, seed=3)
    weights_b, out_b = _binary_run(make_mlp, digits, seed=3)
    weights_c, out_c = _binary_run(make_mlp, digits, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
    np.testing.assert_array_equal(out_a, out_b)
    assert not all(torch.equal(a, c) for a, c in zip(weights_a, weights_c, strict=True))
    assert not np.array_equal(out_a, out_c)


def test_stochastic_binarization_samples_in_training_only(make_mlp, digits) -> None:
    x = digits[0][:64]
    qat = prepare_qat(make_mlp(), n_bits=3, weight_mode="binary_stochastic", seed=0)
    qat.initialize(x)
    with torch.no_grad():
        assert not torch.equal(qat.train()(x), qat(x))  # a new draw per training step
        assert torch.equal(qat.eval()(x), qat(x))  # eval: the deterministic sign


def test_binary_weights_are_plus_or_minus_one_except_the_last_layer(make_mlp, digits) -> None:
    x = digits[0]
    qat = prepare_qat(make_mlp(), n_bits=3, weight_mode="binary")
    qat.initialize(x)
    segments = qat.to_quantized_graph().segments
    for segment in segments[:-1]:
        assert set(np.unique(segment.linear.weight_q)) <= {-1, 1}
        assert segment.linear.weight_quantizer.bits == 2
    last = segments[-1].linear
    assert last.weight_quantizer.bits == 3 and 0 in last.weight_q


def test_two_epoch_qat_beats_random(make_mlp, digits) -> None:
    x_train, x_test, y_train, y_test = digits
    # NOTE: from scratch, without the default accumulator budget (which slows the first
    # epochs of a randomly initialised model: 25% after these 2 epochs).
    qat = prepare_qat(make_mlp(), n_bits=2, accumulator_bits=None)
    fit(qat, x_train, y_train, epochs=2, lr=1e-2, verbose=False)
    assert _accuracy(qat, x_test, y_test) > 0.3


def test_accumulator_budget_bounds_every_proven_accumulator(make_mlp, digits) -> None:
    x_train, _, y_train, _ = digits
    qat = prepare_qat(make_mlp(), n_bits=3, accumulator_bits=7)
    fit(qat, x_train[:256], y_train[:256], epochs=1, verbose=False)
    widths = [s.acc_bits for s in qat.integer_program().steps if isinstance(s, LinearStep)]
    assert max(widths) <= 7
    unbounded = prepare_qat(make_mlp(), n_bits=3, accumulator_bits=None)
    unbounded.initialize(x_train)
    steps = unbounded.integer_program().steps
    assert max(s.acc_bits for s in steps if isinstance(s, LinearStep)) > 7


@pytest.mark.parametrize("bits", [3])
def test_default_is_the_fast_path_budget_and_tables(make_mlp, digits, bits) -> None:
    """The defaults (issue 14 part 6): 2-bit model inputs, 4-bit tables, accumulators
    proven within 6 bits in the first layer and 7 after it, so at most 2 then 3 bits are
    dropped before a table."""
    x_train, x_test, y_train, _ = digits
    qat = prepare_qat(make_mlp(), n_bits=bits, X_sample=x_train)
    qat.initialize(x_train)
    assert qat.config.accumulator_bits == "auto" and qat.config.quant.rounding_bits == 4
    assert [layer.input_quantizer.bits for layer in qat.layers] == [2, 3, 3]
    fit(qat, x_train[:256], y_train[:256], epochs=1, lr=1e-3, verbose=False)
    steps = qat.integer_program().steps
    linear = [s for s in steps if isinstance(s, LinearStep)]
    assert [s.acc_bits <= bound for s, bound in zip(linear, [6, 7, 7], strict=True)] == [True] * 3
    tables = [s for s in steps if isinstance(s, TableStep)]
    assert [t.index_bits <= 4 for t in tables] == [True, True]
    assert [t.lsbs <= dropped for t, dropped in zip(tables, [2, 3], strict=True)] == [True] * 2
    np.testing.assert_array_equal(
        compile_qat_model(qat, x_test, compile=False).forward(x_test),
        qat.eval()(x_test).detach().numpy(),
    )


@pytest.mark.parametrize(
    "n_bits, accumulator_bits, inputs, budgets",
    [
        (3, "auto", 2, [6, 7, 7]),  # the default: 2-bit inputs, one dropped bit fewer
        ({"inputs": 1, "weights": 3, "activations": 3, "outputs": 3}, "auto", 1, [5, 7, 7]),
        ({"inputs": 3, "weights": 3, "activations": 3, "outputs": 3}, "auto", 3, [7, 7, 7]),
        (3, 7, 3, [7, 7, 7]),  # an explicit budget keeps n_bits for the inputs
        (4, "auto", 4, [8, 8, 8]),
    ],
)
def test_narrower_inputs_narrow_the_first_budget(
    make_mlp, n_bits, accumulator_bits, inputs, budgets
) -> None:
    """An int n_bits of 3 with the default budget gives the model inputs 2 bits; a first
    layer reading inputs narrower than the activations gets a budget one bit narrower per
    input bit (same weight budget per input code), explicit settings are kept."""
    qat = prepare_qat(make_mlp(), n_bits=n_bits, accumulator_bits=accumulator_bits)
    assert qat.layers[0].input_quantizer.bits == inputs
    tables = [qat._table_bits(i) for i in range(len(qat.layers))]
    assert [qat.config.layer_accumulator_bits(i, t) for i, t in enumerate(tables)] == budgets


def test_a_first_convolution_keeps_its_input_bits(make_cnn) -> None:
    """A convolution's input has one step per channel: the default keeps 3-bit inputs
    and the 7-bit budget there (2-bit pixels lost 17 points on digits)."""
    qat = prepare_qat(make_cnn(), n_bits=3, X_sample=np.zeros((2, 1, 8, 8)))
    assert qat.layers[0].op == "conv" and qat.layers[0].input_quantizer.bits == 3
    assert qat.config.layer_accumulator_bits(0, qat._table_bits(0)) == 7


def test_no_default_budget_at_two_bits(make_mlp, digits) -> None:
    """2-bit activations keep the unbudgeted default (the budget cost 3 points there):
    no accumulator budget in any layer, 5-bit tables."""
    x_train = digits[0]
    qat = prepare_qat(make_mlp(), n_bits=2, X_sample=x_train)
    qat.initialize(x_train)
    assert qat.config.quant.rounding_bits == 5
    assert [qat.config.layer_accumulator_bits(i, 5) for i in range(3)] == [None] * 3
    steps = qat.integer_program().steps
    assert all(t.index_bits <= 5 for t in steps if isinstance(t, TableStep))


def test_no_default_budget_above_four_bits(make_mlp, digits) -> None:
    x_train = digits[0]
    qat = prepare_qat(make_mlp(), n_bits=6, X_sample=x_train)
    qat.initialize(x_train)
    steps = qat.integer_program().steps
    assert max(s.acc_bits for s in steps if isinstance(s, LinearStep)) > 10
    binary = prepare_qat(make_mlp(), n_bits=3, weight_mode="binary", X_sample=x_train)
    binary.initialize(x_train)
    assert binary.config.layer_accumulator_bits(0, 4) is None


def test_budget_goes_to_the_largest_weights() -> None:
    # 64 weights of similar size and a budget of 9: the old scale sum|w| / 9 rounded
    # every one of them to 0 (a dead layer); the budget now buys the 9 largest.
    weights = np.linspace(0.5, 1.0, 64)[None, :] * np.where(np.arange(64) % 2, 1, -1)
    codes, _ = quantize_weight(weights, bits=3, binary=False, l1_budget=9)
    assert np.abs(codes).sum() == 9
    assert set(np.flatnonzero(codes)) == set(range(55, 64))


#: Float weight matrices of 1-4 output channels and 1-12 inputs.
WEIGHT_ROWS = arrays(
    np.float64,
    st.tuples(st.integers(1, 4), st.integers(1, 12)),
    elements=st.floats(-4, 4, allow_nan=False, width=32),
)


@settings(max_examples=40, deadline=None)
@given(
    weights=WEIGHT_ROWS,
    bits=st.integers(2, 6),
    budget=st.integers(1, 40),
    method=st.sampled_from(["mse", "max"]),
)
def test_weight_budget_holds_and_codes_stay_in_range(weights, bits, budget, method) -> None:
    codes, quantizer = quantize_weight(
        weights, bits=bits, binary=False, method=method, l1_budget=budget
    )
    assert np.abs(codes).sum(axis=1).max() <= budget
    assert codes.min() >= quantizer.qmin and codes.max() <= quantizer.qmax
    free, _ = quantize_weight(weights, bits=bits, binary=False, method=method)
    # the budget only moves codes towards zero
    assert np.all(np.abs(codes) <= np.abs(free) + (np.abs(free).sum(axis=1) == 0)[:, None])
    assert np.all(np.sign(codes) * np.sign(weights) >= 0)


@settings(max_examples=60, deadline=None)
@given(
    weights=WEIGHT_ROWS,
    bits=st.integers(2, 6),
    spare=st.integers(0, 5),
    method=st.sampled_from(["mse", "max"]),
)
def test_a_budget_that_does_not_bind_changes_nothing(weights, bits, spare, method) -> None:
    # a row whose free codes fit the budget keeps its own (least-squares) scale and codes:
    # raising its scale to max|w| / qmax rounded most 2-bit weights to 0 (a 2-bit MLP lost
    # 8 points with an 8-bit budget that no row reached)
    free, free_q = quantize_weight(weights, bits=bits, binary=False, method=method)
    budget = int(np.abs(free).sum(axis=1).max()) + spare
    codes, quantizer = quantize_weight(
        weights, bits=bits, binary=False, method=method, l1_budget=max(budget, 1)
    )
    np.testing.assert_array_equal(codes, free)
    assert quantizer.scale == free_q.scale


def test_quantizers_initialise_by_an_explicit_step_only(make_mlp, digits) -> None:
    x = digits[0][:64]
    qat = prepare_qat(make_mlp(), n_bits=3)
    for mode in (qat.eval, qat.train):  # no training batch initialises them on the side
        with pytest.raises(NotFittedError, match="initialize"):
            mode()(x)
    assert not qat.is_initialized
    qat.initialize(x)
    assert qat.is_initialized
    # a constant input pixel (always 0 after standardization) costs nothing
    dead = np.all(x == 0, axis=0)
    assert dead.any()
    scales = qat.layers[0].input_quantizer.scale.detach().numpy()
    np.testing.assert_array_equal(scales[dead], DEAD_FEATURE_SCALE)
    weight_q = qat.to_quantized_graph().segments[0].linear.weight_q
    assert not weight_q[:, dead].any()
    # prepare_qat initialises on X_sample, fit on its training data, the same way
    sampled = prepare_qat(make_mlp(), n_bits=3, X_sample=x)
    fitted = prepare_qat(make_mlp(), n_bits=3)
    fit(fitted, x, digits[2][:64], epochs=1, lr=1e-12, verbose=False)
    np.testing.assert_array_equal(sampled.layers[0].input_quantizer.scale.detach(), scales)
    # (fit took one step of lr 1e-12 since)
    np.testing.assert_allclose(fitted.layers[0].input_quantizer.scale.detach(), scales, rtol=1e-6)


def test_initialisation_reads_one_batch_of_a_large_set(make_mlp, digits) -> None:
    x = digits[0]
    qat = prepare_qat(make_mlp(), n_bits=3, X_sample=x)
    rows = np.sort(np.random.default_rng(0).choice(len(x), INIT_SAMPLES, replace=False))
    reference = prepare_qat(make_mlp(), n_bits=3)
    reference.initialize(x[rows], max_samples=None)
    assert torch.equal(
        qat.layers[1].input_quantizer.scale, reference.layers[1].input_quantizer.scale
    )
    everything = prepare_qat(make_mlp(), n_bits=3)
    everything.initialize(x, max_samples=None)
    assert not torch.equal(
        qat.layers[1].input_quantizer.scale, everything.layers[1].input_quantizer.scale
    )


def test_state_dict_copy_and_pickle_give_the_same_program(trained_qat, make_mlp, digits) -> None:
    x = digits[1]
    fresh = prepare_qat(make_mlp(), n_bits=3)
    fresh.load_state_dict(trained_qat.state_dict())
    np.testing.assert_array_equal(fresh.eval()(x).detach().numpy(), trained_qat(x).detach().numpy())
    for clone in (copy.deepcopy(trained_qat), pickle.loads(pickle.dumps(trained_qat))):
        np.testing.assert_array_equal(clone(x).detach().numpy(), trained_qat(x).detach().numpy())


def test_fit_is_deterministic_under_its_seed(make_mlp, digits) -> None:
    x, _, y, _ = digits
    runs = []
    for _ in range(2):
        qat = prepare_qat(make_mlp(), n_bits=3)
        history = fit(qat, x[:256], y[:256], epochs=2, seed=5, verbose=False)
        runs.append((history["loss"], [p.detach().clone() for p in qat.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_fit_reports_validation_and_leaves_the_random_state_alone(make_mlp, digits) -> None:
    x_train, x_test, y_train, y_test = digits
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    net = make_mlp()
    history = fit(
        net, x_train[:128], y_train[:128], epochs=2, validation=(x_test, y_test), verbose=False
    )
    assert set(history) == {"loss", "seconds", "val_loss", "val_accuracy"}
    assert len(history["val_accuracy"]) == 2 and 0 <= history["val_accuracy"][-1] <= 1
    assert not net.training
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), expected)


def test_fit_mse_on_a_regression_target(make_mlp) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4))
    y = x[:, 0] - 0.5 * x[:, 1]
    qat = prepare_qat(make_mlp(n_in=4, width=8, n_out=1), n_bits=4)
    history = fit(qat, x, y, epochs=3, loss="mse", lr=1e-2, schedule="cosine", verbose=False)
    assert history["loss"][-1] < history["loss"][0]
