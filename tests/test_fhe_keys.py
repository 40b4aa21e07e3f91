"""Evaluation key sizes read from a compiled circuit's parameters (fhe.key_parameters)
equal the serialized keys Concrete generates, compressed or not."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_iris

import fhe_quant.sklearn as fs
from fhe_quant.fhe import KeyParameters, compile_program

#: Bytes of header per serialized key and for the key set (measured: ~50 per key).
HEADER_SLACK = 4096


@pytest.fixture(scope="module")
def tree_module():
    x, y = load_iris(return_X_y=True)
    model = fs.DecisionTreeClassifier(max_depth=2, random_state=0).fit(x, y)
    model.compile(x)
    return model.quantized_module_, x


@pytest.mark.execute
@pytest.mark.parametrize("compress", [True, False])
def test_evaluation_key_bytes_equal_serialized_keys(tree_module, compress):
    module, x = tree_module
    program = module.program
    inputset = program.input_quantizer.quantize(x).astype(np.int64)
    circuit = compile_program(program, inputset, compress=compress)
    statistics = circuit.statistics
    kinds = sorted({key.kind for key in statistics.keys})
    assert kinds == ["bootstrap", "keyswitch"]
    assert all(key.compressed is compress for key in statistics.keys)
    circuit.keygen()
    serialized = len(circuit.circuit.keys.evaluation.serialize())
    assert 0 <= serialized - statistics.evaluation_key_bytes <= HEADER_SLACK


def test_compression_divides_by_the_mask_size():
    plain = KeyParameters("keyswitch", 2048, 800, 3, 4)
    seeded = KeyParameters("keyswitch", 2048, 800, 3, 4, compressed=True)
    assert plain.serialized_bytes == 2048 * 3 * 801 * 8
    assert seeded.serialized_bytes * 801 == plain.serialized_bytes
    bootstrap = KeyParameters("bootstrap", 800, 2048, 1, 22, 1, 2048, compressed=True)
    assert bootstrap.serialized_bytes == 800 * 1 * 2 * 2048 * 8


@pytest.mark.parametrize(
    "args, message",
    [
        (("bootstrap", 800, 2048, 1, 22, 2, 2048), "glwe_dimension \\* polynomial_size"),
        (("keyswitch", 0, 800, 3, 4), "input_lwe_dimension"),
        (("keyswitch", 2048, 800, True, 4), "level_count"),
        (("pbs", 2048, 800, 3, 4), "'bootstrap' or 'keyswitch'"),
    ],
)
def test_bad_key_parameters_are_refused_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        KeyParameters(*args)


def test_a_circuit_without_lookups_has_no_bootstrap_key():
    x = np.random.default_rng(0).normal(size=(64, 3))
    model = fs.LinearRegression().fit(x, x @ np.array([1.0, -2.0, 0.5]))
    model.compile(x)
    statistics = model.quantized_module_.fhe_circuit.statistics
    assert not [key for key in statistics.keys if key.kind == "bootstrap"]
    assert statistics.evaluation_key_bytes < 1e6
