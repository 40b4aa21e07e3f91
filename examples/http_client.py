"""Encrypt a few samples, have the HTTP server run the model on them, decrypt.

    python examples/http_client.py artifact/client --url http://127.0.0.1:8000 --samples 3

Inputs come from ``--data`` (a ``.npy`` array, one sample per row) or are random with the
model's input shape. The server only ever sees evaluation keys and ciphertexts.
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import numpy as np

from fhe_quant.deploy import FHEModelClient
from fhe_quant.http import Client

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("client_dir", type=Path, help="the 'client' directory of the artifact")
parser.add_argument("--url", default="http://127.0.0.1:8000")
parser.add_argument("--samples", type=int, default=3)
parser.add_argument("--data", type=Path, help=".npy file of inputs (default: random)")
parser.add_argument("--key-dir", type=Path, help="where to keep the keys (default: memory)")
args = parser.parse_args()

client = FHEModelClient(args.client_dir, key_dir=args.key_dir)
shape = client.processing.input_shape
if args.data is not None:
    x = np.load(args.data, allow_pickle=False)[: args.samples]
else:
    x = np.random.default_rng(0).normal(size=(args.samples, *shape))

api = Client(args.url, timeout=600)
client_id = uuid.uuid4().hex
api.upload_keys(client_id, client.get_serialized_evaluation_keys())
task = client.post_processing.task  # "module", "classifier" or "regressor"
for i, ciphertext in enumerate(client.quantize_encrypt_serialize(x)):
    reply = api.predict(client_id, ciphertext)
    outputs = client.deserialize_decrypt_dequantize([reply])[0]  # floats, probabilities
    prediction = f"  prediction {client.predict([reply])[0]!r}" if task != "module" else ""
    print(f"sample {i}: {np.array2string(np.asarray(outputs), precision=4)}{prediction}")
