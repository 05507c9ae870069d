"""A small load through scenarios/loadtest.py, asserting what it checks, never its times.

The benchmark's own run (``python -m scenarios.loadtest``: 1,000 requests, 50
clients, 200 servers), in a separate process, must come back with no 5xx, and
every 202 with exactly one action, one finished event and one NMI. Its latency
and throughput are printed, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.live import REPO

REQUESTS = 1000


def test_load_loses_nothing_and_duplicates_nothing() -> None:
    argv = [sys.executable, "-m", "scenarios.loadtest", "--json"]
    argv += ["--requests", str(REQUESTS), "--clients", "50", "--servers", "200"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    audit = report["audit"]
    assert report["server_errors"] == 0, report
    assert report["no_answer"] == 0, report
    assert report["statuses"] == {"202": REQUESTS}, report
    assert audit["accepted"] == REQUESTS
    assert audit["missing_actions"] == audit["duplicate_actions"] == [], audit
    assert audit["wrong_events"] == audit["unfinished_events"] == [], audit
    assert audit["failed_events"] == [], audit
    assert audit["nmis_sent"] == REQUESTS and audit["nmis_misplaced"] == 0, audit
    print(f"\n{report['requests_per_second']} req/s, latency {report['latency_ms']}")
    assert report["ok"] and done.returncode == 0
