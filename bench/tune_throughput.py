"""Tuning throughput: trials per minute of edgetune's session against stock MetaSchedule
(``tune_tasks`` with its ``LocalBuilder`` and ``RPCRunner``) on the same model, board and budget.

Stock runs once per ``--stock-batch``: 64 is its own default ``num_trials_per_iter``, 16 is edgetune's
largest batch (equal batch sizes). Prints JSON: {"model", "trials", "stock": {BATCH: {...}},
"edgetune": {...}, "speedup": {BATCH: edgetune / stock}, "to_stock_best": {BATCH: {...}}}.

Trials a minute are not the whole story where a session's trials differ in worth (edgetune's are
Winograd candidates that take longer to compile, chosen by task weight), so each session also records its
model estimate (the sum over tasks of weight x best kernel latency so far) against the seconds since its
start, and ``to_stock_best`` says how many seconds each needed to come down to the estimate stock ended
with: the time to equal latency, and its ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from _bed import local_board


def falling(points: list[tuple[float, int, float | None]], weights: dict[int, float]) -> list[tuple[float, float]]:
    """``(seconds, estimated ms)`` after each measured candidate, once every task has a latency, from
    ``(seconds, task, seconds per run or None)`` in the order they were measured."""
    best: dict[int, float] = {}
    curve = []
    for at, task, secs in points:
        if secs is not None and secs < best.get(task, float("inf")):
            best[task] = secs
        if len(best) == len(weights):
            curve.append((at, sum(weights[t] * s for t, s in best.items()) * 1e3))
    return curve


def seconds_to(curve: list[tuple[float, float]], latency_ms: float) -> float | None:
    return next((round(at, 1) for at, estimate in curve if estimate <= latency_ms * (1 + 1e-9)), None)


def stock(model_name: str, trials: int, tracker, key: str, work, batch: int) -> dict:
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from device_agent.probe import read_profile
    from host.logs.format import mean_run_secs
    from host.models.onnx_import import load_onnx
    from host.tuning.tasks import lower_for_tuning

    target = tvm.target.Target(read_profile().target)
    model = load_onnx(model_name)
    start = time.monotonic()
    mod = lower_for_tuning(model.mod, target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    work_dir = str(work / f"stock-{batch}")
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, work_dir)
    runner = ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=tracker[0], tracker_port=tracker[1],
                                                     tracker_key=key, session_timeout_sec=60))
    # TVM-NOTES: the default 30 s build timeout fails every candidate on 2 cores; give it 120 s.
    builder = ms.builder.LocalBuilder(timeout_sec=120)
    measured: list[tuple[float, int, float | None]] = []

    @derived_object
    class Clock(ms.measure_callback.PyMeasureCallback):
        """When each candidate's result came back, beside stock's own callbacks."""

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            at = time.monotonic() - start
            for result in runner_results:
                secs = None if result.error_msg else mean_run_secs([float(x) for x in result.run_secs])
                measured.append((at, int(task_id), secs))

    db = ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                       max_trials_global=trials, num_trials_per_iter=batch, builder=builder, runner=runner,
                       measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [Clock()])
    elapsed = time.monotonic() - start
    records = list(db.get_all_tuning_records())
    ok = sum(1 for r in records if mean_run_secs(r.run_secs) is not None)
    curve = falling(measured, {i: float(w) for i, w in enumerate(weights)})
    return {"seconds": round(elapsed, 1), "trials": len(records), "measured_ok": ok,
            "trials_per_min": round(len(records) / elapsed * 60, 2),
            "estimated_latency_ms": round(curve[-1][1], 4) if curve else None, "curve": curve}


def edgetune(model_name: str, trials: int, tracker, key: str, work) -> dict:
    from device_agent.probe import read_profile
    from host.tuning.session import TuneOptions, run_session

    profile = read_profile()
    start, wall = time.monotonic(), time.time()
    result = run_session(TuneOptions(model=model_name, key=key, trials=trials, log_dir=str(work / "edgetune"),
                                     tracker=tracker, target=profile.target, board=profile.as_dict(),
                                     use_schedules=False))  # cold, as stock is
    elapsed = time.monotonic() - start
    ok = sum(t.trials - t.failed for t in result.tasks)
    # The session's curve from its log: each trial's estimate (the report's), at the time the trial's
    # batch was recorded (its wall clock, to the second: the session's own clock starts after the model's
    # import and task extraction, which stock's figure counts).
    from datetime import datetime

    from host.report.load import estimate_curve, load

    data = load(work / "edgetune")
    xs, ys, complete = estimate_curve(data)
    at = {t.trial: datetime.fromisoformat(t.time).timestamp() - wall for t in data.trials if t.time}
    curve = [(at[x], y) for x, y, c in zip(xs, ys, complete) if c and x in at]
    return {"seconds": round(elapsed, 1), "trials": result.trials_done, "measured_ok": ok,
            "trials_per_min": round(result.trials_done / elapsed * 60, 2),
            "estimated_latency_ms": result.estimated_latency_ms, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny_cnn")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--stock-batch", default="64,16",
                        help="comma-separated num_trials_per_iter for stock runs (64: its default)")
    args = parser.parse_args()
    os.environ.setdefault("EDGETUNE_MDNS_INTERFACES", "127.0.0.1")
    # MetaSchedule prints its scheduler tables to stdout at INFO: keep stdout for the JSON figures.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    with local_board(open_mode=True) as bed:  # stock MetaSchedule's RPCRunner holds no team key
        figures = {"model": args.model, "trials": args.trials, "cores": os.cpu_count()}
        # Both run in this one process, stock first: edgetune then starts with TVM and its tensor
        # intrinsics already imported (about 20 s of the stock run's time); everything else of its
        # session (task extraction, warm-up of its build workers) is counted.
        batches = [int(b) for b in args.stock_batch.split(",") if b.strip()]
        figures["stock"] = {b: stock(args.model, args.trials, bed["tracker"], bed["key"], bed["work"], b)
                            for b in batches}
        figures["edgetune"] = edgetune(args.model, args.trials, bed["tracker"], bed["key"], bed["work"])
        figures["speedup"] = {b: round(figures["edgetune"]["trials_per_min"] / run["trials_per_min"], 2)
                              for b, run in figures["stock"].items()}
        ours = figures["edgetune"].pop("curve")
        figures["to_stock_best"] = {}
        for b, run in figures["stock"].items():
            theirs = run.pop("curve")
            if not theirs:
                continue
            goal = theirs[-1][1]
            stock_s, edgetune_s = seconds_to(theirs, goal), seconds_to(ours, goal)
            figures["to_stock_best"][b] = {
                "stock_estimate_ms": round(goal, 4), "stock_seconds": stock_s, "edgetune_seconds": edgetune_s,
                "speedup": round(stock_s / edgetune_s, 2) if stock_s and edgetune_s else None}
    json.dump(figures, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
