"""Corrupted artifacts, drawn by hypothesis (issue 16): byte flips, truncation, deletion,
files swapped in from another model, each with or without the manifest re-checksummed
as an attacker with write access would. Whatever is drawn, loading and predicting ends
in a typed error or in exactly the original prediction, never a crash, a hang or an
untyped exception. A different prediction is only possible for an unsigned artifact
whose checksums were rewritten, and then never silently: loading it warned that it is
unauthenticated. With the owner's key, every edit that changes a byte is refused.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhe_quant.deploy import FHEModelClient, FHEModelServer
from fhe_quant.errors import DeploymentError, FHEQuantError, UnauthenticatedArtifactWarning

from .conftest import Saved, save_linear
from .test_artifact_safety import _rewrite_manifest

FILES = {
    "client": ("client.zip", "model.json", "model.npz", "report.json", "manifest.json"),
    "server": ("circuit.mlir", "circuit.json", "manifest.json"),
}
TARGETS = [(role, name) for role, names in FILES.items() for name in names]


@st.composite
def corruptions(draw: st.DrawFn) -> tuple:
    role, name = draw(st.sampled_from(TARGETS))
    kind = draw(st.sampled_from(["flip", "truncate", "delete", "swap"]))
    where = draw(st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
    mask = draw(st.integers(min_value=1, max_value=255))
    rechecksum = draw(st.booleans())
    return role, name, kind, where, mask, rechecksum


def _corrupt(root: Path, other: Path, corruption: tuple) -> None:
    role, name, kind, where, mask, rechecksum = corruption
    path = root / role / name
    data = bytearray(path.read_bytes())
    if kind == "flip" and data:
        data[int(where * len(data))] ^= mask
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(bytes(data[: int(where * len(data))]))
    elif kind == "delete":
        path.unlink()
    elif kind == "swap":
        shutil.copyfile(other / role / name, path)
    if rechecksum and name != "manifest.json":
        _rewrite_manifest(root / role)


def _outcome(root: Path, saved: Saved, verify: bool) -> tuple[str, np.ndarray | None, bool]:
    """('error', None, warned) or ('prediction', values, warned)."""
    key = {"verify_key": saved.public_key} if verify else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            client = FHEModelClient(root / "client", **key)
            server = FHEModelServer(root / "server", cache_dir=saved.cache, **key)
        except DeploymentError:
            return "error", None, False
        warned = any(issubclass(w.category, UnauthenticatedArtifactWarning) for w in caught)
        with server, contextlib.suppress(FHEQuantError):
            keys = client.get_serialized_evaluation_keys()
            results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(saved.x[:2])]
            return "prediction", client.deserialize_decrypt_dequantize(results), warned
    return "error", None, warned


def _check(saved: Saved, other: Saved, corruption: tuple, verify: bool, expected) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = saved.copy(Path(scratch) / "artifact")
        _corrupt(root, other.root, corruption)
        kind, values, warned = _outcome(root, saved, verify)
    if kind == "error" or np.array_equal(values, expected):
        return
    rechecksummed = corruption[-1]
    assert rechecksummed and not verify and warned, (
        f"{corruption}: a different prediction without an error "
        f"(verify_key={verify}, warned={warned})"
    )


@pytest.fixture(scope="module")
def expected(unsigned: Saved) -> np.ndarray:
    kind, values, _ = _outcome(unsigned.root, unsigned, verify=False)
    assert kind == "prediction"
    return values


FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(corruption=corruptions())
def test_corrupted_unsigned_artifacts_fail_typed_or_predict_the_same(
    unsigned: Saved, other: Saved, expected: np.ndarray, corruption: tuple
) -> None:
    _check(unsigned, other, corruption, verify=False, expected=expected)


@FUZZ
@given(corruption=corruptions())
def test_corrupted_signed_artifacts_are_refused_with_the_owners_key(
    signed: Saved, other: Saved, corruption: tuple
) -> None:
    kind, values, _ = _outcome(signed.root, signed, verify=True)
    assert kind == "prediction"
    with tempfile.TemporaryDirectory() as scratch:
        root = signed.copy(Path(scratch) / "artifact")
        _corrupt(root, other.root, corruption)
        changed = any(
            not (root / r / n).is_file()
            or (root / r / n).read_bytes() != (signed.root / r / n).read_bytes()
            for r, n in TARGETS
        )
        outcome, got, _ = _outcome(root, signed, verify=True)
    if changed:
        assert outcome == "error", f"{corruption}: an edited signed artifact was accepted"
    else:
        np.testing.assert_array_equal(got, values)


@pytest.mark.slow
@pytest.mark.execute
@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(corruption=corruptions())
def test_corrupted_bootstrapped_artifacts_fail_typed_or_predict_the_same(
    bootstrapped: tuple[Saved, Saved, np.ndarray], corruption: tuple
) -> None:
    saved, other, expected_values = bootstrapped
    _check(saved, other, corruption, verify=False, expected=expected_values)


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Saved, Saved, np.ndarray]:
    """A 2-bit MLP (real table lookups and evaluation keys) and another model."""
    import torch
    from torch import nn

    from fhe_quant.deploy import FHEModelDev
    from fhe_quant.signing import write_signing_key_pair
    from fhe_quant.torch import compile_torch_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x = np.random.default_rng(0).normal(size=(40, 4))
    base = tmp_path_factory.mktemp("bootstrapped")
    private, public = write_signing_key_pair(base / "owner")
    FHEModelDev(base / "artifact", compile_torch_model(net, x, n_bits=2)).save()
    saved = Saved(base / "artifact", None, x, private, public, base / "cache")
    other = save_linear(tmp_path_factory.mktemp("bootstrapped_other"), seed=1, n_out=2)
    kind, values, _ = _outcome(saved.root, saved, verify=False)
    assert kind == "prediction"
    return saved, other, values
