"""Sibling tasks (one conv, two epilogues): found by their loop nests, and a schedule of one carried over
to the other computes the other's result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import HOST_TARGET
from tests.helpers_build import run_kernel, searched_schedule, twin_convs_onnx


@pytest.fixture(scope="module")
def twin_tasks(tmp_path_factory):
    from tvm.s_tir import meta_schedule as ms

    from host.models.onnx_import import load_onnx
    from host.tuning.intrinsics import cpu_intrinsics_only
    from host.tuning.tasks import extract_tasks

    cpu_intrinsics_only()
    folder = tmp_path_factory.mktemp("twins")
    model = load_onnx(twin_convs_onnx(folder / "twin.onnx"))
    tasks = extract_tasks(model.mod, HOST_TARGET, True)
    contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [t.extracted for t in tasks], str(folder / "work"), space="post-order-apply", strategy="evolutionary",
        num_threads=1, seed=3)
    return tasks, contexts


def test_one_conv_with_two_epilogues_makes_two_siblings(twin_tasks, tmp_path):
    from host.tuning.siblings import main_signature, sibling_groups

    tasks, contexts = twin_tasks
    convs = [i for i, t in enumerate(tasks) if "conv2d" in t.name]
    assert len(convs) == 2 and tasks[convs[0]].workload_hash != tasks[convs[1]].workload_hash
    assert sibling_groups([c.mod for c in contexts]) == {convs[0]: [convs[1]], convs[1]: [convs[0]]}
    assert main_signature(contexts[convs[0]].mod) == main_signature(contexts[convs[1]].mod) is not None

    # A conv of another shape (32 channels) is no sibling, though its schedule might replay on it.
    from host.models.onnx_import import load_onnx
    from host.tuning.tasks import extract_tasks

    wide_model = load_onnx(twin_convs_onnx(tmp_path / "wide.onnx", channels=32))
    wide = [t.extracted.dispatched[0] for t in extract_tasks(wide_model.mod, HOST_TARGET, True) if "conv2d" in t.name]
    assert main_signature(wide[0]) is not None
    assert main_signature(wide[0]) != main_signature(contexts[convs[0]].mod)


def _parallel_extent(trace) -> int:
    from host.tuning.siblings import search_part

    [value] = [int(inst.inputs[1]) for inst in search_part(trace)
               if inst.kind.name == "Annotate" and str(inst.attrs[0]) == "meta_schedule.parallel"]
    return value


def test_a_schedule_carried_over_makes_the_same_choices_and_computes_the_siblings_result(twin_tasks):
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from host.tuning.siblings import carry_over, sampling_instructions

    tasks, contexts = twin_tasks
    plain, residual = ([i for i, t in enumerate(tasks) if "conv2d" in t.name and "add_add" not in t.name][0],
                       [i for i, t in enumerate(tasks) if "conv2d" in t.name and "add_add" in t.name][0])
    source_spaces = contexts[plain].generate_design_space()
    target_spaces = contexts[residual].generate_design_space()
    postprocs = contexts[residual].space_generator.postprocs
    infos = ArgInfo.from_prim_func(contexts[residual].mod["main"])
    out_shape = [int(d) for d in infos[-1].shape]
    for rank, space in enumerate(source_spaces):
        sch = searched_schedule(contexts[plain], space, parallel=8 + rank)
        carried = carry_over(sch.trace, target_spaces, contexts[residual].mod, postprocs)
        assert carried is not None, f"design space {rank} did not carry over"
        ours, theirs = sampling_instructions(carried.trace), sampling_instructions(sch.trace)
        assert [i.kind.name for i in ours] == [i.kind.name for i in theirs] and len(ours) > 0
        assert [str(carried.trace.get_decision(a)) for a in ours] == [str(sch.trace.get_decision(b)) for b in theirs]
        assert _parallel_extent(carried.trace) == _parallel_extent(sch.trace) == 8 + rank
        # The carried schedule computes the residual conv exactly as the unscheduled kernel does.
        rng = np.random.default_rng(rank)
        inputs = [rng.standard_normal([int(d) for d in info.shape]).astype("float32") for info in infos[:-1]]
        np.testing.assert_allclose(run_kernel(carried.mod, inputs, out_shape),
                                   run_kernel(contexts[residual].mod, inputs, out_shape), rtol=1e-4, atol=1e-4)
    # Carried the other way as well (the residual conv's schedule on the plain one).
    back = carry_over(searched_schedule(contexts[residual], target_spaces[-1]).trace, source_spaces, contexts[plain].mod,
                      contexts[plain].space_generator.postprocs)
    assert back is not None
