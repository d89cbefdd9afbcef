"""Sibling tasks: the same convolution (or matmul) fused with different epilogues, tuned as two tasks.

A model runs one convolution shape in several places, and where one place adds a residual and another
does not, task extraction makes two kernels of it (resnet18's ``conv2d1_add1_relu`` and
``conv2d1_add1_add2_relu``): two searches for one loop nest, which find schedules of different quality
(at 2,000 trials, 77 against 126 GFLOPS for the two forms of one 512-channel conv). Each task's best
schedule is a candidate for its siblings:

- siblings are tasks whose reduction blocks (the convolution) have equal iteration domains and read
  buffers of equal shapes (:func:`main_signature`); the epilogues may differ;
- a schedule is carried over by its *decisions*: the sibling's own design space (which inlines its own
  epilogue) is replayed with the tile sizes, compute locations, unroll and parallel choices of the
  source schedule, when the two schedule their loop nests with the same instructions (:func:`carry_over`).

A schedule never changes what a kernel computes, so a pair wrongly taken for siblings costs a trial,
never a wrong result.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

logger = logging.getLogger(__name__)


def main_signature(mod: Any) -> tuple | None:
    """What must be equal for two kernels to share a schedule: each reduction block's iteration domain
    and the shapes of the buffers it reads, in the order the kernel runs them. None without a reduction
    (an elementwise kernel has no loop nest worth carrying over)."""
    from tvm.s_tir import Schedule
    from tvm.tirx import IterVar

    sch = Schedule(mod)
    blocks: list[tuple] = []
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(rv)
        if any(int(iv.iter_type) == IterVar.CommReduce for iv in block.iter_vars):
            blocks.append((
                tuple((int(iv.dom.min), int(iv.dom.extent), int(iv.iter_type)) for iv in block.iter_vars),
                tuple(tuple(int(d) for d in region.source.shape) for region in block.reads),
            ))
    return tuple(blocks) if blocks else None


def sibling_groups(mods: Sequence[Any]) -> dict[int, list[int]]:
    """``{task: [its siblings]}`` for the tasks (by index into ``mods``) that have any."""
    by_signature: dict[tuple, list[int]] = defaultdict(list)
    for index, mod in enumerate(mods):
        try:
            signature = main_signature(mod)
        except Exception as err:  # noqa: BLE001 - a kernel we cannot read has no siblings
            logger.debug("no signature for task %d: %s", index, err)
            signature = None
        if signature is not None:
            by_signature[signature].append(index)
    return {i: [j for j in group if j != i] for group in by_signature.values() if len(group) > 1 for i in group}


# Instructions that name a kernel's epilogue blocks and inline them: where sibling kernels differ.
EPILOGUE_KINDS = ("GetSBlock", "ComputeInline", "ReverseComputeInline")


def search_part(trace: Any) -> list[Any]:
    """A trace's instructions up to its post-processing (what the search sampled and mutated)."""
    found = []
    for inst in trace.insts:
        if inst.kind.name == "EnterPostproc":
            break
        found.append(inst)
    return found


def sampling_instructions(trace: Any) -> list[Any]:
    """The sampling instructions of a trace's search part, in order."""
    return [inst for inst in search_part(trace) if inst.kind.name.startswith("Sample")]


def _loop_nest(insts: Sequence[Any]) -> list[Any]:
    return [inst for inst in insts if inst.kind.name not in EPILOGUE_KINDS]


def _shape(insts: Sequence[Any]) -> list[tuple[str, str]]:
    return [(inst.kind.name, str(inst.attrs)) for inst in insts]


def carry_over(trace: Any, target_spaces: Sequence[Any], target_mod: Any, postprocs: Sequence[Any]) -> Any | None:
    """A schedule of ``target_mod`` that schedules its loop nest as ``trace`` (a schedule of a sibling)
    does, or None when it does not carry over.

    The target's design space whose loop-nest instructions (all but the epilogue's, see
    :data:`EPILOGUE_KINDS`) are those of the trace's search part, kind for kind, is replayed with the
    trace's decisions (tile sizes, compute locations, unroll) and its annotation values (the parallel
    and vectorize extents the search mutates); the result must pass the target's postprocessors.
    """
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir.schedule import Instruction, Trace
    from tvm.s_tir.schedule import ExprRV, LoopRV, SBlockRV

    theirs = _loop_nest(search_part(trace))
    for space in target_spaces:
        ours_all = list(space.trace.simplified(remove_postproc=True).insts)
        ours = _loop_nest(ours_all)
        if _shape(ours) != _shape(theirs):
            continue
        partner = {id(mine): other for mine, other in zip(ours, theirs)}
        insts, decisions = [], {}
        for inst in ours_all:
            other = partner.get(id(inst))
            if other is not None and inst.kind.name == "Annotate" and len(other.inputs) == 2 \
                    and not isinstance(other.inputs[1], (ExprRV, LoopRV, SBlockRV)):
                inst = Instruction(inst.kind, [inst.inputs[0], other.inputs[1]], inst.attrs, inst.outputs)
            elif other is not None and inst.kind.name.startswith("Sample"):
                decision = trace.get_decision(other)
                if decision is None:
                    break
                decisions[inst] = decision
            insts.append(inst)
        else:
            sch = Schedule(target_mod)
            try:
                Trace(insts, decisions).apply_to_schedule(sch, remove_postproc=True)
                sch.enter_postproc()  # as the search marks its candidates: the trace's search part ends here
                if all(postproc.apply(sch) for postproc in postprocs):
                    return sch
            except (tvm.TVMError, ValueError, RuntimeError) as err:
                logger.debug("a sibling's schedule does not apply: %s", err)
    return None


class SiblingTransfer:
    """During a search: when a task finds a new best schedule, carry it over to each sibling task that does
    not already run at least as fast, once per schedule. ``measure(task, sch, key, source)``
    times the schedule carried from task ``source`` on a board as a trial of ``task`` (the caller commits it to the log and
    the cost model); it returns False when the budget is spent."""

    def __init__(self, contexts: Sequence[Any], database: Any, best_us: Any, measure: Any) -> None:
        self.contexts = list(contexts)
        self.database = database
        self.best_us = best_us  # callable: () -> each task's best latency so far (µs) or None
        self.measure = measure
        self.groups = sibling_groups([c.mod for c in self.contexts])
        self._spaces: dict[int, list[Any]] = {}  # task -> its design spaces, made once
        self._carried_from: dict[int, float] = {}  # task -> its best (µs) when last carried over
        self._tried: dict[int, set[int]] = defaultdict(set)  # task -> keys of schedules carried to it
        self.trials = 0
        self.improved = 0  # carried schedules that beat their task's best so far (not its first time)

    def spaces(self, task: int) -> list[Any]:
        if task not in self._spaces:
            self._spaces[task] = list(self.contexts[task].generate_design_space())
        return self._spaces[task]

    def after_batch(self, task: int) -> None:
        """Called between batches, once ``task``'s batch is measured and recorded."""
        from .strategy import schedule_key

        if task not in self.groups:
            return
        best = self.best_us()
        if best[task] is None or best[task] >= self._carried_from.get(task, float("inf")):
            return
        self._carried_from[task] = best[task]
        context = self.contexts[task]
        top = self.database.get_top_k(self.database.commit_workload(context.mod), 1)
        if not top:
            return
        for sibling in self.groups[task]:
            if best[sibling] is not None and best[sibling] <= best[task]:
                continue
            target = self.contexts[sibling]
            sch = carry_over(top[0].trace, self.spaces(sibling), target.mod, target.space_generator.postprocs)
            if sch is None:
                continue
            key = schedule_key(sch.mod)
            if key in self._tried[sibling]:
                continue
            self._tried[sibling].add(key)
            before = self.best_us()[sibling]
            if not self.measure(sibling, sch, key, task):
                return
            self.trials += 1
            after = self.best_us()[sibling]
            if before is not None and after is not None and after < before:
                self.improved += 1
