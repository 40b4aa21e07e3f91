"""A small HTTP front end for an :class:`~fhe_quant.deploy.FHEModelServer`.

Endpoints (all bodies of ciphertexts and keys are raw bytes, ``application/octet-stream``):

* ``GET /health`` -> 200 ``{"status": "ok", "clients": n}``
* ``PUT /clients/{client_id}/keys`` with the evaluation-key message -> 204
* ``POST /clients/{client_id}/predict`` with one serialized ciphertext -> 200 with the
  serialized encrypted result

Errors are JSON ``{"error": "..."}``: 400 for a malformed request, bad bytes or a
ciphertext made under other keys than the client's (:class:`DeploymentError`); 404 for an
unknown path or client id; 405 for a wrong method; 411 without ``Content-Length``; 413
for a body over ``max_body_bytes`` (refused from its header, before reading it). The
server keeps serving after any error. A client id matches ``[A-Za-z0-9_-]{1,64}``.

This is the no-dependency fallback: the service for real use is ``fhe-quant serve``
(:mod:`fhe_quant.serve`: FastAPI under uvicorn, a key store on disk with per-client bearer
tokens, FHE on a Dask cluster, 413/429 limits; see ``docs/SERVING.md``). This server stays
because it needs only the standard library (a loopback demo, a machine without the
``serve`` extra) and because tests and examples still start it. It has no TLS, no
authentication (anyone who can reach it may replace a client's keys), no back-pressure,
keeps keys in memory only and runs FHE on the request thread. ``fhe-quant predict`` talks
to it too, one request per sample.

Run it with ``python -m fhe_quant.http artifact/server --port 8000``: the first line it
prints is the URL it listens on.

Examples:
    >>> from fhe_quant.http import Client, make_server  # doctest: +SKIP
    >>> httpd = make_server("artifact/server")  # doctest: +SKIP
    >>> threading.Thread(target=httpd.serve_forever, daemon=True).start()  # doctest: +SKIP
    >>> api = Client(f"http://127.0.0.1:{httpd.server_address[1]}")  # doctest: +SKIP
    >>> api.upload_keys("alice", client.get_serialized_evaluation_keys())  # doctest: +SKIP
    >>> reply = api.predict("alice", client.quantize_encrypt_serialize(x[:1])[0])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fhe_quant.deploy import FHEModelServer, is_fhe_quant_message
from fhe_quant.errors import DeploymentError, FHEQuantError

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "CLIENT_ID_PATTERN",
    "HTTPRequestError",
    "FHEHTTPServer",
    "make_server",
    "serve",
    "http_request",
    "Client",
]

#: Largest accepted request body (evaluation keys are the largest messages).
DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024
#: What a client id must match.
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CLIENT_PATH = re.compile(r"/clients/([^/]*)/(keys|predict)")
_CHUNK = 1 << 20
# After refusing a body unread, discard at most this much of it (for at most _LINGER_S)
# before closing, so that the client can read the refusal instead of a reset connection.
_LINGER_BYTES = 64 << 20
_LINGER_S = 2.0


class HTTPRequestError(FHEQuantError):
    """The server refused a request (4xx/5xx) or could not be reached.

    Attributes:
        status: the HTTP status, or ``None`` if no response came back.
        message: the server's error message (or the transport error).
    """

    def __init__(self, status: int | None, message: str) -> None:
        self.status = status
        self.message = message
        prefix = f"HTTP {status}" if status is not None else "Request failed"
        super().__init__(f"{prefix}: {message}")


class _RefusalError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FHEHTTPServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` holding the FHE server and the clients' keys."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        fhe_server: FHEModelServer,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        verbose: bool = False,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive; got {max_body_bytes}.")
        self.fhe_server = fhe_server
        self.max_body_bytes = max_body_bytes
        self.verbose = verbose
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def set_keys(self, client_id: str, keys: bytes) -> None:
        with self._lock:
            self._keys[client_id] = keys

    def get_keys(self, client_id: str) -> bytes | None:
        with self._lock:
            return self._keys.get(client_id)

    def n_clients(self) -> int:
        with self._lock:
            return len(self._keys)


class _Handler(BaseHTTPRequestHandler):
    server: FHEHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a connection may stay silent before it is dropped

    # ------------------------------------------------------------------ responses
    def _send(self, status: HTTPStatus, body: bytes = b"", content_type: str = "") -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", self._allowed)
        if self.close_connection:
            self.send_header("Connection", "close")
        if status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # ------------------------------------------------------------------ requests
    def _read_body(self) -> bytes:
        header = self.headers.get("Content-Length")
        if header is None:
            self.close_connection = True  # a body may follow that we will not read
            raise _RefusalError(HTTPStatus.LENGTH_REQUIRED, "A Content-Length header is required.")
        if not header.strip().isdigit():
            self.close_connection = True
            raise _RefusalError(HTTPStatus.BAD_REQUEST, f"Invalid Content-Length {header!r}.")
        length = int(header)
        if length > self.server.max_body_bytes:
            self.close_connection = True  # do not read (or wait for) the body
            raise _RefusalError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"Body of {length} bytes is over the limit of {self.server.max_body_bytes} bytes.",
            )
        if length == 0:
            raise _RefusalError(HTTPStatus.BAD_REQUEST, "The request body is empty.")
        chunks, remaining = [], length
        while remaining:
            chunk = self.rfile.read(min(remaining, _CHUNK))
            if not chunk:
                self.close_connection = True
                raise _RefusalError(
                    HTTPStatus.BAD_REQUEST,
                    f"The body ended after {length - remaining} of {length} bytes.",
                )
            chunks.append(chunk)
            remaining -= len(chunk)
        self._body_read = True
        return b"".join(chunks)

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._allowed = "GET"
            if method != "GET":
                raise _RefusalError(
                    HTTPStatus.METHOD_NOT_ALLOWED, f"{method} {path} is not allowed."
                )
            self._send_json(HTTPStatus.OK, {"status": "ok", "clients": self.server.n_clients()})
            return
        match = _CLIENT_PATH.fullmatch(path)
        if match is None:
            raise _RefusalError(HTTPStatus.NOT_FOUND, f"No such path: {path}.")
        client_id, action = match.groups()
        self._allowed = "PUT" if action == "keys" else "POST"
        if method != self._allowed:
            raise _RefusalError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} {path} is not allowed.")
        if CLIENT_ID_PATTERN.fullmatch(client_id) is None:
            raise _RefusalError(
                HTTPStatus.BAD_REQUEST,
                f"Invalid client id {client_id[:80]!r}: it must match [A-Za-z0-9_-]{{1,64}}.",
            )
        if action == "keys":
            body = self._read_body()
            if not is_fhe_quant_message(body):
                raise _RefusalError(
                    HTTPStatus.BAD_REQUEST, "The body is not an fhe_quant evaluation-key message."
                )
            self.server.set_keys(client_id, body)
            self._send(HTTPStatus.NO_CONTENT)
            return
        keys = self.server.get_keys(client_id)
        if keys is None:
            raise _RefusalError(
                HTTPStatus.NOT_FOUND,
                f"Unknown client id {client_id!r}: upload its evaluation keys first "
                f"(PUT /clients/{client_id}/keys).",
            )
        body = self._read_body()
        try:
            result = self.server.fhe_server.run(body, keys)
        except DeploymentError as exc:
            raise _RefusalError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        self._send(HTTPStatus.OK, result, "application/octet-stream")

    def _handle(self, method: str) -> None:
        self._allowed = ""
        self._body_read = False
        try:
            self._route(method)
        except _RefusalError as exc:
            if not self._body_read and (
                self.headers.get("Content-Length", "0").strip() != "0"
                or "Transfer-Encoding" in self.headers
            ):
                self.close_connection = True  # an unread body must not pass as a request
            self._send_json(exc.status, {"error": exc.message})
            if self.close_connection:
                self._linger()
        except Exception as exc:  # keep serving whatever happens
            self.close_connection = True
            try:
                self._send_json(
                    HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"}
                )
            except OSError:
                pass  # the client is gone
            self._linger()

    def _linger(self) -> None:
        """Half-close, then discard what the client still sends (bounded in bytes and
        time): closing a socket with unread data resets the connection, and the client
        could lose the response."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_LINGER_S)
            deadline, total = time.monotonic() + _LINGER_S, 0
            while total < _LINGER_BYTES and time.monotonic() < deadline:
                data = self.connection.recv(_CHUNK)
                if not data:
                    break
                total += len(data)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


def make_server(
    server_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    verbose: bool = False,
) -> FHEHTTPServer:
    """Load the ``server`` artifact and bind (not yet serve) an HTTP server for it.

    ``port=0`` picks a free port: read it from ``server.server_address[1]``. Call
    ``serve_forever()`` to serve and ``shutdown()`` + ``server_close()`` to stop.
    """
    return FHEHTTPServer((host, port), FHEModelServer(server_dir), max_body_bytes, verbose)


def serve(
    server_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    verbose: bool = False,
) -> None:
    """Serve until interrupted; first prints the URL (on its own line, flushed)."""
    httpd = make_server(server_dir, host, port, max_body_bytes, verbose)
    bound_host, bound_port = httpd.server_address[:2]
    print(f"http://{bound_host}:{bound_port}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def http_request(
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
    error: type[HTTPRequestError] | None = None,
) -> bytes:
    """One request with :mod:`urllib.request`; the answer's body.

    Raises:
        HTTPRequestError: (or ``error``, a subclass) a 4xx/5xx, with the server's JSON
            ``error`` message, or no answer at all (``status=None``).
    """
    error = error or HTTPRequestError
    headers = dict(headers)
    if body is not None:
        headers["Content-Type"] = "application/octet-stream"
    request = urllib.request.Request(url, body, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode(errors="replace") or exc.reason
        raise error(exc.code, str(message)) from None
    except (urllib.error.URLError, OSError) as exc:
        raise error(None, f"{method} {url}: {exc}") from None


class Client:
    """A minimal client of the HTTP server, on :mod:`urllib.request`.

    Args:
        url: the server's base URL, e.g. ``"http://127.0.0.1:8000"``.
        timeout: seconds to wait for each request.
    """

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        return http_request(method, self.url + path, body, {}, self.timeout)

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer."""
        return json.loads(self._request("GET", "/health"))

    def upload_keys(self, client_id: str, keys: bytes) -> None:
        """Store (or replace) this client's evaluation keys on the server."""
        self._request("PUT", f"/clients/{client_id}/keys", keys)

    def predict(self, client_id: str, ciphertext: bytes) -> bytes:
        """Run the model on one serialized ciphertext; returns the encrypted result."""
        return self._request("POST", f"/clients/{client_id}/predict", ciphertext)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fhe_quant.http", description="Serve a compiled model over HTTP."
    )
    parser.add_argument("server_dir", help="the 'server' directory written by FHEModelDev")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    try:
        serve(args.server_dir, args.host, args.port, args.max_body_bytes, args.verbose)
    except (DeploymentError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
