"""The QAT module's forward is its integer program: exact parity with the compiled model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fhe_quant.lower import NUMPY, TableStep
from fhe_quant.model import QuantizedModule
from fhe_quant.torch import compile_qat_model, prepare_qat

#: Per-lookup error probability for exactness tests: any mismatch is then a real bug.
TINY_P_ERROR = 1e-12


def test_eval_forward_equals_compiled_disable_exactly(trained_qat, digits) -> None:
    _, x_test, _, y_test = digits
    qm = compile_qat_model(trained_qat, x_test, compile=False)
    np.testing.assert_array_equal(
        trained_qat.forward_integers(x_test), qm.forward_integers(x_test, fhe="disable")
    )
    logits_qat = trained_qat(x_test).detach().numpy()
    logits_qm = qm.forward(x_test, fhe="disable")
    np.testing.assert_array_equal(logits_qat.argmax(axis=1), logits_qm.argmax(axis=1))
    np.testing.assert_allclose(logits_qat, logits_qm, rtol=0, atol=1e-12)
    assert np.array_equal(logits_qat, logits_qm)  # by construction: bit for bit
    assert np.mean(logits_qm.argmax(axis=1) == y_test) > 0.3


def test_training_forward_is_the_program_of_the_current_state(trained_qat, digits) -> None:
    x_train = digits[0][:64]
    qat = copy.deepcopy(trained_qat).train()
    quantized = qat.to_quantized_graph()
    program_before = QuantizedModule(quantized.graph, quantized, qat.integer_program())
    out = qat(x_train)
    assert out.requires_grad
    np.testing.assert_array_equal(out.detach().numpy(), program_before.forward(x_train))


def test_every_code_between_layers_is_the_program_s(trained_qat, digits) -> None:
    # The hidden codes the tables produce are integers in range, and the forward's
    # output is their dequantization: nothing is computed twice in float.
    x = digits[1][:50]
    program = trained_qat.integer_program()
    value = program.input_quantizer.quantize(x)
    for step in program.steps:
        value = step(value, NUMPY)
        if isinstance(step, TableStep):
            assert value.dtype == np.int64
            assert value.min() >= 0 and value.max() < 2**step.out_bits
    np.testing.assert_array_equal(
        program.output_step.dequantize(value), trained_qat(x).detach().numpy()
    )


def test_gradients_reach_weights_biases_and_step_sizes(make_mlp, digits) -> None:
    x, y = digits[0][:128], digits[2][:128]
    qat = prepare_qat(make_mlp(), n_bits=3, X_sample=x)
    loss = torch.nn.functional.cross_entropy(qat(x), torch.as_tensor(y))
    loss.backward()
    for name, parameter in qat.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_disable_equals_simulate(trained_qat, digits) -> None:
    _, x_test, _, _ = digits
    qm = compile_qat_model(trained_qat, digits[0], p_error=TINY_P_ERROR)
    x = x_test[:30]
    np.testing.assert_array_equal(
        qm.forward_integers(x, fhe="simulate"), qm.forward_integers(x, fhe="disable")
    )
    np.testing.assert_array_equal(
        qm.forward_integers(x, fhe="disable"), trained_qat.forward_integers(x)
    )


@pytest.mark.slow
@pytest.mark.execute
def test_execute_equals_the_qat_module(trained_qat, digits) -> None:
    _, x_test, _, _ = digits
    qm = compile_qat_model(trained_qat, digits[0], p_error=TINY_P_ERROR)
    x = x_test[:2]
    np.testing.assert_array_equal(
        qm.forward_integers(x, fhe="execute"), trained_qat.forward_integers(x)
    )
    np.testing.assert_array_equal(qm.forward(x, fhe="execute"), trained_qat(x).detach().numpy())
