"""A small load through scenarios/loadtest.py, asserting what it checks, never its times.

The benchmark itself (``python -m scenarios.loadtest``: 1,000 requests, 50
clients, 200 servers) reports latency and throughput; here a smaller run in a
separate process must come back with no 5xx, and every 202 with exactly one
action, one finished event and one NMI.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.live import REPO


def test_load_loses_nothing_and_duplicates_nothing() -> None:
    argv = [sys.executable, "-m", "scenarios.loadtest", "--json"]
    argv += ["--requests", "300", "--clients", "25", "--servers", "40"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    audit = report["audit"]
    assert report["server_errors"] == 0, report
    assert report["no_answer"] == 0, report
    assert report["statuses"] == {"202": 300}, report
    assert audit["accepted"] == 300
    assert audit["missing_actions"] == audit["duplicate_actions"] == [], audit
    assert audit["wrong_events"] == audit["unfinished_events"] == [], audit
    assert audit["failed_events"] == [], audit
    assert audit["nmis_sent"] == 300 and audit["nmis_misplaced"] == 0, audit
    assert report["ok"] and done.returncode == 0
