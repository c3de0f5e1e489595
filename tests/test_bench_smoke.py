"""The benchmark suite at tiny sizes, so it cannot rot: every scenario runs, produces numbers, misses no row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_the_quick_benchmark_runs_every_scenario(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(output)], cwd=ROOT,
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert set(figures["scenarios"]) == {"latency", "load", "coalescing", "overhead", "many_alerts", "big_results"}
    for name, scenario in figures["scenarios"].items():
        assert scenario["status"] == "ok", name
        assert scenario["metrics"] and all(m["value"] is not None for m in scenario["metrics"]), name
