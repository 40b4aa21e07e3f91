"""Ed25519 signatures of deployment artifacts (the ``cryptography`` package).

The model owner keeps a private *signing key* and gives the public *verify key* to the
people who load the artifacts. :meth:`fhe_quant.deploy.FHEModelDev.save` signs each
directory's ``manifest.json`` (which lists the SHA-256 of every file), and
:class:`~fhe_quant.deploy.FHEModelClient` / :class:`~fhe_quant.deploy.FHEModelServer`
refuse, when given the verify key, any directory whose manifest is unsigned or signed by
another key.

Keys are PEM files: the private key in PKCS #8 (unencrypted, written ``0600``), the
public key in SubjectPublicKeyInfo. ``fhe-quant keygen-signing OUT`` writes ``OUT`` and
``OUT.pub``.

Examples:
    >>> import tempfile, pathlib
    >>> private, public = write_signing_key_pair(pathlib.Path(tempfile.mkdtemp()) / "owner")
    >>> signature = sign(load_signing_key(private), b"manifest bytes")
    >>> verify(load_verify_key(public), b"manifest bytes", signature, "manifest.json")
    >>> oct(private.stat().st_mode & 0o777), public.name
    ('0o600', 'owner.pub')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fhe_quant.errors import DeploymentError, ParameterError

__all__ = [
    "SIGNATURE_SIZE",
    "write_signing_key_pair",
    "load_signing_key",
    "load_verify_key",
    "sign",
    "verify",
    "write_private_file",
]

#: Bytes of an Ed25519 signature.
SIGNATURE_SIZE = 64
_RAW_KEY_SIZE = 32


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` (never overwriting) readable by its owner only (``0600``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def write_signing_key_pair(path: str | Path) -> tuple[Path, Path]:
    """Make a new Ed25519 key pair: the private key at ``path`` (``0600``), the public
    key at ``path + ".pub"``. Refuses to overwrite either.

    Returns:
        ``(private key path, public key path)``.

    Raises:
        ParameterError: a file exists there already.
    """
    private, public = Path(path), Path(f"{path}.pub")
    for file in (private, public):
        if file.exists():
            raise ParameterError(f"{file} exists already; choose another name or remove it.")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(private, pem)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def _key_bytes(key: str | Path | bytes, what: str) -> tuple[bytes, str]:
    """The bytes of a key given as PEM/raw bytes or as a file path, and where they come from."""
    if isinstance(key, bytes):
        return key, f"the {what} given"
    try:
        return Path(key).read_bytes(), str(key)
    except OSError as exc:
        raise DeploymentError(f"Cannot read the {what} {str(key)!r}: {exc.strerror}.") from None


def load_signing_key(key: Any) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object, PEM bytes or a PEM file path.

    Raises:
        DeploymentError: not an unencrypted Ed25519 private key.
    """
    if isinstance(key, Ed25519PrivateKey):
        return key
    if not isinstance(key, (str, Path, bytes)):
        raise DeploymentError(
            "signing_key must be an Ed25519 private key, its PEM bytes or a PEM file path; "
            f"got {type(key).__name__}."
        )
    data, where = _key_bytes(key, "signing key")
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DeploymentError(f"{where} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise DeploymentError(f"{where} is a {type(loaded).__name__}, not an Ed25519 key.")
    return loaded


def load_verify_key(key: Any) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, PEM or raw 32-byte bytes, or a PEM file.

    Raises:
        DeploymentError: not an Ed25519 public key.
    """
    if isinstance(key, Ed25519PublicKey):
        return key
    if not isinstance(key, (str, Path, bytes)):
        raise DeploymentError(
            "verify_key must be an Ed25519 public key, its PEM (or raw 32-byte) bytes or a "
            f"PEM file path; got {type(key).__name__}."
        )
    data, where = _key_bytes(key, "verify key")
    if len(data) == _RAW_KEY_SIZE and not data.startswith(b"-----"):
        return Ed25519PublicKey.from_public_bytes(data)
    try:
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise DeploymentError(f"{where} is not a PEM public key: {exc}") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise DeploymentError(f"{where} is a {type(loaded).__name__}, not an Ed25519 key.")
    return loaded


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The Ed25519 signature of ``data`` (:data:`SIGNATURE_SIZE` bytes)."""
    return key.sign(data)


def verify(key: Ed25519PublicKey, data: bytes, signature: bytes, where: str) -> None:
    """Check that ``signature`` signs ``data`` under ``key``.

    Raises:
        DeploymentError: it does not (naming ``where``).
    """
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise DeploymentError(
            f"{where}: the signature does not verify with the verify key given: the artifact "
            "was modified or signed by someone else."
        ) from None
