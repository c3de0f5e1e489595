"""Runs one scenario in a fresh process (so memory, CPU time and threads of one scenario never leak into the
next) and writes its figures as JSON; started by `python -m bench`."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from bench.harness import FULL, QUICK, ROOT, ScenarioContext, configure_logging


def _finite(value: object) -> object:
    # JSON has no NaN or infinity.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _clean(data: object) -> object:
    if isinstance(data, dict):
        return {str(k): _clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean(v) for v in data]
    return _finite(data)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> int:
    """Run the scenario named on the command line; exit 0 when it ran (whatever its figures), 1 when it failed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--db-prefix", required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    args = parser.parse_args()
    # SIGTERM (a time limit, or the orchestrator stopping) unwinds, so the service, servers and database go.
    signal.signal(signal.SIGTERM, _terminate)

    # Core modules and tests.servers are imported from the repository root.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    collector = configure_logging()
    work_dir = args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = ScenarioContext(name=args.scenario, admin_dsn=os.environ["BENCH_ADMIN_DSN"],
                          sizes=QUICK if args.quick else FULL, quick=args.quick, work_dir=work_dir,
                          db_prefix=args.db_prefix)
    result: dict = {"scenario": args.scenario, "status": "ok", "metrics": [], "error": None}
    began = time.monotonic()
    try:
        module = importlib.import_module(f"bench.{args.scenario}")
        result["metrics"] = [m.to_json() for m in module.run(ctx)]
    except BaseException as exc:  # noqa: BLE001 - everything, including KeyboardInterrupt, is reported
        first_line = (str(exc).strip().splitlines() or [""])[0]
        result.update(status="error", error="".join(traceback.format_exception(exc)),
                      error_summary=f"{type(exc).__name__}: {first_line}"[:200])
        print(result["error"], file=sys.stderr)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result.update(seconds=time.monotonic() - began, details=ctx.details,
                  log_counts=collector.counts, log_samples=collector.samples)
    args.out.write_text(json.dumps(_clean(result), indent=2, default=str))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
