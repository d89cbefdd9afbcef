"""Operations on tuning logs: show the best record per task, merge two logs, export the best records."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.schema import target_to_json

from ..errors import EdgetuneError
from .tuninglog import TuningLog, now_iso

logger = logging.getLogger(__name__)


@dataclass
class TaskBest:
    index: int | None
    name: str
    weight: int | None
    flops: float | None
    trials: int
    failed: int
    best_us: float | None
    decisions: list[str]
    decisions_data: dict[str, Any]

    @property
    def gflops(self) -> float | None:
        if not self.best_us or not self.flops:
            return None
        return self.flops / (self.best_us * 1e-6) / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "weight": self.weight, "flops": self.flops,
                "trials": self.trials, "failed": self.failed, "best_us": self.best_us, "gflops": self.gflops,
                "decisions": self.decisions, "decisions_data": self.decisions_data}


def show(log_dir: str | Path) -> dict[str, Any]:
    """Per task: the best record's latency, GFLOPS and its decisions in readable form."""
    from .decisions import best_records, decisions_dict, describe_decisions

    log = TuningLog.open(log_dir)
    session = log.session
    tasks = {t.get("workload_hash"): t for t in session.get("tasks", [])}
    rows: list[TaskBest] = []
    seen: set[str] = set()
    with log.snapshot() as folder:  # the complete records only, without writing to the log
        bests = best_records(folder)
    for best in bests:
        task = tasks.get(best.workload_hash, {})
        seen.add(best.workload_hash)
        data = decisions_dict(best.record.trace, best.mod) if best.record is not None else {}
        rows.append(TaskBest(task.get("index"), task.get("name") or best.task or best.function or best.workload_hash,
                             task.get("weight"), task.get("flops"), best.trials, best.failed, best.latency_us,
                             describe_decisions(data) if data else [], data))
    for task in session.get("tasks", []):  # tasks with no record at all yet
        if task.get("workload_hash") not in seen:
            rows.append(TaskBest(task.get("index"), task.get("name"), task.get("weight"), task.get("flops"),
                                 0, 0, None, [], {}))
    rows.sort(key=lambda r: (r.index is None, r.index if r.index is not None else 0))
    return {"log": str(log.path), "model": session.get("model"), "key": session.get("key"),
            "target": session.get("target"), "budget": session.get("budget"),
            "trials_done": log.record_count(), "status": session.get("status"),
            "tasks": [r.as_dict() for r in rows]}


def _records(log: TuningLog):
    return list(log.database().get_all_tuning_records())


def merge(a: str | Path, b: str | Path, out: str | Path) -> dict[str, Any]:
    """Combine two logs of the same target into ``out`` (a new folder). Identical records are kept once.

    Raises :class:`EdgetuneError` when the targets differ or ``out`` already holds a log.
    """
    import tvm_ffi

    log_a, log_b = TuningLog.open(a), TuningLog.open(b)
    ta, tb = log_a.session.get("target"), log_b.session.get("target")
    if ta and tb and target_to_json(ta) != target_to_json(tb):
        raise EdgetuneError(f"{a} and {b} are logs of different targets ({target_to_json(ta)} vs "
                            f"{target_to_json(tb)}): records of different targets never mix")
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise EdgetuneError(f"{out_path} is not empty: give a new folder for the merged log")
    merged = TuningLog.open(out_path, create=True)
    db = merged.database()
    kept = dropped = 0
    seen: set[tuple[int, str]] = set()
    for log in (log_a, log_b):
        for record in _records(log):
            identity = (tvm_ffi.structural_hash(record.workload.mod), str(record.trace))
            if identity in seen:
                dropped += 1
                continue
            seen.add(identity)
            workload = db.commit_workload(record.workload.mod)
            from tvm.s_tir.meta_schedule.database import TuningRecord

            db.commit_tuning_record(TuningRecord(record.trace, workload, record.run_secs, record.target,
                                                 record.args_info))
            kept += 1
    session = dict(log_a.session or log_b.session)
    session.update(merged_from=[str(Path(a).resolve()), str(Path(b).resolve())], merged=now_iso(),
                   trials_done=kept, status="merged", runs=[])
    merged.session = session
    merged.save_session()
    history = []
    for log in (log_a, log_b):
        for entry in log.history():
            entry = dict(entry, source=str(log.path))
            history.append(entry)
    for i, entry in enumerate(history, 1):
        entry["trial"] = i
    if history:
        merged.append_history(history)
    return {"out": str(out_path), "records": kept, "duplicates_dropped": dropped,
            "target": session.get("target")}


def export(log_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """The best record of each workload as a new MetaSchedule JSON database (what a build needs)."""
    log = TuningLog.open(log_dir)
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise EdgetuneError(f"{out_path} is not empty: give a new folder for the export")
    exported = TuningLog.open(out_path, create=True)
    log.database().dump_pruned(exported.database())
    exported.session = dict(log.session, exported_from=str(log.path.resolve()), exported=now_iso(),
                            trials_done=exported.record_count(), status="exported", runs=[])
    exported.save_session()
    return {"out": str(out_path), "records": exported.record_count(), "target": log.session.get("target")}
