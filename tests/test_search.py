"""``n_bits="auto"``: the cheapest candidate within the accuracy budget, its report,
determinism, and the errors of bad budgets and bad validation data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fhe_quant.errors import InputError, ParameterError
from fhe_quant.report import score
from fhe_quant.search import (
    AccuracyBudgetError,
    Candidate,
    SearchRow,
    SearchSpace,
    check_validation,
    search_torch,
    supports_accumulator_bits,
)
from fhe_quant.torch import compile_torch_model

#: A small space keeps the test fast (each passing candidate is compiled).
SPACE = SearchSpace(
    weights=(3, 4, 6), activations=(3, 4, 6), rounding_bits=(None, 5), per_channel=(True,)
)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    xt, yt = torch.tensor(x[:200], dtype=torch.float32), torch.tensor(y[:200])
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return net, x[:200], x[200:], y[200:]


def _search(problem, space=SPACE, **kwargs):
    from fhe_quant.frontends.torch import trace_module
    from fhe_quant.model import build_quantized_module
    from fhe_quant.passes import simplify

    net, x, xv, yv = problem
    graph = simplify(trace_module(net, x))
    return search_torch(
        lambda config: build_quantized_module(graph, x, config, compile=False),
        graph,
        x,
        (xv, yv.astype(np.float64)),
        space=space,
        **kwargs,
    )


def test_auto_picks_the_cheapest_passing_candidate(problem):
    _, _, xv, yv = problem
    qm = _search(problem, max_accuracy_drop=0.05)
    rows = qm.search_report_
    assert all(isinstance(r, SearchRow) for r in rows)
    assert len(rows) == len(SPACE.candidates(accumulator=supports_accumulator_bits()))
    chosen = [r for r in rows if r.status == "chosen"]
    assert len(chosen) == 1
    float_metric = score(qm.float_forward(xv), yv, "accuracy")
    # the chosen candidate's metric is the exact integer program's, within budget
    assert chosen[0].metric == score(qm.forward(xv, fhe="disable"), yv, "accuracy")
    assert chosen[0].metric >= float_metric - 0.05
    # ... and it equals simulate bit for bit
    assert np.array_equal(
        qm.forward_integers(xv[:20], fhe="simulate"), qm.forward_integers(xv[:20], fhe="disable")
    )
    compiled = [r for r in rows if r.estimated_seconds is not None]
    assert chosen[0].estimated_seconds == min(r.estimated_seconds for r in compiled)
    assert all(r.complexity > 0 for r in compiled)
    # failed candidates are out of budget; pruned ones have a failing dominating one
    for r in rows:
        if r.status == "failed":
            assert r.metric < float_metric - 0.05
        if r.status == "pruned":
            assert any(f.status == "failed" and f.candidate.dominates(r.candidate) for f in rows)
    assert qm.fhe_circuit.statistics.keygen_seconds is None  # never keyed


def test_auto_is_deterministic(problem):
    first = _search(problem, max_accuracy_drop=0.05).search_report_
    second = _search(problem, max_accuracy_drop=0.05).search_report_
    assert first == second


def test_every_budget_is_met_by_its_choice(problem):
    _, _, xv, yv = problem
    for drop in (0.2, 0.03):
        qm = _search(problem, max_accuracy_drop=drop)
        chosen = next(r for r in qm.search_report_ if r.status == "chosen")
        assert chosen.metric >= score(qm.float_forward(xv), yv, "accuracy") - drop
        failed = [r for r in qm.search_report_ if r.status == "failed"]
        assert all(r.metric < chosen.metric for r in failed)


def test_compile_torch_model_auto_end_to_end(problem):
    net, x, xv, yv = problem
    qm = compile_torch_model(net, x, n_bits="auto", max_accuracy_drop=0.05, validation=(xv, yv))
    chosen = [r for r in qm.search_report_ if r.status == "chosen"]
    assert len(chosen) == 1
    assert score(qm.forward(xv, fhe="disable"), yv, "accuracy") == chosen[0].metric


def test_unreachable_budget_is_a_typed_error_with_the_best(problem):
    net, x, _, _ = problem
    before = [p.detach().clone() for p in net.parameters()]
    # measured: no candidate of SPACE keeps the float model's accuracy exactly
    with pytest.raises(AccuracyBudgetError, match="best reached") as info:
        _search(problem, max_accuracy_drop=0.0)
    error = info.value
    assert isinstance(error, ParameterError)
    assert error.best_metric < error.float_metric
    assert error.best_metric == max(r.metric for r in error.rows if r.metric is not None)
    assert f"{error.best_metric:.4f}" in str(error)
    assert error.best_seconds > 0 and f"{error.best_seconds:.2f} s/sample" in str(error)
    for p, q in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, q)  # the model stays usable and untouched
    compile_torch_model(net, x, n_bits=3, compile=False)


def test_budget_error_names_best_metric_and_cost():
    row = SearchRow(Candidate(3, 3, None), "failed", 0.5, 1.25, 1e10, 100.0)
    error = AccuracyBudgetError(0.9, 0.5, 1.25, 0.01, [row])
    assert "0.5000" in str(error) and "1.25 s/sample" in str(error) and "0.9000" in str(error)


@pytest.mark.parametrize(
    ("validation", "match"),
    [
        (None, "pair"),
        ((np.zeros((4, 4)),), "pair"),
        ((np.zeros((4, 4)), None), "labels"),
        ((np.zeros((4, 3)), np.zeros(4)), "shape"),
        ((np.full((4, 4), np.nan), np.zeros(4)), "NaN"),
        ((np.zeros((4, 4)), np.array([0, 1, np.nan, 1])), "NaN"),
        ((np.zeros((4, 4)), np.zeros(3)), "samples"),
        ((np.zeros((4, 4)), np.array(["a", "b", "c", "d"])), "numeric"),
    ],
)
def test_bad_validation_is_named(problem, validation, match):
    net, x, _, _ = problem
    with pytest.raises(InputError, match=match):
        compile_torch_model(net, x, n_bits="auto", validation=validation)
    compile_torch_model(net, x, n_bits=3, compile=False)  # still usable


@pytest.mark.parametrize("drop", [-0.1, 1.0, "a", True])
def test_bad_budget(problem, drop):
    net, x, xv, yv = problem
    with pytest.raises(ParameterError, match="max_accuracy_drop"):
        compile_torch_model(net, x, n_bits="auto", max_accuracy_drop=drop, validation=(xv, yv))


def test_validation_without_auto_and_auto_without_compile(problem):
    net, x, xv, yv = problem
    with pytest.raises(ParameterError, match="only used with n_bits='auto'"):
        compile_torch_model(net, x, n_bits=3, validation=(xv, yv))
    with pytest.raises(ParameterError, match="compile=False"):
        compile_torch_model(net, x, n_bits="auto", validation=(xv, yv), compile=False)


def test_candidates_and_dominance():
    space = SearchSpace()
    candidates = space.candidates(accumulator=False)
    assert len(set(candidates)) == len(candidates)
    assert candidates[0].weights + candidates[0].activations == 6
    big, small = Candidate(5, 5, None), Candidate(4, 5, 5)
    assert big.table_bits == 6 and big.dominates(small) and not small.dominates(big)
    assert not Candidate(5, 5, None, per_channel=False).dominates(small)
    # a wider accumulator budget (None: no budget) is at least as accurate
    assert Candidate(5, 5, None, accumulator_bits=12).dominates(Candidate(5, 5, None, True, 10))
    assert not Candidate(5, 5, None, accumulator_bits=10).dominates(Candidate(5, 5, None))
    assert len(space.candidates(accumulator=True)) == 4 * len(candidates)
    with pytest.raises(ParameterError, match="rounding_bits"):
        Candidate(3, 3, 0)
    assert check_validation((np.zeros((2, 3)), [0, 1]), (3,))[1].tolist() == [0.0, 1.0]


@pytest.mark.slow
@pytest.mark.execute
def test_auto_choice_executes_like_disable(problem):
    _, _, xv, _ = problem
    space = SearchSpace(weights=(3, 4), activations=(3, 4), rounding_bits=(4,), per_channel=(True,))
    qm = _search(problem, max_accuracy_drop=0.2, space=space)
    assert max(qm.program.lookups_by_width()) <= 4
    assert np.array_equal(
        qm.forward_integers(xv[:1], fhe="execute"), qm.forward_integers(xv[:1], fhe="disable")
    )
