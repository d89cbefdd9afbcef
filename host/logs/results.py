"""What a tuning log says about each task: the typed per-task result (trials, failures, best latency,
GFLOPS), computed from the history (:class:`~host.logs.format.Trial`) or from the database,
and the one table that prints them.

A task is matched to the database by its workload hash (:func:`host.logs.format.workload_key`); a
session task without one is matched by its kernel's function name.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .format import Trial, database_key, hash_key, mean_run_us, read_database_rows, workload_key
from .tuninglog import TuningLog, json_database

logger = logging.getLogger(__name__)


def gflops(flops: float | None, latency_us: float | None) -> float | None:
    """The one GFLOPS formula: ``flops`` (per run of the kernel) over ``latency_us`` (microseconds);
    ``None`` when either is unknown or not positive."""
    if not flops or not latency_us or flops <= 0 or latency_us <= 0:
        return None
    return flops / (latency_us * 1e3)


class TaskState(enum.StrEnum):
    """What the build does with a task: its best record (``tuned``) or a default schedule (``fallback``)."""

    TUNED = "tuned"
    FALLBACK = "fallback"


@dataclasses.dataclass
class TaskResult:
    """The result of one tuning task so far.

    ``index`` is the session's task index (``None`` for a workload of the database the session does not
    list); ``flops`` per run of the kernel; ``trials`` counts every trial, ``failed`` those without a
    usable time; ``best_us`` is the best mean latency in microseconds (``None`` while no trial succeeded),
    ``best_trial`` the trial number that gave it (history only). ``record`` is the database's best
    ``TuningRecord`` when read from the database. ``decisions`` / ``decisions_data`` / ``decisions_note``
    describe the best record's schedule when asked for (see :func:`describe`).
    """

    index: int | None
    name: str
    weight: int = 1
    flops: float | None = None
    workload_hash: str | None = None
    trials: int = 0
    failed: int = 0
    best_us: float | None = None
    best_trial: int | None = None
    decisions: list[str] = dataclasses.field(default_factory=list)
    decisions_data: dict[str, Any] = dataclasses.field(default_factory=dict)
    decisions_note: str | None = None
    record: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def gflops(self) -> float | None:
        return gflops(self.flops, self.best_us)

    @property
    def status(self) -> TaskState:
        return TaskState.TUNED if self.best_us is not None else TaskState.FALLBACK

    @property
    def tuned(self) -> bool:
        return self.best_us is not None

    @property
    def mod(self) -> Any:
        """The workload IRModule of the best record (``None`` without one)."""
        return self.record.workload.mod if self.record is not None else None

    @property
    def function(self) -> str | None:
        """The ``global_symbol`` of the best record's workload function (tune_tir keeps the kernel's name)."""
        return function_name(self.mod) if self.record is not None else None

    def count(self, latency_us: float | None, trial: int | None = None) -> bool:
        """Count one trial (``latency_us`` ``None``: it failed). Returns whether it is the new best."""
        self.trials += 1
        if latency_us is None:
            self.failed += 1
            return False
        if self.best_us is None or latency_us < self.best_us:
            self.best_us, self.best_trial = latency_us, trial
            return True
        return False

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "weight": self.weight, "flops": self.flops,
                "workload_hash": self.workload_hash, "trials": self.trials, "failed": self.failed,
                "best_us": self.best_us, "gflops": self.gflops, "best_trial": self.best_trial,
                "status": self.status, "tuned": self.tuned, "decisions": self.decisions,
                "decisions_data": self.decisions_data, "decisions_note": self.decisions_note}

    @classmethod
    def of_task(cls, task: Any) -> "TaskResult":
        """An empty result for a task: a dict of ``session.json``'s ``tasks`` or an object with the same
        fields (``host.tuning.tasks.Task``)."""
        get = task.get if isinstance(task, dict) else (lambda name, default=None: getattr(task, name, default))
        index = get("index")
        try:
            flops = float(get("flops")) if get("flops") is not None else None
        except (TypeError, ValueError):
            flops = None
        return cls(index=index if isinstance(index, int) else None,
                   name=str(get("name") or (f"task{index}" if isinstance(index, int) else "task")),
                   weight=int(get("weight") or 1), flops=flops, workload_hash=hash_key(get("workload_hash")))


def estimated_latency_ms(results: Sequence[TaskResult]) -> float | None:
    """The model's latency the results promise: the sum of weight x best latency, in milliseconds;
    ``None`` while any task has no successful trial."""
    if not results or any(r.best_us is None for r in results):
        return None
    return sum(r.weight * (r.best_us or 0.0) for r in results) / 1000.0


def session_results(session: dict[str, Any]) -> list[TaskResult]:
    """Empty results for the tasks ``session.json`` lists, in its order."""
    out = []
    for position, task in enumerate(session.get("tasks") or []):
        if isinstance(task, dict):
            result = TaskResult.of_task(task)
            if result.index is None:
                result.index = position
            out.append(result)
    return out


def tally_trials(results: list[TaskResult], trials: Iterable[Trial]) -> list[TaskResult]:
    """Count ``trials`` into the results of their tasks (by index). A trial of a task the results do not
    hold adds a result named as the trial says. Returns ``results``."""
    by_index = {r.index: r for r in results}
    for trial in trials:
        result = by_index.get(trial.task)
        if result is None:
            result = by_index[trial.task] = TaskResult(trial.task, trial.task_name or f"task{trial.task}")
            results.append(result)
        result.count(trial.latency_us, trial.trial)
    return results


def tally_records(results: list[TaskResult], records: Iterable[Any]) -> list[TaskResult]:
    """Count MetaSchedule ``TuningRecord`` objects into the results of their tasks (by workload hash) and
    keep each task's best record in ``record``. Records of other workloads are left out. Returns ``results``."""
    by_hash = {r.workload_hash: r for r in results if r.workload_hash}
    for record in records:
        result = by_hash.get(workload_key(record.workload.mod))
        if result is not None and result.count(mean_run_us(record.run_secs)):
            result.record = record
    return results


def best_records(log: TuningLog | str | Any) -> list[TaskResult]:
    """The result of every workload of a log's database, in workload (file) order: trials and failures
    counted from the record file, the best record (lowest mean ``run_secs``, as MetaSchedule ranks them)
    from stock TVM's ``JSONDatabase``. A workload is named after its session task when ``session.json``
    lists one with the same ``workload_hash`` (then ``index`` is the task's), else after its function.

    Reads without writing. Raises :class:`TuningLogError` when there is no database or it is damaged.
    """
    log = log if isinstance(log, TuningLog) else TuningLog.open(log)
    tasks = {r.workload_hash: r for r in session_results(log.session) if r.workload_hash}
    with log.snapshot() as folder:  # the complete lines only; the database reads the same copy
        workloads, rows = read_database_rows(folder)
        db = json_database(folder)
    out: list[TaskResult] = []
    for row in workloads:
        key = database_key(row[0]) or ""
        task = tasks.get(key)
        out.append(task if task is not None else TaskResult(None, key, workload_hash=key))
    by_hash = {r.workload_hash: r for r in out}
    for workload, rec in rows:
        out[workload].count(mean_run_us(rec[1] if len(rec) > 1 else None))
    # The database object's workload order is not the file's: pair its records by hash.
    for record in db.get_all_tuning_records():
        result = by_hash.get(workload_key(record.workload.mod))
        latency = mean_run_us(record.run_secs)
        if result is None or latency is None:
            continue
        held = mean_run_us(result.record.run_secs) if result.record is not None else None
        if held is None or latency < held:
            result.record = record
    for result in out:
        if result.index is None and result.function:
            result.name = result.function
    return out


def describe(result: TaskResult) -> TaskResult:
    """Fill ``decisions`` and ``decisions_data`` from the result's best record (a trace that cannot be read
    leaves a ``decisions_note``). Returns ``result``."""
    from .decisions import decisions_dict, describe_decisions

    if result.record is None:
        return result
    try:
        result.decisions_data = decisions_dict(result.record.trace, result.mod)
        result.decisions = describe_decisions(result.decisions_data)
    except Exception as err:  # noqa: BLE001 - one unreadable trace must not cost the whole listing
        logger.warning("decisions of task %s unreadable: %s", result.name, err)
        result.decisions_note = f"the best record's trace could not be read ({err})"
    return result


def function_name(mod: Any) -> str | None:
    """The ``global_symbol`` of the (first) function of a workload IRModule, unless it is just ``main``."""
    for func in mod.functions.values():
        attrs = func.attrs
        symbol = attrs.get("global_symbol") if attrs is not None else None
        return str(symbol) if symbol and str(symbol) != "main" else None
    return None


# The columns of the results table.
RESULT_COLUMNS = ("#", "TASK", "WEIGHT", "STATUS", "TRIALS", "FAILED", "BEST us", "GFLOPS")


def results_table(results: Sequence[TaskResult], shares: Sequence[float] | None = None
                  ) -> tuple[list[list[Any]], list[str]]:
    """The one table of task results, as (rows, header) for the CLI's ``table(rows, header)``: index, name, weight,
    tuned or fallback, trials, failed, best latency (µs), GFLOPS, and with ``shares`` (one per result,
    0..1) each task's share of the model's FLOPs."""
    header = list(RESULT_COLUMNS) + (["FLOPS SHARE"] if shares is not None else [])
    rows = []
    for position, r in enumerate(results):
        row: list[Any] = [r.index if r.index is not None else "-", r.name, r.weight, r.status, r.trials, r.failed,
                          f"{r.best_us:.1f}" if r.best_us is not None else "-",
                          f"{r.gflops:.2f}" if r.gflops else "-"]
        if shares is not None:
            row.append(f"{100 * shares[position]:.1f}%")
        rows.append(row)
    return rows, header
