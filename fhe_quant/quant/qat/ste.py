"""Straight-through estimators: rounding and clamping with the gradients QAT trains by
(identity through ``round``, LSQ's step-size gradient through the fake codes)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["round_ste", "scale_gradient", "fake_codes"]


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (ties to even) forward, identity backward.

    Examples:
        >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
        >>> y = round_ste(x)
        >>> y.sum().backward()
        >>> y.tolist(), x.grad.tolist()
        ([0.0, 2.0], [1.0, 1.0])
    """
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` forward (up to rounding), gradient multiplied by ``factor`` backward.

    Examples:
        >>> s = torch.tensor(2.0, requires_grad=True)
        >>> scale_gradient(s, 0.25).backward()
        >>> s.grad.item()
        0.25
    """
    return (x - x * factor).detach() + x * factor


def fake_codes(x: Tensor, step: Tensor, zero_point: Tensor, qmax: int) -> Tensor:
    """STE codes ``clamp(round(x / step) + z, 0, qmax)`` as floats.

    Forward: the codes of :meth:`UniformQuantizer.quantize` (up to float rounding).
    Backward: ``1 / step`` inside the range, 0 where clamped; towards ``step`` the LSQ
    gradient ``-x / step**2`` inside the range (multiplied by the step itself in the
    dequantized value ``step * (codes - z)``, it gives LSQ's ``round(x/s) - x/s``).

    Examples:
        >>> fake_codes(torch.tensor([[-1.0, 0.26, 9.0]]), torch.tensor(0.5), torch.tensor(1),
        ...            3).tolist()
        [[0.0, 2.0, 3.0]]
    """
    codes = torch.clamp(x / step + zero_point, 0.0, float(qmax))
    return round_ste(codes)
