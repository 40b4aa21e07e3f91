"""Refuse a pytest run whose own summary line reports a failure, whatever its exit status.

Usage: python .ci/check_pytest_summary.py LOG

concrete-python 2.11 once turned every exit status into 0 after an encrypted run
(fhe_quant.process undoes that); this check keeps a runtime change from reopening the gate
silently. It reads the last summary line pytest prints (``==== 3 failed, 10 passed in
4.2s ====``, or the same without the rule in quiet mode) and exits 1 when the line is
missing, counts a failure or an error, or counts no passed test. It prints nothing when
the run is good, so pytest's line stays the last line of the output.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_SUMMARY = re.compile(r"^=*\s*(?P<counts>(?:\d+ [a-z]+(?:, )?)+) in [\d.]+s\b.*$")
_COUNT = re.compile(r"(\d+) ([a-z]+)")
_BAD = {"failed", "error", "errors"}


def verdict(log: str) -> str | None:
    """None when ``log`` ends with a good pytest summary, else why it is refused.

    >>> verdict("x\\n===== 5 passed, 2 skipped, 1 xfailed in 3.10s =====\\n")
    >>> verdict("=== 1 failed, 4 passed in 2.00s ===")
    'pytest reported 1 failed'
    >>> verdict("collected 0 items")
    'no pytest summary line in the log'
    """
    lines = [line.strip() for line in log.splitlines()]
    summaries = [m for m in map(_SUMMARY.match, lines) if m is not None]
    if not summaries:
        return "no pytest summary line in the log"
    counts = {word: int(n) for n, word in _COUNT.findall(summaries[-1].group("counts"))}
    bad = [f"{counts[word]} {word}" for word in sorted(_BAD) if counts.get(word)]
    if bad:
        return "pytest reported " + ", ".join(bad)
    if not counts.get("passed"):
        return "pytest reported no passed test"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    reason = verdict(Path(argv[0]).read_text(errors="replace"))
    if reason is None:
        return 0
    print(f"CI gate: {reason}; refusing the run whatever pytest's exit status was.",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
