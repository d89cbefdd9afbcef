"""Trials resnet18 needs with a schedule store, against tuning it cold.

    python bench/store_reuse.py [--cold-trials 1000] [--source-trials 1000] [--mobilenet-trials 500]

1. resnet18 is tuned cold (no store) for ``--cold-trials``; its best estimated latency over the
   session is the reference, and the trials it took to come within 95% of it (latency <= best / 0.95)
   are the cold figure.
2. resnet34 (written by ``make_resnet34.py``: the same conv shapes as resnet18, other weights) is tuned
   cold for ``--source-trials``, and mobilenet_v2 for ``--mobilenet-trials``.
3. resnet18 is tuned again from a fresh store holding only the resnet34 session (exact workload
   matches: measured first, cost model pre-trained), then from one holding only the mobilenet_v2
   session (no workload in common: only the cost model's pre-training carries over). Each seeded
   session gets ``--seeded-share`` of the cold trials (default 1/2, the mobilenet goal).

The estimate after a trial is the sum over tasks of weight x best latency so far (the report's
curve), counted only once every task has a measured latency. Seeded trials count as trials.
Prints JSON: per session the trials to reach the cold reference, and the ratios to cold.
Cold logs are kept (``--logs``, default ``~/.cache/edgetune/bench-logs``, the same names as
``latency.py``'s), so a rerun reuses them; the seeded sessions run again each time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from _bed import local_board
from latency import bench_log_dir, model_path
from make_resnet34 import write as write_resnet34

REACH = 0.95


def curve(log_dir: Path) -> list[tuple[int, float]]:
    """(trial, estimated model latency in ms) after each trial, once every task has been measured."""
    from host.report.load import estimate_curve, load

    xs, ys, complete = estimate_curve(load(log_dir))
    return [(x, y) for x, y, c in zip(xs, ys, complete) if c]


def trials_to_reach(points: list[tuple[int, float]], latency_ms: float) -> int | None:
    return next((trial for trial, estimate in points if estimate <= latency_ms), None)


def tune(model: str, trials: int, log_dir: Path, bed: dict, target: dict, store: str | None = None) -> dict:
    from device_agent.probe import read_profile
    from host.logs.tuninglog import TuningLog
    from host.tuning.session import TuneOptions, run_session

    started = time.monotonic()
    result = run_session(TuneOptions(model=model_path(model), key=bed["key"], trials=trials, log_dir=str(log_dir),
                                     tracker=bed["tracker"], target=target, board=read_profile().as_dict(),
                                     schedules=store,
                                     use_schedules=store is not None))
    session = TuningLog.open(log_dir).session
    return {"model": model, "trials": result.trials_done, "log": str(log_dir),
            "tuned_this_run": result.trials_this_run > 0,
            "minutes": round(float(session.get("elapsed_s", time.monotonic() - started)) / 60, 2),
            "schedules": session.get("schedules"), "cost_model": session.get("cost_model")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold-trials", type=int, default=1000)
    parser.add_argument("--source-trials", type=int, default=1000, help="trials of the resnet34 session")
    parser.add_argument("--mobilenet-trials", type=int, default=500, help="trials of the mobilenet_v2 session")
    parser.add_argument("--seeded-share", type=float, default=0.5,
                        help="budget of each seeded session, as a share of the cold trials to the reference")
    parser.add_argument("--sources", default="resnet34,mobilenet_v2",
                        help="which stores to seed resnet18 from (comma-separated: resnet34, mobilenet_v2)")
    parser.add_argument("--logs", default=str(Path.home() / ".cache" / "edgetune" / "bench-logs"))
    args = parser.parse_args()
    os.environ.setdefault("EDGETUNE_MDNS_INTERFACES", "127.0.0.1")
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)

    from device_agent.probe import read_profile
    from host.schedules.store import ScheduleStore

    target = read_profile().target
    logs = Path(args.logs)
    resnet34 = str(write_resnet34())
    sessions: dict[str, dict] = {}
    with local_board() as bed:
        cold_log = bench_log_dir(logs, "resnet18", args.cold_trials, "default")
        sessions["cold"] = tune("resnet18", args.cold_trials, cold_log, bed, target)
        cold = curve(cold_log)
        best = min(estimate for _, estimate in cold)
        reference = best / REACH
        cold_needed = trials_to_reach(cold, reference)
        sessions["cold"].update(best_ms=round(best, 3), trials_to_reference=cold_needed)

        sources = {"resnet34": (resnet34, args.source_trials), "mobilenet_v2": ("mobilenet_v2", args.mobilenet_trials)}
        sources = {name: sources[name] for name in args.sources.split(",") if name in sources}
        budget = max(1, int(cold_needed * args.seeded_share))
        for name, (model, trials) in sources.items():
            source_log = bench_log_dir(logs, model, trials, "default")
            sessions[f"{name}_session"] = tune(model, trials, source_log, bed, target)
            work = Path(tempfile.mkdtemp(prefix="edgetune-store-bench-"))
            store = str(work / "schedules.sqlite")
            with ScheduleStore(store) as opened:
                opened.import_log(source_log)
            seeded = tune("resnet18", budget, work / "resnet18", bed, target, store=store)
            points = curve(work / "resnet18")
            needed = trials_to_reach(points, reference)
            seeded.update(store_holds=f"{name} session ({trials} trials)", budget=budget,
                          best_ms=round(min(e for _, e in points), 3) if points else None,
                          first_complete_estimate_ms=round(points[0][1], 3) if points else None,
                          trials_to_reference=needed,
                          share_of_cold=round(needed / cold_needed, 3) if needed else None)
            sessions[f"resnet18_from_{name}"] = seeded

    json.dump({"reference_ms": round(reference, 3), "reach": REACH, "target": target, "sessions": sessions},
              sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
