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
Prints JSON: per session the trials to reach the cold reference, and the ratios to cold; for each seeded
session the board's state before and after it (``latency.board_state``: on a VM whose two cores slow
down together for minutes, a seeded session of a few minutes times its replays in one state).
Unless ``--no-model-check``, the same question is also answered by the models a user would build: the whole
cold log's, and each log cut after N trials (with its own best schedules, no store), built and timed on the
board against ONNX Runtime in alternating rounds. The cold figure is the first of N = 1/4, 1/2, 3/4 and
all of the estimate's trials (then all 1,000) whose model's ratio is within 95% of the whole cold log's,
reported with the checkpoint before it (the trials needed lie between; ``--refine`` halves that gap, one
build a halving); a seeded session's is the first of N = its replays of every task's best, 1/10, 1/4 and
1/2 of the cold figure and its whole budget, refined the same way. Why
both: the estimate's reference sums per kernel the luckiest of many noisy timings (a schedule timed
again runs slower), which a session of few trials rarely matches even with the same schedules.
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
from latency import bench_log_dir, board_state, model_path
from make_resnet34 import write as write_resnet34

REACH = 0.95


def curve(log_dir: Path) -> list[tuple[int, float]]:
    """(trial, estimated model latency in ms) after each trial, once every task has been measured."""
    from host.report.load import estimate_curve, load

    xs, ys, complete = estimate_curve(load(log_dir))
    return [(x, y) for x, y, c in zip(xs, ys, complete) if c]


def trials_to_reach(points: list[tuple[int, float]], latency_ms: float) -> int | None:
    return next((trial for trial, estimate in points if estimate <= latency_ms), None)


def tune(model: str, trials: int, log_dir: Path, bed: dict, target: dict, store: str | None = None,
         seed: int | None = None) -> dict:
    from device_agent.probe import read_profile
    from host.logs.tuninglog import TuningLog
    from host.tuning.session import TuneOptions, run_session

    started = time.monotonic()
    result = run_session(TuneOptions(model=model_path(model), key=bed["key"], trials=trials, log_dir=str(log_dir),
                                     tracker=bed["tracker"], target=target, board=read_profile().as_dict(),
                                     schedules=store, use_schedules=store is not None, seed=seed))
    session = TuningLog.open(log_dir).session
    return {"model": model, "trials": result.trials_done, "log": str(log_dir),
            "tuned_this_run": result.trials_this_run > 0,
            "minutes": round(float(session.get("elapsed_s", time.monotonic() - started)) / 60, 2),
            "schedules": session.get("schedules"), "cost_model": session.get("cost_model")}


def median_or_more(values: list[float | None], budget: float) -> float | str:
    """The median of ``values``; a run that did not reach the reference (None) counts as above
    ``budget``, and a median among those is reported as ``"> budget"``."""
    import statistics

    missed = float("inf")
    middle = statistics.median_low([missed if v is None else v for v in values])
    return f"> {round(budget, 3)}" if middle == missed else middle


def prefix_log(log_dir: Path, trials: int, dest: Path) -> Path:
    """A copy of ``log_dir`` as it stood after its first ``trials`` trials: the records and history lines
    of those trials (records are committed in trial order), no finalists (a run times them at its end)."""
    from host.logs.format import HISTORY_FILE, RECORD_FILE, SESSION_FILE, WORKLOAD_FILE

    dest.mkdir(parents=True)
    (dest / WORKLOAD_FILE).write_text((log_dir / WORKLOAD_FILE).read_text())
    records = [line for line in (log_dir / RECORD_FILE).read_text().splitlines() if line.strip()]
    history = [line for line in (log_dir / HISTORY_FILE).read_text().splitlines() if line.strip()]
    if len(records) != len(history) or trials > len(records):
        raise SystemExit(f"{log_dir}: {len(records)} records, {len(history)} trials: cannot cut it at {trials}")
    (dest / RECORD_FILE).write_text("".join(line + "\n" for line in records[:trials]))
    (dest / HISTORY_FILE).write_text("".join(line + "\n" for line in history[:trials]))
    session = json.loads((log_dir / SESSION_FILE).read_text())
    session.pop("finals", None)
    session["trials_done"] = trials
    (dest / SESSION_FILE).write_text(json.dumps(session, indent=2))
    return dest


def model_ratio(log_dir: Path, bed: dict, runs: int, rounds: int) -> float:
    """resnet18 built from ``log_dir`` and timed on the board against ONNX Runtime: the median of the
    rounds' tuned / ONNX Runtime ratios (each round times both within seconds, so a board that changes
    speed between two measurements slows both). Kernels the log lacks take TVM's default schedule, not
    the user's schedule store's."""
    from host.bench.bench import bench
    from host.schedules.store import ENV, OFF

    saved = os.environ.get(ENV)
    os.environ[ENV] = OFF
    try:
        measured = bench(model_path("resnet18"), bed["key"], bed["tracker"], log_dir=str(log_dir), runs=runs,
                         rounds=rounds, with_untuned=False)
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved
    if measured.onnxruntime_ratio is None:
        raise SystemExit(f"{log_dir}: incomplete measurement: {measured.notes}")
    return round(measured.onnxruntime_ratio, 4)


def model_reach(log_dir: Path, checkpoints: list[int], reference_ratio: float, bed: dict, args) -> dict:
    """The model built from the log's first N trials, for each checkpoint N in turn, timed against ONNX
    Runtime, up to the first whose ratio is within ``REACH`` of the cold model's (``reference_ratio``);
    then ``args.refine`` halvings of the gap between it and the checkpoint before it."""
    ratios: dict[int, float] = {}
    cut = Path(tempfile.mkdtemp(prefix="edgetune-store-bench-cut-"))

    def reaches(trials: int) -> bool:
        ratios[trials] = model_ratio(prefix_log(log_dir, trials, cut / str(trials)), bed, args.model_runs,
                                     args.model_rounds)
        return ratios[trials] <= reference_ratio / REACH

    reached = next((trials for trials in checkpoints if reaches(trials)), None)
    # The checkpoint before it did not reach: the trials needed lie between the two.
    short = max((n for n in checkpoints if reached is not None and n < reached), default=0)
    for _ in range(args.refine):
        if reached is None or reached - short <= 1:
            break
        middle = (short + reached) // 2
        if reaches(middle):
            reached = middle
        else:
            short = middle
    return {"tuned_over_onnxruntime_at": dict(sorted(ratios.items())), "model_reaches_reference_at": reached,
            "model_needs_more_than": short}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold-trials", type=int, default=1000)
    parser.add_argument("--source-trials", type=int, default=1000, help="trials of the resnet34 session")
    parser.add_argument("--mobilenet-trials", type=int, default=500, help="trials of the mobilenet_v2 session")
    parser.add_argument("--seeded-share", type=float, default=0.5,
                        help="budget of each seeded session, as a share of the cold trials to the reference")
    parser.add_argument("--sources", default="resnet34,mobilenet_v2",
                        help="which stores to seed resnet18 from (comma-separated: resnet34, mobilenet_v2)")
    parser.add_argument("--runs", type=int, default=1,
                        help="seeded sessions per store (tuning seeds 1..N), reported each and as a median")
    parser.add_argument("--no-model-check", action="store_true",
                        help="skip the built models' timings (the figure by the estimate only)")
    parser.add_argument("--model-runs", type=int, default=1000, help="timed runs of each built model")
    parser.add_argument("--model-rounds", type=int, default=25, help="rounds those runs are split into")
    parser.add_argument("--refine", type=int, default=1,
                        help="halvings of the gap between the last checkpoint short of the reference and the first "
                             "that reaches it (one more build each)")
    parser.add_argument("--logs", default=str(Path.home() / ".cache" / "edgetune" / "bench-logs"))
    args = parser.parse_args()
    os.environ.setdefault("EDGETUNE_MDNS_INTERFACES", "127.0.0.1")
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)

    from device_agent.probe import read_profile
    from host.logs.tuninglog import TuningLog
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
        # The estimate's reference is the luckiest of many noisy timings per kernel (the same schedules
        # timed again run slower), which a session of few trials rarely matches. The built models say
        # what a user gets: the cold log's, and each log cut after N trials, timed against ONNX Runtime.
        model_needed = None
        if not args.no_model_check:
            # The whole cold log cut like the others (no finalists: a cut log has none), so that only
            # the trials differ between the reference and a checkpoint.
            every = len(TuningLog.open(cold_log).history())
            whole = prefix_log(cold_log, every, Path(tempfile.mkdtemp(prefix="edgetune-store-bench-cut-")) / "all")
            reference_ratio = model_ratio(whole, bed, args.model_runs, args.model_rounds)
            grid = sorted({max(1, cold_needed * k // 4) for k in (1, 2, 3, 4)} | {every})
            sessions["cold"].update(tuned_over_onnxruntime=reference_ratio,
                                    **model_reach(cold_log, grid, reference_ratio, bed, args))
            model_needed = sessions["cold"]["model_reaches_reference_at"] or cold_needed

        sources = {"resnet34": (resnet34, args.source_trials), "mobilenet_v2": ("mobilenet_v2", args.mobilenet_trials)}
        sources = {name: sources[name] for name in args.sources.split(",") if name in sources}
        budget = max(1, int(cold_needed * args.seeded_share))
        for name, (model, trials) in sources.items():
            source_log = bench_log_dir(logs, model, trials, "default")
            sessions[f"{name}_session"] = tune(model, trials, source_log, bed, target)
            runs = []
            for run in range(1, args.runs + 1):
                work = Path(tempfile.mkdtemp(prefix="edgetune-store-bench-"))
                store = str(work / "schedules.sqlite")
                with ScheduleStore(store) as opened:
                    opened.import_log(source_log)
                before = board_state(bed, target)
                seeded = tune("resnet18", budget, work / "resnet18", bed, target, store=store,
                              seed=run if args.runs > 1 else None)
                seeded["board_state"] = {"before": before, "after": board_state(bed, target)}
                points = curve(work / "resnet18")
                needed = trials_to_reach(points, reference)
                seeded.update(store_holds=f"{name} session ({trials} trials)", budget=budget,
                              best_ms=round(min(e for _, e in points), 3) if points else None,
                              trials_to_reference=needed,
                              share_of_cold=round(needed / cold_needed, 3) if needed else None)
                if model_needed is not None:
                    bests = (seeded.get("cost_model") or {}).get("replayed_seed_best") or 0
                    grid = sorted({n for n in (bests, model_needed // 10, model_needed // 4, model_needed // 2,
                                               budget) if 0 < n <= budget})
                    seeded.update(model_needed_cold=model_needed,
                                  **model_reach(work / "resnet18", grid, reference_ratio, bed, args))
                    reached = seeded["model_reaches_reference_at"]
                    # Between the cold log's two checkpoints around its own reach: a range of shares.
                    above = sessions["cold"]["model_needs_more_than"]
                    seeded["model_share_of_cold"] = ([round(reached / model_needed, 3),
                                                      round(reached / (above + 1), 3)] if reached else None)
                runs.append(seeded)
            sessions[f"resnet18_from_{name}"] = runs[0] if len(runs) == 1 else {
                "runs": runs, "budget": budget,
                # a run that did not reach the reference within its budget counts as needing more
                "median_trials_to_reference": median_or_more([r["trials_to_reference"] for r in runs], budget),
                "median_share_of_cold": median_or_more([r["share_of_cold"] for r in runs], budget / cold_needed)}
            if model_needed is not None and len(runs) > 1:
                # By the built models: the median run's reaching cut, and its share of cold as a range.
                middle = median_or_more([r["model_reaches_reference_at"] for r in runs], budget)
                shares = [r["model_share_of_cold"] for r in runs if r["model_reaches_reference_at"] == middle]
                sessions[f"resnet18_from_{name}"].update(
                    median_model_reaches_reference_at=middle,
                    median_model_share_of_cold=shares[0] if shares else f"> {round(budget / model_needed, 3)}")

    json.dump({"reference_ms": round(reference, 3), "reach": REACH, "target": target, "sessions": sessions},
              sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
