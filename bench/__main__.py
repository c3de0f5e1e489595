"""Run the benchmark suite: `python -m bench [--quick] [--only NAME] [--output PATH] [--strict]`.

Each scenario runs in its own process against one PostgreSQL server (embedded, or BENCH_DATABASE_URL, in which
each scenario creates and drops its own database; when that server has TimescaleDB, overhead and load also run on
hypertables). Progress goes to stderr, a table of every figure to stdout, and everything to
bench/results/latest.json. The exit status is 1 when a scenario failed, produced no number, or broke a correctness
check (rows never reported, messages re-sent on restart); missed performance targets only fail the run with --strict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import (RESULTS_DIR, ROOT, drop_databases, machine_info, postgres_server, progress,
                           timescaledb_on_server)

SCENARIOS = ["latency", "steady", "load", "filtered", "coalescing", "overhead", "many_alerts", "big_results",
             "scale_out"]
# With TimescaleDB these also run on hypertables, which doubles their work (and their time limit).
HYPERTABLE_SCENARIOS = ["load", "overhead"]
# Hard limits per scenario process (a scenario normally takes well under half of its limit).
QUICK_TIMEOUT = 120.0
FULL_TIMEOUTS = {"latency": 120.0, "steady": 360.0, "load": 360.0, "filtered": 240.0, "coalescing": 180.0,
                 "overhead": 240.0, "many_alerts": 420.0, "big_results": 180.0, "scale_out": 900.0}


def run_scenario(name: str, admin_dsn: str, quick: bool, run_id: str, hypertables: bool) -> dict[str, Any]:
    """Run one scenario in a child process (killed with its own children after the time limit)."""
    limit = QUICK_TIMEOUT if quick else FULL_TIMEOUTS[name]
    if hypertables and name in HYPERTABLE_SCENARIOS:
        limit *= 2
    prefix = f"bench_{run_id}_{name}_"
    # The scratch directory belongs to this process, so it goes even when the scenario is killed.
    with tempfile.TemporaryDirectory(prefix=f"alert-bench-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "bench.run_one", name, "--out", str(out), "--db-prefix", prefix,
                   "--work-dir", str(Path(tmp) / "work")]
        if quick:
            command.append("--quick")
        env = {**os.environ, "BENCH_ADMIN_DSN": admin_dsn}
        began = time.monotonic()
        child = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
        timed_out = False
        try:
            child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            progress(name, f"over its {limit:.0f} s limit: stopping it")
            _stop_group(child)
        except BaseException:
            _stop_group(child)
            raise
        finally:
            # A killed scenario cannot drop its database; do it here.
            left = drop_databases(admin_dsn, prefix)
            if left:
                progress(name, f"dropped leftover database(s) {', '.join(left)}")
        if out.exists():
            result = json.loads(out.read_text())
        else:
            result = {"scenario": name, "status": "error", "metrics": [], "details": {},
                      "error": f"timed out after {limit:.0f} s" if timed_out
                      else f"exited {child.returncode} without a result"}
        result["wall_seconds"] = time.monotonic() - began
        return result


def _stop_group(child: subprocess.Popen) -> None:
    """Stop the scenario process and the writer processes it started (they share its session)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if float(value).is_integer() and abs(value) < 1e15:
        text = f"{int(value):,}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return f"{text} {unit}".strip()


def _error_summary(result: dict[str, Any]) -> str:
    return result.get("error_summary") or (result.get("error") or "unknown error").strip().splitlines()[-1]


def _comparison(m: dict[str, Any]) -> str:
    """The ratio to the floor or baseline; for latencies also the excess over it (a floor can be ~0)."""
    if m["baseline"] is None or m["value"] is None:
        return ""
    name = m["baseline_name"] or "baseline"
    text = f"{name} {_format_value(m['baseline'], m['unit'])}"
    if m["unit"] == "ms":
        text += f", +{_format_value(m['value'] - m['baseline'], m['unit'])}"
    if m["ratio"] is not None:
        text += f", {m['ratio']:.2f}x"
    return text


def render_table(results: list[dict[str, Any]]) -> str:
    """The summary table: scenario, metric, value, target, met, ratio vs its floor or baseline."""
    header = ("scenario", "metric", "value", "target", "met", "vs floor/baseline")
    rows: list[tuple[str, ...]] = []
    for result in results:
        if result["status"] != "ok":
            rows.append((result["scenario"], "ERROR", _error_summary(result)[:80], "", "no", ""))
        for m in result["metrics"]:
            met = "" if m["met"] is None else ("yes" if m["met"] else "NO")
            rows.append((result["scenario"], m["name"], _format_value(m["value"], m["unit"]), m["target"] or "",
                         met, _comparison(m)))
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(6)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def problems(results: list[dict[str, Any]], strict: bool) -> list[str]:
    """Why the run fails: failed scenarios, missing numbers, broken correctness checks (and, if strict, targets)."""
    found = []
    for result in results:
        name = result["scenario"]
        if result["status"] != "ok":
            found.append(f"{name}: did not finish ({_error_summary(result)})")
            continue
        if not result["metrics"]:
            found.append(f"{name}: produced no figures")
        for m in result["metrics"]:
            if m["value"] is None or not math.isfinite(m["value"]):
                found.append(f"{name}: {m['name']} has no value")
            elif m["met"] is False and (m["correctness"] or strict):
                found.append(f"{name}: {m['name']} = {m['value']} (target {m['target']})")
    return found


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C, so the scenario, its databases and the embedded server are cleaned up.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks every scenario runs (seconds)")
    parser.add_argument("--only", action="append", choices=SCENARIOS, metavar="NAME",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json", help="where to write the JSON")
    parser.add_argument("--strict", action="store_true", help="also fail when a performance target is missed")
    args = parser.parse_args(argv)

    names = [n for n in SCENARIOS if not args.only or n in args.only]
    run_id = uuid.uuid4().hex[:6]
    began, started_at = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: list[dict[str, Any]] = []
    progress("bench", f"{'quick' if args.quick else 'full'} run of {', '.join(names)}")
    with postgres_server() as (admin_dsn, kind):
        machine = machine_info(admin_dsn, kind)
        progress("bench", f"PostgreSQL ready ({kind}): {machine['postgresql'].split(',')[0]}")
        hypertables, timescaledb = timescaledb_on_server(admin_dsn)
        machine["timescaledb"] = timescaledb if hypertables else None
        on_hypertables = [n for n in names if n in HYPERTABLE_SCENARIOS]
        if on_hypertables and hypertables:
            progress("bench", f"{timescaledb}: {' and '.join(on_hypertables)} also run on hypertables")
        elif on_hypertables:
            progress("bench", f"hypertable figures of {' and '.join(on_hypertables)} not measured: {timescaledb}")
        for name in names:
            progress(name, "starting")
            result = run_scenario(name, admin_dsn, args.quick, run_id, hypertables)
            progress(name, f"{result['status']} in {result['wall_seconds']:.1f} s")
            results.append(result)
    wall = time.monotonic() - began
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    found = problems(results, args.strict)
    report = {"mode": "quick" if args.quick else "full", "started_at": started_at, "wall_seconds": wall,
              "machine": machine, "scenarios": {r["scenario"]: r for r in results}, "problems": found}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str))

    print(render_table(results))
    print(f"\n{report['mode']} run: {wall:.1f} s on {machine['cpu_model']} ({machine['usable_cores']} cores), "
          f"Python {machine['python']}, {machine['postgresql'].split(',')[0]}; load average "
          f"{machine['load_average_at_start'][0]} at start, {machine['load_average_at_end'][0]} at end; "
          f"figures in {args.output}")
    for result in results:
        counts = result.get("log_counts") or {}
        if counts:
            print(f"{result['scenario']}: service logged {counts}; first: {(result.get('log_samples') or [''])[0]}")
    for problem in found:
        print(f"PROBLEM: {problem}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
