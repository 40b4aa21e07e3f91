"""Throughput of batches on dask.distributed: samples/s against workers.

For each model (the deployment demo's 3-bit QAT MLP 64-24-10 on digits, and a small
random forest on breast cancer): save the artifact, make one client's keys, then for 1
and 2 workers of a fresh ``LocalCluster`` (one thread each, ``OMP_NUM_THREADS=1``): a
warm-up batch (each worker loads the artifact and the keys and expands them once), then
a timed batch of ``--samples`` samples through ``FHEModelServer.run_batch``. Reported:
samples/s, the speed-up of 2 workers over 1, the key bytes each worker received for the
client (from the workers' own counters: once per worker is the target), the server
artifact's bytes, whether every decrypted answer equals the clear program's, Concrete's
``complexity``, and the load average (the machine is shared: wall times move with it).

Then ``/health`` under load: ``fhe-quant serve`` with 2 workers in its own process, a
batch keeping both workers busy, and 200 ``GET /health`` requests meanwhile: p50/p99.

Run: python benchmarks/throughput.py [--samples 16] [--models qat_mlp random_forest]
Writes benchmarks/results/throughput.json and throughput.md.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import write_results
from deployment import P_ERROR, qat_mlp
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from fhe_quant.batch import local_cluster, run_batch, worker_statistics
from fhe_quant.deploy import FHEModelClient, FHEModelDev, FHEModelServer
from fhe_quant.model import QuantizedModule
from fhe_quant.service_client import ServiceClient, circuit_id


def random_forest() -> tuple[Any, QuantizedModule, np.ndarray]:
    from fhe_quant.sklearn import RandomForestClassifier

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x, y, test_size=0.25, random_state=0)
    model = RandomForestClassifier(n_estimators=5, max_depth=3, n_bits=3, random_state=0)
    model.set_params(p_error=P_ERROR)
    model.fit(x_train, y_train)
    model.compile(x_train)
    return model, model.quantized_module_, x_test


MODELS: dict[str, tuple[str, Callable[[], tuple[Any, QuantizedModule, np.ndarray]]]] = {
    "qat_mlp": ("torch MLP 64-24-10, digits, QAT 3 bits", qat_mlp),
    "random_forest": ("RandomForest 5 trees depth 3, breast cancer, 3 bits", random_forest),
}


def _throughput(
    server: FHEModelServer, client: FHEModelClient, x: np.ndarray, expected: np.ndarray, w: int
) -> dict[str, Any]:
    keys = client.get_serialized_evaluation_keys()
    cluster, dask = local_cluster(w)
    try:
        dask.wait_for_workers(w)
        warm = client.quantize_encrypt_serialize(x[: 2 * w])
        start = time.perf_counter()
        run_batch(server, warm, keys, dask)
        warm_seconds = time.perf_counter() - start
        ciphertexts = client.quantize_encrypt_serialize(x)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        results = run_batch(server, ciphertexts, keys, dask)
        seconds = time.perf_counter() - start
        stats = worker_statistics(dask)
    finally:
        dask.close()
        cluster.close()
    per_worker = [s["received_bytes"].get("keys", 0) for s in stats.values()]
    return {
        "workers": w,
        "samples": len(x),
        "seconds": seconds,
        "samples_per_second": len(x) / seconds,
        "warmup_seconds": warm_seconds,
        "key_bytes_received_per_worker": per_worker,
        "key_message_bytes": len(keys),
        "server_artifact_bytes_received_per_worker": [
            s["received_bytes"].get("server", 0) for s in stats.values()
        ],
        "equals_clear": bool(np.array_equal(client.deserialize_decrypt(results), expected)),
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
    }


def _start_service(server_dir: Path, store: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "fhe_quant.cli", "serve", str(server_dir), "--port", "0"]
    command += ["--key-store", str(store), "--workers", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line.startswith("http://"):
        proc.kill()
        raise SystemExit(f"fhe-quant serve did not start (printed {line!r}).")
    return proc, line


def health_under_load(root: Path, client: FHEModelClient, x: np.ndarray) -> dict[str, Any]:
    """p50/p99 of 200 /health requests while a batch keeps two workers busy."""
    proc, url = _start_service(root / "server", root / "store")
    try:
        api = ServiceClient(url, timeout=3600)
        api.upload_keys("bench", client.get_serialized_evaluation_keys(), circuit_id(client))
        api.predict_batch("bench", client.quantize_encrypt_serialize(x[:2]))  # warm-up
        ciphertexts = client.quantize_encrypt_serialize(x)
        worker = threading.Thread(target=api.predict_batch, args=("bench", ciphertexts))
        worker.start()
        time.sleep(0.5)
        latencies, busy = [], []
        probe = ServiceClient(url, timeout=30)
        for _ in range(200):
            start = time.perf_counter()
            busy.append(probe.health()["busy"])
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
        worker.join()
    finally:
        proc.terminate()
        proc.wait(60)
    return {
        "requests": len(latencies),
        "health_p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "health_p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "fraction_while_busy": float(np.mean(np.asarray(busy) > 0)),
        "load_average_1min": os.getloadavg()[0],
    }


def measure(name: str, scratch: Path, samples: int, health: bool) -> dict[str, Any]:
    label, build = MODELS[name]
    model, qm, x_test = build()
    root = scratch / name
    FHEModelDev(root, model).save()
    client = FHEModelClient(root / "client", key_dir=root / "keys")
    client.generate_private_and_evaluation_keys()
    server = FHEModelServer(root / "server")
    x = x_test[:samples]
    expected = qm.forward_integers(x, fhe="disable")
    runs = [_throughput(server, client, x, expected, w) for w in (1, 2)]
    row = {
        "name": name,
        "model": label,
        "pbs_count": qm.statistics["pbs_count"],
        "complexity": qm.statistics["complexity"],
        "runs": runs,
        "speedup_2_over_1": runs[1]["samples_per_second"] / runs[0]["samples_per_second"],
    }
    if health:
        row["health_under_load"] = health_under_load(root, client, x)
    print(f"measured {name}", flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | complexity | workers | samples/s | speed-up | key MiB received per worker "
        "| exact | load before/after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for run in r["runs"]:
            keys = ", ".join(f"{b / 2**20:.1f}" for b in run["key_bytes_received_per_worker"])
            speedup = f"{r['speedup_2_over_1']:.2f}x" if run["workers"] == 2 else ""
            lines.append(
                f"| {r['model']} | {r['complexity']:.4g} | {run['workers']} "
                f"| {run['samples_per_second']:.2f} | {speedup} | {keys} | {run['equals_clear']} "
                f"| {run['load_average_1min_before']:.1f}/{run['load_average_1min_after']:.1f} |"
            )
    for r in rows:
        h = r.get("health_under_load")
        if h:
            lines.append("")
            lines.append(
                f"/health while a batch of {r['model']} keeps 2 workers busy: "
                f"p50 {h['health_p50_ms']:.1f} ms, p99 {h['health_p99_ms']:.1f} ms over "
                f"{h['requests']} requests ({100 * h['fraction_while_busy']:.0f}% answered "
                f"while busy), load {h['load_average_1min']:.1f}"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="samples per timed batch")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--health", choices=sorted(MODELS), default="qat_mlp", help="/health test")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json"
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            rows.append(measure(name, Path(scratch), args.samples, health=name == args.health))
            # NOTE: written after each model, so that a long run keeps what it measured.
            write_results(args.out, rows)
            args.out.with_suffix(".md").write_text(table(rows))
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
