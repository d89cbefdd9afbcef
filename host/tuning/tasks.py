"""Tuning tasks of a model for a board's target: one per distinct fused kernel, with its weight."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..logs.format import kernel_form, workload_key  # the key a tuning log gives a workload; re-exported for tuning
from .winograd import FUSED
from .layout import DEFAULT as DEFAULT_LAYOUT, convert_layout

logger = logging.getLogger(__name__)


@dataclass
class Task:
    """One tuning task: a distinct fused kernel and how often the model runs it."""

    index: int
    name: str
    flops: float
    weight: int
    workload_hash: str
    extracted: Any = None  # tvm ExtractedTask

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "flops": self.flops, "weight": self.weight,
                "workload_hash": self.workload_hash}


def lower_for_tuning(mod, target, layout_rewrite: bool = True, layout: str = DEFAULT_LAYOUT,
                     winograd: bool | str = FUSED):
    """The Relax module at the point where the tuning log is applied: the convolutions in ``layout``
    (see :mod:`.layout`), library dispatch, LegalizeOps (with ``winograd``, 3x3 NHWC convolutions as
    Winograd kernels of that form: see :mod:`.winograd`), AnnotateTIROpPattern, FoldConstant, FuseOps,
    FuseTIR. Extracting tasks from the same form the build applies the log to keeps the tuning log's
    workloads and the build's kernels identical.

    With ``layout_rewrite``, kernels are marked with the buffers that hold weights
    (``AttachAttrLayoutFreeBuffers``), so MetaSchedule's ``RewriteLayout`` may repack a weight into
    the layout its schedule reads fastest (ONNX Runtime's CPU kernels do the same with NCHWc). The
    mark is part of the workload, so a log records which form it was tuned in (see :func:`compile_tuned`).
    """
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    from .winograd import legalize_map as winograd_legalize_map

    try:
        dispatch = relax_pipeline.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    seq = tvm.transform.Sequential([
        *dispatch,
        relax.transform.LegalizeOps(winograd_legalize_map(winograd) if winograd else None),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *([relax.transform.AttachAttrLayoutFreeBuffers()] if layout_rewrite else []),
    ])
    with target, tvm.transform.PassContext(opt_level=3):
        return seq(convert_layout(mod, layout))


def compile_tuned(database, mod, target, layout_rewrite: bool = True, layout: str = DEFAULT_LAYOUT,
                  winograd: bool | str = FUSED, exec_mode: str = "compiled"):
    """Compile ``mod`` with the schedules of ``database`` applied; returns a Relax VM executable.

    ``exec_mode="compiled"``: the model's program (which kernel runs when, on which buffers) is compiled
    to machine code with the kernels, not interpreted by the VM instruction by instruction; on a small
    model, where a run is 50 µs, that is 1.8-2.4% of its latency (tiny_cnn, timed in one process
    alternating with the interpreted form). ``"bytecode"`` gives a program that ``as_text`` shows.

    MetaSchedule's ``compile_relax`` with the weight repacking of TVM's ``static_shape_tuning``
    pipeline: after the database is applied, ``SplitLayoutRewritePreproc`` moves each kernel's weight
    repacking into a function of its own, which ``FoldConstant`` runs at build time on the weights
    (bound as constants). The executable's interface is the model's: the repacked weights are inside.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    @tvm.transform.module_pass(opt_level=3)
    def _pipeline(mod, _ctx):
        mod = lower_for_tuning(mod, target, layout_rewrite, layout, winograd)
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        if layout_rewrite:
            # Folding leaves each kernel's repacked weights as a tuple of constants taken apart at
            # every run (a tuple, two lookups and a release per kernel in the VM): the kernels are
            # called with the constants themselves, and the tuples go.
            mod = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                            relax.transform.FoldConstant(),
                                            relax.transform.CanonicalizeBindings(),
                                            relax.transform.DeadCodeElimination()])(mod)
        return tvm.transform.Sequential(cpu_pipeline.dataflow_lower_passes(target)
                                        + cpu_pipeline.finalize_passes(target))(mod)

    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target, relax_pipeline=_pipeline, exec_mode=exec_mode)


def log_layout_rewrite(session: dict[str, Any], has_records: bool, wanted: bool = True) -> bool:
    """The kernel form of a tuning log: what its session recorded; a log with records from before the
    form was recorded was tuned without layout rewrite; an empty log takes ``wanted``."""
    return kernel_form(session, "layout_rewrite", has_records, False, wanted, lambda value: isinstance(value, bool))


def extract_tasks(mod, target_dict: dict[str, Any], layout_rewrite: bool = True,
                  layout: str = DEFAULT_LAYOUT, winograd: bool | str = FUSED) -> list[Task]:
    """The model's tuning tasks for ``target_dict``, most expected benefit (FLOPs x weight) first;
    ``layout_rewrite``, ``layout`` and ``winograd``: the kernel form (see :func:`lower_for_tuning`)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    target = tvm.target.Target(target_dict)
    lowered = lower_for_tuning(mod, target, layout_rewrite, layout, winograd)
    extracted = ms.relax_integration.extract_tasks(lowered, target)
    tasks = []
    for task in extracted:
        if task.mod.attrs is not None and task.mod.attrs.get("tirx.is_scheduled", False):
            continue
        workload = task.dispatched[0]
        try:
            flops = float(estimate_tir_flops(workload))
        except Exception:  # noqa: BLE001 - estimation fails on some exotic kernels; 0 means unknown
            flops = 0.0
        tasks.append(Task(0, str(task.task_name), flops, int(task.weight), workload_key(workload), task))
    tasks.sort(key=lambda t: (-(t.flops * t.weight), t.name))
    for i, task in enumerate(tasks):
        task.index = i
    return tasks
