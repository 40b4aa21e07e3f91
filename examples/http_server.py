"""Serve a saved model over HTTP (loopback demo).

    python examples/http_server.py artifact --port 8000

``artifact`` is the directory given to ``FHEModelDev(...).save()``; its ``server``
sub-directory is served. See ``fhe_quant/http.py`` for the endpoints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fhe_quant.http import serve

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("artifact", type=Path, help="directory written by FHEModelDev")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
args = parser.parse_args()
serve(args.artifact / "server", args.host, args.port)
