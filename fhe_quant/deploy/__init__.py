"""Client/server deployment of a compiled model (see :mod:`fhe_quant.deploy.artifact`).

The package's public face: every public name of :mod:`fhe_quant.deploy.artifact` (the
artifact format, :class:`FHEModelDev`, :class:`FHEModelClient`, the server), and
:class:`FHEModelServer`, the artifact's server with :meth:`FHEModelServer.run_batch`
(batches on a Dask cluster, :mod:`fhe_quant.batch`). It sits above :mod:`fhe_quant.batch`,
which builds on :mod:`fhe_quant.deploy.artifact` only, so no module of the artifact
imports the batch code and loading a deployment needs no Dask.

Examples:
    >>> from fhe_quant import deploy
    >>> deploy.FORMAT_VERSION, issubclass(deploy.FHEModelServer, artifact.FHEModelServer)
    (3, True)
"""

from __future__ import annotations

from typing import Any

from fhe_quant.deploy import artifact
from fhe_quant.deploy.artifact import (
    FORMAT_VERSION,
    MESSAGE_MAGIC,
    TASKS,
    FHEModelClient,
    FHEModelDev,
    PostProcessing,
    artifact_info,
    is_fhe_quant_message,
)

__all__ = [
    "FORMAT_VERSION",
    "MESSAGE_MAGIC",
    "TASKS",
    "PostProcessing",
    "FHEModelDev",
    "FHEModelClient",
    "FHEModelServer",
    "artifact_info",
    "is_fhe_quant_message",
]


class FHEModelServer(artifact.FHEModelServer):
    __doc__ = artifact.FHEModelServer.__doc__

    def run_batch(self, ciphertexts: list[bytes], keys: bytes, client: Any = None) -> list[bytes]:
        """Run a batch of one client's serialized samples on a ``dask.distributed``
        cluster; the results come back in input order (see :mod:`fhe_quant.batch`).

        Args:
            ciphertexts: serialized encrypted samples (``quantize_encrypt_serialize``).
            keys: the client's evaluation-key message.
            client: a :class:`distributed.Client`; ``None`` starts (once) an embedded
                :class:`distributed.LocalCluster`, one single-threaded worker per core.

        Raises:
            DeploymentError: a bad batch (refused before any work) or a sample that
                cannot be run.
        """
        # NOTE: imported when called, so that deploying needs no dask.
        from fhe_quant.batch import run_batch

        return run_batch(self, ciphertexts, keys, client)
