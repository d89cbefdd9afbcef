"""What a report shows, read from a tuning log through :mod:`host.logs`.

Sources, in order of preference:

- edgetune's history (one trial per line, failed ones included) with the session's tasks (weights, FLOPs);
- MetaSchedule's database alone (a stock work dir, or a session whose history is missing): trials in the
  order of the record file, one task per workload the session does not name, named after the workload
  function's ``global_symbol``, FLOPs estimated from its TIR, weight 1.

The estimated model latency after a trial is the sum over tasks of weight x best latency of the task so
far; it is known only once every task has a successful trial.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from host.errors import EdgetuneError
from host.logs.format import (
    RECORD_FILE,
    SESSION_FILE,
    Trial,
    TuningLogError,
    database_key,
    mean_run_us,
    read_database_rows,
)
from host.logs.results import (
    TaskResult,
    best_records,
    describe,
    function_name,
    gflops,
    session_results,
    tally_trials,
)
from host.logs.tuninglog import TuningLog

logger = logging.getLogger(__name__)

# The best record's latency may differ from the history's best trial by this share before the report
# says that the decisions shown are of another measurement (the database keeps each record's own time).
DIFFERS_SHARE = 0.05


class ReportError(EdgetuneError):
    """A report could not be made from a tuning log."""


@dataclasses.dataclass
class ReportLog:
    """A tuning log as the report reads it: ``source`` is ``history`` or ``database``; ``tasks`` hold each
    task's result over ``trials`` (in measurement order)."""

    path: Path
    source: str
    session: dict[str, Any]
    tasks: list[TaskResult]
    trials: list[Trial]

    @property
    def failed(self) -> int:
        return sum(1 for t in self.trials if t.failed)

    def onnxruntime_ms(self) -> float | None:
        """ONNX Runtime's p50 on the board, measured at the start of the session (None if it was not)."""
        value = (self.session.get("baseline") or {}).get("onnxruntime_p50_ms")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def no_trials(log_dir: Path) -> ReportError:
    return ReportError(
        f"{log_dir} has no measured trials yet: run `edgetune tune MODEL --device KEY --trials N "
        f"--log {log_dir}` first (or point `edgetune report` at a tuning log directory)"
    )


def load(log_dir: Path) -> ReportLog:
    """Read the log in ``log_dir`` (never writing to it), with the decisions of each task's best record.
    Raises :class:`ReportError` when there is nothing to report, :class:`TuningLogError` when it is damaged."""
    if not log_dir.is_dir():
        raise ReportError(f"{log_dir} is not a directory: give the --log DIR of a tuning session")
    if not (log_dir / SESSION_FILE).exists() and not (log_dir / RECORD_FILE).exists():
        raise no_trials(log_dir)
    log = TuningLog.open(log_dir)
    trials = log.trials()
    data = _from_history(log, trials) if trials else _from_database(log)
    if not data.trials:
        raise no_trials(log_dir)
    _add_decisions(log, data)
    return data


def _from_history(log: TuningLog, trials: list[Trial]) -> ReportLog:
    tasks = tally_trials(session_results(log.session), trials)
    tasks.sort(key=lambda t: t.index if t.index is not None else -1)
    flops = {t.index: t.flops for t in tasks}
    for trial in trials:
        if trial.gflops is None:
            trial.gflops = gflops(flops.get(trial.task), trial.latency_us)
    return ReportLog(log.path, "history", log.session, tasks, trials)


def _from_database(log: TuningLog) -> ReportLog:
    with log.snapshot() as folder:  # the complete lines only
        workloads, rows = read_database_rows(folder)
    # Session tasks keep their index and name; workloads the session does not know become extra tasks.
    tasks = session_results(log.session)
    by_hash = {t.workload_hash: t for t in tasks if t.workload_hash}
    task_of_workload: list[TaskResult] = []
    extra: list[TaskResult] = []
    next_index = max((t.index for t in tasks if t.index is not None), default=-1) + 1
    for position, row in enumerate(workloads):
        key = database_key(row[0])
        known = by_hash.get(key or "")
        if known is None:
            name, flops = _workload_name_and_flops(row, position)
            known = TaskResult(next_index, name, flops=flops, workload_hash=key)
            next_index += 1
            extra.append(known)
        task_of_workload.append(known)
    names = [t.name for t in extra]
    for t in extra:  # two workloads of one function (other shapes) must stay apart in the table
        if names.count(t.name) > 1:
            t.name = f"{t.name}#{t.index}"
    tasks += extra
    trials = []
    for number, (position, rec) in enumerate(rows, start=1):
        task = task_of_workload[position]
        latency = mean_run_us(rec[1] if len(rec) > 1 else None)
        trials.append(Trial(trial=number, task=task.index if task.index is not None else -1, task_name=task.name,
                            latency_us=latency, gflops=gflops(task.flops, latency),
                            error=None if latency is not None else "no run time in the record (the measurement failed)"))
    tally_trials(tasks, trials)
    return ReportLog(log.path, "database", log.session, tasks, trials)


def _workload_name_and_flops(row: Any, index: int) -> tuple[str, float | None]:
    """A stock work dir names no tasks: use the workload function's global_symbol and estimate its FLOPs."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        mod = ms.database.Workload.from_json(row).mod
    except Exception as err:  # noqa: BLE001 - an unreadable workload still has trials worth plotting
        logger.warning("workload %d of the database does not load (%s)", index, err)
        return f"workload{index}", None
    name = function_name(mod) or f"workload{index}"
    try:
        flops = float(estimate_tir_flops(mod))
    except Exception as err:  # noqa: BLE001 - FLOPs are optional: the plot falls back to latency
        logger.debug("no FLOP estimate for workload %d (%s)", index, err)
        flops = None
    return name, flops


def _add_decisions(log: TuningLog, data: ReportLog) -> None:
    """The decisions of each task's best record in the database, matched by workload hash (or, for a
    session task without one, by its kernel's name)."""
    try:
        best = [b for b in best_records(log) if b.record is not None]
    except TuningLogError as err:
        logger.info("no decisions: %s", err)
        best = []
    by_hash = {b.workload_hash: b for b in best}
    by_function = {b.function: b for b in best if b.function}
    for task in data.tasks:
        found = by_hash.get(task.workload_hash or "")
        if found is None and task.workload_hash is None:
            found = by_function.get(task.name)
        if found is None:
            if task.tuned:
                task.decisions_note = "no record of this task in the database (no workload hash matched)"
            continue
        describe(found)
        task.decisions, task.decisions_data, task.decisions_note = (found.decisions, found.decisions_data,
                                                                    found.decisions_note)
        top = task.best_us
        if top is not None and found.best_us is not None and abs(found.best_us - top) > DIFFERS_SHARE * top:
            task.decisions_note = (f"decisions of the database's best record ({found.best_us:.1f} µs), which "
                                   "differs from the best trial of the history")


def untuned_us(data: ReportLog) -> dict[int, float]:
    """Each task's kernel without a schedule, as the session measured it before its first trial (µs)."""
    raw = data.session.get("untuned_us")
    if not isinstance(raw, dict):
        return {}
    out = {}
    for key, value in raw.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and str(key).isdigit():
            out[int(key)] = float(value)
    return out


def estimate_curve(data: ReportLog) -> tuple[list[int], list[float], list[bool]]:
    """Per trial: estimated model latency (ms) from the best latencies so far, and whether it is complete.
    When the session measured every task's untuned kernel, the curve starts at trial 0 with the untuned
    model and every task's best starts there, so the curve only falls."""
    best: dict[int, float] = untuned_us(data)
    weights = {t.index: t.weight for t in data.tasks}
    xs, ys, complete = [], [], []
    if best and all(t.index in best for t in data.tasks):
        xs.append(0)
        ys.append(sum(weights.get(k, 1) * v for k, v in best.items()) / 1e3)
        complete.append(True)
    for trial in data.trials:
        if trial.latency_us is not None:
            held = best.get(trial.task)
            if held is None or trial.latency_us < held:
                best[trial.task] = trial.latency_us
        if not best:
            continue
        xs.append(trial.trial)
        ys.append(sum(weights.get(k, 1) * v for k, v in best.items()) / 1e3)
        complete.append(all(t.index in best for t in data.tasks))
    return xs, ys, complete
