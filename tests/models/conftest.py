"""The zoo's models are a helper module of these tests (tests are imported with
``--import-mode=importlib``, which adds no directory to ``sys.path``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
