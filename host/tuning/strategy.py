"""Search strategies wrapped with a session-wide trial budget and per-task early stopping.

MetaSchedule checks its global trial budget only before a batch is generated, so a session can
overshoot by a batch; and it has no early stopping. Both are enforced here, around MetaSchedule's
own strategies (evolutionary search guided by the cost model, or uniform replay of the space), by
trimming or ending each task's batches. A schedule is measured once per log: MetaSchedule remembers
what it measured only within one run, so a resumed session (whose cost model ranks the log's best
schedules highest) would measure them again; candidates already in the log, or twice in a batch, are
dropped here. Everything else is the wrapped strategy's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.search_strategy import (
    EvolutionarySearch,
    MeasureCandidate,
    PySearchStrategy,
    ReplayTrace,
    SearchStrategy,
)

STRATEGIES = ("xgb", "random")

# After this many batches in a row made only of schedules measured before, a task counts as exhausted.
MAX_REPEATED_BATCHES = 4


def schedule_key(mod) -> int:
    """Identity of a scheduled module (MetaSchedule's own "measured" check is structural too)."""
    import tvm_ffi

    return tvm_ffi.structural_hash(mod)


def replayed_key(record, postprocs) -> int | None:
    """The key the search gives the schedule of ``record`` when it proposes it again, or None if it
    no longer applies. The search builds a candidate by replaying a trace without its post-processing
    and then running the task's postprocessors; replaying the whole recorded trace
    (``TuningRecord.as_measure_candidate``) gives a module that is equivalent but hashes differently
    whenever a postprocessor rewrote a layout (``RewriteLayout``), so it is keyed the search's way."""
    from tvm.s_tir import Schedule

    sch = Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=True)
    if not all(postproc.apply(sch) for postproc in postprocs):
        return None
    return schedule_key(sch.mod)


def measured_schedules(database, workload_mod, postprocs) -> set[int]:
    """Keys of the schedules of ``workload_mod`` that ``database`` already holds (measured or failed),
    as the search would key them (see :func:`replayed_key`)."""
    from .tasks import workload_key

    wanted = workload_key(workload_mod)
    keys: set[int] = set()
    for record in database.get_all_tuning_records():
        if workload_key(record.workload.mod) != wanted:
            continue
        try:
            key = replayed_key(record, postprocs)
        except Exception:  # noqa: BLE001 - a record whose trace no longer applies cannot come back
            continue
        if key is not None:
            keys.add(key)
    return keys


@dataclass
class Budget:
    """Trials the whole session may still hand out, shared by every task's strategy."""

    remaining: int
    early_stopping: int | None = None
    first_batch: int | None = None  # trials of each task's first batch (the scheduler's short first pass)
    early_stopped: list[str] = field(default_factory=list)  # names of tasks stopped for no improvement
    repeats_skipped: int = 0  # candidates dropped because the log (or their batch) already had them
    lock: threading.Lock = field(default_factory=threading.Lock)
    strategies: dict[str, "BudgetedStrategy"] = field(default_factory=dict)  # each task's, by task name

    def take(self, wanted: int) -> int:
        with self.lock:
            granted = max(0, min(wanted, self.remaining))
            self.remaining -= granted
            return granted


# The evolutionary search runs on the workstation before every batch, and with the weighted
# scheduler's batches of 8-16 trials it is most of a session's time: profiled on mobilenet_v2 (160
# trials, population 128, 4 genetic rounds), 73% of the session was spent generating candidates, a
# third of that extracting features for the cost model. MetaSchedule's defaults (512, 4) are sized
# for 64-trial batches. Measured here, quiet, at equal trials (bench/latency.py's models):
#   population, rounds   mobilenet_v2 160 trials      tiny_cnn 256 trials
#   128, 4               30.4 trials/min, est 22.7 ms  71.1 trials/min, est 0.318 ms
#   64, 2                56.6 trials/min, est 20.8 ms  107.1 trials/min, est 0.331 ms
# The cost model still ranks 64 mutants per round; the estimates differ by less than one seed's noise.
SEARCH_POPULATION = 64
SEARCH_GENETIC_ITERS = 2


def make_inner(strategy: str) -> SearchStrategy:
    if strategy == "xgb":
        return EvolutionarySearch(population_size=SEARCH_POPULATION, init_min_unmeasured=32,
                                  genetic_num_iters=SEARCH_GENETIC_ITERS)
    if strategy == "random":
        return ReplayTrace()
    raise ValueError(strategy)


@derived_object
class BudgetedStrategy(PySearchStrategy):
    """Wraps a MetaSchedule strategy: trims batches to the shared budget, stops a task early."""

    def __init__(self, strategy: str, budget: Budget, inner: SearchStrategy | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.budget = budget
        self.inner = inner if inner is not None else make_inner(strategy)
        self.best: float | None = None
        self.since_improvement = 0
        self.stopped_early = False
        self.task_name = ""
        self.mod = None
        self.postprocs: list = []
        self.measured: set[int] = set()
        self.duplicates_dropped = 0
        self.batches = 0

    def _initialize_with_tune_context(self, context) -> None:
        self.task_name = str(context.task_name)
        self.budget.strategies[self.task_name] = self
        self.mod = context.mod
        self.postprocs = list(context.space_generator.postprocs or []) if context.space_generator else []
        self.inner._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.measured = (measured_schedules(database, self.mod, self.postprocs)
                         if database is not None and self.mod is not None else set())
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self) -> list[MeasureCandidate] | None:
        if self.stopped_early:
            return None
        for _ in range(MAX_REPEATED_BATCHES):
            candidates = self.inner.generate_measure_candidates()
            if not candidates:
                return None
            fresh = self._unmeasured(candidates)
            if fresh:
                break
            self.inner.notify_runner_results([], [])  # nothing measured; the inner search goes on
        else:
            return None
        wanted = len(fresh)
        if self.batches == 0 and self.budget.first_batch:
            wanted = min(wanted, self.budget.first_batch)
        granted = self.budget.take(wanted)
        if granted == 0:
            return None
        self.batches += 1
        fresh = fresh[:granted]
        self.measured.update(key for key, _ in fresh)
        return [candidate for _, candidate in fresh]

    def _unmeasured(self, candidates) -> list[tuple[int, MeasureCandidate]]:
        fresh: list[tuple[int, MeasureCandidate]] = []
        seen = set(self.measured)
        for candidate in candidates:
            key = schedule_key(candidate.sch.mod)
            if key in seen:
                self.duplicates_dropped += 1
                with self.budget.lock:
                    self.budget.repeats_skipped += 1
                continue
            seen.add(key)
            fresh.append((key, candidate))
        return fresh

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.inner.notify_runner_results(measure_candidates, results)
        for result in results:
            secs = [float(s) for s in result.run_secs] if result.run_secs is not None else None
            latency = sum(secs) / len(secs) if secs else None
            if latency is not None and (self.best is None or latency < self.best):
                self.best = latency
                self.since_improvement = 0
            else:
                self.since_improvement += 1
        limit = self.budget.early_stopping
        if limit is not None and self.best is not None and self.since_improvement >= limit and not self.stopped_early:
            self.stopped_early = True
            with self.budget.lock:
                self.budget.early_stopped.append(self.task_name)

    def clone(self) -> SearchStrategy:
        return BudgetedStrategy(self.strategy, self.budget, self.inner.clone())
