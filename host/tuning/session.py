"""The tuning session: model in, tuning log out, measured on the boards of a key through the tracker.

Built on MetaSchedule (task extraction, design spaces, evolutionary search, XGBoost cost model, task
scheduler, JSON database); edgetune adds the warm cross-compiling builder, the multi-board runner
with deadlines, the exact budget and early stopping, resuming, transfer from another log, and the
per-trial history.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from device_agent.schema import check_key, target_to_json

from .. import config
from ..errors import AgentError, EdgetuneError
from ..logs.tuninglog import TuningLog, mean_run_secs, now_iso
from ..models.onnx_import import Model, load_onnx
from ..toolchain import check_target, toolchain_for
from ..tracker.client import TrackerAddr, servers_of_key, tracker_summary
from .strategy import STRATEGIES
from .tasks import Task, extract_tasks, log_layout_rewrite, workload_key

logger = logging.getLogger(__name__)

Event = dict[str, Any]

# Timed runs of ONNX Runtime on the board at the start of a session (its baseline).
BASELINE_RUNS = 20


@dataclass
class TuneOptions:
    model: str
    key: str
    trials: int
    log_dir: str
    tracker: TrackerAddr
    target: dict[str, Any] | None = None  # None: the board's own (from its agent), else the log's
    board: dict[str, Any] | None = None  # the board profile the target came from
    strategy: str = "xgb"
    from_log: str | None = None
    early_stopping: int | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    no_board_deadline_sec: float | None = None
    seed: int | None = None
    layout_rewrite: bool = True  # kernel form of a new log (a resumed log keeps its own)
    scheduler: str = "weighted"  # or "gradient": MetaSchedule's own, with budget / tasks trials per batch


@dataclass
class TaskSummary:
    index: int
    name: str
    weight: int
    flops: float
    trials: int = 0
    failed: int = 0
    best_us: float | None = None

    @property
    def gflops(self) -> float | None:
        if self.best_us is None or not self.flops:
            return None
        return self.flops / (self.best_us * 1e-6) / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "weight": self.weight, "flops": self.flops,
                "trials": self.trials, "failed": self.failed, "best_us": self.best_us, "gflops": self.gflops}


@dataclass
class SessionResult:
    log_dir: str
    status: str  # completed | stopped-no-board | interrupted | already-complete
    budget: int
    trials_done: int
    trials_this_run: int
    elapsed_s: float
    tasks: list[TaskSummary]
    estimated_latency_ms: float | None
    measured_by: dict[str, int]
    message: str = ""
    cost_model: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "log_dir": self.log_dir, "status": self.status, "budget": self.budget, "trials_done": self.trials_done,
            "trials_this_run": self.trials_this_run, "elapsed_s": round(self.elapsed_s, 2),
            "estimated_latency_ms": self.estimated_latency_ms, "measured_by": self.measured_by,
            "message": self.message, "cost_model": self.cost_model, "tasks": [t.as_dict() for t in self.tasks],
        }


def estimated_latency_ms(tasks: list[TaskSummary]) -> float | None:
    """Sum of weight x best latency over tasks; None while any task has no successful trial."""
    if not tasks or any(t.best_us is None for t in tasks):
        return None
    return sum(t.weight * (t.best_us or 0.0) for t in tasks) / 1000.0


class _Progress:
    """Per-task bests and the history file; shared by the measure callback and the replay step."""

    def __init__(self, log: TuningLog, tasks: list[Task], budget: int, on_event: Callable[[Event], None],
                 elapsed_before: float) -> None:
        self.log = log
        self.tasks = tasks
        self.budget = budget
        self.on_event = on_event
        self.summaries = [TaskSummary(t.index, t.name, t.weight, t.flops) for t in tasks]
        self.trial = 0
        self.started = time.monotonic()
        self.elapsed_before = elapsed_before
        self.board_of: dict[str, str] = {}

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def absorb_history(self, history: list[dict[str, Any]]) -> None:
        for entry in history:
            self.trial = max(self.trial, int(entry.get("trial", 0)))
            idx = entry.get("task")
            if isinstance(idx, int) and 0 <= idx < len(self.summaries):
                self._count(self.summaries[idx], entry.get("latency_us"))

    @staticmethod
    def _count(summary: TaskSummary, latency_us: float | None) -> None:
        summary.trials += 1
        if latency_us is None:
            summary.failed += 1
        elif summary.best_us is None or latency_us < summary.best_us:
            summary.best_us = latency_us

    def record(self, task_index: int, outcomes: list[tuple[float | None, str | None, str | None]]) -> None:
        """Append one batch of trials: (latency_s or None, error or None, board) each."""
        summary = self.summaries[task_index]
        entries = []
        for latency_s, error, board in outcomes:
            self.trial += 1
            latency_us = latency_s * 1e6 if latency_s is not None else None
            self._count(summary, latency_us)
            gflops = (summary.flops / latency_s / 1e9) if (latency_s and summary.flops) else None
            entries.append({
                "trial": self.trial, "task": task_index, "task_name": summary.name,
                "elapsed_s": round(self.elapsed(), 3), "time": now_iso(),
                "latency_us": latency_us, "gflops": gflops, "error": error, "board": board,
            })
        self.log.append_history(entries)
        self.on_event({
            "event": "trials", "done": self.trial, "budget": self.budget, "task": summary.name,
            "task_index": task_index, "batch": len(outcomes), "failed": sum(1 for o in outcomes if o[0] is None),
            "best_us": summary.best_us, "gflops": summary.gflops,
            "estimated_ms": estimated_latency_ms(self.summaries),
            "tasks_tuned": sum(1 for s in self.summaries if s.best_us is not None), "tasks": len(self.summaries),
            "elapsed_s": round(self.elapsed(), 2),
        })


def _history_callback(progress: _Progress):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class HistoryCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            outcomes = []
            for built, ran in zip(builder_results, runner_results):
                board = progress.board_of.pop(str(built.artifact_path), None) if built.artifact_path else None
                error = built.error_msg or ran.error_msg
                latency = None if error else mean_run_secs(ran.run_secs)
                outcomes.append((latency, str(error) if error else (None if latency else "no timing"), board))
            progress.record(int(task_id), outcomes)

    return HistoryCallback()


def resolve_board_target(key: str, timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The target and board profile of a phone of ``key`` recorded by `edgetune android connect`, else the
    target (and TXT record) advertised by an agent of ``key`` on mDNS, else None."""
    from ..android.phones import recorded_target
    from ..discovery.browse import browse_boards

    phone = recorded_target(key)  # a phone set up by `edgetune android connect` (plain TVM RPC, no agent)
    if phone is not None:
        return phone
    seen = browse_boards(config.DISCOVERY_SEC if timeout is None else timeout)
    records = [entry.record for entry in seen.values() if entry.record.key == key]
    if not records:
        return None
    targets = {target_to_json(r.target()) for r in records}
    if len(targets) > 1:
        logger.warning("boards of key %r advertise different targets; using %s's", key, records[0].name)
    return records[0].target(), records[0].as_dict()


def _check_boards(tracker: TrackerAddr, key: str) -> int:
    summary = tracker_summary(tracker)
    boards = len(servers_of_key(summary, key))
    if boards == 0:
        keys = sorted({s.get("key", "").split(":", 1)[-1] for s in summary.get("server_info", [])})
        raise EdgetuneError(
            f"no board is registered under key {key!r} at tracker {tracker[0]}:{tracker[1]} "
            f"(keys there: {', '.join(keys) or 'none'}): check --device, or start `edgetune-agent serve --key {key}`"
        )
    return boards


def _pretrain(cost_model, contexts, tasks: list[Task], records) -> int:
    """Train the cost model on existing records (of this log when resuming, or a similar board's)."""
    from tvm.s_tir.meta_schedule.runner import RunnerResult

    by_hash = {t.workload_hash: i for i, t in enumerate(tasks)}
    grouped: dict[int, tuple[list, list]] = {}
    for record in records:
        if mean_run_secs(record.run_secs) is None:
            continue
        idx = by_hash.get(workload_key(record.workload.mod))
        if idx is None:
            continue
        try:
            candidate = record.as_measure_candidate()
        except Exception as err:  # noqa: BLE001 - a record whose trace no longer applies is skipped
            logger.debug("skipping a record: %s", err)
            continue
        cands, results = grouped.setdefault(idx, ([], []))
        cands.append(candidate)
        results.append(RunnerResult([float(s) for s in record.run_secs], None))
    used = 0
    for idx, (cands, results) in grouped.items():
        cost_model.update(contexts[idx], cands, results)
        used += len(cands)
    return used


def _best_by_task(records, tasks: list[Task]) -> dict[int, Any]:
    by_hash = {t.workload_hash: i for i, t in enumerate(tasks)}
    best: dict[int, tuple[float, Any]] = {}
    for record in records:
        latency = mean_run_secs(record.run_secs)
        idx = by_hash.get(workload_key(record.workload.mod))
        if latency is None or idx is None:
            continue
        if idx not in best or latency < best[idx][0]:
            best[idx] = (latency, record)
    return {idx: rec for idx, (_, rec) in best.items()}


def _replay(seed_best: dict[int, Any], contexts, target, database, builder, runner, progress: _Progress,
            budget) -> int:
    """Measure the seed log's best schedule of each task on this board first (they count as trials)."""
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    replayed = 0
    for idx in sorted(seed_best):
        if budget.take(1) == 0:
            break
        record = seed_best[idx]
        ctx = contexts[idx]
        try:
            candidate = record.as_measure_candidate()
        except Exception as err:  # noqa: BLE001
            logger.debug("seed record does not apply: %s", err)
            budget.remaining += 1
            continue
        built = builder.build([BuilderInput(candidate.sch.mod, target)])[0]
        if built.error_msg:
            run_secs, error, board = None, built.error_msg, None
        else:
            ran = runner.run([RunnerInput(built.artifact_path, "cpu", candidate.args_info)])[0].result()
            board = progress.board_of.pop(str(built.artifact_path), None)
            run_secs, error = ran.run_secs, ran.error_msg
        workload = database.commit_workload(ctx.mod)
        database.commit_tuning_record(TuningRecord(candidate.sch.trace, workload, run_secs, target,
                                                   candidate.args_info))
        latency = None if error else mean_run_secs(run_secs)
        progress.record(idx, [(latency, error, board)])
        replayed += 1
    return replayed


def _measure_baseline(model: Model, options: TuneOptions, emit: Callable[[Event], None]) -> dict[str, Any]:
    """ONNX Runtime's p50 on a board of the key, the latency the tuned model has to beat. Taken before
    the build workers start, so nothing is built while the board times it. Never fails the session:
    a board without ONNX Runtime (or a plain TVM server) gives a note instead."""
    from ..bench.bench import onnxruntime_on_board
    from ..build.build import reference_io

    inputs, expected = reference_io(model)
    try:
        timing, note = onnxruntime_on_board(options.tracker, options.key, model.path, inputs, expected,
                                            BASELINE_RUNS, deadline_sec=config.TRACKER_CONNECT_SEC * 6)
    except EdgetuneError as err:
        timing, note = None, str(err)
    baseline: dict[str, Any] = ({"onnxruntime_p50_ms": round(timing.p50_ms, 4), "board": timing.board,
                                 "runtime": timing.label} if timing else {"note": note})
    emit({"event": "baseline", **baseline})
    return baseline


def _load_records(path: str | Path):
    log = TuningLog.open(path)
    return list(log.database().get_all_tuning_records()), log


def run_session(options: TuneOptions, on_event: Callable[[Event], None] | None = None) -> SessionResult:
    """Run (or resume) a tuning session. Raises :class:`EdgetuneError` on bad input before any trial;
    a session stopped by missing boards returns with ``status="stopped-no-board"`` and its log intact."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .builder import WarmBuilder
    from .intrinsics import cpu_intrinsics_only
    from .runner import BoardRunner, SessionStop
    from .scheduler import WeightedScheduler, batch_sizes
    from .strategy import Budget, BudgetedStrategy

    emit = on_event or (lambda event: None)
    if options.strategy not in STRATEGIES:
        raise EdgetuneError(f"unknown strategy {options.strategy!r}: use one of {', '.join(STRATEGIES)}")
    if options.trials <= 0:
        raise EdgetuneError("--trials must be a positive number of trials (e.g. --trials 64)")
    if options.early_stopping is not None and options.early_stopping <= 0:
        raise EdgetuneError("--early-stopping must be a positive number of trials")
    try:
        check_key(options.key)
    except AgentError as err:
        raise EdgetuneError(str(err).replace("--key", "--device")) from None

    model: Model = load_onnx(options.model, options.input_shapes)
    log = TuningLog.open(options.log_dir, create=True)
    target, board = options.target, options.board
    if target is None:
        found = resolve_board_target(options.key)
        if found is not None:
            target, board = found
        elif log.session.get("target"):
            target, board = log.session["target"], log.session.get("board")
        else:
            raise EdgetuneError(
                f"no agent of key {options.key!r} advertises its target on mDNS: pass --target JSON "
                "(for a board running plain TVM RPC) or start `edgetune-agent serve` on the board"
            )
    check_target(target)
    toolchain = toolchain_for(target)
    log.check_compatible(model.sha256, target)
    seed_records, seed_log = ([], None)
    if options.from_log:
        if Path(options.from_log).resolve() == Path(options.log_dir).resolve():
            raise EdgetuneError("--from-log is the same folder as --log: resuming needs no --from-log")
        seed_records, seed_log = _load_records(options.from_log)
    boards = _check_boards(options.tracker, options.key)

    done_before = log.record_count()
    layout_rewrite = log_layout_rewrite(log.session, done_before > 0, options.layout_rewrite)
    tasks = extract_tasks(model.mod, target, layout_rewrite)
    if not tasks:
        raise EdgetuneError(f"{model.name} has no kernels to tune for this target")
    remaining = options.trials - done_before
    history = log.history()
    elapsed_before = float(log.session.get("elapsed_s", 0.0))
    session = log.session
    session.update({
        "model": model.describe(), "key": options.key, "target": target, "board": board,
        "strategy": options.strategy, "budget": options.trials, "trials_done": done_before,
        "tasks": [t.as_dict() for t in tasks], "early_stopping": options.early_stopping,
        "layout_rewrite": layout_rewrite,
    })
    session.setdefault("runs", [])
    _close_killed_runs(session["runs"], history, done_before)
    session.setdefault("created", now_iso())
    progress = _Progress(log, tasks, options.trials, emit, elapsed_before)
    progress.absorb_history(history)
    progress.trial = max(progress.trial, done_before)
    if remaining <= 0:
        session["status"] = "completed"
        log.save_session()
        return SessionResult(str(log.path), "already-complete", options.trials, done_before, 0, 0.0,
                             progress.summaries, estimated_latency_ms(progress.summaries), {},
                             f"the log already holds {done_before} trials (budget {options.trials}): raise --trials to tune more")

    run_entry = {"started": now_iso(), "ended": None, "trials": 0, "status": "running", "boards": boards}
    session["runs"].append(run_entry)
    session["status"] = "running"
    log.save_session()
    emit({"event": "start", "model": model.name, "key": options.key, "target": target, "tasks": len(tasks),
          "budget": options.trials, "done": done_before, "boards": boards, "resumed": done_before > 0,
          "log": str(log.path)})

    cpu_intrinsics_only()
    tvm_target = tvm.target.Target(target)
    database = log.database()
    budget = Budget(remaining, options.early_stopping)
    extracted = [t.extracted for t in tasks]
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted, str(log.path), space="post-order-apply",
        strategy=BudgetedStrategy(options.strategy, budget),
        num_threads=max(1, os.cpu_count() or 1), seed=options.seed,
    )
    if options.strategy == "xgb":
        # Adaptive training (MetaSchedule's default) retrains only once the data grew by a fifth: with
        # the short batches of the first pass, retraining after every batch took about a third of the
        # search time on 2 cores.
        cost_model = ms.cost_model.XGBModel(
            extractor=ms.feature_extractor.PerStoreFeature(extract_workload=True),
            num_warmup_samples=8, num_tuning_cores=max(1, os.cpu_count() or 1),
            adaptive_training=True, tree_method="auto",
        )
    else:
        cost_model = ms.cost_model.RandomModel()
    cost_info: dict[str, Any] = {"kind": "xgb" if options.strategy == "xgb" else "none",
                                 "seeded_from": str(options.from_log) if options.from_log else None}
    if options.strategy == "xgb":
        own = list(database.get_all_tuning_records()) if done_before else []
        cost_info["pretrained_on_own"] = _pretrain(cost_model, contexts, tasks, own)
        cost_info["pretrained_on_seed"] = _pretrain(cost_model, contexts, tasks, seed_records)
        cost_info["trained_before_first_trial"] = getattr(cost_model, "booster", None) is not None
    session["cost_model"] = cost_info
    log.save_session()

    builder = WarmBuilder(toolchain)
    runner = BoardRunner(options.tracker, options.key, no_board_deadline_sec=options.no_board_deadline_sec,
                         on_event=emit, board_log=progress.board_of)
    status, message = "completed", ""
    run_start = time.monotonic()
    # Ctrl-C usually lands inside MetaSchedule's C++ loop, which hands the KeyboardInterrupt back
    # wrapped in its own error: remember that it was an interrupt.
    interrupted = threading.Event()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def _on_sigint(signum, frame):
            interrupted.set()
            raise KeyboardInterrupt

        previous_handler = signal.signal(signal.SIGINT, _on_sigint)
    try:
        if "onnxruntime_p50_ms" not in (session.get("baseline") or {}):
            session["baseline"] = _measure_baseline(model, options, emit)
            log.save_session()
        emit({"event": "warming", "what": "build workers"})
        builder.warm_up()
        if seed_records and done_before == 0:
            replayed = _replay(_best_by_task(seed_records, tasks), contexts, tvm_target, database, builder,
                               runner, progress, budget)
            cost_info["replayed_seed_best"] = replayed
        if budget.remaining > 0:
            if options.scheduler == "gradient":
                per_iter, scheduler = max(2, min(32, budget.remaining // max(1, len(tasks)))), "gradient"
            else:
                first_batch, per_iter = batch_sizes(budget.remaining, len(tasks))
                budget.first_batch = first_batch
                scheduler = WeightedScheduler(lambda: [s.best_us for s in progress.summaries], weights)
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(log.path),
                max_trials_global=budget.remaining, max_trials_per_task=budget.remaining,
                num_trials_per_iter=per_iter, builder=builder, runner=runner, database=database,
                cost_model=cost_model,
                measure_callbacks=[ms.measure_callback.AddToDatabase(), _history_callback(progress),
                                   ms.measure_callback.UpdateCostModel()],
                task_scheduler=scheduler,
            )
    except SessionStop as err:
        status, message = "stopped-no-board", str(err)
    except KeyboardInterrupt:
        status, message = "interrupted", "interrupted: run the same command again to resume"
    except Exception:  # noqa: BLE001 - a stop raised inside the tuning loop comes back wrapped
        if runner.stopped is not None:
            status, message = "stopped-no-board", str(runner.stopped)
        elif interrupted.is_set():
            status, message = "interrupted", "interrupted: run the same command again to resume"
        else:
            status = "failed"  # recorded as such in session.json; the measured records stay
            raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        builder.shutdown()
        runner.shutdown()
        trials_done = log.record_count()
        run_entry.update(ended=now_iso(), trials=trials_done - done_before, status=status)
        run_entry["early_stopped"] = list(budget.early_stopped)
        run_entry["repeats_skipped"] = budget.repeats_skipped
        session.update(trials_done=trials_done, status=status, elapsed_s=round(progress.elapsed(), 3),
                       measured_by=_merge_counts(session.get("measured_by", {}), runner.measured_by))
        log.save_session()
        log.close()  # the writer's lock goes with the session, not with this process
    if status == "completed" and trials_done < options.trials:
        message = (f"search ended after {trials_done} of {options.trials} trials "
                   + ("(early stopping)" if options.early_stopping else "(the search space is exhausted)"))
    return SessionResult(str(log.path), status, options.trials, trials_done, trials_done - done_before,
                         time.monotonic() - run_start, progress.summaries, estimated_latency_ms(progress.summaries),
                         dict(runner.measured_by), message, cost_info)


def _close_killed_runs(runs: list[dict], history: list[dict], records: int) -> None:
    """A run still marked running was killed before it could close: count its trials from the history
    (the last of them also gets records whose history line the kill cut off)."""
    killed = None
    for i, run in enumerate(runs):
        if run.get("status") != "running":
            continue
        start = run.get("started") or ""
        end = runs[i + 1].get("started") if i + 1 < len(runs) else None
        mine = [h for h in history if start <= (h.get("time") or "") and (end is None or h.get("time", "") < end)]
        run.update(status="killed", trials=len(mine), ended=mine[-1]["time"] if mine else start)
        killed = run
    if killed is not None:
        counted = sum(int(r.get("trials") or 0) for r in runs)
        killed["trials"] += max(0, records - counted)


def _merge_counts(old: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    merged = dict(old)
    for board, count in new.items():
        merged[board] = merged.get(board, 0) + count
    return merged
