"""The final choice among a task's best candidates (host/tuning/finals.py): the fastest cold finalist is
the record the build applies; a choice whose record the log no longer holds leaves the log's best."""

from __future__ import annotations

from collections import defaultdict

from tests.helpers_schedules import SMALL


def test_the_fastest_cold_finalist_is_chosen_and_failed_ones_never():
    from host.tuning.finals import choose

    finalists = [{"key": "a", "logged_us": 10.0, "cold_us": 40.0}, {"key": "b", "logged_us": 11.0, "cold_us": None},
                 {"key": "c", "logged_us": 12.0, "cold_us": 25.0}, {"key": "d", "logged_us": 13.0, "cold_us": 31.0}]
    assert choose(finalists)["key"] == "c"
    assert choose([{"key": "a", "logged_us": 10.0, "cold_us": None}]) is None


def test_the_build_database_gives_the_chosen_record_first_and_the_logs_best_otherwise():
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from host.logs.format import mean_run_secs, workload_key
    from host.logs.tuninglog import TuningLog
    from host.tuning.finals import finals_database, trace_key

    log_db = TuningLog.open(SMALL).database()
    records = log_db.get_all_tuning_records()
    by_workload = defaultdict(list)
    for record in records:
        if mean_run_secs(record.run_secs) is not None:
            by_workload[workload_key(record.workload.mod)].append(record)
    key, ranked = next((k, sorted(rs, key=lambda r: mean_run_secs(r.run_secs)))
                       for k, rs in by_workload.items() if len(rs) >= 2)
    hot_best, second = ranked[0], ranked[1]
    assert trace_key(hot_best.trace) != trace_key(second.trace)
    target = tvm.target.Target(TuningLog.open(SMALL).session["target"])

    def applied(finals) -> str:
        union = ms.database.OrderedUnionDatabase(finals_database(records, finals), log_db)
        return trace_key(union.query_tuning_record(hot_best.workload.mod, target, "main").trace)

    # The session chose the second best by hot time (it ran fastest cold): the build applies it.
    assert applied({key: {"chosen": trace_key(second.trace)}}) == trace_key(second.trace)
    # No finals, or a choice the log no longer holds: the log's best by hot time, as before.
    assert applied(None) == trace_key(hot_best.trace)
    assert applied({key: {"chosen": "0123456789abcdef"}}) == trace_key(hot_best.trace)
    # The key is the trace's, decisions included: stable across reads of the log.
    again = {trace_key(r.trace) for r in TuningLog.open(SMALL).database().get_all_tuning_records()}
    assert {trace_key(r.trace) for r in records} == again
