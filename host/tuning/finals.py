"""The final choice among a task's best candidates: timed against each other as the model runs them.

A session that times its kernels hot (their weights in the caches, as repeated runs leave them) searches
well: hot timings tell schedules apart by how well they compute, and the cost model learns from them.
In the model, though, a kernel whose arguments do not fit in a core's cache finds its weights where the
previous kernels left them, often in memory, and among schedules that compute equally well some stream
their weights far better than others (mobilenet_v2's 2,000-trial log: a stride-2 conv's hot best runs in
119 us after a cache flush, its third best in 57 us; about 120 us for the hot best in the model). A
session that times them cold ranks its candidates by a few single runs each, taken minutes apart on a
board whose speed drifts.

So at the end of a completed run, each large kernel's best few candidates by their logged time (the
finalists) are timed again against each other, cold, in one session on one board, and the fastest is
the one ``build`` uses. These timings are not trials: no budget, no record (the log's records stay
comparable); they are kept in the session as ``finals``, per workload: the chosen trace's key, and each
finalist's logged and final time.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

FINALISTS = 8  # candidates re-timed per large task: the best by their logged time
# How the finalists are timed: in FINAL_ROUNDS rounds, each timing every finalist with FINAL_RUNS single
# runs after a cache flush, one session on one board; a finalist's time is the median of its rounds'
# medians. Timed one after the other, a board's drift decides: on a 2-core VM the same kernel's cold
# time moved between 119 and 234 us from one minute to the next, while finalists timed in alternation
# keep their order.
FINAL_ROUNDS = 6
FINAL_RUNS = 10


def final_evaluator():
    """MetaSchedule's evaluator for a finalist in one round: FINAL_RUNS single runs after a cache flush."""
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    return EvaluatorConfig(number=1, repeat=FINAL_RUNS, min_repeat_ms=0, enable_cpu_cache_flush=True)


def median_us(round_secs: list[float] | None) -> float | None:
    """A finalist's time: the median of its rounds' medians, in microseconds; None when it failed."""
    import statistics

    return round(statistics.median(round_secs) * 1e6, 3) if round_secs else None


def trace_key(trace: Any) -> str:
    """A stable key of a schedule's trace, to find its record again in the log: its instructions' kinds
    and its decisions (integers). Not the whole trace: its attributes hold floats (a categorical
    sample's probabilities) that a trip through the log's JSON file may print differently."""
    import json

    decisions = trace.decisions
    text = json.dumps([[inst.kind.name for inst in trace.insts],
                       [str(decisions[inst]) for inst in trace.insts if inst in decisions]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def choose(finalists: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finalist with the lowest final time (``{"key", "logged_us", "cold_us"}``; cold None: failed), or
    None when none ran cold."""
    timed = [f for f in finalists if f.get("cold_us") is not None]
    return min(timed, key=lambda f: f["cold_us"]) if timed else None


def chosen_records(records: Iterable[Any], finals: dict[str, Any] | None) -> dict[str, Any]:
    """Per workload key, the record ``finals`` chose (when the log still holds it)."""
    from ..logs.format import workload_key

    wanted = {wl: entry["chosen"] for wl, entry in (finals or {}).items() if entry.get("chosen")}
    found: dict[str, Any] = {}
    if not wanted:
        return found
    for record in records:
        key = workload_key(record.workload.mod)
        if key in wanted and key not in found and trace_key(record.trace) == wanted[key]:
            found[key] = record
    return found


def finals_database(records: Iterable[Any], finals: dict[str, Any] | None):
    """A MetaSchedule database holding only the chosen records: put first in a union, it gives the
    build each chosen kernel's schedule; the rest come from the log as before."""
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.MemoryDatabase()
    for record in chosen_records(records, finals).values():
        workload = db.commit_workload(record.workload.mod)
        db.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target,
                                                         record.args_info))
    return db
