"""Benchmark: three ccproxy replicas behind nginx (contrib/nginx.conf) restarted one at a time
while 200 clients stream turn after turn: how many streams completed, were cut or ended with
an error event, and how many sessions moved to another replica.

    python3 tests/bench_replicas.py

The same setup as tests/test_replicas.py (Debian's nginx, the stdlib OpenAI mock, 3-second
streams), run once with its figures printed. Loopback only; not part of the test suite.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_replicas  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        cluster = test_replicas.cluster.__wrapped__(Path(folder))
        try:
            setup = next(cluster)
        except pytest.skip.Exception as skipped:
            raise SystemExit("cannot run: %s" % skipped)
        try:
            test_replicas.test_a_rolling_restart_under_200_streams_loses_none(setup)
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
