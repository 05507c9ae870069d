"""``crashlab bench --quick --json``: the shape of the report and exact NMI counts.

The benchmark runs as a user runs it, in a child process. No figure is held
to a time: only the keys, the sizes and that every simulated BMC received
exactly one NMI per round, whoever sent it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICK_SIZES = [10, 50]
QUICK_ROUNDS, QUICK_ROUNDS_N = 2, 50


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "scenarios.cli", "bench", "--quick", "--json", "--quiet"]
        + ["--output", str(output)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"crashlab bench failed:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_api_overhead_has_percentiles_and_ratio(report: dict[str, Any]) -> None:
    api = report["api_overhead"]
    for key in ("accept_p50_ms", "accept_p99_ms", "event_p50_ms", "direct_p50_ms", "ratio"):
        assert isinstance(api[key], int | float) and api[key] >= 0, key
    assert api["accept_p50_ms"] <= api["accept_p99_ms"]


@pytest.mark.parametrize(
    ("section", "baseline"), [("ipmi_fleet", "ipmitool_s"), ("redfish_fleet", "curl_s")]
)
def test_fleet_delivers_exactly_n_nmis(report: dict[str, Any], section: str, baseline: str) -> None:
    entries = report[section]
    assert [entry["n"] for entry in entries] == QUICK_SIZES
    for entry in entries:
        assert set(entry) >= {"n", "crashlab_s", baseline, "ratio", "nmis_received"}
        assert entry["nmis_received"] == entry["n"]
        assert entry["baseline_nmis_received"] == entry["n"]
        assert entry["exact"], entry
        assert entry["crashlab_s"] > 0 and entry[baseline] > 0
        [per_round] = entry["per_round"]
        assert (per_round["errors"], per_round["nmis_per_bmc"]) == (0, {"1": entry["n"]})


def test_ipmi_rounds_record_errors_and_nmis_per_round_in_both_services(
    report: dict[str, Any],
) -> None:
    serves = report["ipmi_rounds"]
    assert set(serves) == {"long_running", "fresh"}
    for result in serves.values():
        assert result["n"] == QUICK_ROUNDS_N and len(result["rounds"]) == QUICK_ROUNDS
        assert (result["errors"], result["exact"]) == (0, True), result
        for record in result["rounds"]:
            assert record["errors"] == 0 and record["failures"] == []
            assert record["nmis_per_bmc"] == {"1": QUICK_ROUNDS_N}
            assert 0 < record["wall_s"] < 60
        assert result["wall_s"]["min"] <= result["wall_s"]["median"] <= result["wall_s"]["max"]


def test_footprint_and_no_scenario_when_quick(report: dict[str, Any]) -> None:
    footprint = report["footprint"]
    assert set(footprint) >= {"idle_rss_mb", "loaded_rss_mb", "startup_s"}
    assert footprint["idle_rss_mb"] > 0 and footprint["startup_s"] > 0
    assert report["scenario"] is None
    assert report["errors"] == []
    assert report["machine"]["nproc"] >= 1


def test_noisy_neighbour_measures_the_other_tenant_alone_and_flooded(
    report: dict[str, Any],
) -> None:
    neighbour = report["noisy_neighbour"]
    assert neighbour["flood_requests"] > 0
    assert neighbour["rounds_alone"] > 0 and neighbour["rounds_flooded"] > 0
    for kind in ("get", "trigger_to_event"):
        for label in ("alone", "flooded"):
            assert 0 < neighbour[f"{kind}_{label}_p50_ms"] <= neighbour[f"{kind}_{label}_p99_ms"]
        assert neighbour[f"{kind}_p99_ratio"] > 0
