"""The encrypted-inference service: a FastAPI application under uvicorn.

Run it with ``fhe-quant serve artifact/server --key-store keys/`` (the first line it
prints is its URL; OpenAPI documentation at ``/docs``). Endpoints:

* ``GET /health`` -> ``{"status": "ok", "clients": n, "keys_in_memory": n, "busy": n}``
* ``PUT /clients/{id}/keys``: the client's evaluation-key message (raw bytes) and the
  ``X-FHE-Quant-Circuit`` header (:func:`circuit_id` of its client artifact) ->
  ``{"token": ...}``, the client's bearer token. Replacing existing keys requires the
  current token and answers a new one.
* ``POST /clients/{id}/predict``: one ciphertext -> its encrypted result.
* ``POST /clients/{id}/predict_batch``: ciphertexts framed by :func:`pack` -> results
  framed the same way, in order.

Predictions and key replacement need ``Authorization: Bearer <token>``: 401 without it,
403 with another. Keys live in a :class:`~fhe_quant.keystore.KeyStore` (disk, atomic,
0600; an LRU in memory). The FHE work runs on a ``dask.distributed`` cluster
(:mod:`fhe_quant.batch`: the embedded ``LocalCluster`` or ``--dask ADDRESS``), in worker
processes: the event loop only moves bytes, so ``/health`` answers while predictions
run, and a worker that Concrete aborts does not take the service down. Limits: a body
over ``max_body_bytes`` is refused with 413 from its ``Content-Length`` header before
it is read (411 without one); more than ``max_concurrent`` predictions at once get 429.
Errors are JSON ``{"error": "..."}`` naming the problem.

:class:`fhe_quant.service_client.ServiceClient` is the matching client (standard
library only). ``python -m fhe_quant.http`` stays as a no-dependency fallback (one
process, keys in memory, no tokens): see its docstring.

Examples:
    >>> from fhe_quant.keystore import parse_size
    >>> ServiceSettings("artifact/server", key_memory=parse_size("2GB")).key_memory
    2000000000
    >>> ServiceSettings("artifact/server", max_concurrent=0)
    Traceback (most recent call last):
    ...
    fhe_quant.errors.ParameterError: ServiceSettings.max_concurrent must be a positive int; got 0.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fhe_quant.deploy import FHEModelServer, is_fhe_quant_message
from fhe_quant.errors import DeploymentError, ParameterError
from fhe_quant.keystore import KeyStore, StoredKeys
from fhe_quant.service_client import CIRCUIT_HEADER, circuit_id, pack, unpack

__all__ = ["ServiceSettings", "create_app", "serve"]


@dataclass(frozen=True)
class ServiceSettings:
    """What ``fhe-quant serve`` is configured with.

    Attributes:
        server_dir: the model's ``server`` artifact directory.
        key_store: the key store's directory; ``None``: a temporary one (keys are lost
            at exit).
        key_memory: bytes of evaluation keys held in memory (LRU).
        dask: a scheduler address; ``None``: the embedded ``LocalCluster``.
        workers: the embedded cluster's worker processes (``None``: one per core).
        max_body_bytes: largest request body accepted.
        max_concurrent: predictions running at once; more get 429.
        max_batch: samples in one ``predict_batch``.
    """

    server_dir: str
    key_store: str | None = None
    key_memory: int = 4 * 10**9
    dask: str | None = None
    workers: int | None = None
    max_body_bytes: int = 512 * 2**20
    max_concurrent: int = 8
    max_batch: int = 10_000

    def __post_init__(self) -> None:
        for name in ("key_memory", "max_body_bytes", "max_concurrent", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "key_memory" else 1):
                raise ParameterError(
                    f"ServiceSettings.{name} must be a positive int; got {value!r}."
                )
        if self.workers is not None and self.workers < 1:
            raise ParameterError(f"ServiceSettings.workers must be >= 1; got {self.workers!r}.")


class _RefusalError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _Service:
    """The application's state: model, circuit id, key store, cluster, busy count."""

    def __init__(self, settings: ServiceSettings) -> None:
        from fhe_quant import batch

        self.settings = settings
        self.server = FHEModelServer(settings.server_dir)
        self.circuit = circuit_id(self.server)
        self._scratch = None
        directory = settings.key_store
        if directory is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="fhe_quant_keys_")
            directory = self._scratch.name
        self.store = KeyStore(directory, settings.key_memory, on_evict=batch.forget_keys)
        self.dask: Any = None
        self.busy = 0
        self._lock = threading.Lock()

    def connect(self) -> None:
        from fhe_quant.batch import connect

        self.dask = connect(self.settings.dask, self.settings.workers)

    def authorize(self, client_id: str, authorization: str | None) -> None:
        """401 without a bearer token, 403 with a wrong one, 404 for an unknown client."""
        if not self.store.has(client_id):
            raise _RefusalError(
                404,
                f"Unknown client id {client_id!r}: upload its evaluation keys first "
                f"(PUT /clients/{client_id}/keys).",
            )
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _RefusalError(
                401,
                f"Client {client_id!r} requires 'Authorization: Bearer <token>' (the token "
                "answered by its key upload).",
                {"WWW-Authenticate": "Bearer"},
            )
        if not self.store.check_token(client_id, token.strip()):
            raise _RefusalError(403, f"Wrong token for client {client_id!r}.")

    def keys(self, client_id: str) -> StoredKeys:
        try:
            keys = self.store.get(client_id)
        except KeyError:
            raise _RefusalError(404, f"Unknown client id {client_id!r}.") from None
        if keys.circuit != self.circuit:
            raise _RefusalError(
                409,
                f"The keys of {client_id!r} are for another circuit than this model's: "
                "upload keys made from this model's client artifact.",
            )
        return keys

    def acquire(self) -> None:
        with self._lock:
            if self.busy >= self.settings.max_concurrent:
                raise _RefusalError(
                    429,
                    f"{self.busy} predictions are running, the limit of this service: retry later.",
                    {"Retry-After": "1"},
                )
            self.busy += 1

    def release(self) -> None:
        with self._lock:
            self.busy -= 1

    def run(self, ciphertexts: list[bytes], keys: StoredKeys) -> list[bytes]:
        """Runs in a thread: the batch on the cluster."""
        from fhe_quant.batch import run_batch

        return run_batch(self.server, ciphertexts, keys.message, self.dask, key_id=keys.key_id)


# ------------------------------------------------------------------ the application


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: a PUT/POST needs a ``Content-Length`` (411) within the limit
    (413), checked from the header before the body is read."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"content-length")
        refusal = None
        if header is None:
            refusal = _error(411, "A Content-Length header is required.")
        elif not header.strip().isdigit():
            refusal = _error(400, f"Invalid Content-Length {header.decode(errors='replace')!r}.")
        elif int(header) > self.max_body_bytes:
            refusal = _error(
                413,
                f"Body of {int(header)} bytes is over the limit of {self.max_body_bytes} bytes.",
                {"Connection": "close"},
            )
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _client_id(client_id: str) -> str:
    try:
        return KeyStore.check_client_id(client_id)
    except ParameterError as exc:
        raise _RefusalError(400, str(exc)) from None


async def _drain(request: Request) -> None:
    """Read and drop an unread body (within the size limit) before refusing the request:
    a client still sending it would otherwise get a reset connection, not the answer."""
    try:
        async for _ in request.stream():
            pass
    except Exception:  # NOTE: the client is gone, or the body was read already
        pass


async def _predict(service: _Service, client_id: str, request: Request, batch: bool) -> bytes:
    try:
        service.authorize(_client_id(client_id), request.headers.get("authorization"))
        keys = await run_in_threadpool(service.keys, client_id)
    except _RefusalError:
        await _drain(request)
        raise
    body = await request.body()
    if not body:
        raise _RefusalError(400, "The request body is empty.")
    try:
        ciphertexts = unpack(body, service.settings.max_batch) if batch else [body]
    except DeploymentError as exc:
        raise _RefusalError(400, str(exc)) from None
    service.acquire()
    try:
        results = await run_in_threadpool(service.run, ciphertexts, keys)
    except DeploymentError as exc:
        raise _RefusalError(400, str(exc)) from None
    finally:
        service.release()
    return pack(results) if batch else results[0]


async def _check_upload(service: _Service, client_id: str, request: Request) -> str:
    """The checks of a key upload that need no body; returns the declared circuit id."""
    if await run_in_threadpool(service.store.has, _client_id(client_id)):
        service.authorize(client_id, request.headers.get("authorization"))
    circuit = request.headers.get(CIRCUIT_HEADER)
    if circuit is None:
        raise _RefusalError(
            400, f"The {CIRCUIT_HEADER} header (the client's circuit id) is missing."
        )
    if circuit != service.circuit:
        raise _RefusalError(
            400,
            f"These keys are for another circuit ({circuit[:16]}...) than this model's "
            f"({service.circuit[:16]}...): make them from this model's client artifact.",
        )
    return circuit


def _routes(app: FastAPI, service: _Service) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and load: clients with keys, keys in memory, predictions running."""
        return {
            "status": "ok",
            "clients": len(service.store.clients()),
            "keys_in_memory": len(service.store.in_memory()),
            "busy": service.busy,
        }

    @app.put("/clients/{client_id}/keys")
    async def upload_keys(client_id: str, request: Request) -> dict[str, str]:
        """Store (or, with the current token, replace) a client's evaluation keys; the body
        is the key message, the circuit id goes in the X-FHE-Quant-Circuit header.
        Answers the client's (new) bearer token."""
        try:
            circuit = await _check_upload(service, client_id, request)
        except _RefusalError:
            await _drain(request)
            raise
        body = await request.body()
        if not is_fhe_quant_message(body):
            raise _RefusalError(400, "The body is not an fhe_quant evaluation-key message.")
        token = await run_in_threadpool(service.store.put, client_id, body, circuit)
        return {"token": token}

    @app.post("/clients/{client_id}/predict")
    async def predict(client_id: str, request: Request) -> Response:
        """One serialized ciphertext in, its serialized encrypted result out."""
        result = await _predict(service, client_id, request, batch=False)
        return Response(result, media_type="application/octet-stream")

    @app.post("/clients/{client_id}/predict_batch")
    async def predict_batch(client_id: str, request: Request) -> Response:
        """Ciphertexts framed by fhe_quant.service_client.pack in, results framed the
        same way out, in order; the samples run in parallel on the cluster's workers."""
        result = await _predict(service, client_id, request, batch=True)
        return Response(result, media_type="application/octet-stream")


def create_app(settings: ServiceSettings, on_ready: Any = None) -> Any:
    """The FastAPI application (wrapped in the body-size limit) for ``settings``.

    The cluster is connected at startup (``on_ready()`` is called then).
    """
    from contextlib import asynccontextmanager

    service = _Service(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        await run_in_threadpool(service.connect)
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="fhe_quant encrypted inference", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(_RefusalError)
    async def refused(_: Request, exc: _RefusalError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    _routes(app, service)
    return _BodyLimit(app, settings.max_body_bytes)


def serve(settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve under uvicorn until interrupted; prints the URL (one line, flushed) once the
    cluster is up and the socket listens."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[:2]
    if settings.key_store is None:
        print(
            "fhe-quant serve: no --key-store: keys are kept in a temporary directory and "
            "lost at exit.",
            file=sys.stderr,
        )
    url = f"http://{bound[0]}:{bound[1]}"

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            print(url, flush=True)

    app = create_app(settings)
    # NOTE: on SIGTERM, requests in flight get 10 s to finish (a long batch is cut).
    config = uvicorn.Config(
        app, log_level="warning", timeout_keep_alive=30, lifespan="on", timeout_graceful_shutdown=10
    )
    _Server(config).run(sockets=[sock])
