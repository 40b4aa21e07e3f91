"""The quantizers of quantization-aware training (QAT), split by concern.

* :mod:`~fhe_quant.quant.qat.config`: :class:`QATConfig` and QAT's defaults (table
  width, accumulator budget per layer);
* :mod:`~fhe_quant.quant.qat.ops`: the torch side of the op table (elementwise
  operations, linear layers) and the chain of layers QAT trains;
* :mod:`~fhe_quant.quant.qat.ste`: straight-through estimators (rounding, LSQ's gradient);
* :mod:`~fhe_quant.quant.qat.weights`: weight quantizers (per-channel least-squares
  scale, accumulator budget, binary);
* :mod:`~fhe_quant.quant.qat.activations`: the activation quantizer (LSQ or moving
  averages).

The training module that runs the lowered integer program, ``QATModule``, is
:mod:`fhe_quant.qat_module` (above :mod:`fhe_quant.lower`); the public functions are
:func:`fhe_quant.torch.prepare_qat` and :func:`fhe_quant.torch.compile_qat_model`.
"""

from __future__ import annotations

from fhe_quant.quant.qat.activations import DEAD_FEATURE_SCALE, ActivationQuantizer
from fhe_quant.quant.qat.config import (
    ACTIVATION_SCALES,
    AUTO_BUDGET_MAX_BITS,
    AUTO_DROPPED_BITS,
    AUTO_MIN_TABLE_BITS,
    WEIGHT_MODES,
    WEIGHT_SCALES,
    QATConfig,
    default_accumulator_bits,
    default_input_bits,
    default_table_bits,
)
from fhe_quant.quant.qat.ops import (
    QAT_LINEAR_OPS,
    TORCH_ELEMENTWISE,
    along,
    split_chain,
    torch_elementwise,
    torch_linear,
)
from fhe_quant.quant.qat.ste import fake_codes, round_ste, scale_gradient
from fhe_quant.quant.qat.weights import quantize_weight, unit_weights

__all__ = [
    "ACTIVATION_SCALES",
    "WEIGHT_MODES",
    "WEIGHT_SCALES",
    "AUTO_BUDGET_MAX_BITS",
    "AUTO_DROPPED_BITS",
    "AUTO_MIN_TABLE_BITS",
    "DEAD_FEATURE_SCALE",
    "QATConfig",
    "default_table_bits",
    "default_accumulator_bits",
    "default_input_bits",
    "TORCH_ELEMENTWISE",
    "torch_elementwise",
    "round_ste",
    "scale_gradient",
    "fake_codes",
    "quantize_weight",
    "unit_weights",
    "ActivationQuantizer",
    "QAT_LINEAR_OPS",
    "torch_linear",
    "split_chain",
    "along",
]
