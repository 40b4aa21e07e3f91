"""What a compiled model costs and how accurate it is: float vs quantized vs FHE.

The report compares, on data the user passes:

* ``float``: the traced float model;
* ``quantized (full tables)``: the integer program with tables over the whole
  accumulator, i.e. quantization alone;
* ``quantized``: the integer program as compiled (``fhe="disable"``), which adds the
  effect of dropping accumulator bits before each table;
* ``simulate`` (or ``execute``): Concrete's circuit, which must equal ``quantized``.

The estimated latency, key generation time and key size come from the cost model
(:mod:`fhe_quant.cost`: Concrete's own cost estimate of the circuit, fitted on runs
measured on a 2-core machine with concrete-python 2.11), before any key exists; each
layer's share of the latency is its part of the lookups' price. It is a
guide, ``benchmarks/`` holds measurements.
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


def _layer_seconds(layers: list[dict[str, Any]], total: float | None) -> list[float | None]:
    """Each layer's share of the estimated latency (:func:`fhe_quant.cost.layer_costs`)."""
    if total is None:
        return [None] * len(layers)
    from fhe_quant.cost import layer_costs

    return [total * share for _, share in layer_costs(layers)]


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
    floats = model.graph.run(np.asarray(x, dtype=np.float64))
    values = model.program.values(model.quantize_input(x))
    result: dict[str, float] = {}
    for step, value in zip(model.program.steps, values[1:], strict=True):
        if step.produces == "accumulator" and step.name in floats:
            reference = floats[step.name]
            if reference.shape == value.shape:
                result[step.name] = sqnr_db(reference, step.dequantize(value))
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
    estimated_keygen_seconds: float | None = None
    evaluation_key_bytes: int | None = None

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
            if self.evaluation_key_bytes is not None:
                lines.append(
                    f"estimated key generation: {self.estimated_keygen_seconds:.1f} s, "
                    f"evaluation keys {self.evaluation_key_bytes / 1e9:.2f} GB"
                )
            lines += self._estimate_lines()
        return "\n".join(lines)

    def _estimate_lines(self) -> list[str]:
        """The estimated latency shared between the layers that do lookups."""
        seconds = _layer_seconds(self.layers, self.estimated_latency_seconds)
        rows = [
            f"  {layer['layer'][:19]:<20}{s:>9.3f} s"
            for layer, s in zip(self.layers, seconds, strict=True)
            if s
        ]
        return ["estimated latency per layer (by lookup price):", *rows] if rows else []

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython
        printer.text(str(self))

    def plot(self, ax: Any = None) -> Any:
        """Draw the layers' cost with matplotlib: one bar per layer, its height the
        layer's table lookups per sample, its colour the width its tables read (each bar
        is annotated ``in→out``, the table's input and output bits, or ``no table``);
        the accumulator bits are diamonds on a second y axis (a twin of ``ax``), above
        the bars.

        Examples:
            >>> import matplotlib
            >>> matplotlib.use("Agg")
            >>> layers = [{"layer": "fc1", "accumulator_bits": 9, "table_input_bits": 5,
            ...            "table_output_bits": 3, "lookups": 16},
            ...           {"layer": "fc2", "accumulator_bits": 8}]
            >>> report = Report(None, {}, layers, input_bits=4, pbs_count=16,
            ...                 max_bit_width=9)
            >>> ax = report.plot()
            >>> [bar.get_height() for bar in ax.patches]
            [16, 0]
            >>> matplotlib.pyplot.close(ax.figure)

        Needs matplotlib (``pip install 'fhe-quant[plot]'``).

        Args:
            ax: the matplotlib ``Axes`` to draw in; by default a new figure's.

        Returns:
            The ``Axes`` holding the bars (``ax`` when given); the accumulator bits'
            twin axis shares its x axis (``ax.figure.axes``).

        Raises:
            ImportError: matplotlib is not installed (the message says how to install it).
        """
        pyplot = _pyplot()
        if ax is None:
            _, ax = pyplot.subplots(figsize=(max(4.0, 1.2 * len(self.layers) + 2.0), 3.5))
        names = [str(layer["layer"]) for layer in self.layers]
        positions = np.arange(len(names))
        widths = [layer.get("table_input_bits") for layer in self.layers]
        colours, legend = _width_colours(widths, pyplot)
        lookups = [int(layer.get("lookups", 0) or 0) for layer in self.layers]
        bars = ax.bar(positions, lookups, color=colours, edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, labels=[_table_label(layer) for layer in self.layers], fontsize=8)
        ax.set_xticks(positions, names)
        ax.set_xlabel("layer")
        ax.set_ylabel("table lookups per sample")
        ax.set_ylim(0, max([1, *lookups]) * 1.6)  # NOTE: room for the diamonds above
        accumulators = ax.twinx()
        acc = [float(layer.get("accumulator_bits", np.nan)) for layer in self.layers]
        accumulators.plot(positions, acc, "D", color="black", label="accumulator bits")
        accumulators.set_ylabel("accumulator bits")
        accumulators.set_ylim(0, np.nanmax([1.0, *acc]) * 1.15)
        handles = [*legend, *accumulators.get_legend_handles_labels()[0]]
        ax.legend(
            handles=handles, fontsize=8, ncols=len(handles), frameon=False,
            loc="upper center", bbox_to_anchor=(0.5, -0.18),
        )  # fmt: skip
        pbs = "" if self.pbs_count is None else f", {self.pbs_count} PBS per sample"
        ax.set_title(f"inputs {self.input_bits} bits{pbs}")
        return ax


def _sqnr_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pyplot() -> Any:
    """matplotlib's ``pyplot``, imported on first use (it is the ``plot`` extra)."""
    try:
        import matplotlib.pyplot as pyplot
    except ImportError as exc:
        raise ImportError(
            "Report.plot needs matplotlib: pip install 'fhe-quant[plot]' "
            "(or pip install matplotlib)."
        ) from exc
    return pyplot


def _table_label(layer: dict[str, Any]) -> str:
    """``in→out`` bits of a layer's tables, ``no table`` for a layer without one."""
    if not layer.get("lookups") or layer.get("table_input_bits") is None:
        return "no table"
    out = layer.get("table_output_bits")
    return f"{layer['table_input_bits']}→{'?' if out is None else out}"


def _width_colours(widths: list[Any], pyplot: Any) -> tuple[list[Any], list[Any]]:
    """A colour per layer by the input width of its tables (grey without a table), and
    the legend's patches, one per width."""
    from matplotlib.patches import Patch

    present = sorted({int(w) for w in widths if w is not None})
    cmap = pyplot.get_cmap("viridis")
    shade = {w: cmap(i / max(1, len(present) - 1) * 0.85) for i, w in enumerate(present)}
    colours = ["lightgrey" if w is None else shade[int(w)] for w in widths]
    legend = [Patch(color=shade[w], label=f"tables read {w} bits") for w in present]
    return colours, legend


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
    estimate = None
    if model._circuit is not None:
        from fhe_quant.cost import estimate_cost

        estimate = estimate_cost(model)
    return Report(
        metric=metric,
        scores=scores,
        layers=layers,
        input_bits=stats["input_bits"],
        pbs_count=stats.get("pbs_count"),
        max_bit_width=stats.get("max_bit_width"),
        pbs_per_precision=per_precision,
        estimated_latency_seconds=None if estimate is None else estimate.seconds_per_sample,
        program=model.program.source(),
        estimated_keygen_seconds=None if estimate is None else estimate.keygen_seconds,
        evaluation_key_bytes=None if estimate is None else estimate.key_bytes,
    )
