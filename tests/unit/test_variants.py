"""A small kernel's two extra candidates: its best schedule on one thread, and no schedule. Each computes
what the kernel computes, the build applies whichever has the fastest record, and a session times them
only once every task has had its first batch, each once."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.conftest import HOST_TARGET
from tests.helpers_build import TINY_CNN, run_kernel, searched_schedule


@pytest.fixture(scope="module")
def tiny_tasks():
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from host.models.onnx_import import load_onnx
    from host.tuning.intrinsics import cpu_intrinsics_only
    from host.tuning.tasks import extract_tasks

    cpu_intrinsics_only()
    model = load_onnx(str(TINY_CNN))
    tasks = extract_tasks(model.mod, HOST_TARGET, True)
    contexts = [ms.TuneContext(mod=t.extracted.dispatched[0], target=tvm.target.Target(HOST_TARGET),
                               space_generator="post-order-apply", task_name=t.name, rand_state=3) for t in tasks]
    return model, tasks, contexts


def _index(tasks, name: str) -> int:
    return next(i for i, t in enumerate(tasks) if t.name == name)


def _commit(database, workload_mod, sch, secs: float, target=None) -> None:
    """A record of ``sch`` for ``workload_mod`` in ``database``, timed at ``secs``."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, database.commit_workload(workload_mod), [secs], target,
        ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))


def _parallel_loops(mod) -> int:
    return mod.script().count("T.parallel(")


def test_the_serial_form_of_a_schedule_drops_its_parallel_loops_and_computes_the_same(tiny_tasks):
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from host.logs.decisions import describe_trace
    from host.tuning.variants import serial_variant, unscheduled

    _, tasks, contexts = tiny_tasks
    for name in ("mean1", "fused_matmul_add51"):
        context = contexts[_index(tasks, name)]
        searched = searched_schedule(context, context.generate_design_space()[0])
        assert _parallel_loops(searched.mod) >= 1, name  # as the search samples it: in parallel
        serial = serial_variant(searched.trace, context.mod)
        assert serial is not None and _parallel_loops(serial.mod) == 0, name
        assert "Parallel" not in [inst.kind.name for inst in serial.trace.insts]
        # Everything else the schedule does stays (its vectorized and unrolled loops).
        assert len(serial.trace.insts) == len(searched.trace.insts) - sum(
            inst.kind.name == "Parallel" for inst in searched.trace.insts)
        # A schedule without parallel loops has no serial form of its own.
        assert serial_variant(serial.trace, context.mod) is None
        bare = unscheduled(context.mod)
        assert [i.kind.name for i in bare.trace.insts] == ["GetSBlock"] and _parallel_loops(bare.mod) == 0
        assert describe_trace(bare.trace, context.mod) == ["no schedule: TVM's default loops"]  # `log show`
        assert not any("parallel loop " in line for line in describe_trace(serial.trace, context.mod))
        assert any("parallel loop " in line for line in describe_trace(searched.trace, context.mod))
        infos = ArgInfo.from_prim_func(context.mod["main"])
        rng = np.random.default_rng(7)
        inputs = [rng.standard_normal([int(d) for d in info.shape]).astype("float32") for info in infos[:-1]]
        out_shape = [int(d) for d in infos[-1].shape]
        expected = run_kernel(searched.mod, inputs, out_shape)
        for variant in (serial, bare):
            np.testing.assert_allclose(run_kernel(variant.mod, inputs, out_shape), expected, rtol=1e-5, atol=1e-5)


def _kernel_source(executable, name: str) -> str:
    """The LLVM IR of the body of the executable's kernel ``name``."""
    text = executable.mod.imports[0].inspect_source("ll")
    start = re.search(rf"^define [^\n]*@{name}_compute_\(", text, re.M).start()
    return text[start:text.index("\n}\n", start)]


@pytest.mark.parametrize("fastest", ["searched", "unscheduled"])
def test_the_build_applies_whichever_record_is_fastest_the_unscheduled_kernel_too(tiny_tasks, fastest):
    import tvm

    from host.build.build import fallback_database
    from host.tuning.tasks import compile_tuned
    from host.tuning.variants import unscheduled

    model, tasks, contexts = tiny_tasks
    target = tvm.target.Target(HOST_TARGET)
    index = _index(tasks, "mean1")
    context = contexts[index]
    database = fallback_database([t for i, t in enumerate(tasks) if i != index], target)
    searched = searched_schedule(context, context.generate_design_space()[0])
    times = {"searched": 2e-6, "unscheduled": 3e-6 if fastest == "searched" else 1e-7}
    for name, sch in (("searched", searched), ("unscheduled", unscheduled(context.mod))):
        _commit(database, context.mod, sch, times[name], target)
    source = _kernel_source(compile_tuned(database, model.mod, target), "mean1")
    # A parallel loop is a call into the thread pool with the loop body as a closure.
    assert ("TVMBackendParallelLaunch" in source) is (fastest == "searched")


def _variants_run(tiny_tasks, best: dict[int, float], budget: int = 100, untuned: dict[int, float] | None = None):
    """A SmallKernelVariants over tiny_cnn's tasks whose measure commits each candidate with the time
    ``best`` gives its task (so it neither beats nor loses) and records what was asked."""
    from tvm.s_tir import meta_schedule as ms

    from host.tuning.variants import SmallKernelVariants

    _, tasks, contexts = tiny_tasks
    database = ms.database.MemoryDatabase()
    for i in best:
        _commit(database, contexts[i].mod, searched_schedule(contexts[i], contexts[i].generate_design_space()[0]),
                best[i] * 1e-6)
    asked: list[tuple[int, str]] = []
    state = {"first_pass_done": False, "budget": budget}

    def measure(task, sch, key, variant) -> bool:
        if state["budget"] == 0:
            return False
        state["budget"] -= 1
        asked.append((task, variant))
        return True

    bests = [best.get(i) for i in range(len(tasks))]
    variants = SmallKernelVariants(contexts, database, lambda: bests, measure, lambda: state["first_pass_done"],
                                   [(untuned or {}).get(i) for i in range(len(tasks))])
    return variants, asked, state


def test_a_session_times_each_small_kernels_candidates_once_after_the_first_pass(tiny_tasks):
    from host.tuning.variants import SERIAL, SMALL_KERNEL_US, UNSCHEDULED

    _, tasks, _ = tiny_tasks
    small = [_index(tasks, "mean1"), _index(tasks, "fused_matmul_add51")]
    large = _index(tasks, "fused_conv2d_winograd_add1_maximum1_minimum11")
    best = {small[0]: 0.6, small[1]: 0.7, large: SMALL_KERNEL_US * 2}
    variants, asked, state = _variants_run(tiny_tasks, best)
    variants.after_batch(small[0])
    assert asked == []  # the first pass is not over: its batches come first
    state["first_pass_done"] = True
    variants.after_batch(large)  # the first batch after the first pass: every small task's candidates
    assert asked == [(small[0], SERIAL), (small[0], UNSCHEDULED), (small[1], SERIAL), (small[1], UNSCHEDULED)]
    assert variants.trials == 4 and variants.improved == 0
    for task in (*small, large):  # each once: the same best schedule asks for nothing new
        variants.after_batch(task)
    assert len(asked) == 4


def test_the_unscheduled_kernel_is_no_candidate_when_its_first_timing_was_far_slower(tiny_tasks):
    from host.tuning.variants import SERIAL, UNSCHEDULED, UNSCHEDULED_WITHIN

    _, tasks, _ = tiny_tasks
    mean, dense = _index(tasks, "mean1"), _index(tasks, "fused_matmul_add51")
    # The session timed the mean without a schedule within the margin of its best, the dense layer far
    # above it (as a convolution in TVM's default loops is).
    untuned = {mean: 0.6 * UNSCHEDULED_WITHIN * 0.9, dense: 0.7 * UNSCHEDULED_WITHIN}
    variants, asked, state = _variants_run(tiny_tasks, {mean: 0.6, dense: 0.7}, untuned=untuned)
    state["first_pass_done"] = True
    variants.after_batch(mean)
    assert asked == [(mean, SERIAL), (mean, UNSCHEDULED), (dense, SERIAL)]


def test_candidates_the_log_already_holds_are_not_timed_again(tiny_tasks):
    """A resumed session: its earlier run timed the mean's candidates, so this run asks for none."""
    _, tasks, contexts = tiny_tasks
    mean = _index(tasks, "mean1")
    variants, asked, state = _variants_run(tiny_tasks, {mean: 0.6})
    for _, sch in variants.candidates(mean):
        _commit(variants.database, contexts[mean].mod, sch, 0.6e-6)
    state["first_pass_done"] = True
    variants.after_batch(mean)
    assert asked == [] and variants.trials == 0


def test_the_candidates_stop_when_the_budget_is_spent(tiny_tasks):
    _, tasks, _ = tiny_tasks
    small = [_index(tasks, "mean1"), _index(tasks, "fused_matmul_add51")]
    variants, asked, state = _variants_run(tiny_tasks, {small[0]: 0.6, small[1]: 0.7}, budget=3)
    state["first_pass_done"] = True
    variants.after_batch(small[1])
    assert len(asked) == 3 and variants.trials == 3
