"""Writes the tutorial notebooks (``notebooks/*.ipynb``) from the cells below.

The notebooks are committed without outputs; this script is their source. After editing
it, run ``python notebooks/make_notebooks.py`` and commit both (a test checks that the
committed notebooks are what this script writes, and ``tests/test_notebooks.py``
executes every notebook top to bottom).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SKLEARN_QUICKSTART = [
    """# 1. scikit-learn quickstart

fhe_quant's estimators take the same arguments as scikit-learn's, plus `n_bits`. `fit`
trains the scikit-learn model and quantizes it; `compile` builds the encrypted circuit;
`predict(X, fhe=...)` runs it:

* `fhe="disable"`: the integer program in NumPy (fast; the reference),
* `fhe="simulate"`: Concrete's simulator of the encrypted circuit,
* `fhe="execute"`: real encryption (see notebook 4).

With exact rounding (the default) the three give the same integers, bit for bit.""",
    """import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

x, y = load_breast_cancer(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
scaler = StandardScaler().fit(x_train)
x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
x_train.shape, x_test.shape""",
    """## A linear model

A linear model is one dot product per class: additions and multiplications by clear
constants, which cost nothing in FHE. So it can use 8 bits and still needs no table
lookup (PBS); the sigmoid or argmax runs on the client after decryption.""",
    """from fhe_quant.sklearn import LogisticRegression

model = LogisticRegression(n_bits=8).fit(x_train, y_train)
model.compile(x_train)

clear = model.predict(x_test)
simulated = model.predict(x_test, fhe="simulate")
assert (clear == simulated).all()
print(f"float accuracy     {model.sklearn_model_.score(x_test, y_test):.3f}")
print(f"quantized accuracy {np.mean(clear == y_test):.3f}")
print(f"PBS per sample     {model.quantized_module_.statistics['pbs_count']}")""",
    """### The report

`report` puts it together: scores in float, with full tables, quantized and simulated,
and the cost per layer.""",
    "print(model.report(x_test, y_test))",
    """## Probabilities, and an already-trained model

`predict_proba` is computed by the client from the decrypted scores, exactly as
scikit-learn does. `from_sklearn` imports a model you trained with scikit-learn itself.""",
    """from sklearn.linear_model import LogisticRegression as SkLogisticRegression

from fhe_quant.sklearn import from_sklearn

trained = SkLogisticRegression(C=0.5).fit(x_train, y_train)
imported = from_sklearn(trained, x_train, n_bits=8)
imported.compile(x_train)
print(imported.predict_proba(x_test[:3], fhe="simulate").round(3))
print(trained.predict_proba(x_test[:3]).round(3))""",
    """## A small neural network

A multi-layer perceptron needs one table lookup per hidden neuron (the activation),
so fewer bits keep it cheap. The report shows each layer's accumulator width and the
width of its tables.""",
    """from fhe_quant.sklearn import MLPClassifier

mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=500, random_state=0, n_bits=4)
mlp.fit(x_train, y_train)
mlp.compile(x_train)
assert (mlp.predict(x_test, fhe="simulate") == mlp.predict(x_test)).all()
print(mlp.report(x_test, y_test))""",
]

TORCH_PTQ = [
    """# 2. PyTorch: post-training quantization

`compile_torch_model` quantizes a trained `torch.nn.Module` on calibration data (after
training: no retraining) and compiles it. Here: how accuracy and cost (table lookups
per sample, PBS) change with the number of bits.""",
    """import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.torch import compile_torch_model
from fhe_quant.training import fit

x, y = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
scaler = StandardScaler().fit(x_train)
x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
fit(net, x_train, y_train, epochs=30, verbose=False)
with torch.no_grad():
    float_predictions = net(torch.tensor(x_test, dtype=torch.float32)).argmax(1).numpy()
float_accuracy = (float_predictions == y_test).mean()
print(f"float accuracy {float_accuracy:.3f}")""",
    """## Sweep the bits

For each `n_bits`, quantize + compile (no key generation: compiling is fast), then
measure accuracy with the integer program. One setting is also simulated, to check that
the circuit computes the same integers.""",
    """rows = []
for n_bits in [2, 3, 4, 5, 6]:
    qm = compile_torch_model(net, x_train, n_bits=n_bits)
    accuracy = (qm.forward(x_test).argmax(1) == y_test).mean()
    rows.append((n_bits, accuracy, qm.statistics["pbs_count"]))
    print(f"{n_bits} bits: accuracy {accuracy:.3f}, {qm.statistics['pbs_count']} PBS per sample")

qm4 = compile_torch_model(net, x_train, n_bits=4)
simulated = qm4.forward_integers(x_test[:50], fhe="simulate")
assert (simulated == qm4.forward_integers(x_test[:50])).all()""",
    """bits, accuracies, pbs = zip(*rows, strict=True)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(bits, accuracies, "o-", color="tab:blue")
ax.axhline(float_accuracy, color="tab:blue", linestyle=":", label="float")
ax.set_xlabel("n_bits")
ax.set_ylabel("test accuracy", color="tab:blue")
ax.legend(loc="lower center")
ax2 = ax.twinx()
ax2.plot(bits, pbs, "s--", color="tab:red")
ax2.set_ylabel("PBS per sample", color="tab:red")
ax.set_title("Digits MLP 64-32-10, post-training quantization")
fig.tight_layout()""",
    """## What runs encrypted

The integer program is plain NumPy: each linear layer is an integer matrix product with
a proven range, then exact rounding of its low bits and one table lookup per neuron.""",
    "print(qm4.program.source())",
    """## Next

Few bits after training cost accuracy; quantization-aware training (notebook 3) gets
it back at 2-3 bits.""",
]

QAT = [
    """# 3. Quantization-aware training to 2-3 bits

`prepare_qat` turns a float module into one whose forward pass *is* the integer program
(with straight-through gradients), so training sees the quantization. The compiled model
then gives the same integers as the trained module, bit for bit. `accumulator_bits`
bounds every accumulator while training, which keeps the table lookups few and narrow.""",
    """import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.torch import compile_qat_model, compile_torch_model, prepare_qat
from fhe_quant.training import fit

x, y = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
scaler = StandardScaler().fit(x_train)
x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)


def make_net():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10)]
    return torch.nn.Sequential(*layers)""",
    """## Post-training quantization at 3 bits, for comparison""",
    """float_net = make_net()
fit(float_net, x_train, y_train, epochs=30, verbose=False)
ptq = compile_torch_model(float_net, x_train, n_bits=3)
print(f"PTQ 3 bits: accuracy {(ptq.forward(x_test).argmax(1) == y_test).mean():.3f}")""",
    """## Quantization-aware training""",
    """results = {}
for n_bits in [2, 3]:
    qat = prepare_qat(make_net(), n_bits=n_bits, X_sample=x_train, accumulator_bits=8)
    fit(qat, x_train, y_train, epochs=30, lr=3e-3, verbose=False)
    qm = compile_qat_model(qat, x_train)
    with torch.no_grad():
        trained = qat(torch.tensor(x_test, dtype=torch.float32)).argmax(1).numpy()
    compiled = qm.forward(x_test, fhe="simulate").argmax(1)
    assert (trained == compiled).all()  # what was trained is what runs encrypted
    results[n_bits] = qm
    print(
        f"QAT {n_bits} bits: accuracy {(compiled == y_test).mean():.3f}, "
        f"{qm.statistics['pbs_count']} PBS per sample"
    )""",
    "print(results[2].report(x_test, y_test))",
    """## The same as a scikit-learn estimator

`NeuralNetClassifier` builds the MLP, trains it quantization-aware and compiles it.""",
    """from fhe_quant.sklearn import NeuralNetClassifier

clf = NeuralNetClassifier(n_bits=3, n_hidden=24, n_layers=2, epochs=20, random_state=0)
clf.fit(x_train, y_train)
clf.compile(x_train)
print(f"accuracy (simulated FHE) {np.mean(clf.predict(x_test, fhe='simulate') == y_test):.3f}")""",
]

DEPLOYMENT = [
    """# 4. Client/server deployment

The model owner saves two directories: `server/` (the compiled circuit: no secret key,
no quantization parameters) and `client/` (quantization and post-processing parameters,
Concrete's client specs). The client generates keys, sends the *evaluation* keys once,
then ciphertexts; the server answers with encrypted results that only the client can
read. Everything travels as bytes.""",
    """from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.deploy import FHEModelClient, FHEModelDev, FHEModelServer
from fhe_quant.sklearn import LogisticRegression

x, y = load_breast_cancer(return_X_y=True)
labels = np.array(["malignant", "benign"])[y]
x_train, x_test, y_train, y_test = train_test_split(x, labels, test_size=0.25, random_state=0)
scaler = StandardScaler().fit(x_train)
x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

model = LogisticRegression(n_bits=8, p_error=1e-9).fit(x_train, y_train)
model.compile(x_train)""",
    """## Save (model owner)""",
    """artifact = Path("artifact")
FHEModelDev(artifact, model).save()
for path in sorted(artifact.rglob("*")):
    print(f"{path!s:32} {path.stat().st_size:>8} B")""",
    """## Keys (client)

Keys stay with the client (`key_dir`); only the evaluation keys are sent. A linear
model has no table lookup, so its evaluation keys are tiny; a network's are tens to
hundreds of MB.""",
    """client = FHEModelClient(artifact / "client", key_dir="keys")
client.generate_private_and_evaluation_keys()
evaluation_keys = client.get_serialized_evaluation_keys()
print(f"evaluation keys: {len(evaluation_keys):,} bytes")""",
    """## Encrypted inference (server)""",
    """server = FHEModelServer(artifact / "server")
ciphertexts = client.quantize_encrypt_serialize(x_test[:5])
replies = [server.run(c, evaluation_keys) for c in ciphertexts]
print(f"ciphertext {len(ciphertexts[0]):,} B, result {len(replies[0]):,} B")""",
    """## Decrypt and decode (client)

The client applies the estimator's post-processing: labels (of the same type as
`classes_`), probabilities. They equal the estimator's own predictions.""",
    """predicted = client.predict(replies)
probabilities = client.predict_proba(replies)
print(predicted, y_test[:5])
print(probabilities.round(3))
assert (predicted == model.predict(x_test[:5], fhe="simulate")).all()
assert np.array_equal(probabilities, model.predict_proba(x_test[:5], fhe="simulate"))""",
    """## Over HTTP

`fhe_quant.http` serves the server directory (standard library, for a loopback demo;
see its docstring for what a production deployment adds). In a terminal:
`fhe-quant serve artifact/server --port 8000`. Here, in a thread:""",
    """import threading

from fhe_quant.http import Client, make_server

httpd = make_server(artifact / "server", port=0)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
api = Client(f"http://127.0.0.1:{httpd.server_address[1]}")
api.upload_keys("alice", evaluation_keys)
reply = api.predict("alice", client.quantize_encrypt_serialize(x_test[:1])[0])
print(api.health(), client.predict([reply]))
httpd.shutdown()
httpd.server_close()""",
    """## What an artifact holds

`fhe-quant info artifact/client` prints the same from a shell.""",
    """from fhe_quant.deploy import artifact_info

info = artifact_info(artifact / "client")
print({k: info[k] for k in ("task", "classes", "output_function", "input_shape", "input_bits")})
print(info["program"])""",
]

NOTEBOOKS = {
    "1_sklearn_quickstart.ipynb": SKLEARN_QUICKSTART,
    "2_torch_post_training_quantization.ipynb": TORCH_PTQ,
    "3_quantization_aware_training.ipynb": QAT,
    "4_client_server_deployment.ipynb": DEPLOYMENT,
}


def build(cells: list[str]) -> nbformat.NotebookNode:
    """A notebook of ``cells``: a cell starting with ``#`` is markdown, any other code."""
    notebook = new_notebook()
    for index, text in enumerate(cells):
        markdown = text.startswith("#")
        cell = new_markdown_cell(text) if markdown else new_code_cell(text)
        cell.id = f"cell-{index}"  # stable ids: regenerating gives identical files
        notebook.cells.append(cell)
    notebook.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


def render(cells: list[str]) -> str:
    return nbformat.writes(build(cells)) + "\n"


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        (HERE / name).write_text(render(cells))
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
