"""Which task gets the next batch of trials: a short first pass, then trials where the model's time is.

MetaSchedule's gradient scheduler gives every task one full batch before task weights count at all;
with the batch size a session can afford (budget / tasks), most of a small budget went into that
uniform pass and no task ever saw a cost-model-guided second batch. Here:

1. first pass: every task gets one short batch (the strategy trims it, see ``BudgetedStrategy``), so
   each task has a measured latency and the shared XGBoost model has data from every kernel shape (a
   task a seed's schedule was measured for before the search, in a seeded session, has both: it skips it);
2. then each batch goes to the task with the largest ``weight x best latency x room / batches so far``:
   a task's trials grow with its share of the model's time, and more so the further its kernel runs
   below the FLOP rate the model's best kernel reaches on the board (``room`` is 1 for that kernel, up
   to ``1 + ROOM_WEIGHT`` for a kernel far below it: there is time to win there, while a kernel that
   already runs near the board's best gains little from more trials). A kernel that is a tiny share of
   the model's time (below ``MIN_TIME_SHARE``) gets no more trials while a bigger one is left.
A task whose first batch failed entirely (no latency yet) is tried again before any other.

With ``overlap``, the workstation prepares the next batch (searches its candidates and builds them)
while the boards measure the current one: a batch is joined (its results recorded) only when the batch
after it has been handed out, so each choice sees every result but the one still measuring. Only for
boards that are not this machine: a build on the CPU that is timing a candidate would skew the timing.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

logger = logging.getLogger(__name__)

# A kernel carrying less than this share of the model's estimated time gets no trials after the
# first pass while a larger one can still take them: 0.5% of the time cannot repay a batch.
MIN_TIME_SHARE = 0.005
# Tasks with no successful trial yet are retried at most this many batches before they are left to
# the build's default schedule.
MAX_BATCHES_WITHOUT_RESULT = 3
# How much a kernel's distance below the model's best FLOP rate adds to its claim on trials: its time
# counts up to (1 + ROOM_WEIGHT) times. Bounded, because a kernel can be far below the best for want of
# arithmetic (a depthwise conv, a pooling: memory-bound), which no schedule changes.
ROOM_WEIGHT = 1.0


def batch_sizes(remaining: int, tasks: int, pretrained: int = 0) -> tuple[int, int]:
    """(first-pass batch, later batch) for a session with ``remaining`` trials over ``tasks`` tasks:
    the first pass takes at most half the budget, later batches are big enough to keep the build
    workers and the boards busy (16, MetaSchedule's own default is 64).

    ``pretrained``: records the cost model was trained on before the session (a seed's). When they are
    at least what the first pass would measure, the pass has done one of its two jobs already (data for
    the cost model) and keeps the other (a latency for every task) with the shortest batch, ranked by
    that model: the trials it saves go where the model's time is."""
    tasks = max(1, tasks)
    first = max(2, min(8, remaining // (2 * tasks)))
    later = max(first, min(16, remaining // tasks))
    if pretrained >= first * tasks:
        first = 2
    return first, later


def room(best_us: Sequence[float | None], flops: Sequence[float] | None, measured: Sequence[int]) -> dict[int, float]:
    """Each measured task's factor in ``[1, 1 + ROOM_WEIGHT]``: how far its kernel runs below the FLOP
    rate of the fastest kernel (per FLOP) of the model so far. 1 for a task without a FLOP count."""
    rates = {i: flops[i] / float(best_us[i]) for i in measured  # type: ignore[arg-type]
             if flops is not None and flops[i] > 0 and best_us[i]}
    top = max(rates.values(), default=0.0)
    return {i: 1.0 + ROOM_WEIGHT * (1.0 - rates[i] / top) if i in rates and top > 0 else 1.0 for i in measured}


def next_task(best_us: Sequence[float | None], weights: Sequence[float], batches: Sequence[int],
              live: Sequence[int], flops: Sequence[float] | None = None) -> int | None:
    """The index (among ``live``) that gets the next batch, per the rules above; None if none is left.

    ``best_us``: each task's best latency so far (None: no successful trial), ``weights``: how often
    the model runs it, ``batches``: batches it had in this session, ``flops``: each task's FLOPs per run
    (None: no FLOP counts, trials follow the model's time alone).
    """
    if not live:
        return None
    untouched = [i for i in live if batches[i] == 0]
    if untouched:
        return untouched[0]
    unmeasured = [i for i in live if best_us[i] is None and batches[i] < MAX_BATCHES_WITHOUT_RESULT]
    if unmeasured:
        return min(unmeasured, key=lambda i: batches[i])
    measured = [i for i in live if best_us[i] is not None]
    if not measured:
        return None
    times = {i: weights[i] * float(best_us[i]) for i in measured}  # type: ignore[arg-type]
    total = sum(times.values()) or 1.0
    worth = [i for i in measured if times[i] / total >= MIN_TIME_SHARE] or measured
    factor = room(best_us, flops, measured)
    return max(worth, key=lambda i: (times[i] * factor[i] / batches[i], -i))


def overlap_seconds(work: Sequence[tuple[float, float]], measurements: Sequence[tuple[float, float]]) -> float:
    """Seconds during which the workstation worked while at least one board was measuring: each work
    interval's intersection with the union of the measurement intervals, summed."""
    merged: list[list[float]] = []
    for start, end in sorted(measurements):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return sum(max(0.0, min(w_end, m_end) - max(w_start, m_start))
               for w_start, w_end in work for m_start, m_end in merged)


@derived_object
class WeightedScheduler(PyTaskScheduler):
    """A MetaSchedule task scheduler that follows :func:`next_task`.

    ``best_us`` is read live (the session's history callback updates it after every batch); ``after_batch``
    runs once a task's batch is joined (the session carries new best schedules over to sibling tasks
    there). With ``overlap``, one batch keeps measuring while the next is built (see the module notes).
    """

    def __init__(self, best_us, weights: Sequence[float], flops: Sequence[float] | None = None,
                 after_batch=None, overlap: bool = False, measured: Sequence[int] = ()) -> None:
        super().__init__()
        self.best_us = best_us  # callable: () -> list of each task's best latency in us, or None
        self.weights = list(weights)
        self.flops = list(flops) if flops is not None else None
        self.after_batch = after_batch  # callable(task): runs once a task's batch is measured and recorded
        self.overlap = overlap
        # Tasks in ``measured`` (a seed's schedule measured before the search) count one batch already:
        # they skip the first pass and compete for trials by their time at once.
        seeded = set(measured)
        self.batches = [1 if i in seeded else 0 for i in range(len(self.weights))]
        self.overlapped = 0  # batches handed out while another was still measuring
        # (start, end) of each batch's preparation, monotonic: from its hand-out to the next call here
        # (MetaSchedule searches its candidates, builds them and sends them to the runner in between)
        self.preparing: list[tuple[float, float]] = []
        self._handed_out_at: float | None = None
        self._running: list[int] = []  # tasks whose batch is out (built, measuring), oldest first

    def _join(self, task_id: int) -> None:
        if not self._outer().tasks_[task_id].is_terminated:  # a task with no candidates left sent none
            self.join_running_task(task_id)  # measure callbacks run here: bests are up to date
            if self.after_batch is not None:
                self.after_batch(task_id)

    def next_task_id(self) -> int:
        if self._handed_out_at is not None:
            self.preparing.append((self._handed_out_at, time.monotonic()))
            self._handed_out_at = None
        outer = self._outer()
        while len(self._running) > (1 if self.overlap else 0):
            self._join(self._running.pop(0))
        live = [i for i, task in enumerate(outer.tasks_) if not task.is_terminated]
        # A task whose batch is still out cannot have another before its results are in.
        chosen = next_task(self.best_us(), self.weights, self.batches, [i for i in live if i not in self._running],
                           self.flops)
        if chosen is None and self._running:  # nothing else to choose: wait for that batch, then choose
            self._join(self._running.pop(0))  # a join ends no task: ``live`` still holds
            chosen = next_task(self.best_us(), self.weights, self.batches, live, self.flops)
        if chosen is None:
            return -1
        self.overlapped += bool(self._running)
        self.batches[chosen] += 1
        self._running.append(chosen)
        self._handed_out_at = time.monotonic()
        return chosen
