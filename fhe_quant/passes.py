"""Float graph passes, each a pure ``Graph -> Graph`` function, run in the order of
:data:`FLOAT_PASSES` before quantization.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fhe_quant.errors import UnsupportedOpError
from fhe_quant.ir import ELEMENTWISE, OPS, Graph, Node

__all__ = [
    "remove_identities",
    "fold_affine_into_linear",
    "check_chain",
    "commute_max_pool",
    "fuse_gathers",
    "FLOAT_PASSES",
    "simplify",
]


def _rewire(nodes: list[Node], old: str, new: str) -> list[Node]:
    return [
        Node(
            n.name,
            n.op,
            tuple(new if i == old else i for i in n.inputs),
            n.attrs,
            n.params,
            n.source,
        )
        if old in n.inputs
        else n
        for n in nodes
    ]


def remove_identities(graph: Graph) -> Graph:
    """Drop identity nodes (dropout, ``nn.Identity``) and reshapes that change nothing."""
    nodes = list(graph.nodes)
    output = graph.output_name
    shapes = {name: value.shape[1:] for name, value in graph.run(_probe(graph)).items()}
    for original in graph.nodes:
        node = next(n for n in nodes if n.name == original.name)  # inputs may be rewired
        same_shape = node.op == "reshape" and shapes[node.name] == shapes[node.inputs[0]]
        if node.op == "identity" or same_shape:
            nodes = _rewire([n for n in nodes if n.name != node.name], node.name, node.inputs[0])
            if output == node.name:
                output = node.inputs[0]
    return graph.replace(nodes, output)


def _per_output_constant(
    constant: np.ndarray, n_out: int, out_ndim: int, channel_axis: int
) -> np.ndarray | None:
    """The constant as a vector over a linear-kind layer's output channels, if it only
    varies along the layer's channel axis (of an output with ``out_ndim`` axes, batch
    included) when broadcast against the output; else ``None``."""
    if constant.size == 1:
        return np.full(n_out, constant.item())
    if constant.ndim > out_ndim:
        return None
    shape = (1,) * (out_ndim - constant.ndim) + constant.shape
    axis = channel_axis % out_ndim
    others = [size for i, size in enumerate(shape) if i != axis]
    if shape[axis] != n_out or any(size != 1 for size in others):
        return None
    return constant.reshape(n_out)


def fold_affine_into_linear(graph: Graph) -> Graph:
    """Fold ``mul_const`` / ``add_const`` (batch norm, scalings) into the linear-kind
    layer before them (dense or convolution), when that layer feeds only them and the
    constant is one value per output channel.

    Average pooling is left alone: its weights must stay ``1/k`` to quantize exactly
    (the constant then fuses into the table after it, at no cost).
    """
    nodes = list(graph.nodes)
    output = graph.output_name
    ndims = {name: value.ndim for name, value in graph.run(_probe(graph)).items()}
    changed = True
    while changed:
        changed = False
        by_name = {n.name: n for n in nodes}
        for node in nodes:
            if node.op not in ("mul_const", "add_const"):
                continue
            prev = by_name[node.inputs[0]]
            users = [n for n in nodes if prev.name in n.inputs]
            if prev.kind != "linear" or len(users) != 1 or prev.name == output:
                continue
            spec = OPS[prev.op]
            if spec.unit_weights:
                continue
            weight = prev.params["weight"]
            n_out = weight.shape[0]
            vector = _per_output_constant(
                node.params["constant"], n_out, ndims[prev.name], spec.channel_axis
            )
            if vector is None:
                continue
            bias = prev.params.get("bias", np.zeros(n_out))
            if node.op == "mul_const":
                scale = vector.reshape((n_out,) + (1,) * (weight.ndim - 1))
                params = {"weight": weight * scale, "bias": bias * vector}
            else:
                params = {"weight": weight, "bias": bias + vector}
            merged = Node(node.name, prev.op, prev.inputs, prev.attrs, params, prev.source)
            nodes = [merged if n.name == node.name else n for n in nodes if n.name != prev.name]
            ndims[merged.name] = ndims[prev.name]
            changed = True
            break
    return graph.replace(nodes, output)


#: The elementwise operations that are always non-decreasing (from the op table; the
#: others may be, depending on their attributes: see :meth:`ElementwiseOp.is_monotone`).
_MONOTONE = frozenset(name for name, row in ELEMENTWISE.items() if row.monotone is True)


def _is_monotone(node: Node, ndim: int) -> bool:
    """Whether ``node`` is a non-decreasing elementwise function, the same at every
    spatial position of its ``ndim``-axis input (batch included), so that it commutes
    with a maximum over positions."""
    row = ELEMENTWISE.get(node.op)
    return row is not None and row.is_monotone(node, ndim)


def commute_max_pool(graph: Graph) -> Graph:
    """Move a non-decreasing elementwise operation that follows a max pool before it:
    ``f(max(x)) = max(f(x))`` exactly, padding included (a padded value is never the
    maximum either way). The table that ``f`` needs then also re-quantizes the pool's
    input, which the pool needed anyway, and the table after the pool disappears: one
    lookup fewer per pooled element (``conv -> max pool -> relu``)."""
    nodes = list(graph.nodes)
    output = graph.output_name
    if not any(n.op == "max_pool" for n in nodes):
        return graph
    ndims = {name: value.ndim for name, value in graph.run(_probe(graph)).items()}
    changed = True
    while changed:
        changed = False
        for pool in nodes:
            users = [n for n in nodes if pool.name in n.inputs]
            if pool.op != "max_pool" or len(users) != 1 or pool.name == output:
                continue
            (fn,) = users
            if (
                fn.kind != "elementwise"
                or fn.inputs != (pool.name,)
                or not _is_monotone(fn, ndims[pool.inputs[0]])
            ):
                continue
            # f on the pool's input, then the pool under f's name (its users and the
            # output need no rewiring; errors still name the pooling layer).
            before = Node(
                f"{fn.name}_before_pool", fn.op, pool.inputs, fn.attrs, fn.params, fn.source
            )
            after = Node(fn.name, pool.op, (before.name,), pool.attrs, {}, pool.source)
            ndims[before.name] = ndims[after.name] = ndims[pool.inputs[0]]
            nodes = [
                before if n.name == pool.name else after if n.name == fn.name else n for n in nodes
            ]
            changed = True
            break
    return graph.replace(nodes, output)


def _fuse_gather_once(nodes: list[Node], output: str, sizes: dict[str, int]) -> list[Node] | None:
    """One fusion of a gather with a reshape or gather next to it (see
    :func:`fuse_gathers`), or ``None`` when there is none left."""
    by_name = {n.name: n for n in nodes}
    for node in nodes:
        if node.op != "gather":
            continue
        index = node.params["index"]
        prev = by_name[node.inputs[0]]
        users = [n for n in nodes if prev.name in n.inputs]
        if prev.op in ("reshape", "gather") and users == [node] and prev.name != output:
            # a reshape keeps the row-major order: the flat index does not change
            if prev.op == "gather":
                index = prev.params["index"][index.astype(np.int64)]
            merged = Node(
                node.name, "gather", prev.inputs, node.attrs, {"index": index}, node.source
            )
            return [merged if n.name == node.name else n for n in nodes if n is not prev]
        after = [n for n in nodes if node.name in n.inputs]
        if len(after) == 1 and after[0].op == "reshape" and node.name != output:
            (reshape,) = after
            merged = Node(
                reshape.name, "gather", node.inputs, reshape.attrs, {"index": index}, node.source
            )
            return [merged if n is reshape else n for n in nodes if n is not node]
        if index.size == sizes[node.inputs[0]] and np.array_equal(index, np.arange(index.size)):
            plain = Node(node.name, "reshape", node.inputs, node.attrs, {}, node.source)
            return [plain if n is node else n for n in nodes]
    return None


def fuse_gathers(graph: Graph) -> Graph:
    """Merge every gather (transpose, permute, upsample) with the reshapes and gathers
    next to it that only it reads, and turn a gather that moves nothing into a reshape.

    Channel shuffle (``view(n, g, c // g, h, w) -> transpose(1, 2) -> view(n, c, h, w)``)
    becomes one gather from ``(c, h, w)`` to ``(c, h, w)``: the channels are permuted, so
    per-channel quantizers stay per channel on both sides. Exact: a gather computes no
    value."""
    nodes = list(graph.nodes)
    if not any(n.op == "gather" for n in nodes):
        return graph
    # NOTE: fusions keep the names of the nodes they keep, and their values.
    sizes = {name: value[0].size for name, value in graph.run(_probe(graph)).items()}
    while (fused := _fuse_gather_once(nodes, graph.output_name, sizes)) is not None:
        nodes = fused
    return graph.replace(nodes, graph.output_name)


def check_chain(graph: Graph) -> Graph:
    """Refuse graphs that are not a single chain (no longer in :data:`FLOAT_PASSES`:
    branching graphs are quantized by :func:`fhe_quant.quant.ptq.quantize_dag`; kept for
    callers that only handle chains)."""
    for node in graph.nodes:
        users = graph.users(node.name)
        if len(users) > 1:
            raise UnsupportedOpError(
                f"a tensor read by {len(users)} operations",
                node.source or node.name,
                "Branching graphs (residual connections) are not supported yet.",
            )
    return graph


def _probe(graph: Graph) -> np.ndarray:
    return np.zeros((1,) + graph.input_shape)


#: The float passes, in the order they run.
FLOAT_PASSES: tuple[Callable[[Graph], Graph], ...] = (
    remove_identities,
    fuse_gathers,
    fold_affine_into_linear,
    commute_max_pool,
)


def simplify(graph: Graph) -> Graph:
    """Run :data:`FLOAT_PASSES` in order; the result computes the same function."""
    for graph_pass in FLOAT_PASSES:
        graph = graph_pass(graph)
    return graph
