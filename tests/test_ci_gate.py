"""`.ci/run` refuses a run whose pytest summary counts a failure, whatever the exit status."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

GATE = Path(__file__).resolve().parents[1] / ".ci" / "check_pytest_summary.py"


def _gate():
    spec = importlib.util.spec_from_file_location("check_pytest_summary", GATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("log", "refused"),
    [
        ("======= 1385 passed, 22 skipped, 1 xfailed in 434.20s (0:07:14) =======", False),
        ("....\n2 passed in 6.49s", False),
        ("= 1 failed, 1 passed in 6.49s =", True),
        ("==== 3 passed, 1 error in 2.00s ====", True),
        ("==== 2 errors in 2.00s ====", True),
        # a non-strict XPASS is not a failure (pytest exits 0 for it too)
        ("==== 1 xpassed, 1 passed in 2.00s ====", False),
        ("==== 4 skipped in 0.10s ====", True),
        ("==== no tests ran in 0.01s ====", True),
        ("Successfully installed fhe-quant-0.1.0", True),
        # a test's own output quoting a summary does not count: the last line does
        ("= 1 failed, 1 passed in 6.49s =\n===== 9 passed in 77.67s =====", False),
        ("===== 9 passed in 77.67s =====\nFAILED x\n= 1 failed, 8 passed in 9.0s =", True),
    ],
)
def test_verdict(log: str, refused: bool):
    assert (_gate().verdict(log) is not None) is refused


def test_gate_exit_status(tmp_path: Path):
    bad, good = tmp_path / "bad.log", tmp_path / "good.log"
    bad.write_text("FAILED tests/x.py::y\n===== 1 failed, 3 passed in 1.00s =====\n")
    good.write_text("===== 4 passed in 1.00s =====\n")
    run = [sys.executable, str(GATE)]
    refused = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert refused.returncode == 1
    assert "1 failed" in refused.stderr
    accepted = subprocess.run([*run, str(good)], capture_output=True, text=True)
    assert (accepted.returncode, accepted.stdout, accepted.stderr) == (0, "", "")


def test_ci_run_calls_the_readme_test_command_and_the_gate():
    ci = (GATE.parent / "run").read_text()
    readme = (GATE.parents[1] / "README.md").read_text()
    command = 'pip install -e ".[dev]" && python -m pytest'
    assert command in readme
    assert f'{command} 2>&1 | tee "$log"' in ci
    assert "set -euo pipefail" in ci
    assert 'python .ci/check_pytest_summary.py "$log"' in ci
