"""Tuning tasks of a model for a board's target: one per distinct fused kernel, with its weight."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

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


def lower_for_tuning(mod, target):
    """The Relax module at the point where MetaSchedule's database is applied by ``compile_relax``:
    library dispatch, LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR. Extracting
    tasks from the same form keeps the tuning log's workloads and the build's kernels identical."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    try:
        dispatch = relax_pipeline.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    seq = tvm.transform.Sequential([
        *dispatch,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])
    with target, tvm.transform.PassContext(opt_level=3):
        return seq(mod)


def workload_key(mod) -> str:
    """The hash MetaSchedule's database keys a workload on (structural hash), as hex."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def extract_tasks(mod, target_dict: dict[str, Any]) -> list[Task]:
    """The model's tuning tasks for ``target_dict``, most expected benefit (FLOPs x weight) first."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    target = tvm.target.Target(target_dict)
    lowered = lower_for_tuning(mod, target)
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
