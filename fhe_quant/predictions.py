"""A predictions file that ``fhe-quant predict`` fills batch by batch and can resume.

* ``.csv``: rows are appended (and flushed to disk) as each batch is decrypted; a
  header row names the columns (``prediction`` or ``prediction_<j>``, a classifier's
  ``proba_<class>``, a module's ``output_<j>``).
* ``.npy``: each batch is written to ``<out>.parts/<first row>.npy`` (atomically); the
  array is assembled into ``<out>`` at the end and the parts removed.

A sidecar ``<out>.progress.json`` records the SHA-256 of the inputs, so a rerun on the
same inputs keeps the rows already there (a half-written last CSV line is dropped) and
a rerun on other inputs is refused instead of mixing answers.

Examples:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> out = tempfile.mkdtemp() + "/p.csv"
    >>> x = np.zeros((3, 2))
    >>> f = PredictionFile(out, x)
    >>> f.append(np.array([1, 0]), None, None)
    >>> PredictionFile(out, x).rows_done()
    2
    >>> f.append(np.array([1]), None, None)
    >>> _ = f.finish()
    >>> Path(out).read_text().split()
    ['prediction', '1', '0', '1']
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fhe_quant.errors import InputError

__all__ = ["PredictionFile"]


def _digest(x: np.ndarray) -> str:
    array = np.ascontiguousarray(x, dtype=np.float64)
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    text = str(value.item() if isinstance(value, np.generic) else value)
    if any(c in text for c in ',"\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


def _columns(predictions: np.ndarray, probabilities: Any, post: Any) -> list[str]:
    width = int(np.prod(predictions.shape[1:], dtype=int))
    task = getattr(post, "task", None)
    base = "output" if task == "module" else "prediction"
    names = [base] if predictions.ndim == 1 else [f"{base}_{j}" for j in range(width)]
    if probabilities is not None:
        names += [f"proba_{c}" for c in post.classes]
    return names


class PredictionFile:
    """The output of one ``predict`` run over inputs ``x``.

    Args:
        path: a ``.csv`` or ``.npy`` file name.
        x: the inputs (their digest guards a resume).

    Raises:
        InputError: another suffix, or a previous run's file for other inputs.
    """

    def __init__(self, path: str | Path, x: np.ndarray) -> None:
        self.path = Path(path)
        self.kind = self.path.suffix.lower()
        if self.kind not in (".csv", ".npy"):
            raise InputError(f"--out must end in .csv or .npy; got {str(path)!r}.")
        self.n = len(x)
        self.progress = self.path.with_name(self.path.name + ".progress.json")
        self.parts = self.path.with_name(self.path.name + ".parts")
        digest = _digest(x)
        if self.progress.is_file():
            recorded = json.loads(self.progress.read_text()).get("data_sha256")
            if recorded != digest:
                raise InputError(
                    f"{self.path} holds predictions of other inputs than --data: remove it "
                    f"(and {self.progress.name}) or choose another --out."
                )
        elif self.path.exists():
            raise InputError(f"{self.path} exists and is not an unfinished predict: remove it.")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.progress.write_text(json.dumps({"data_sha256": digest, "rows": self.n}))

    def rows_done(self) -> int:
        """Rows already written by a previous run (on these inputs)."""
        if self.kind == ".npy":
            done = 0
            while (self.parts / f"{done}.npy").is_file():
                done += len(np.load(self.parts / f"{done}.npy", allow_pickle=False))
            return done
        if not self.path.is_file():
            return 0
        text = self.path.read_text()
        if not text.endswith("\n"):  # a line cut by the interruption: drop it
            text = text[: text.rfind("\n") + 1]
            self.path.write_text(text)
        return max(0, text.count("\n") - 1)

    def append(self, predictions: np.ndarray, probabilities: Any, post: Any) -> None:
        """Write the next batch's rows (durably)."""
        if self.kind == ".npy":
            start = self.rows_done()
            self.parts.mkdir(exist_ok=True)
            tmp = self.parts / f".{start}.tmp.npy"
            np.save(tmp, np.asarray(predictions), allow_pickle=False)
            os.replace(tmp, self.parts / f"{start}.npy")
            return
        rows = np.asarray(predictions).reshape(len(predictions), -1)
        lines = []
        if not self.path.is_file() or self.path.stat().st_size == 0:
            lines.append(",".join(_columns(np.asarray(predictions), probabilities, post)))
        for i, row in enumerate(rows):
            cells = [_cell(v) for v in row]
            if probabilities is not None:
                cells += [_cell(v) for v in probabilities[i]]
            lines.append(",".join(cells))
        with self.path.open("a") as file:
            file.write("\n".join(lines) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def finish(self) -> Path:
        """Assemble a ``.npy`` and drop the progress record; returns the file's path."""
        if self.kind == ".npy":
            starts = sorted(int(p.stem) for p in self.parts.glob("[0-9]*.npy"))
            chunks = [np.load(self.parts / f"{s}.npy", allow_pickle=False) for s in starts]
            np.save(self.path, np.concatenate(chunks), allow_pickle=False)
            shutil.rmtree(self.parts)
        self.progress.unlink(missing_ok=True)
        return self.path
