"""Writes the tutorial notebooks (``notebooks/*.ipynb``) from the cells below, with their
outputs.

``python notebooks/make_notebooks.py`` executes each notebook top to bottom in a fresh
``python3`` kernel (in a scratch directory, figures as PNG outputs of matplotlib's inline
backend) and writes it with its outputs, so that it reads well on a code host; name
notebooks to redo only those; ``--sources-only`` writes the cells without running them
(a quick draft: the test fails until they are executed). Commit this script and the
notebooks together: ``tests/test_notebooks.py`` checks that the committed cells are the
ones below and that a fresh execution prints the same outputs.

The outputs are the same on every run except wall-clock times: data, splits, models and
training are seeded, and every time a notebook measures is printed as a number followed
by its unit (``1.2 s``, ``30 ms``), which the test ignores. Estimates (``fhe_quant.cost``)
are printed the same way, so that refitting the cost model does not stale the notebooks.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
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
    """## Accuracy and cost against the number of bits

For each `n_bits`, quantize both models (the same trained float MLP every time, through
`from_sklearn`), compile, and score the simulated circuit. `estimate_cost` reads the
cost from the compiled circuit, before any key exists: Concrete's own estimate, turned
into seconds by a model fitted on runs measured on 2 cores. The linear model's cost
stays flat (no lookup); the network's grows quickly with the width of its tables.""",
    """import matplotlib.pyplot as plt

from fhe_quant.cost import estimate_cost

bits = [2, 3, 4, 5, 6, 7, 8]
sweep = {"LogisticRegression": [], "MLP 30-16-2": []}
for n_bits in bits:
    linear = LogisticRegression(n_bits=n_bits).fit(x_train, y_train)
    network = from_sklearn(mlp.sklearn_model_, x_train, n_bits=n_bits)
    for name, estimator in zip(sweep, (linear, network), strict=True):
        estimator.compile(x_train)  # no key generation: the estimate needs only the circuit
        accuracy = np.mean(estimator.predict(x_test, fhe="simulate") == y_test)
        cost = estimate_cost(estimator)
        sweep[name].append((accuracy, cost.seconds_per_sample))
        print(
            f"{name:18} {n_bits} bits: accuracy {accuracy:.3f}, {cost.pbs_count:3} PBS, "
            f"estimated {cost.seconds_per_sample:.2f} s per sample"
        )""",
    """fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
for (name, rows), colour in zip(sweep.items(), ("tab:blue", "tab:red"), strict=True):
    accuracy, seconds = zip(*rows, strict=True)
    left.plot(bits, accuracy, "o-", color=colour, label=name)
    right.plot(bits, seconds, "o-", color=colour, label=name)
for trained, colour in ((model, "tab:blue"), (mlp, "tab:red")):
    left.axhline(trained.sklearn_model_.score(x_test, y_test), color=colour, ls=":")
left.set(xlabel="n_bits", ylabel="test accuracy (simulated FHE)", title="Accuracy")
right.set(xlabel="n_bits", ylabel="seconds per sample", yscale="log")
right.set_title("Estimated encrypted latency (2 cores)")
left.legend(fontsize=8, title="dotted: float", title_fontsize=8)
fig.tight_layout()""",
]

TORCH_PTQ = [
    """# 2. PyTorch: post-training quantization

`compile_torch_model` quantizes a trained `torch.nn.Module` on calibration data (after
training: no retraining) and compiles it. Here: how accuracy and cost (table lookups
per sample, estimated latency) change with the number of bits, in clear, in Concrete's
simulator and, for one sample, encrypted.""",
    """import time

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.cost import estimate_cost
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
measure accuracy with the integer program in clear (`fhe="disable"`) and with
Concrete's simulator of the circuit (`fhe="simulate"`): with exact rounding they agree
on every sample. `estimate_cost` reads the latency from the compiled circuit.""",
    """bits = [2, 3, 4, 5, 6]
models, rows = {}, []
for n_bits in bits:
    qm = compile_torch_model(net, x_train, n_bits=n_bits)
    clear = qm.forward(x_test).argmax(1)
    simulated = qm.forward(x_test, fhe="simulate").argmax(1)
    assert (clear == simulated).all()
    cost = estimate_cost(qm)
    models[n_bits] = qm
    rows.append(((clear == y_test).mean(), (simulated == y_test).mean(), cost.seconds_per_sample))
    print(
        f"{n_bits} bits: accuracy {rows[-1][0]:.3f} (simulated {rows[-1][1]:.3f}), "
        f"{cost.pbs_count} PBS, estimated {cost.seconds_per_sample:.2f} s per sample"
    )""",
    """## One sample encrypted

Real encryption at 2 bits, the cheapest keys: key generation, then one encrypted run.
It returns the same integers as the clear program. The times are this run's wall clock
(they vary from run to run; the estimate is for an idle 2-core machine).""",
    """qm2 = models[2]
start = time.perf_counter()
qm2.keygen()
keygen_seconds = time.perf_counter() - start
start = time.perf_counter()
encrypted = qm2.forward_integers(x_test[:1], fhe="execute")
encrypted_seconds = time.perf_counter() - start
assert (encrypted == qm2.forward_integers(x_test[:1])).all()
print(f"2 bits, encrypted: the same integers as in clear, class {encrypted.argmax(1)[0]}")
print(f"wall clock: key generation {keygen_seconds:.1f} s, one run {encrypted_seconds:.2f} s")""",
    """clear_accuracy, simulated_accuracy, estimated = zip(*rows, strict=True)
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
left.plot(bits, clear_accuracy, "o-", label="clear (disable)")
left.plot(bits, simulated_accuracy, "x", markersize=10, label="simulated")
left.axhline(float_accuracy, color="grey", linestyle=":", label="float")
left.set(xlabel="n_bits", ylabel="test accuracy", title="Accuracy")
left.legend(fontsize=8)
right.plot(bits, estimated, "o-", label="estimated (idle 2 cores)")
right.plot([2], [encrypted_seconds], "*", markersize=12, label="encrypted, 1 sample (this run)")
right.set(xlabel="n_bits", ylabel="seconds per sample", yscale="log", title="Latency")
right.legend(fontsize=8)
fig.suptitle("Digits MLP 64-32-10, post-training quantization")
fig.tight_layout()""",
    """## Where the cost is

`Report.plot` draws each layer's table lookups (coloured by the width the tables read,
annotated with their input and output bits) and its accumulator's bits. At 4 bits: the
hidden layer's 32 lookups are the whole cost; the last layer's accumulator is decrypted
and dequantized by the client, with no lookup. The PBS count in the title also counts
the bootstraps that drop the accumulator's low bits exactly, one per bit and lookup
(here 32 + 6 x 32).""",
    """report = models[4].report()
report.plot();""",
    """## What runs encrypted

The integer program is plain NumPy: each linear layer is an integer matrix product with
a proven range, then exact rounding of its low bits and one table lookup per neuron.""",
    "print(models[4].program.source())",
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
    """## Post-training quantization at 2 and 3 bits, for comparison""",
    """float_net = make_net()
fit(float_net, x_train, y_train, epochs=30, verbose=False)
with torch.no_grad():
    float_output = float_net(torch.tensor(x_test, dtype=torch.float32)).numpy()
float_accuracy = (float_output.argmax(1) == y_test).mean()
print(f"float: accuracy {float_accuracy:.3f}")
ptq_accuracy = {}
for n_bits in [2, 3]:
    ptq = compile_torch_model(float_net, x_train, n_bits=n_bits)
    ptq_accuracy[n_bits] = (ptq.forward(x_test).argmax(1) == y_test).mean()
    print(f"PTQ {n_bits} bits: accuracy {ptq_accuracy[n_bits]:.3f}")""",
    """## Quantization-aware training""",
    """results, models = {}, {}
for n_bits in [2, 3]:
    qat = prepare_qat(make_net(), n_bits=n_bits, X_sample=x_train, accumulator_bits=8)
    fit(qat, x_train, y_train, epochs=30, lr=3e-3, verbose=False)
    qm = compile_qat_model(qat, x_train)
    with torch.no_grad():
        trained = qat(torch.tensor(x_test, dtype=torch.float32)).argmax(1).numpy()
    compiled = qm.forward(x_test, fhe="simulate").argmax(1)
    assert (trained == compiled).all()  # what was trained is what runs encrypted
    results[n_bits] = (compiled == y_test).mean()
    models[n_bits] = qm
    print(
        f"QAT {n_bits} bits: accuracy {results[n_bits]:.3f} (simulated FHE), "
        f"{qm.statistics['pbs_count']} PBS per sample"
    )""",
    """import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(5, 3.5))
positions = np.arange(2)
ax.bar(positions - 0.2, [ptq_accuracy[b] for b in (2, 3)], 0.4, label="post-training")
ax.bar(positions + 0.2, [results[b] for b in (2, 3)], 0.4, label="quantization-aware")
ax.axhline(float_accuracy, color="grey", linestyle=":", label="float")
ax.set_xticks(positions, ["2 bits", "3 bits"])
ax.set(ylabel="test accuracy", ylim=(0, 1.15), title="Digits MLP 64-24-10")
ax.legend(loc="upper center", ncols=3, fontsize=8)
fig.tight_layout()""",
    "print(models[2].report(x_test, y_test))",
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
model.compile(x_train);""",
    """### Timing

Each step below is timed. The times are this run's wall clock: they vary from run to
run and machine to machine (every other number here is the same on each run).""",
    """import time
from contextlib import contextmanager

seconds = {}  # wall-clock seconds of each step


@contextmanager
def timed(step):
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start""",
    """## Save (model owner)

The owner signs the artifacts with an Ed25519 key made once (`fhe-quant keygen-signing` does
the same from a shell); client and server refuse any artifact its public key did not
sign.""",
    """from fhe_quant.signing import write_signing_key_pair

owner_key, owner_public_key = write_signing_key_pair("owner_key")  # keep owner_key private
artifact = Path("artifact")
FHEModelDev(artifact, model).save(signing_key=owner_key)
for role in ("server", "client"):
    print(f"{role}/:", ", ".join(sorted(path.name for path in (artifact / role).iterdir())))""",
    """## Keys (client)

Keys stay with the client (`key_dir`); only the evaluation keys are sent. A linear
model has no table lookup, so its evaluation keys are tiny; a network's are tens to
hundreds of MB.""",
    """client = FHEModelClient(artifact / "client", key_dir="keys", verify_key=owner_public_key)
with timed("key generation"):
    client.generate_private_and_evaluation_keys()
evaluation_keys = client.get_serialized_evaluation_keys()
print(f"evaluation keys: {len(evaluation_keys):,} bytes")""",
    """## Encrypted inference (server)""",
    """server = FHEModelServer(artifact / "server", verify_key=owner_public_key)
with timed("encrypt (client)"):
    ciphertexts = client.quantize_encrypt_serialize(x_test[:5])
with timed("run (server)"):
    replies = [server.run(c, evaluation_keys) for c in ciphertexts]
print(f"ciphertext {len(ciphertexts[0]):,} B, result {len(replies[0]):,} B")""",
    """## Decrypt and decode (client)

The client applies the estimator's post-processing: labels (of the same type as
`classes_`), probabilities. They equal the estimator's own predictions.""",
    """with timed("decrypt (client)"):
    predicted = client.predict(replies)
probabilities = client.predict_proba(replies)
print(predicted, y_test[:5])
print(probabilities.round(3))
assert (predicted == model.predict(x_test[:5], fhe="simulate")).all()
assert np.array_equal(probabilities, model.predict_proba(x_test[:5], fhe="simulate"))""",
    """## Sizes and times

The artifacts' sizes and what travels (left, bytes on a log scale: the evaluation keys
once per client, then a ciphertext each way per sample), and how long each step took
(right, this run, for 5 samples). The client artifact's size varies by a byte or two
between runs (its report records the compile time); what travels does not.""",
    """import matplotlib.pyplot as plt

sizes = {
    "server/ artifact": sum(path.stat().st_size for path in (artifact / "server").iterdir()),
    "client/ artifact": sum(path.stat().st_size for path in (artifact / "client").iterdir()),
    "evaluation keys": len(evaluation_keys),
    "ciphertext in": len(ciphertexts[0]),
    "result out": len(replies[0]),
}
print("wall clock: " + ", ".join(f"{step} {s:.3f} s" for step, s in seconds.items()))

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
left.barh(list(sizes), list(sizes.values()), color="tab:blue")
left.set(xscale="log", xlabel="bytes", title="Sizes")
left.invert_yaxis()
right.barh(list(seconds), list(seconds.values()), color="tab:orange")
right.set(xlabel="seconds (this run)", title="Latency per step, 5 samples")
right.invert_yaxis()
fig.tight_layout()""",
    """## Over HTTP

`fhe_quant.http` serves the server directory (standard library, for a loopback demo;
see its docstring for what a production deployment adds). In a terminal:
`fhe-quant serve artifact/server --port 8000`. Here, in a thread, the server loaded (and
its signature checked) above:""",
    """import threading

from fhe_quant.http import Client, FHEHTTPServer

httpd = FHEHTTPServer(("127.0.0.1", 0), server)  # port 0: any free port
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

info = artifact_info(artifact / "client", verify_key=owner_public_key)
print({k: info[k] for k in ("task", "classes", "output_function", "input_shape", "input_bits")})
print(info["program"])""",
]

NOTEBOOKS = {
    "1_sklearn_quickstart.ipynb": SKLEARN_QUICKSTART,
    "2_torch_post_training_quantization.ipynb": TORCH_PTQ,
    "3_quantization_aware_training.ipynb": QAT,
    "4_client_server_deployment.ipynb": DEPLOYMENT,
}


#: Seconds one cell may take (a slow, shared machine) before execution fails.
CELL_TIMEOUT = 600

#: The kernel's environment on top of the caller's: figures as PNG outputs (whatever
#: ``MPLBACKEND`` the caller has, e.g. ``Agg`` in a test run) and a fixed hash seed.
KERNEL_ENV = {
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "PYTHONHASHSEED": "0",
    # NOTE: tqdm.auto warns in a kernel without ipywidgets; the notebooks show no
    # progress bars (verbose=False), so the warning would only print this machine's paths.
    "PYTHONWARNINGS": "ignore:IProgress not found:Warning",
}


def build(cells: list[str]) -> nbformat.NotebookNode:
    """A notebook of ``cells``: a cell starting with ``#`` is markdown, any other code."""
    notebook = new_notebook()
    for index, text in enumerate(cells):
        markdown = text.startswith("#")
        cell = new_markdown_cell(text) if markdown else new_code_cell(text)
        cell.id = f"cell-{index}"  # stable ids: regenerating gives identical files
        notebook.cells.append(cell)
    notebook.metadata = _metadata()
    return notebook


def _metadata() -> nbformat.NotebookNode:
    return nbformat.from_dict(
        {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
    )


def render(notebook: nbformat.NotebookNode) -> str:
    """The text of ``notebook`` as committed."""
    return nbformat.writes(notebook) + "\n"


def strip_outputs(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``notebook`` without outputs or execution counts: its sources."""
    bare = nbformat.from_dict(notebook)
    for cell in bare.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return bare


def execute(
    notebook: nbformat.NotebookNode, directory: Path, timeout: int = CELL_TIMEOUT
) -> nbformat.NotebookNode:
    """Run ``notebook`` top to bottom in a fresh ``python3`` kernel whose working
    directory is ``directory``; returns it with its outputs (no timing metadata; the
    notebook's metadata stays what :func:`build` wrote).

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised (with its traceback).
    """
    import nbclient  # NOTE: only needed to execute (the dev extra)

    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(directory)}},
    )
    client.execute(env={**os.environ, **KERNEL_ENV})
    notebook.metadata = _metadata()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    return notebook


def coalesce_streams(outputs: list[nbformat.NotebookNode]) -> list[nbformat.NotebookNode]:
    """``outputs`` with each run of text written to the same stream as one output (the
    kernel flushes a stream in pieces, as timing goes)."""
    merged: list[nbformat.NotebookNode] = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            output.output_type == "stream"
            and previous is not None
            and previous.output_type == "stream"
            and previous.name == output.name
        ):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to write (default: all)")
    parser.add_argument(
        "--sources-only", action="store_true", help="write the cells without executing them"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NOTEBOOKS))
    if unknown:
        parser.error(f"unknown notebooks {unknown}; choose from {sorted(NOTEBOOKS)}")
    for name in args.names or NOTEBOOKS:
        notebook, start = build(NOTEBOOKS[name]), time.perf_counter()
        if not args.sources_only:
            with tempfile.TemporaryDirectory() as directory:
                notebook = execute(notebook, Path(directory))
        (HERE / name).write_text(render(notebook))
        done = (
            "no outputs"
            if args.sources_only
            else f"executed in {time.perf_counter() - start:.0f} s"
        )
        print(f"wrote {HERE / name} ({done})")


if __name__ == "__main__":
    main()
