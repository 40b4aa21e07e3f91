"""Wire compression: on by default, reported by the circuit's configuration, smaller keys
and ciphertexts, and the same circuit (complexity, results) as without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fhe_quant.fhe import WIRE_COMPRESSION, compile_program
from fhe_quant.torch import compile_torch_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x = np.random.default_rng(0).normal(size=(30, 4))
    return compile_torch_model(net, x, n_bits=2), x


def test_compression_is_on_by_default_and_reported(model) -> None:
    qm, _ = model
    circuit = qm.fhe_circuit
    assert circuit.statistics.compression == dict.fromkeys(WIRE_COMPRESSION, True)
    for name in WIRE_COMPRESSION:
        assert getattr(circuit.circuit.configuration, name) is True


def test_compression_keeps_the_circuit_and_its_results(model) -> None:
    qm, x = model
    q = qm.quantize_input(x)
    plain = compile_program(qm.program, q, compress=False)
    assert plain.statistics.compression == dict.fromkeys(WIRE_COMPRESSION, False)
    compressed = qm.fhe_circuit
    assert plain.statistics.complexity == compressed.statistics.complexity
    assert plain.statistics.pbs_count == compressed.statistics.pbs_count
    np.testing.assert_array_equal(plain.run(q[:6], "simulate"), compressed.run(q[:6], "simulate"))
    np.testing.assert_array_equal(compressed.run(q[:6], "simulate"), qm.program(q[:6]))


@pytest.mark.slow
@pytest.mark.execute
def test_compressed_wire_is_smaller_and_execute_is_exact(model) -> None:
    qm, x = model
    q = qm.quantize_input(x[:2])
    sizes = {}
    for compress in (False, True):
        fc = compile_program(qm.program, qm.quantize_input(x), compress=compress)
        np.testing.assert_array_equal(fc.run(q, "execute"), qm.program(q))
        keys = fc.circuit.client.evaluation_keys.serialize()
        ciphertext = fc.circuit.encrypt(q[:1]).serialize()
        sizes[compress] = (len(keys), len(ciphertext))
    assert sizes[True][0] * 3 <= sizes[False][0]
    assert sizes[True][1] * 10 <= sizes[False][1]
