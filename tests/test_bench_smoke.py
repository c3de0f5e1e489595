"""The benchmark suite at tiny sizes, so it cannot rot: every scenario runs, produces numbers, misses no row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import timescaledb_available

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_the_quick_benchmark_runs_every_scenario_and_on_timescaledb_its_hypertable_variants(tmp_path):
    # The suite's server when it has one (a TimescaleDB run of the suite exercises the hypertable variants),
    # else the benchmark starts an embedded server of its own, as `make bench` does.
    server = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    env = {**os.environ, **({"BENCH_DATABASE_URL": server} if server else {})}
    output = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(output)], cwd=ROOT,
                            capture_output=True, text=True, timeout=280, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert set(figures["scenarios"]) == {"latency", "steady", "load", "filtered", "coalescing", "overhead",
                                         "many_alerts", "big_results", "scale_out"}
    for name, scenario in figures["scenarios"].items():
        assert scenario["status"] == "ok", name
        assert scenario["metrics"] and all(m["value"] is not None for m in scenario["metrics"]), name

    hypertables = bool(server) and timescaledb_available(server)
    for name in ("overhead", "load"):
        scenario = figures["scenarios"][name]
        names = {m["name"] for m in scenario["metrics"]}
        plain = {n for n in names if "hypertable" not in n}
        twins = {n.removesuffix(" (hypertable)") for n in names if n.endswith(" (hypertable)")}
        if hypertables:
            assert twins == plain, name
            assert scenario["details"]["hypertables"].startswith("measured"), name
        else:
            assert names == plain, name
            assert scenario["details"]["hypertables"].startswith("not measured: "), name
    if not hypertables:
        assert "hypertable figures of load and overhead not measured" in result.stderr
