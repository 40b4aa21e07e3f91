"""fhe_quant: compile trained models into low-bit integer programs for encrypted inference.

Public entry points live in submodules: :mod:`fhe_quant.torch` (PyTorch) and, as they
land, :mod:`fhe_quant.sklearn` and :mod:`fhe_quant.deploy`.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
