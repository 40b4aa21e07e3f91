"""What a compiled model costs and how accurate it is: float vs quantized vs FHE.

The report compares, on data the user passes:

* ``float``: the traced float model;
* ``quantized (full tables)``: the integer program with tables over the whole
  accumulator, i.e. quantization alone;
* ``quantized``: the integer program as compiled (``fhe="disable"``), which adds the
  effect of dropping accumulator bits before each table;
* ``simulate`` (or ``execute``): Concrete's circuit, which must equal ``quantized``.

The estimated latency scales Concrete's own cost estimate of the circuit by a factor
measured on a 2-core machine with concrete-python 2.11; it is a guide, ``benchmarks/``
holds measurements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fhe_quant.errors import InputError, ParameterError

if TYPE_CHECKING:
    from fhe_quant.model import QuantizedModule

__all__ = [
    "Report",
    "build_report",
    "estimate_latency",
    "score",
    "layer_sqnr",
    "sqnr_db",
    "SECONDS_PER_COMPLEXITY",
]

#: Seconds per unit of Concrete's ``complexity`` estimate of a circuit, measured on the
#: digits MLP at 3 to 6 bits, exact and approximate rounding, 2 cores, concrete-python
#: 2.11 (observed ratios 0.9e-10 to 2.4e-10 on a shared machine). Counting PBS alone
#: underestimated up to 5x: a bootstrap's price grows with the width of the value it
#: reads, and exact rounding of wide accumulators reads wide values.
SECONDS_PER_COMPLEXITY = 1.6e-10


def estimate_latency(complexity: float) -> float:
    """Estimated seconds per sample from Concrete's ``complexity`` of a circuit.

    Examples:
        >>> round(estimate_latency(1e11), 1)
        16.0
    """
    return float(complexity) * SECONDS_PER_COMPLEXITY


def score(output: np.ndarray, y: np.ndarray, metric: str) -> float:
    """``accuracy`` (argmax, or threshold 0 for one column) or ``r2``."""
    y = np.asarray(y)
    if metric == "accuracy":
        pred = (
            (output.reshape(len(output), -1)[:, 0] > 0).astype(int)
            if output.reshape(len(output), -1).shape[1] == 1
            else output.argmax(axis=1)
        )
        return float(np.mean(pred == y.reshape(-1)))
    if metric == "r2":
        out = output.reshape(y.shape)
        ss_res = float(np.sum((y - out) ** 2))
        ss_tot = float(np.sum((y - y.mean(axis=0)) ** 2))
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    raise ParameterError(f"The 'metric' parameter must be 'accuracy' or 'r2'. Got {metric!r}.")


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum err^2)``
    (``inf`` when exact).

    Examples:
        >>> round(sqnr_db(np.array([1.0, -1.0]), np.array([1.1, -0.9])), 1)
        20.0
    """
    signal = float(np.sum(np.square(reference)))
    noise = float(np.sum(np.square(np.asarray(reference) - np.asarray(approximation))))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-300) / noise))


def layer_sqnr(model: QuantizedModule, x: np.ndarray) -> dict[str, float]:
    """Per layer (linear layer or add), the SQNR in dB of its dequantized output in the
    integer program (as compiled, bits dropped included) against the float model's
    value there, on the float inputs ``x``: the layer where the SQNR falls is where the
    signal is lost.
    """
    from fhe_quant.lower import NUMPY, AddStep, LinearStep, _operands

    floats = model.graph.run(np.asarray(x, dtype=np.float64))
    q = model.quantize_input(x)
    values = [q]
    result: dict[str, float] = {}
    for step in model.program.steps:
        values.append(step(_operands(step, values), NUMPY))
        if isinstance(step, (LinearStep, AddStep)) and step.name in floats:
            reference = floats[step.name]
            if reference.shape == values[-1].shape:
                result[step.name] = sqnr_db(reference, step.dequantize(values[-1]))
    return result


@dataclass
class Report:
    """A compiled model's accuracy and cost (see the module docstring)."""

    metric: str | None
    scores: dict[str, float]
    layers: list[dict[str, Any]]
    input_bits: int
    pbs_count: int | None
    max_bit_width: int | None
    pbs_per_precision: dict[int, int] = field(default_factory=dict)
    estimated_latency_seconds: float | None = None
    program: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = ["fhe_quant report", "================"]
        if self.metric:
            lines.append(f"{self.metric}:")
            for name, value in self.scores.items():
                lines.append(f"  {name:<26}{value:.4f}")
        lines.append(f"input bits: {self.input_bits}")
        header = (
            f"{'layer':<20}{'acc bits':>9}{'dropped':>9}{'table in':>9}{'table out':>10}"
            f"{'SQNR dB':>9}{'lookups':>9}"
        )
        # NOTE: lookups stay the last column (tests and scripts read it there).
        lines += ["", header, "-" * len(header)]
        for layer in self.layers:
            lines.append(
                f"{layer['layer'][:19]:<20}{layer.get('accumulator_bits', '-'):>9}"
                f"{layer.get('truncated_bits', '-'):>9}{layer.get('table_input_bits', '-'):>9}"
                f"{layer.get('table_output_bits', '-'):>10}"
                f"{_sqnr_text(layer.get('sqnr_db')):>9}{layer.get('lookups', 0):>9}"
            )
        lines.append("(last layer: accumulator decrypted and dequantized by the client)")
        if self.pbs_count is not None:
            lines += [
                "",
                f"PBS per sample: {self.pbs_count}  (by width: "
                f"{dict(sorted(self.pbs_per_precision.items()))})",
                f"max bit width: {self.max_bit_width}",
                f"estimated latency: {self.estimated_latency_seconds:.2f} s/sample (2 cores)",
            ]
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython
        printer.text(str(self))


def _sqnr_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def build_report(
    model: QuantizedModule,
    x: Any = None,
    y: Any = None,
    *,
    fhe: str = "simulate",
    metric: str | None = None,
) -> Report:
    """Build the :class:`Report` of ``model``; scores need ``x`` and ``y``."""
    stats = model.statistics
    layers = [dict(layer) for layer in stats["layers"]]
    scores: dict[str, float] = {}
    if (x is None) != (y is None):
        raise InputError("report() needs both x and y to compute scores, or neither.")
    if x is not None:
        x = model.check_input(x)
        y = np.asarray(y)
        if len(y) != len(x):
            raise InputError(f"x has {len(x)} samples but y has {len(y)}.")
        if metric is None:
            metric = "accuracy" if y.dtype.kind in "iub" else "r2"
        scores["float"] = score(model.float_forward(x), y, metric)
        q = model.quantize_input(x)
        full = model.program.run_without_rounding(q)
        scores["quantized (full tables)"] = score(model.dequantize_output(full), y, metric)
        scores["quantized"] = score(model.forward(x, fhe="disable"), y, metric)
        if fhe != "disable" and model._circuit is not None:
            scores[fhe] = score(model.forward(x, fhe=fhe), y, metric)
        sqnr = layer_sqnr(model, x)
        for layer in layers:
            if layer["layer"] in sqnr:
                layer["sqnr_db"] = sqnr[layer["layer"]]
    per_precision = stats.get("pbs_per_precision", {})
    return Report(
        metric=metric,
        scores=scores,
        layers=layers,
        input_bits=stats["input_bits"],
        pbs_count=stats.get("pbs_count"),
        max_bit_width=stats.get("max_bit_width"),
        pbs_per_precision=per_precision,
        estimated_latency_seconds=(
            estimate_latency(stats["complexity"]) if "complexity" in stats else None
        ),
        program=model.program.source(),
    )
