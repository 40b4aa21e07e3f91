"""Silent bad input made loud (issue 16, finding 5): every case below was accepted
silently or raised an untyped error (with a torch traceback on stderr) before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression
from torch import nn

from fhe_quant.errors import (
    CalibrationWarning,
    FHEQuantError,
    InputError,
    ModelError,
    UnsupportedOpError,
)
from fhe_quant.sklearn import LogisticRegression as FheLogisticRegression
from fhe_quant.sklearn import from_sklearn
from fhe_quant.torch import compile_torch_model


def _regression() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    return x, x @ np.array([1.0, -2.0, 0.5])


def test_calibration_on_one_sample_is_refused_and_few_warn() -> None:
    x, y = _regression()
    model = LinearRegression().fit(x, y)
    with pytest.raises(InputError, match="holds 1 sample; at least 2"):
        from_sklearn(model, x[:1], n_bits=6)
    with pytest.warns(CalibrationWarning, match="only 10 samples"):
        from_sklearn(model, x[:10], n_bits=6)
    from_sklearn(model, x, n_bits=6)  # 200 samples: no warning (warnings are errors)


def test_single_class_and_rare_classes_are_typed_errors() -> None:
    x, _ = _regression()
    with pytest.raises(InputError, match="single class"):
        FheLogisticRegression().fit(x, np.zeros(len(x), dtype=int))
    y = np.r_[np.zeros(len(x) - 1, dtype=int), 1]
    with pytest.raises(InputError, match="Class 1 of y has 1 sample"):
        FheLogisticRegression().fit(x, y)


def test_nan_in_a_fitted_model_is_a_typed_error_naming_the_parameter() -> None:
    x, y = _regression()
    model = LogisticRegression().fit(x, y > 0)
    model.coef_[0, 1] = np.nan
    with pytest.raises(ModelError, match=r"LogisticRegression\.coef_ holds 1 NaN .*\(0, 1\)"):
        from_sklearn(model, x, n_bits=6)
    np.testing.assert_array_equal(np.isnan(model.coef_), [[False, True, False]])  # untouched


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(a + b)


def test_a_function_or_a_two_input_module_is_refused_quietly(capfd) -> None:
    x, _ = _regression()
    with pytest.raises(ModelError, match=r"must be a torch\.nn\.Module; got function"):
        compile_torch_model(lambda t: t * 2, x, n_bits=4, compile=False)
    with pytest.raises(UnsupportedOpError, match=r"2 inputs \['a', 'b'\].*one tensor input"):
        compile_torch_model(_TwoInputs(), x, n_bits=4, compile=False)
    with pytest.raises(FHEQuantError, match="failed"):  # wrong shape: torch fails inside
        compile_torch_model(nn.Linear(5, 1), x, n_bits=4, compile=False)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and captured.err.strip() == ""
