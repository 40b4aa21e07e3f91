"""Multi-layer perceptrons: ``coefs_`` and ``intercepts_`` become linear nodes with the
hidden activation between them.

The output activation (``softmax``, ``logistic``, ``identity``, or ``exp`` for a
Poisson loss) is not in the graph: the last layer's accumulator is decrypted, and the
client applies it (see :data:`~fhe_quant.frontends.sklearn.OUTPUT_FUNCTIONS`).

Examples:
    >>> import numpy as np
    >>> from sklearn.neural_network import MLPRegressor
    >>> x = np.random.default_rng(0).normal(size=(20, 3))
    >>> model = MLPRegressor(hidden_layer_sizes=(4,), activation="tanh", max_iter=2000,
    ...                      random_state=0)
    >>> model = model.fit(x, x.sum(axis=1))
    >>> [node.op for node in mlp_graph(model).graph.nodes]
    ['input', 'linear', 'tanh', 'linear']
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.neural_network import MLPClassifier, MLPRegressor

from fhe_quant.errors import UnsupportedOpError
from fhe_quant.frontends.sklearn.base import Converter, SklearnGraph
from fhe_quant.ir import Graph, Node

__all__ = ["HIDDEN_ACTIVATIONS", "OUTPUT_ACTIVATIONS", "mlp_graph", "CONVERTERS"]

#: scikit-learn's hidden activations and the graph op of each.
HIDDEN_ACTIVATIONS = {"identity": "identity", "relu": "relu", "tanh": "tanh", "logistic": "sigmoid"}

#: scikit-learn's output activations and the client-side output function of each.
OUTPUT_ACTIVATIONS = {
    "identity": "identity",
    "exp": "exp",
    "softmax": "softmax",
    "logistic": "sigmoid",
}


def mlp_graph(estimator: Any) -> SklearnGraph:
    """The graph of a fitted ``MLPClassifier`` or ``MLPRegressor``.

    Args:
        estimator: the fitted perceptron.

    Returns:
        Linear layers (weights in torch layout) with the hidden activation between them;
        the output activation is the client's output function.

    Raises:
        UnsupportedOpError: an activation fhe_quant does not know, or multilabel targets.
    """
    name = type(estimator).__name__
    hidden = HIDDEN_ACTIVATIONS.get(estimator.activation)
    if hidden is None:
        raise UnsupportedOpError(
            f"activation={estimator.activation!r}",
            name,
            f"Supported hidden activations: {sorted(HIDDEN_ACTIVATIONS)}.",
        )
    output = OUTPUT_ACTIVATIONS.get(estimator.out_activation_)
    if output is None:
        raise UnsupportedOpError(
            f"out_activation_={estimator.out_activation_!r}",
            name,
            f"Supported output activations: {sorted(OUTPUT_ACTIVATIONS)}.",
        )
    if isinstance(estimator, MLPClassifier) and estimator.n_outputs_ > 1 and output == "sigmoid":
        raise UnsupportedOpError(
            "multilabel targets",
            name,
            "Fit one MLPClassifier per label, or a multiclass model on a single target.",
        )
    nodes = [Node("input", "input", source=f"{name} input")]
    previous = "input"
    n_layers = len(estimator.coefs_)
    for index, (coef, intercept) in enumerate(
        zip(estimator.coefs_, estimator.intercepts_, strict=True)
    ):
        layer = f"dense_{index}"
        nodes.append(
            Node(
                layer,
                "linear",
                (previous,),
                params={"weight": np.asarray(coef, dtype=np.float64).T, "bias": intercept},
                source=f"{name}.coefs_[{index}] / intercepts_[{index}]",
            )
        )
        previous = layer
        if index < n_layers - 1:
            act = f"{hidden}_{index}"
            nodes.append(
                Node(act, hidden, (previous,), source=f"{name} activation={estimator.activation!r}")
            )
            previous = act
    graph = Graph(tuple(nodes), "input", previous, (estimator.coefs_[0].shape[0],))
    return SklearnGraph(graph, output, ravel=estimator.n_outputs_ == 1)


#: The converters of this family, by scikit-learn class.
CONVERTERS: dict[type, Converter] = {MLPClassifier: mlp_graph, MLPRegressor: mlp_graph}
