"""Bring concrete-python into the process without what its runtime does to the process.

concrete-python 2.11 starts a dataflow runtime (HPX, ``libhpx`` in
``concrete_python.libs``) the first time a circuit runs. Two things follow, both
measured (``docs/DESIGN-NOTES.md`` §12):

* ``concrete.compiler`` registers ``atexit(terminate_df_parallelization)``. Once the
  runtime has started, that call ends the process with status 0 and never returns, so
  ``sys.exit(1)``, an uncaught exception and a pytest run with failures all exit 0.
* Starting the runtime installs its own handlers for ``SIGPIPE``, ``SIGSEGV`` and
  ``SIGABRT``. Python ignores ``SIGPIPE`` (a write to a socket the peer closed raises
  ``BrokenPipeError`` on that write); the runtime's handler kills the whole process
  instead, so one client hanging up ends a server.

:func:`import_concrete` is the only way fhe_quant imports Concrete: it starts the
runtime at once (about 10 ms, the same start a first run would do), puts back the
signal dispositions the process had before, and removes Concrete's exit hook, so every
exit status is the interpreter's own. Skipping the runtime's termination at exit is
safe: it only stops the runtime's threads, which the end of the process stops anyway.
"""

from __future__ import annotations

import atexit
import ctypes
import signal
import sys
import threading
import warnings
from types import ModuleType

__all__ = ["RUNTIME_SIGNALS", "import_concrete", "runtime_prepared"]

#: The signals whose handlers Concrete's runtime replaces when it starts.
RUNTIME_SIGNALS = (signal.SIGPIPE, signal.SIGSEGV, signal.SIGABRT)

# NOTE: ``struct sigaction`` is 152 bytes on Linux x86_64 and aarch64; the buffer is kept
# opaque (saved and written back byte for byte) so no field layout is assumed.
_SIGACTION_BYTES = 512

_lock = threading.Lock()
_prepared = False


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True)


def _save_dispositions(libc: ctypes.CDLL | None) -> dict[int, ctypes.Array[ctypes.c_char]]:
    saved: dict[int, ctypes.Array[ctypes.c_char]] = {}
    if libc is None:
        return saved
    for signum in RUNTIME_SIGNALS:
        buffer = ctypes.create_string_buffer(_SIGACTION_BYTES)
        if libc.sigaction(int(signum), None, buffer) == 0:
            saved[int(signum)] = buffer
    return saved


def _restore_dispositions(
    libc: ctypes.CDLL | None, saved: dict[int, ctypes.Array[ctypes.c_char]]
) -> None:
    if libc is None:
        # NOTE: elsewhere only Python's own SIGPIPE choice can be put back, from the main thread.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        return
    for signum, buffer in saved.items():
        libc.sigaction(signum, buffer, None)


def _start_runtime_undoing_its_side_effects() -> None:
    import concrete.compiler as compiler

    libc = _libc()
    saved = _save_dispositions(libc)
    init = getattr(compiler, "init_dfr", None)
    if init is not None:
        init()
    _restore_dispositions(libc, saved)
    terminate = getattr(compiler, "_terminate_df_parallelization", None)
    if terminate is not None:
        atexit.unregister(terminate)


def import_concrete() -> ModuleType:
    """Import ``concrete.fhe`` with its runtime started and its process side effects undone.

    Idempotent and thread-safe; every fhe_quant module that needs Concrete calls it.

    Returns:
        The ``concrete.fhe`` module.

    Examples:
        >>> fhe = import_concrete()
        >>> runtime_prepared()
        True
    """
    global _prepared
    with warnings.catch_warnings():
        # NOTE: concrete imports pkg_resources, which warns on import with recent setuptools.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from concrete import fhe
    with _lock:
        if not _prepared:
            _start_runtime_undoing_its_side_effects()
            _prepared = True
    return fhe


def runtime_prepared() -> bool:
    """Whether :func:`import_concrete` has prepared this process's Concrete runtime."""
    return _prepared
