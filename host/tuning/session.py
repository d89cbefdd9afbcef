"""The tuning session: model in, tuning log out, measured on the boards of a key through the tracker.

Built on MetaSchedule (task extraction, design spaces, evolutionary search, XGBoost cost model, task
scheduler, JSON database); edgetune adds the warm cross-compiling builder, the multi-board runner
with deadlines, the exact budget and early stopping, resuming, transfer from another log, and the
per-trial history. What a log holds and how it is read is :mod:`host.logs`'; this module only writes
through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from device_agent.schema import check_key, target_to_json

from .. import config
from ..errors import AgentError, EdgetuneError
from ..logs.format import Status, Trial, mean_run_secs, mean_run_us, workload_key
from ..logs.results import TaskResult, estimated_latency_ms, gflops, tally_trials
from ..logs.tuninglog import TuningLog, now_iso
from ..models.onnx_import import Model, load_onnx
from ..toolchain import check_target, toolchain_for
from ..tracker.client import TrackerAddr, servers_of_key, tracker_summary
from .strategy import STRATEGIES
from .layout import DEFAULT as DEFAULT_LAYOUT, log_layout
from .tasks import Task, extract_tasks, log_layout_rewrite
from .winograd import log_winograd
from .timing import board_llc_kib, log_times_cold

logger = logging.getLogger(__name__)

Event = dict[str, Any]

# Timed runs of ONNX Runtime on the board at the start of a session (its baseline).
BASELINE_RUNS = 20
RESUME_MESSAGE = "interrupted: run the same command again to resume"
SCHEDULERS = ("weighted", "time-share", "gradient")
# The seed's schedules of a task measured again at the start of a seeded session: its best, and the
# runners-up within a quarter of the budget (replay_order).
SEED_REPLAYS = 3


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
    layout: str = DEFAULT_LAYOUT  # the convolutions' data layout in a new log (a resumed log keeps its own)
    winograd: bool = True  # 3x3 convolutions as Winograd kernels in a new log (a resumed log keeps its own)
    # "weighted" (scheduler.next_task), "time-share" (the same without the kernels' room to improve), or
    # "gradient" (MetaSchedule's own, with budget / tasks trials per batch): the last two for A/Bs.
    scheduler: str = "weighted"
    schedules: str | None = None  # the schedule store (file or postgresql:// URL); None: EDGETUNE_SCHEDULES or default
    use_schedules: bool = True  # False (--no-schedules): neither seed from the store nor add to it
    # Time the candidates of kernels too large for the caches with cold caches, as the model runs them
    # (timing.COLD_ABOVE_BYTES); False times every candidate hot. A resumed log keeps its own.
    cold_weights: bool = True
    # At the end of a completed run, time each large kernel's best candidates against each other cold
    # and let the build use the fastest (finals.py); False for A/Bs.
    finals: bool = True
    # Build the next batch while the boards measure this one: None decides by the boards (on when none
    # of the key's boards runs on this machine, whose builds would skew its timings), True/False force it.
    overlap: bool | None = None


@dataclass
class SessionResult:
    """How a run of :func:`run_session` ended: ``status`` is one of COMPLETED, ALREADY_COMPLETE,
    STOPPED_NO_BOARD, INTERRUPTED; ``tasks`` are the results of all runs of the log together."""

    log_dir: str
    status: Status
    budget: int
    trials_done: int
    trials_this_run: int
    elapsed_s: float
    tasks: list[TaskResult]
    estimated_latency_ms: float | None
    measured_by: dict[str, int]
    message: str = ""
    cost_model: dict[str, Any] = field(default_factory=dict)
    carried_to_siblings: dict[str, int] = field(default_factory=dict)  # trials, improved (this run)
    small_kernels: dict[str, int] = field(default_factory=dict)  # trials, improved (this run; variants.py)

    def as_dict(self) -> dict[str, Any]:
        return {
            "log_dir": self.log_dir, "status": self.status, "budget": self.budget, "trials_done": self.trials_done,
            "trials_this_run": self.trials_this_run, "elapsed_s": round(self.elapsed_s, 2),
            "estimated_latency_ms": self.estimated_latency_ms, "measured_by": self.measured_by,
            "message": self.message, "cost_model": self.cost_model, "carried_to_siblings": self.carried_to_siblings,
            "small_kernels": self.small_kernels,
            "tasks": [t.as_dict() for t in self.tasks],
        }


class _Progress:
    """Per-task results and the history file; shared by the measure callback and the seed replay."""

    def __init__(self, log: TuningLog, tasks: list[Task], budget: int, on_event: Callable[[Event], None],
                 elapsed_before: float) -> None:
        self.log = log
        self.budget = budget
        self.on_event = on_event
        self.results = [TaskResult.of_task(t) for t in tasks]
        self.trial = 0
        self.started = time.monotonic()
        self.elapsed_before = elapsed_before
        self.board_of: dict[str, str] = {}

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def absorb(self, trials: list[Trial]) -> None:
        """Count the trials of earlier runs (a resumed log)."""
        tally_trials(self.results, [t for t in trials if 0 <= t.task < len(self.results)])
        self.trial = max([self.trial, *(t.trial for t in trials)])

    def record(self, task_index: int, outcomes: list[tuple[float | None, str | None, str | None]],
               carried_from: str | None = None, variant: str | None = None) -> None:
        """Append one batch of trials: (latency_s or None, error or None, board) each; ``carried_from``: the
        sibling task whose schedule they replay (see :mod:`.siblings`); ``variant``: which small-kernel
        candidate they are (see :mod:`.variants`)."""
        result = self.results[task_index]
        elapsed, now = round(self.elapsed(), 3), now_iso()  # the batch is recorded together: one time for all
        trials = []
        for latency_s, error, board in outcomes:
            self.trial += 1
            latency_us = latency_s * 1e6 if latency_s is not None else None
            result.count(latency_us, self.trial)
            trials.append(Trial(trial=self.trial, task=task_index, task_name=result.name, latency_us=latency_us,
                                gflops=gflops(result.flops, latency_us), error=error, board=board,
                                elapsed_s=elapsed, time=now, carried_from=carried_from, variant=variant))
        self.log.append_history(trials)
        self.on_event({
            "event": "trials", "done": self.trial, "budget": self.budget, "task": result.name,
            "task_index": task_index, "batch": len(outcomes), "failed": sum(1 for o in outcomes if o[0] is None),
            "best_us": result.best_us, "gflops": result.gflops,
            "estimated_ms": estimated_latency_ms(self.results),
            "tasks_tuned": sum(1 for r in self.results if r.tuned), "tasks": len(self.results),
            "elapsed_s": round(self.elapsed(), 2),
            **({"carried_from": carried_from} if carried_from else {}),
            **({"variant": variant} if variant else {}),
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


@dataclass
class _Run:
    """One run of a session: what :func:`_prepare` found, and the state its steps share."""

    options: TuneOptions
    model: Model
    log: TuningLog
    target: dict[str, Any]
    board: dict[str, Any] | None
    toolchain: Any
    tasks: list[Task]
    seed_records: list[Any]
    board_hosts: tuple[str, ...]  # the addresses the tracker listed the key's boards under at the start
    done_before: int
    progress: _Progress
    store: Any = None  # the schedule store (ScheduleStore) the run seeds from and adds to, None without one
    entry: dict[str, Any] = field(default_factory=dict)  # this run in session.json's "runs"
    budget: Any = None  # strategy.Budget, once the search is made
    replayed: set[int] = field(default_factory=set)  # tasks a seed's schedule was measured for (replay)
    started: float = field(default_factory=time.monotonic)
    trials_done: int = 0

    @property
    def boards(self) -> int:
        return len(self.board_hosts)

    @property
    def session(self) -> dict[str, Any]:
        return self.log.session

    @property
    def remaining(self) -> int:
        return self.options.trials - self.done_before


@dataclass
class _Search:
    """MetaSchedule's side of a run: tune contexts, cost model, database, builder and runner."""

    contexts: list[Any]
    weights: list[float]
    cost_model: Any
    database: Any
    tvm_target: Any
    builder: Any
    runner: Any
    cost_info: dict[str, Any]
    siblings: Any = None  # siblings.SiblingTransfer of the weighted scheduler's search, once made
    variants: Any = None  # variants.SmallKernelVariants of the weighted scheduler's search, once made
    scheduler: Any = None  # scheduler.WeightedScheduler, once made


def run_session(options: TuneOptions, on_event: Callable[[Event], None] | None = None) -> SessionResult:
    """Run (or resume) a tuning session. Raises :class:`EdgetuneError` on bad input before any trial;
    a session stopped by missing boards returns with ``status=STOPPED_NO_BOARD`` and its log intact."""
    emit = on_event or (lambda event: None)
    _check_options(options)
    run = _prepare(options, emit)  # the model, the target and the log; refuses what cannot be tuned
    if run.remaining <= 0:
        return _already_complete(run)
    _open_run(run, emit)
    status, message = Status.FAILED, ""  # recorded as such if anything unexpected stops the run
    search: _Search | None = None
    try:
        search = _make_search(run, emit)
        with _noting_interrupts() as interrupted:
            try:
                _measure_baseline(run, emit)
                emit({"event": "warming", "what": "build workers"})
                search.builder.warm_up()
                _measure_untuned(run, search, emit)
                _seed(run, search)
                _search(run, search)
                _final_choice(run, search, emit)
                status = Status.COMPLETED
            except BaseException as err:  # noqa: BLE001 - a stop is a status; anything else is re-raised
                status, message = _stop_reason(err, search.runner, interrupted)
                if status is Status.FAILED:
                    raise
    finally:
        _close_run(run, search, status)
    return _result(run, search, status, message)


# ----------------------------------------------------------------------------------------------------
# The steps of a run


def _check_options(options: TuneOptions) -> None:
    if options.strategy not in STRATEGIES:
        raise EdgetuneError(f"unknown strategy {options.strategy!r}: use one of {', '.join(STRATEGIES)}")
    if options.scheduler not in SCHEDULERS:
        raise EdgetuneError(f"unknown scheduler {options.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    if options.trials <= 0:
        raise EdgetuneError("--trials must be a positive number of trials (e.g. --trials 64)")
    if options.early_stopping is not None and options.early_stopping <= 0:
        raise EdgetuneError("--early-stopping must be a positive number of trials")
    try:
        check_key(options.key)
    except AgentError as err:
        raise EdgetuneError(str(err).replace("--key", "--device")) from None


def _prepare(options: TuneOptions, emit: Callable[[Event], None]) -> _Run:
    """Load the model, open (or resume) the log, settle the target, find the boards and the tasks, and
    write the session header. Raises :class:`EdgetuneError` before any trial; the log is closed then."""
    model: Model = load_onnx(options.model, options.input_shapes)
    log = TuningLog.open(options.log_dir, create=True)
    try:
        target, board = _target_of(options, log)
        check_target(target)
        toolchain = toolchain_for(target)
        log.check_compatible(model.sha256, target)
        seed_records: list[Any] = []
        if options.from_log:
            if Path(options.from_log).resolve() == Path(options.log_dir).resolve():
                raise EdgetuneError("--from-log is the same folder as --log: resuming needs no --from-log")
            seed_records = list(TuningLog.open(options.from_log).database().get_all_tuning_records())
        servers = _check_boards(options.tracker, options.key)
        done_before = log.record_count()
        cold_weights = log_times_cold(log.session, done_before > 0, model.weight_bytes, board, options.cold_weights)
        store = _open_store(options)
        layout_rewrite = log_layout_rewrite(log.session, done_before > 0, options.layout_rewrite)
        layout = log_layout(log.session, done_before > 0, options.layout)
        winograd = log_winograd(log.session, done_before > 0, options.winograd)
        tasks = extract_tasks(model.mod, target, layout_rewrite, layout, winograd)
        if not tasks:
            raise EdgetuneError(f"{model.name} has no kernels to tune for this target")
        if store is not None and not options.from_log and done_before == 0:
            seed_records = store.seed_records(target, cold_weights, own=[t.workload_hash for t in tasks])
        earlier = log.trials()
    except BaseException:
        log.close()
        if "store" in locals() and store is not None:
            store.close()
        raise
    session = log.session
    session.update({
        "model": model.describe(), "key": options.key, "target": target, "board": board,
        "strategy": options.strategy, "budget": options.trials, "trials_done": done_before,
        "tasks": [t.as_dict() for t in tasks], "early_stopping": options.early_stopping,
        "layout_rewrite": layout_rewrite, "layout": layout, "winograd": winograd, "cold_weights": cold_weights,
    })
    session.setdefault("runs", [])
    _close_killed_runs(session["runs"], earlier, done_before)
    session.setdefault("created", now_iso())
    progress = _Progress(log, tasks, options.trials, emit, float(session.get("elapsed_s", 0.0)))
    progress.absorb(earlier)
    progress.trial = max(progress.trial, done_before)
    if store is not None:
        session["schedules"] = {"store": _store_name(store), "seed_records": len(seed_records)
                                if not options.from_log else 0}
    hosts = tuple(str(s.get("addr", [""])[0]) for s in servers)
    return _Run(options, model, log, target, board, toolchain, tasks, seed_records, hosts, done_before, progress,
                store)


def _open_store(options: TuneOptions) -> Any:
    """The schedule store the session uses, or None (``--no-schedules``, ``EDGETUNE_SCHEDULES=off``).
    Raises :class:`EdgetuneError` (one line) when it cannot be opened."""
    from ..schedules.store import ScheduleStore, sessions_use_store

    if not options.use_schedules or (options.schedules is None and not sessions_use_store()):
        return None
    return ScheduleStore(options.schedules)


def _store_name(store: Any) -> str:
    from ..schedules.store import redact

    return redact(store.location)


def _target_of(options: TuneOptions, log: TuningLog) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The target to tune for: given, else the one a board of the key advertises, else the log's."""
    if options.target is not None:
        return options.target, options.board
    found = resolve_board_target(options.key)
    if found is not None:
        return found
    if log.session.get("target"):
        return log.session["target"], log.session.get("board")
    raise EdgetuneError(
        f"no agent of key {options.key!r} advertises its target on mDNS: pass --target JSON "
        "(for a board running plain TVM RPC) or start `edgetune-agent serve` on the board"
    )


def _already_complete(run: _Run) -> SessionResult:
    """The log already holds the budget: mark it complete and run nothing."""
    run.session["status"] = Status.COMPLETED
    _add_to_store(run)
    run.log.save_session()
    run.log.close()
    results = run.progress.results
    return SessionResult(str(run.log.path), Status.ALREADY_COMPLETE, run.options.trials, run.done_before, 0, 0.0,
                         results, estimated_latency_ms(results), {},
                         f"the log already holds {run.done_before} trials (budget {run.options.trials}): "
                         "raise --trials to tune more")


def _open_run(run: _Run, emit: Callable[[Event], None]) -> None:
    """Record the run as running in session.json and announce it."""
    overlap = run.options.overlap if run.options.scheduler != "gradient" else False  # MetaSchedule's own: never
    if overlap is None:
        from .runner import boards_elsewhere

        overlap = boards_elsewhere(run.board_hosts)
    run.entry = {"started": now_iso(), "ended": None, "trials": 0, "status": Status.RUNNING, "boards": run.boards,
                 "overlap": overlap}
    run.session["runs"].append(run.entry)
    run.session["status"] = Status.RUNNING
    run.log.save_session()
    run.started = time.monotonic()
    emit({"event": "start", "model": run.model.name, "key": run.options.key, "target": run.target,
          "tasks": len(run.tasks), "budget": run.options.trials, "done": run.done_before, "boards": run.boards,
          "resumed": run.done_before > 0, "log": str(run.log.path), "cold_weights": run.session["cold_weights"],
          "layout": run.session["layout"], "weight_mb": round(run.model.weight_bytes / 1e6, 1),
          "winograd_tasks": sum(1 for t in run.tasks if "winograd" in t.name),
          "llc_kib": board_llc_kib(run.board), "overlap": overlap})


def _make_search(run: _Run, emit: Callable[[Event], None]) -> _Search:
    """MetaSchedule's tune contexts over the log's database, the cost model, the builder and the runner."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .builder import WarmBuilder
    from .cost_model import session_xgb_model
    from .intrinsics import cpu_intrinsics_only
    from .runner import BoardRunner
    from .strategy import Budget, BudgetedStrategy

    options = run.options
    cpu_intrinsics_only()
    run.budget = Budget(run.remaining, options.early_stopping)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [t.extracted for t in run.tasks], str(run.log.path), space="post-order-apply",
        strategy=BudgetedStrategy(options.strategy, run.budget),
        num_threads=max(1, os.cpu_count() or 1), seed=options.seed,
    )
    if options.strategy == "xgb":
        # Adaptive training (MetaSchedule's default) retrains only once the data grew by a fifth: with
        # the short batches of the first pass, retraining after every batch took about a third of the
        # search time on 2 cores. The fifth counts the session's own records (cost_model.py).
        cost_model = session_xgb_model()
    else:
        cost_model = ms.cost_model.RandomModel()
    seeded_from = (str(options.from_log) if options.from_log
                   else f"schedule store {_store_name(run.store)}" if run.seed_records else None)
    cost_info: dict[str, Any] = {"kind": "xgb" if options.strategy == "xgb" else "none", "seeded_from": seeded_from}
    runner = BoardRunner(options.tracker, options.key, cold_weights=bool(run.session.get("cold_weights")),
                         no_board_deadline_sec=options.no_board_deadline_sec,
                         on_event=emit, board_log=run.progress.board_of)
    return _Search(contexts, weights, cost_model, run.log.database(), tvm.target.Target(run.target),
                   WarmBuilder(run.toolchain), runner, cost_info)


@contextlib.contextmanager
def _noting_interrupts() -> Iterator[threading.Event]:
    """Ctrl-C usually lands inside MetaSchedule's C++ loop, which hands the KeyboardInterrupt back
    wrapped in its own error: the event remembers that it was an interrupt."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def _on_sigint(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _measure_baseline(run: _Run, emit: Callable[[Event], None]) -> None:
    """ONNX Runtime's p50 on a board of the key, the latency the tuned model has to beat, once per log.
    Taken before the build workers start, so nothing is built while the board times it. Never fails the
    session: a board without ONNX Runtime (or a plain TVM server) gives a note instead."""
    from ..bench.bench import onnxruntime_on_board
    from ..build.build import reference_io

    if "onnxruntime_p50_ms" in (run.session.get("baseline") or {}):
        return
    inputs, expected = reference_io(run.model)
    try:
        timing, note = onnxruntime_on_board(run.options.tracker, run.options.key, run.model.path, inputs, expected,
                                            BASELINE_RUNS, deadline_sec=config.TRACKER_CONNECT_SEC * 6)
    except EdgetuneError as err:
        timing, note = None, str(err)
    baseline: dict[str, Any] = ({"onnxruntime_p50_ms": round(timing.p50_ms, 4), "board": timing.board,
                                 "runtime": timing.label} if timing else {"note": note})
    emit({"event": "baseline", **baseline})
    run.session["baseline"] = baseline
    run.log.save_session()


def _measure_untuned(run: _Run, search: _Search, emit: Callable[[Event], None]) -> None:
    """Each task's kernel as TVM builds it without a schedule, measured once per log on a board: the
    start of the report's convergence curve (the untuned model), from which it only falls. These are not
    trials: they take no budget and are not written to the MetaSchedule database."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    from .runner import BoardRunner

    if isinstance(run.session.get("untuned_us"), dict):
        return
    # One timed run each: an unscheduled kernel is slow (a second on a Pi for a large conv), and its
    # time only has to place the start of the curve.
    runner = BoardRunner(run.options.tracker, run.options.key, EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0),
                         no_board_deadline_sec=run.options.no_board_deadline_sec, on_event=emit,
                         board_log=run.progress.board_of)
    untuned: dict[str, float | None] = {}
    try:
        for task, context in zip(run.tasks, search.contexts):
            func = next(iter(context.mod.functions.values()))
            run_secs, error, _ = _measure_once(run, search, runner, context.mod, ArgInfo.from_prim_func(func))
            secs = None if error else mean_run_secs(run_secs)
            untuned[str(task.index)] = round(secs * 1e6, 3) if secs is not None else None
    finally:
        runner.shutdown()
    known = [t.weight * untuned[str(t.index)] for t in run.tasks if untuned[str(t.index)] is not None]
    estimate = round(sum(known) / 1e3, 3) if len(known) == len(run.tasks) else None
    emit({"event": "untuned", "estimated_ms": estimate, "tasks_measured": len(known)})
    run.session["untuned_us"] = untuned
    run.log.save_session()


def _seed(run: _Run, search: _Search) -> None:
    """Start from what is known: train the cost model on the log's own records (a resumed log) and on the
    seed's (``--from-log``, or the schedule store's), then measure the seed's best schedules of each task
    on this board (replay_order)."""
    cost_info = search.cost_info
    if run.options.strategy == "xgb":
        own = list(search.database.get_all_tuning_records()) if run.done_before else []
        cost_info["pretrained_on_own"] = _pretrain(search, run.tasks, own)
        cost_info["pretrained_on_seed"] = _pretrain(search, run.tasks, run.seed_records)
        cost_info["trained_before_first_trial"] = getattr(search.cost_model, "booster", None) is not None
    run.session["cost_model"] = cost_info
    run.log.save_session()
    if run.seed_records and run.done_before == 0:
        tops = seed_tops(run.tasks, run.seed_records, SEED_REPLAYS)
        run.progress.on_event({"event": "seeded", "source": cost_info["seeded_from"], "records": len(run.seed_records),
                     "pretrained": cost_info.get("pretrained_on_seed", 0), "tasks_matched": len(tops)})
        cost_info["replayed_seed_best"], cost_info["replayed_seed"] = _replay(tops, run, search)
        # Tasks a replay measured: they skip the search's first pass (scheduler.py).
        cost_info["first_pass_skipped"] = len(run.replayed)
        run.log.save_session()


def _pretrain(search: _Search, tasks: list[Task], records: list[Any]) -> int:
    """Train the cost model on existing records (of this log when resuming, or a similar board's)."""
    from tvm.s_tir.meta_schedule.runner import RunnerResult

    from tvm.s_tir.meta_schedule import TuneContext

    by_hash = {t.workload_hash: i for i, t in enumerate(tasks)}
    # Records of this model's tasks train under their task; records of other kernels (another model of
    # the same CPU class, from the schedule store) under a context of their own: the cost model
    # normalises times per workload, and its features describe loop nests, which carry over.
    grouped: dict[str, tuple[Any, list, list]] = {}
    for record in records:
        if mean_run_secs(record.run_secs) is None:
            continue
        key = workload_key(record.workload.mod)
        try:
            candidate = record.as_measure_candidate()
        except Exception as err:  # noqa: BLE001 - a record whose trace no longer applies is skipped
            logger.debug("skipping a record: %s", err)
            continue
        if key not in grouped:
            context = (search.contexts[by_hash[key]] if key in by_hash
                       else TuneContext(mod=record.workload.mod, target=search.tvm_target, num_threads=1))
            grouped[key] = (context, [], [])
        _, cands, results = grouped[key]
        cands.append(candidate)
        results.append(RunnerResult([float(s) for s in record.run_secs], None))
    return search.cost_model.pretrain(list(grouped.values()))


def _measure_once(run: _Run, search: _Search, runner: Any, mod: Any,
                  args_info: Any) -> tuple[list[float] | None, str | None, str | None]:
    """Build ``mod`` and time it once on a board through ``runner``, outside MetaSchedule's loop:
    (run times, error, board)."""
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    built = search.builder.build([BuilderInput(mod, search.tvm_target)])[0]
    if built.error_msg:
        return None, built.error_msg, None
    ran = runner.run([RunnerInput(built.artifact_path, "cpu", args_info)])[0].result()
    board = run.progress.board_of.pop(str(built.artifact_path), None)
    return ran.run_secs, ran.error_msg, board


def seed_tops(tasks: list[Task], records: list[Any], per_task: int) -> dict[int, list[Any]]:
    """The seed records of each task (by workload hash) worth measuring again: its ``per_task`` fastest
    distinct schedules, fastest first. ``{task index: records}``; tasks without a measured seed are left out."""
    from .finals import trace_key

    by_hash = {t.workload_hash: i for i, t in enumerate(tasks)}
    tops: dict[int, list[Any]] = {}
    seen: set[tuple[int, str]] = set()
    timed = [(secs, r) for r in records if (secs := mean_run_secs(r.run_secs)) is not None]
    for _, record in sorted(timed, key=lambda pair: pair[0]):
        index = by_hash.get(workload_key(record.workload.mod))
        if index is None or len(tops.get(index, ())) >= per_task:
            continue
        key = (index, trace_key(record.trace))
        if key not in seen:
            seen.add(key)
            tops.setdefault(index, []).append(record)
    return tops


def replay_order(tops: dict[int, list[Any]], budget: int,
                 weights: dict[int, float] | None = None,
                 untuned_us: dict[int, float | None] | None = None) -> list[tuple[int, Any]]:
    """The order the seed's schedules are measured in, ``(task, record)``: the best of every task first,
    then the runners-up rank by rank while they take no more than a quarter of ``budget`` (a task's best
    logged time is the luckiest of many noisy timings; one new timing of it regresses towards its mean, and
    the next best schedules are as likely to be the fastest here).

    Within a rank, the task whose replay can take the most off the model's time goes first: a best by
    ``weight x (untuned - seed's time)`` (what it saves over the kernel TVM builds unscheduled, which is
    what the model has until then), a runner-up by ``weight x seed's time`` (what a faster schedule can
    still save; also a best's when its untuned time is unknown). Without weights, tasks go in index order."""
    weights = weights or {}
    untuned_us = untuned_us or {}

    def saves(index: int, record: Any, best: bool) -> float:
        seed = mean_run_us(record.run_secs) or 0.0
        untuned = untuned_us.get(index)
        return weights.get(index, 1.0) * ((untuned - seed) if best and untuned else seed)

    def rank_order(rank: int) -> list[int]:
        indices = sorted(i for i, records in tops.items() if rank < len(records))
        if not weights:
            return indices
        return sorted(indices, key=lambda i: (-saves(i, tops[i][rank], rank == 0), i))

    order = [(index, tops[index][0]) for index in rank_order(0)]
    room = budget // 4
    for rank in range(1, max((len(r) for r in tops.values()), default=0)):
        for index in rank_order(rank):
            if room > 0:
                order.append((index, tops[index][rank]))
                room -= 1
    return order


def _replay(tops: dict[int, list[Any]], run: _Run, search: _Search) -> tuple[int, int]:
    """Measure the seed's best schedules of each task on this board first (they count as trials): (tasks
    whose best was measured, schedules measured)."""
    from ..schedules.store import rebind

    replayed, best_of = 0, set()
    untuned = run.session.get("untuned_us") or {}
    order = replay_order(tops, run.budget.remaining, {i: float(t.weight) for i, t in enumerate(run.tasks)},
                         {i: untuned.get(str(t.index)) for i, t in enumerate(run.tasks)})
    for idx, record in order:
        if run.budget.take(1) == 0:
            break
        # The seed's trace is rebound to this session's kernel (block names differ between models), so
        # the record committed below applies to the workload it is filed under.
        workload = search.database.commit_workload(search.contexts[idx].mod)
        try:
            candidate = rebind(record, workload).as_measure_candidate()
        except Exception as err:  # noqa: BLE001
            logger.debug("seed record does not apply: %s", err)
            run.budget.remaining += 1
            continue
        _, latency = _trial(run, search, idx, workload, candidate.sch, candidate.args_info)
        replayed += 1
        if latency is not None:
            run.replayed.add(idx)
        if record is tops[idx][0]:
            best_of.add(idx)
    return len(best_of), replayed


def _trial(run: _Run, search: _Search, task: int, workload: Any, sch: Any, args_info: Any,
           carried_from: str | None = None, variant: str | None = None) -> tuple[list[float] | None, float | None]:
    """Measure schedule ``sch`` of ``task`` on a board outside MetaSchedule's loop, as a trial of the task:
    its record into the log's database (under ``workload``), its line into the history. (run times,
    mean latency in seconds or None when it failed)."""
    from tvm.s_tir.meta_schedule.database import TuningRecord

    run_secs, error, board = _measure_once(run, search, search.runner, sch.mod, args_info)
    search.database.commit_tuning_record(TuningRecord(sch.trace, workload, run_secs, search.tvm_target, args_info))
    latency = None if error else mean_run_secs(run_secs)
    run.progress.record(task, [(latency, error, board)], carried_from=carried_from, variant=variant)
    return run_secs, latency


def _search(run: _Run, search: _Search) -> None:
    """MetaSchedule's search over the budget left, batches handed out by the weighted scheduler."""
    from tvm.s_tir import meta_schedule as ms

    from .scheduler import WeightedScheduler, batch_sizes
    from .siblings import SiblingTransfer
    from .variants import SmallKernelVariants

    budget = run.budget
    if budget.remaining <= 0:
        return
    if run.options.scheduler == "gradient":
        per_iter, scheduler = max(2, min(32, budget.remaining // max(1, len(run.tasks)))), "gradient"
    else:
        first_batch, per_iter = batch_sizes(budget.remaining, len(run.tasks),
                                            search.cost_info.get("pretrained_on_seed") or 0)
        budget.first_batch = first_batch

        def best_us() -> list[float | None]:
            return [r.best_us for r in run.progress.results]

        flops = None  # "time-share": trials by the model's time alone, no sibling transfer
        if run.options.scheduler == "weighted":
            flops = [t.flops for t in run.tasks]
            search.siblings = SiblingTransfer(search.contexts, search.database, best_us,
                                              lambda task, sch, key, source: _measure_extra(
                                                  run, search, task, sch, key, carried_from=run.tasks[source].name))
        untuned = run.session.get("untuned_us") or {}
        search.variants = SmallKernelVariants(search.contexts, search.database, best_us,
                                              lambda task, sch, key, variant: _measure_extra(
                                                  run, search, task, sch, key, variant=variant),
                                              lambda: all(search.scheduler.batches),
                                              [untuned.get(str(t.index)) for t in run.tasks])

        def after_batch(task: int) -> None:
            if search.siblings is not None:
                search.siblings.after_batch(task)
            search.variants.after_batch(task)

        # A task the seed's replay measured has what the first pass gives (a latency, the cost model's
        # data on its kernel): its trials go where the model's time is from the start.
        scheduler = WeightedScheduler(best_us, search.weights, flops, after_batch, overlap=run.entry["overlap"],
                                      measured=run.replayed)
        search.scheduler = scheduler
    ms.tune_tasks(
        tasks=search.contexts, task_weights=search.weights, work_dir=str(run.log.path),
        max_trials_global=budget.remaining, max_trials_per_task=budget.remaining,
        num_trials_per_iter=per_iter, builder=search.builder, runner=search.runner, database=search.database,
        cost_model=search.cost_model,
        measure_callbacks=[ms.measure_callback.AddToDatabase(), _history_callback(run.progress),
                           ms.measure_callback.UpdateCostModel()],
        task_scheduler=scheduler,
    )


def _measure_extra(run: _Run, search: _Search, task: int, sch: Any, key: int, carried_from: str | None = None,
                   variant: str | None = None) -> bool:
    """Time a schedule the search did not sample as a trial of ``task`` (one carried over from the sibling
    task ``carried_from``, or a small-kernel ``variant``): into the log, the history and the cost model,
    and marked measured for the task's search. False when the budget is spent."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import RunnerResult
    from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate

    if run.budget.take(1) == 0:
        return False
    context = search.contexts[task]
    args_info = ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    run_secs, latency = _trial(run, search, task, search.database.commit_workload(context.mod), sch, args_info,
                               carried_from=carried_from, variant=variant)
    if latency is not None and run.options.strategy == "xgb":
        search.cost_model.update(context, [MeasureCandidate(sch, args_info)],
                                 [RunnerResult([float(s) for s in run_secs], None)])
    strategy = run.budget.strategies.get(run.tasks[task].name)
    if strategy is not None:
        strategy.measured.add(key)
    return True


def _final_choice(run: _Run, search: _Search, emit: Callable[[Event], None]) -> None:
    """The end of a completed run: each large kernel's best candidates by their logged time (its
    finalists) timed against each other on a board as the model runs them, after a cache flush; the
    fastest is the one ``build`` uses (finals.py). Not trials: no budget, no record; kept in
    session.json's ``finals``. A kernel whose finalists cannot be timed keeps its logged best."""
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from .finals import FINAL_ROUNDS, FINALISTS, choose, final_evaluator, median_us, trace_key
    from .runner import BoardRunner
    from .timing import COLD, kernel_timing

    if not run.options.finals:
        return
    runner = BoardRunner(run.options.tracker, run.options.key, no_board_deadline_sec=run.options.no_board_deadline_sec,
                         on_event=emit, board_log=run.progress.board_of)
    finals: dict[str, Any] = {}
    timed = changed = 0
    try:
        for task, context in zip(run.tasks, search.contexts):
            top = search.database.get_top_k(search.database.commit_workload(context.mod), FINALISTS)
            if len(top) < 2 or kernel_timing(True, [a.as_json() for a in top[0].args_info]) != COLD:
                continue
            candidates = [record.as_measure_candidate() for record in top]
            built = search.builder.build([BuilderInput(c.sch.mod, search.tvm_target) for c in candidates])
            inputs = [RunnerInput(b.artifact_path, "cpu", c.args_info) for b, c in zip(built, candidates)
                      if not b.error_msg]
            try:
                rounds = iter(runner.time_interleaved(inputs, final_evaluator(), FINAL_ROUNDS))
            except EdgetuneError as err:  # no board, or it stopped answering: the trials are all in the log
                logger.warning("finals stopped after %d kernels: %s; the others build with their logged best",
                               len(finals), err)
                emit({"event": "finals-stopped", "reason": str(err)})
                break
            finalists = [{"key": trace_key(record.trace), "logged_us": mean_run_us(record.run_secs),
                          "cold_us": None if b.error_msg else median_us(next(rounds))}
                         for record, b in zip(top, built)]
            timed += len(inputs)
            best = choose(finalists)
            if best is not None:
                changed += best is not finalists[0]
                finals[task.workload_hash] = {"task": task.name, "chosen": best["key"], "finalists": finalists}
    finally:
        runner.shutdown()
    run.session["finals"] = finals
    run.entry["finals"] = {"tasks": len(finals), "timed": timed, "changed": changed}
    run.log.save_session()
    emit({"event": "finals", "tasks": len(finals), "timed": timed, "changed": changed})


def _stop_reason(err: BaseException, runner: Any, interrupted: threading.Event) -> tuple[Status, str]:
    """What stopped the run: no board (a SessionStop, also when it comes back wrapped by MetaSchedule's
    loop), Ctrl-C, or anything else (FAILED: the caller re-raises it)."""
    from .runner import SessionStop

    if isinstance(err, SessionStop):
        return Status.STOPPED_NO_BOARD, str(err)
    if isinstance(err, KeyboardInterrupt):
        return Status.INTERRUPTED, RESUME_MESSAGE
    if isinstance(err, Exception):
        if runner.stopped is not None:
            return Status.STOPPED_NO_BOARD, str(runner.stopped)
        if interrupted.is_set():
            return Status.INTERRUPTED, RESUME_MESSAGE
    return Status.FAILED, ""


def _close_run(run: _Run, search: _Search | None, status: Status) -> None:
    """Stop the workers, write how the run ended into session.json, and release the log's writer lock
    (it goes with the session, not with this process)."""
    measured_by: dict[str, int] = {}
    if search is not None:
        search.builder.shutdown()
        search.runner.shutdown()
        measured_by = search.runner.measured_by
        if search.siblings is not None:
            run.entry["carried_to_siblings"] = {"trials": search.siblings.trials, "improved": search.siblings.improved}
        if search.variants is not None:
            run.entry["small_kernels"] = {"trials": search.variants.trials, "improved": search.variants.improved}
        if hasattr(search.cost_model, "trainings"):
            run.entry["cost_model_trainings"] = search.cost_model.trainings
        if search.scheduler is not None:
            from .scheduler import overlap_seconds

            # How long the workstation prepared the next batch (search and build) while a board measured
            # (0 without overlap): what working ahead saved in this run.
            run.entry["overlapped_batches"] = search.scheduler.overlapped
            run.entry["prepared_while_measuring_s"] = round(
                overlap_seconds(search.scheduler.preparing, search.runner.busy), 2)
    run.trials_done = run.log.record_count()
    run.entry.update(ended=now_iso(), trials=run.trials_done - run.done_before, status=status)
    if run.budget is not None:
        run.entry["early_stopped"] = list(run.budget.early_stopped)
        run.entry["repeats_skipped"] = run.budget.repeats_skipped
    run.session.update(trials_done=run.trials_done, status=status, elapsed_s=round(run.progress.elapsed(), 3),
                       measured_by=_merge_counts(run.session.get("measured_by", {}), measured_by))
    _add_to_store(run)
    run.log.save_session()
    run.log.close()


def _add_to_store(run: _Run) -> None:
    """Add the log's records to the schedule store (every run, whatever its status: the store skips what
    it has). A store that fails here costs a warning, never the session: the log holds every record."""
    if run.store is None:
        return
    try:
        added = run.store.import_log(run.log.path, source=f"{run.options.key}:{run.log.path.resolve()}").added
        run.session.setdefault("schedules", {"store": _store_name(run.store)})["added"] = added
    except Exception as err:  # noqa: BLE001 - see above
        logger.warning("could not add the session's records to the schedule store %s: %s "
                       "(`edgetune schedules import %s` adds them later)", _store_name(run.store), err, run.log.path)
    finally:
        run.store.close()


def _result(run: _Run, search: _Search, status: Status, message: str) -> SessionResult:
    if status is Status.COMPLETED and run.trials_done < run.options.trials:
        message = (f"search ended after {run.trials_done} of {run.options.trials} trials "
                   + ("(early stopping)" if run.options.early_stopping else "(the search space is exhausted)"))
    results = run.progress.results
    return SessionResult(str(run.log.path), status, run.options.trials, run.trials_done,
                         run.trials_done - run.done_before, time.monotonic() - run.started, results,
                         estimated_latency_ms(results), dict(search.runner.measured_by), message, search.cost_info,
                         dict(run.entry.get("carried_to_siblings") or {}), dict(run.entry.get("small_kernels") or {}))


# ----------------------------------------------------------------------------------------------------
# Helpers


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


def _check_boards(tracker: TrackerAddr, key: str) -> list[dict[str, Any]]:
    """The boards registered under ``key`` (the tracker's entries); raises when there is none."""
    summary = tracker_summary(tracker)
    servers = servers_of_key(summary, key)
    if not servers:
        keys = sorted({s.get("key", "").split(":", 1)[-1] for s in summary.get("server_info", [])})
        raise EdgetuneError(
            f"no board is registered under key {key!r} at tracker {tracker[0]}:{tracker[1]} "
            f"(keys there: {', '.join(keys) or 'none'}): check --device, or start `edgetune-agent serve --key {key}`"
        )
    return servers


def _close_killed_runs(runs: list[dict], trials: list[Trial], records: int) -> None:
    """A run still marked running was killed before it could close: count its trials from the history
    (the last of them also gets records whose history line the kill cut off)."""
    killed = None
    for i, run in enumerate(runs):
        if Status.parse(run.get("status")) is not Status.RUNNING:
            continue
        start = run.get("started") or ""
        end = runs[i + 1].get("started") if i + 1 < len(runs) else None
        mine = [t for t in trials if start <= (t.time or "") and (end is None or (t.time or "") < end)]
        run.update(status=Status.KILLED, trials=len(mine), ended=mine[-1].time if mine else start)
        killed = run
    if killed is not None:
        counted = sum(int(r.get("trials") or 0) for r in runs)
        killed["trials"] += max(0, records - counted)


def _merge_counts(old: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    merged = dict(old)
    for board, count in new.items():
        merged[board] = merged.get(board, 0) + count
    return merged
