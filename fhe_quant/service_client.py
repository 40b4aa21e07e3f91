"""The client of the encrypted-inference service (:mod:`fhe_quant.serve`) and its wire
format; standard library only, so a client needs neither FastAPI nor Dask.

Examples:
    >>> pack([b"ab", b"c"])[:4], unpack(pack([b"ab", b"c"]))
    (b'FHQB', [b'ab', b'c'])
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from typing import Any

from fhe_quant.deploy import FHEModelClient, FHEModelServer
from fhe_quant.errors import DeploymentError
from fhe_quant.http import HTTPRequestError, http_request

__all__ = [
    "BATCH_MAGIC",
    "CIRCUIT_HEADER",
    "ServiceError",
    "ServiceClient",
    "circuit_id",
    "pack",
    "unpack",
]

BATCH_MAGIC = b"FHQB"
CIRCUIT_HEADER = "X-FHE-Quant-Circuit"
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")


def pack(messages: Sequence[bytes]) -> bytes:
    """Frame messages for ``predict_batch``: magic, count, then length + bytes each."""
    parts = [BATCH_MAGIC, _COUNT.pack(len(messages))]
    for message in messages:
        parts += [_LENGTH.pack(len(message)), message]
    return b"".join(parts)


def unpack(body: bytes, limit: int = 1 << 20) -> list[bytes]:
    """The messages framed by :func:`pack`.

    Raises:
        DeploymentError: not a batch, a truncated one, or more than ``limit`` messages.

    Examples:
        >>> unpack(b"FHQB\\x05\\x00\\x00\\x00")
        Traceback (most recent call last):
        ...
        fhe_quant.errors.DeploymentError: The batch is truncated: message 0 of 5 is missing.
    """
    if not body.startswith(BATCH_MAGIC) or len(body) < 8:
        raise DeploymentError("The body is not an fhe_quant batch (bad header).")
    (count,) = _COUNT.unpack_from(body, 4)
    if count > limit:
        raise DeploymentError(f"The batch holds {count} messages, over the limit of {limit}.")
    messages, offset = [], 8
    for i in range(count):
        if offset + 8 > len(body):
            raise DeploymentError(f"The batch is truncated: message {i} of {count} is missing.")
        (length,) = _LENGTH.unpack_from(body, offset)
        if offset + 8 + length > len(body):
            raise DeploymentError(f"The batch is truncated inside message {i} of {count}.")
        messages.append(body[offset + 8 : offset + 8 + length])
        offset += 8 + length
    if offset != len(body):
        raise DeploymentError(f"The batch has {len(body) - offset} bytes after its messages.")
    return messages


def circuit_id(side: FHEModelClient | FHEModelServer) -> str:
    """The id of a model's circuit (SHA-256 of its keyset description), equal on the
    client and the server artifact of one model: keys are only accepted for it."""
    if isinstance(side, FHEModelClient):
        info = side.client.specs.program_info
    else:
        info = side.server.program_info
    return hashlib.sha256(info.get_keyset_info().serialize()).hexdigest()


class ServiceError(HTTPRequestError):
    """The service refused a request (4xx/5xx) or could not be reached.

    Attributes:
        status: the HTTP status, or ``None`` if no response came back.
        message: the service's error message (or the transport error).
    """


class ServiceClient:
    """A client of ``fhe-quant serve``, on :mod:`urllib.request`.

    Args:
        url: the service's base URL, e.g. ``"http://127.0.0.1:8000"``.
        timeout: seconds to wait for each request.
        token: a bearer token already obtained (else :meth:`upload_keys` sets it).
    """

    def __init__(self, url: str, timeout: float = 600.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = token

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        headers = dict(headers or {})
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return http_request(method, self.url + path, body, headers, self.timeout, ServiceError)

    def health(self) -> dict[str, Any]:
        """The service's ``/health`` answer."""
        return json.loads(self._request("GET", "/health"))

    def upload_keys(self, client_id: str, keys: bytes, circuit: str) -> str | None:
        """Store (or, with the current token, replace) this client's evaluation keys;
        keeps and returns the new bearer token."""
        answer = self._request("PUT", f"/clients/{client_id}/keys", keys, {CIRCUIT_HEADER: circuit})
        # NOTE: the standard-library fallback (python -m fhe_quant.http) answers no token.
        self.token = json.loads(answer)["token"] if answer else None
        return self.token

    def predict(self, client_id: str, ciphertext: bytes) -> bytes:
        """The encrypted result of one serialized ciphertext."""
        return self._request("POST", f"/clients/{client_id}/predict", ciphertext)

    def predict_batch(self, client_id: str, ciphertexts: Sequence[bytes]) -> list[bytes]:
        """The encrypted results of a batch of ciphertexts, in order."""
        try:
            reply = self._request("POST", f"/clients/{client_id}/predict_batch", pack(ciphertexts))
        except ServiceError as exc:
            if exc.status != 404 or "No such path" not in exc.message:
                raise
            # NOTE: the standard-library fallback has no batch endpoint: one request each.
            return [self.predict(client_id, c) for c in ciphertexts]
        results = unpack(reply)
        if len(results) != len(ciphertexts):
            raise ServiceError(200, f"{len(results)} results for {len(ciphertexts)} samples.")
        return results
