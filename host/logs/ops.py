"""Operations on tuning logs: show the best record per task, merge two logs, export the best records."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.schema import target_to_json

from .format import Status, TuningLogError, workload_key
from .results import TaskResult, best_records, describe, session_results
from .tuninglog import TuningLog, now_iso

logger = logging.getLogger(__name__)


@dataclass
class LogSummary:
    """What `edgetune log show` prints: the log's session header and the result of every task."""

    log: str
    model: dict[str, Any] | None
    key: str | None
    target: dict[str, Any] | None
    budget: int | None
    trials_done: int
    status: Status | None
    tasks: list[TaskResult]

    def as_dict(self) -> dict[str, Any]:
        return {"log": self.log, "model": self.model, "key": self.key, "target": self.target, "budget": self.budget,
                "trials_done": self.trials_done, "status": self.status, "tasks": [t.as_dict() for t in self.tasks]}


def summarize(log_dir: str | Path) -> LogSummary:
    """Per task: trials, failures, the best record's latency, GFLOPS and its decisions in readable form.
    Tasks of the session without any record yet are listed too. Raises :class:`TuningLogError`."""
    log = TuningLog.open(log_dir)
    session = log.session
    results = [describe(r) for r in best_records(log)]
    listed = {r.workload_hash for r in results}
    results += [r for r in session_results(session) if r.workload_hash not in listed]  # nothing measured yet
    results.sort(key=lambda r: (r.index is None, r.index if r.index is not None else 0))
    return LogSummary(str(log.path), session.get("model"), session.get("key"), session.get("target"),
                      session.get("budget"), log.record_count(), log.status, results)


def show(log_dir: str | Path) -> dict[str, Any]:
    """:func:`summarize` as plain JSON data."""
    return summarize(log_dir).as_dict()


def merge(a: str | Path, b: str | Path, out: str | Path) -> dict[str, Any]:
    """Combine two logs of the same target into ``out`` (a new folder). Identical records are kept once.

    Raises :class:`TuningLogError` when the targets differ or ``out`` already holds a log.
    """
    from tvm.s_tir.meta_schedule.database import TuningRecord

    log_a, log_b = TuningLog.open(a), TuningLog.open(b)
    ta, tb = log_a.session.get("target"), log_b.session.get("target")
    if ta and tb and target_to_json(ta) != target_to_json(tb):
        raise TuningLogError(f"{a} and {b} are logs of different targets ({target_to_json(ta)} vs "
                             f"{target_to_json(tb)}): records of different targets never mix")
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise TuningLogError(f"{out_path} is not empty: give a new folder for the merged log")
    merged = TuningLog.open(out_path, create=True)
    db = merged.database()
    kept = dropped = 0
    seen: set[tuple[str, str]] = set()
    for log in (log_a, log_b):
        for record in log.database().get_all_tuning_records():
            identity = (workload_key(record.workload.mod), str(record.trace))
            if identity in seen:
                dropped += 1
                continue
            seen.add(identity)
            workload = db.commit_workload(record.workload.mod)
            db.commit_tuning_record(TuningRecord(record.trace, workload, record.run_secs, record.target,
                                                 record.args_info))
            kept += 1
    session = dict(log_a.session or log_b.session)
    session.update(merged_from=[str(Path(a).resolve()), str(Path(b).resolve())], merged=now_iso(),
                   trials_done=kept, status=Status.MERGED, runs=[])
    merged.session = session
    merged.save_session()
    history = []
    for log in (log_a, log_b):
        for entry in log.history():
            history.append(dict(entry, source=str(log.path)))
    for i, entry in enumerate(history, 1):
        entry["trial"] = i
    if history:
        merged.append_history(history)
    merged.close()
    return {"out": str(out_path), "records": kept, "duplicates_dropped": dropped,
            "target": session.get("target")}


def export(log_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """The best record of each workload as a new MetaSchedule JSON database (what a build needs).
    Raises :class:`TuningLogError` when ``out`` already holds something."""
    log = TuningLog.open(log_dir)
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise TuningLogError(f"{out_path} is not empty: give a new folder for the export")
    exported = TuningLog.open(out_path, create=True)
    log.database().dump_pruned(exported.database())
    exported.session = dict(log.session, exported_from=str(log.path.resolve()), exported=now_iso(),
                            trials_done=exported.record_count(), status=Status.EXPORTED, runs=[])
    exported.save_session()
    exported.close()
    return {"out": str(out_path), "records": exported.record_count(), "target": log.session.get("target")}
