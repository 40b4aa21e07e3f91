"""A small, deterministic training loop for torch modules (QAT modules included).

Examples:
    >>> import numpy as np, torch
    >>> x = np.random.default_rng(0).normal(size=(64, 3))
    >>> y = (x[:, 0] > 0).astype(int)
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> history = fit(net, x, y, epochs=3, lr=0.1, verbose=False)
    >>> len(history["loss"]), history["loss"][-1] < history["loss"][0]
    (3, True)
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fhe_quant.errors import InputError, ParameterError
from fhe_quant.qat_module import QATModule

__all__ = ["LOSSES", "OPTIMIZERS", "SCHEDULES", "fit"]

#: Loss names :func:`fit` accepts.
LOSSES = ("cross_entropy", "mse")

#: Optimizer names :func:`fit` accepts.
OPTIMIZERS = ("adam", "adamw", "sgd")

#: Learning-rate schedules :func:`fit` accepts (``"cosine"`` decays to 0 per step).
SCHEDULES = ("constant", "cosine")


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ParameterError(
            f"The {name!r} parameter of fit must be an int >= {low}. Got {value!r} instead."
        )
    return int(value)


def _check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise ParameterError(f"The 'lr' parameter of fit must be a float > 0. Got {lr!r}.")
    return float(lr)


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(
            f"The {name!r} parameter of fit must be one of "
            f"{', '.join(repr(c) for c in choices)}. Got {value!r} instead."
        )
    return value


def _as_array(value: Any, what: str) -> np.ndarray:
    # NOTE: callers copy into torch with torch.tensor (read-only arrays are fine).
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise InputError(f"The {what} must hold numbers; got dtype {array.dtype} instead.")
    if not np.all(np.isfinite(array)):
        raise InputError(f"The {what} holds NaN or inf values.")
    return array


def _dtype(model: nn.Module) -> torch.dtype:
    parameter = next(iter(model.parameters()), None)
    return parameter.dtype if parameter is not None else torch.float32


def _targets(y: np.ndarray, loss: str, dtype: torch.dtype) -> torch.Tensor:
    if loss == "cross_entropy":
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise InputError("cross_entropy needs integer class indices in y.")
        return torch.tensor(y.astype(np.int64))
    return torch.tensor(y, dtype=dtype)


def _loss(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target.reshape(output.shape).to(output.dtype))


def _optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def fit(
    model: nn.Module,
    X: Any,
    y: Any,
    *,
    epochs: int,
    lr: float = 1e-2,
    batch_size: int = 64,
    loss: str = "cross_entropy",
    optimizer: str = "adam",
    seed: int = 0,
    verbose: bool = True,
    validation: tuple[Any, Any] | None = None,
    schedule: str = "constant",
    num_threads: int | None = 1,
) -> dict[str, list[float]]:
    """Train ``model`` on ``(X, y)`` with minibatches; deterministic under ``seed``.

    The shuffling and torch's global generator (dropout, ...) are seeded inside a forked
    random state, so the caller's random state is left untouched. The model is left in
    eval mode.

    Args:
        model: any ``torch.nn.Module``; a :class:`~fhe_quant.qat_module.QATModule`
            whose quantizers were never initialised is initialised on ``X`` first
            (:meth:`~fhe_quant.qat_module.QATModule.initialize`).
        X: inputs ``(N, ...)``, NumPy or torch.
        y: class indices ``(N,)`` for ``"cross_entropy"``, targets for ``"mse"``.
        epochs: passes over the data.
        lr: learning rate.
        batch_size: minibatch size (the last batch may be smaller).
        loss: ``"cross_entropy"`` or ``"mse"``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        seed: seed of the shuffling and of torch's global generator during training.
        verbose: show a progress bar.
        validation: optional ``(X_val, y_val)``, scored after every epoch.
        schedule: ``"constant"`` learning rate or ``"cosine"`` (decays to 0 over the
            training, step by step).
        num_threads: torch's intra-op threads during training, restored afterwards
            (``None``: leave torch's setting). One thread is the fastest for models small
            enough to run encrypted, whose operations are far too small to split, and
            several threads slow down by orders of magnitude when the cores are busy.

    Returns:
        The history: ``"loss"`` (mean training loss per epoch), ``"seconds"`` (time per
        epoch) and, with ``validation``, ``"val_loss"`` and (for cross-entropy)
        ``"val_accuracy"``.

    Raises:
        ParameterError: a parameter out of range.
        InputError: ``X`` and ``y`` of different lengths, or not finite numbers.
    """
    if not isinstance(model, nn.Module):
        raise ParameterError(f"fit needs a torch.nn.Module. Got {type(model).__name__}.")
    epochs = _check_int(epochs, "epochs", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    seed = _check_int(seed, "seed", 0)
    loss = _check_choice(loss, "loss", LOSSES)
    optimizer = _check_choice(optimizer, "optimizer", OPTIMIZERS)
    schedule = _check_choice(schedule, "schedule", SCHEDULES)
    num_threads = None if num_threads is None else _check_int(num_threads, "num_threads", 1)
    lr = _check_lr(lr)
    dtype = _dtype(model)
    x_all = torch.tensor(_as_array(X, "X"), dtype=dtype)
    y_all = _targets(_as_array(y, "y"), loss, dtype)
    if len(x_all) != len(y_all) or len(x_all) == 0:
        raise InputError(f"X has {len(x_all)} samples and y has {len(y_all)}; they must match.")
    val = _validation(validation, loss, dtype)
    if isinstance(model, QATModule) and not model.is_initialized:
        # NOTE: the explicit initialisation step, on the whole training set.
        model.initialize(x_all.numpy())
    history = _history(val is not None, loss)
    opt = _optimizer(optimizer, model, lr)
    scheduler = _scheduler(schedule, opt, epochs * -(-len(x_all) // batch_size))
    with _torch_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        bar = tqdm(range(epochs), desc="training", disable=not verbose, leave=False)
        for _ in bar:
            start = time.perf_counter()
            batches = torch.randperm(len(x_all), generator=generator).split(batch_size)
            mean_loss = _epoch(model, opt, scheduler, x_all, y_all, batches, loss)
            history["loss"].append(mean_loss)
            history["seconds"].append(time.perf_counter() - start)
            postfix = {"loss": mean_loss}
            if val is not None:
                scores = _evaluate(model, val[0], val[1], loss)
                for key, value in scores.items():
                    history[key].append(value)
                postfix.update(scores)
            bar.set_postfix({key: f"{value:.4f}" for key, value in postfix.items()})
    model.eval()
    return history


def _scheduler(schedule: str, opt: torch.optim.Optimizer, steps: int) -> Any:
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return None


def _validation(
    validation: tuple[Any, Any] | None, loss: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if validation is None:
        return None
    x_val, y_val = validation
    return (
        torch.tensor(_as_array(x_val, "validation X"), dtype=dtype),
        _targets(_as_array(y_val, "validation y"), loss, dtype),
    )


def _history(validation: bool, loss: str) -> dict[str, list[float]]:
    history: dict[str, list[float]] = {"loss": [], "seconds": []}
    if validation:
        history["val_loss"] = []
        if loss == "cross_entropy":
            history["val_accuracy"] = []
    return history


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scheduler: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: tuple[torch.Tensor, ...],
    loss: str,
) -> float:
    model.train()
    total = 0.0
    for batch in batches:
        opt.zero_grad()
        value = _loss(model(x[batch]), y[batch], loss)
        value.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        total += float(value.detach()) * len(batch)
    return total / len(x)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        output = model(x)
    scores = {"val_loss": float(_loss(output, y, loss))}
    if loss == "cross_entropy":
        scores["val_accuracy"] = float((output.argmax(dim=1) == y).double().mean())
    return scores
