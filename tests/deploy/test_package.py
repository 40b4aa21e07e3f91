"""``fhe_quant.deploy`` is a package: the artifact code in ``deploy.artifact`` (imports
no batch code), and the public face re-exporting it with ``FHEModelServer.run_batch``."""

from __future__ import annotations

import subprocess
import sys

import fhe_quant.deploy as deploy
from fhe_quant.deploy import artifact


def test_every_public_name_is_the_artifact_modules_own() -> None:
    assert set(deploy.__all__) == set(artifact.__all__)
    for name in deploy.__all__:
        if name != "FHEModelServer":
            assert getattr(deploy, name) is getattr(artifact, name), name
    assert issubclass(deploy.FHEModelServer, artifact.FHEModelServer)
    assert callable(deploy.FHEModelServer.run_batch)
    assert not hasattr(artifact.FHEModelServer, "run_batch")


def test_loading_a_deployment_imports_no_batch_code_and_no_dask() -> None:
    code = (
        "import sys, fhe_quant.deploy\n"
        "loaded = [m for m in ('fhe_quant.batch', 'distributed', 'dask') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
