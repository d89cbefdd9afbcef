"""Two candidates for a small kernel that the search never samples: its best schedule on one thread, and
no schedule at all.

Every schedule MetaSchedule's CPU rules sample runs its outer loops in parallel, so each call of the
kernel launches the board's thread pool: the workers take a slice each and the caller waits for the
last. On a 2-core x86 VM a launch costs ~0.6 us (a two-way parallel loop of 64 additions: 0.6 us; the
same loop serial: 0.014 us), and 1.5-2.3 us in stretches where its cores are slow to reach each other.
A kernel that computes in less spends most of its time launching: tiny_cnn's mean runs in 0.67 us as
tuned and in 0.07 us on one thread, its classifier in 0.73 against 0.13. Its input transpose is
fastest in TVM's default loops, without any schedule (0.79 us, against 1.54 as tuned and 1.86 as tuned
on one thread). From ~3 us up the kernel loses on one thread (tiny_cnn's 3.4 us pointwise conv: 5.0 us).

So once the first pass has measured every task, each task whose best runs in under
:data:`SMALL_KERNEL_US` gets two more candidates (and again after each later batch of it): its best
schedule with the parallel loops run serially (once for each schedule that becomes the best), and the
kernel without a schedule (once per task, unless the session's first timing of it, before any trial,
took more than :data:`UNSCHEDULED_WITHIN` times the best: tiny_cnn's convolutions run 7-34x slower in
TVM's default loops than tuned, its transpose and mean as fast or faster). They are ordinary trials:
they take budget and go into the log, the history (marked ``variant``) and the cost model, but not
into the search's early stopping, which counts its own trials. The build takes whichever candidate ran
fastest, as with any other trial.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

# A kernel whose best runs in less than this (us) gets the two candidates below: where a pool launch
# can be a large part of its time. Two trials for a kernel that cannot gain cost more than they save.
SMALL_KERNEL_US = 10.0

# The unscheduled kernel is a candidate while its one timing before the first trial is within this
# factor of the task's best (a single run: noisy, hence the margin).
UNSCHEDULED_WITHIN = 2.0

SERIAL = "serial"  # the best schedule with its parallel loops run serially
UNSCHEDULED = "unscheduled"  # the kernel as TVM builds it without a schedule


def serial_variant(trace: Any, mod: Any) -> Any | None:
    """The schedule of ``mod`` that ``trace`` makes, without its ``Parallel`` instructions (they only mark
    loops, nothing refers to their outputs), or None when the trace has none or no longer applies."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir.schedule import Trace

    insts = [inst for inst in trace.insts if inst.kind.name != "Parallel"]
    if len(insts) == len(trace.insts):
        return None
    decisions = {inst: decision for inst in insts if (decision := trace.get_decision(inst)) is not None}
    sch = Schedule(mod)
    try:
        Trace(insts, decisions).apply_to_schedule(sch, remove_postproc=False)
    except (tvm.TVMError, ValueError, RuntimeError) as err:
        logger.debug("the serial form of a schedule does not apply: %s", err)
        return None
    return sch


def unscheduled(mod: Any) -> Any:
    """``mod`` with a schedule that changes nothing: replayed by the build, it leaves TVM's default loops.
    Its one instruction looks up the kernel's root block: MetaSchedule's databases pass over a record
    whose trace is empty (``get_top_k`` never returns it, so the build would not apply it)."""
    from tvm.s_tir import Schedule

    sch = Schedule(mod)
    sch.get_sblock("root")
    return sch


class SmallKernelVariants:
    """During a search, after each batch: the candidates above for a task whose best is under
    :data:`SMALL_KERNEL_US`. ``measure(task, sch, key, variant)`` times a schedule on a board as a trial of
    the task (the caller commits it to the log and the cost model) and returns False when the budget is spent.
    ``first_pass_done()`` says whether every task has had its first batch: until then the budget goes to
    those (a short session must measure every kernel before it refines any). ``untuned_us``: each task's
    kernel without a schedule as the session timed it before its first trial (None: not timed)."""

    def __init__(self, contexts: Sequence[Any], database: Any, best_us: Callable[[], list[float | None]],
                 measure: Callable[[int, Any, int, str], bool], first_pass_done: Callable[[], bool],
                 untuned_us: Sequence[float | None] | None = None) -> None:
        self.contexts = list(contexts)
        self.untuned_us = list(untuned_us) if untuned_us is not None else [None] * len(self.contexts)
        self.database = database
        self.best_us = best_us
        self.measure = measure
        self.first_pass_done = first_pass_done
        self._started = False  # whether the first pass was over at an earlier batch
        self._tried: set[tuple[int, int]] = set()  # (task, schedule key) of the candidates timed
        self._logged: dict[int, set[str]] = {}  # task -> trace keys of its records (from earlier runs too)
        self.trials = 0
        self.improved = 0  # candidates that beat their task's best so far

    def candidates(self, task: int) -> list[tuple[str, Any]]:
        """The variants of ``task`` worth a trial now, ``(variant, schedule)``."""
        context = self.contexts[task]
        top = self.database.get_top_k(self.database.commit_workload(context.mod), 1)
        found: list[tuple[str, Any]] = []
        serial = serial_variant(top[0].trace, context.mod) if top else None
        if serial is not None:
            found.append((SERIAL, serial))
        untuned, best = self.untuned_us[task], self.best_us()[task]
        if untuned is None or best is None or untuned < UNSCHEDULED_WITHIN * best:
            found.append((UNSCHEDULED, unscheduled(context.mod)))
        return found

    def after_batch(self, task: int) -> None:
        """Called between batches, once ``task``'s batch is measured and recorded: the candidates of every
        small task when the first pass has just ended, then those of ``task``."""
        if not self.first_pass_done():
            return
        tasks = [task] if self._started else range(len(self.contexts))
        self._started = True
        for index in tasks:
            if not self._try(index):
                return

    def _in_log(self, task: int, trace: Any) -> bool:
        """Whether the log already holds a record of ``trace`` for ``task``: a resumed session's earlier
        runs timed their candidates already."""
        from .finals import trace_key

        if task not in self._logged:
            workload = self.database.commit_workload(self.contexts[task].mod)
            self._logged[task] = {trace_key(r.trace) for r in self.database.get_top_k(workload, 1 << 20)}
        return trace_key(trace) in self._logged[task]

    def _try(self, task: int) -> bool:
        """Time ``task``'s candidates not timed yet, if it is small; False once the budget is spent."""
        from .strategy import schedule_key

        best = self.best_us()[task]
        if best is None or best >= SMALL_KERNEL_US:
            return True
        for variant, sch in self.candidates(task):
            key = schedule_key(sch.mod)
            if (task, key) in self._tried or self._in_log(task, sch.trace):
                continue
            self._tried.add((task, key))
            before = self.best_us()[task]
            if not self.measure(task, sch, key, variant):
                return False
            self.trials += 1
            after = self.best_us()[task]
            if before is not None and after is not None and after < before:
                self.improved += 1
        return True
