"""``edgetune build``: compile the whole model for a board, applying the tuning log.

Tuned kernels take their best record from the log. A kernel the log has no successful record for
falls back to a schedule from MetaSchedule's own design space for the target (multi-level tiling,
parallel outer loops, vectorized inner loops, unrolling), checked by MetaSchedule's postprocessors:
a sensible schedule, never the naive loop nest ``tvm.compile`` gives an unscheduled kernel.

The output folder holds what ``edgetune package`` ships:

```
OUT/model.so               Relax VM executable linked with the board's toolchain
OUT/build.json             model, key, target, board, inputs/outputs, coverage, tuning-time latency
OUT/reference/input.npz    a seeded random input
OUT/reference/output.npz   ONNX Runtime's output for it on the workstation (what the board must match)
```
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from device_agent.schema import target_to_json

from ..errors import EdgetuneError
from ..logs.results import TaskResult, estimated_latency_ms, tally_records
from ..logs.tuninglog import TuningLog, write_json_atomic
from ..models.onnx_import import Model, load_onnx
from ..toolchain import check_target, toolchain_for
from ..tuning.layout import DEFAULT as DEFAULT_LAYOUT, log_layout
from ..tuning.tasks import Task, compile_tuned, extract_tasks, log_layout_rewrite
from ..tuning.winograd import FUSED, log_winograd
from ..tuning.finals import finals_database
from ..tuning.timing import log_times_cold

logger = logging.getLogger(__name__)

# Cost written on fallback records: far above any measurement, so a tuned record always wins.
FALLBACK_RUN_SECS = 1e6
REFERENCE_SEED = 20240
# Timed runs of the tuned build and ONNX Runtime when a build is compared on the workstation; TVM's
# untuned build takes up to seconds a run (resnet18), so it gets fewer.
COMPARE_RUNS = 20
UNTUNED_COMPARE_RUNS = 3


@dataclass
class BuildResult:
    """A build written to ``out_dir``. ``coverage`` holds each task's result from the log (a task without a
    successful record is a fallback: the build gives it MetaSchedule's default schedule)."""

    out_dir: Path
    model: str
    key: str
    target: dict[str, Any]
    coverage: list[TaskResult]
    estimated_latency_ms: float | None
    host_check: dict[str, Any] | None
    files: list[str] = field(default_factory=list)
    from_store: list[str] = field(default_factory=list)  # tasks the schedule store filled (none in the log)

    @property
    def flops_shares(self) -> list[float]:
        """Each task's share of the model's FLOPs (weight x FLOPs), in ``coverage`` order."""
        return flops_shares(self.coverage)

    @property
    def tuned_share(self) -> float:
        return sum(share for c, share in zip(self.coverage, self.flops_shares) if c.tuned)

    def coverage_dicts(self) -> list[dict[str, Any]]:
        return [dict(c.as_dict(), flops_share=round(share, 6)) for c, share in zip(self.coverage, self.flops_shares)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir), "model": self.model, "key": self.key, "target": self.target,
            "tasks": len(self.coverage), "tuned": sum(1 for c in self.coverage if c.tuned),
            "from_store": self.from_store,
            "fallback": sum(1 for c in self.coverage if not c.tuned) - len(self.from_store),
            "tuned_flops_share": round(self.tuned_share, 6),
            "estimated_latency_ms": self.estimated_latency_ms, "host_check": self.host_check,
            "coverage": self.coverage_dicts(), "files": self.files,
        }


def flops_shares(results: list[TaskResult]) -> list[float]:
    """Each task's share (0..1) of the model's FLOPs, weight x FLOPs over the sum of them."""
    total = sum((r.flops or 0.0) * r.weight for r in results) or 1.0
    return [(r.flops or 0.0) * r.weight / total for r in results]


def task_coverage(db, tasks: list[Task]) -> list[TaskResult]:
    """The result of each task in the database ``db``: trials, failures and best record."""
    return tally_records([TaskResult.of_task(t) for t in tasks], db.get_all_tuning_records())


def fallback_database(tasks: list[Task], target, seed: int = 0):
    """A MemoryDatabase with one default schedule per task: MetaSchedule's design space for the
    target with its decisions sampled (seeded), accepted only if every postprocessor passes."""
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.MemoryDatabase()
    for task in tasks:
        mod = task.extracted.dispatched[0]
        chosen = None
        for attempt in range(8):
            ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                                 search_strategy="replay-trace", task_name=task.name, rand_state=seed + attempt + 1)
            for sch in ctx.generate_design_space():
                if all(p.apply(sch) for p in ctx.space_generator.postprocs):
                    chosen = sch
                    break
            if chosen is not None:
                break
        if chosen is None:
            logger.warning("no default schedule for %s: it builds unscheduled", task.name)
            continue
        workload = db.commit_workload(mod)
        func = next(iter(mod.functions.values()))
        db.commit_tuning_record(ms.database.TuningRecord(
            chosen.trace, workload, [FALLBACK_RUN_SECS], target, ms.arg_info.ArgInfo.from_prim_func(func),
        ))
    return db


def reference_io(model: Model) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """A seeded random input and ONNX Runtime's outputs for it (the board must match these)."""
    import onnxruntime as ort

    rng = np.random.default_rng(REFERENCE_SEED)
    inputs = {}
    for spec in model.inputs:
        if spec.dtype.startswith("float"):
            inputs[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        else:
            inputs[spec.name] = rng.integers(0, 10, size=spec.shape).astype(spec.dtype)
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, inputs)
    return inputs, [np.asarray(o) for o in outputs]


def _host_can_run(target: dict[str, Any]) -> bool:
    arch = str(target.get("mtriple", "")).split("-")[0]
    return arch == {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower()) \
        and "android" not in str(target.get("mtriple", ""))


def run_module(path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run an exported Relax VM module on this machine's CPU."""
    import tvm
    from tvm import relax

    lib = tvm.runtime.load_module(str(path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return flatten_outputs(out)


def p50_here_ms(path: Path, inputs: list[np.ndarray], runs: int) -> float:
    """Median latency (ms) of an exported Relax VM module on this machine's CPU, after a warm-up run."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    vm.set_input("main", *[tvm.runtime.tensor(a) for a in inputs])
    vm.invoke_stateful("main")
    timer = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=1, repeat=runs)
    return float(np.median(timer("main").results)) * 1000.0


def compare_here(model: Model, tuned_path: Path, inputs: dict[str, np.ndarray], target: dict[str, Any],
                 runs: int = COMPARE_RUNS) -> dict[str, float]:
    """p50 (ms) on this workstation of the tuned build, ONNX Runtime and TVM's untuned build, one after
    the other (nothing is built while one is timed)."""
    from device_agent.ort_bench import run as onnxruntime_run

    from ..bench.bench import _untuned_build

    ordered = [inputs[s.name] for s in model.inputs]
    figures = {"tuned_p50_ms": p50_here_ms(tuned_path, ordered, runs)}
    with tempfile.TemporaryDirectory(prefix="edgetune-compare-") as tmp:
        np.savez(Path(tmp) / "in.npz", **inputs)
        answer = onnxruntime_run(str(model.path), str(Path(tmp) / "in.npz"), str(Path(tmp) / "out.npz"), runs)
        if answer.get("available"):
            figures["onnxruntime_p50_ms"] = float(np.median(answer["ms"]))
        _untuned_build(model, target, Path(tmp) / "untuned.so")
        figures["untuned_p50_ms"] = p50_here_ms(Path(tmp) / "untuned.so", ordered, UNTUNED_COMPARE_RUNS)
    return figures


def flatten_outputs(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]


def _from_store(tasks: list[Task], target: dict[str, Any], schedules: str | None, use_schedules: bool,
                cold_weights: bool = True):
    """A MemoryDatabase with the schedule store's best record of each of ``tasks`` on ``target``'s CPU class
    (of the records timed as a session timing ``cold_weights`` would, when there are any), and the names of
    the tasks it covers. Empty without a store (or when it cannot be opened: the build then uses default
    schedules, and says why)."""
    from tvm.s_tir import meta_schedule as ms

    from ..schedules.store import ScheduleStore, ScheduleStoreError, retarget, sessions_use_store

    db, names = ms.database.MemoryDatabase(), []
    if not tasks or not use_schedules or (schedules is None and not sessions_use_store()):
        return db, names
    try:
        store = ScheduleStore(schedules)
    except ScheduleStoreError as err:
        logger.warning("%s: building with default schedules for the untuned tasks", err)
        return db, names
    with store:
        for task in tasks:
            mod = task.extracted.dispatched[0]
            best = store.best_record(target, mod, cold_weights)
            if best is None:
                continue
            workload = db.commit_workload(mod)
            try:
                record = retarget(best.record, store.workload(best.digest).mod, mod)
                db.commit_tuning_record(ms.database.TuningRecord.from_json(record, workload))
            except Exception as err:  # noqa: BLE001 - a schedule that does not apply leaves the task to the default
                logger.warning("%s: the schedule store's record does not apply (%s); default schedule", task.name,
                               str(err).splitlines()[-1] if str(err) else type(err).__name__)
                continue
            names.append(task.name)
    return db, names


def build(model_path: str, key: str, out_dir: str | Path, log_dir: str | None = None,
          target: dict[str, Any] | None = None, board: dict[str, Any] | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None,
          on_progress: Callable[[str], None] | None = None, compare: bool = True,
          schedules: str | None = None, use_schedules: bool = True) -> BuildResult:
    """Compile ``model_path`` for ``target`` with the tuning log applied and write OUT.

    When this machine can run the target, the build's output is checked against ONNX Runtime here,
    and with ``compare`` it is timed against ONNX Runtime and TVM's untuned build (``host_check``).

    A task the log has no schedule for takes the schedule store's best for the target's CPU class
    (``schedules``: its location; ``use_schedules=False`` or ``EDGETUNE_SCHEDULES=off``: none), else a
    default schedule. The target comes from ``target``, else the log's session. Raises :class:`EdgetuneError` for a log
    of another model or target, a missing toolchain, or a model that does not import.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from ..tuning.intrinsics import cpu_intrinsics_only

    say = on_progress or (lambda message: None)
    model = load_onnx(model_path, input_shapes)
    log = TuningLog.open(log_dir) if log_dir else None
    if target is None and log is not None:
        target, board = log.session.get("target"), board or log.session.get("board")
    if target is None:
        raise EdgetuneError("no target: pass --log DIR (the tuning log knows its target) or --target JSON")
    check_target(target)
    if log is not None:
        log.check_compatible(model.sha256, target)
    toolchain = toolchain_for(target)
    cpu_intrinsics_only()
    tvm_target = tvm.target.Target(target)

    say("extracting tasks")
    tuned_db = log.database() if log is not None else ms.database.MemoryDatabase()
    has_records = log is not None and log.record_count() > 0
    layout_rewrite = log_layout_rewrite(log.session, has_records) if log is not None else True
    layout = log_layout(log.session, has_records) if log is not None else DEFAULT_LAYOUT
    winograd = log_winograd(log.session, has_records) if log is not None else FUSED
    tasks = extract_tasks(model.mod, target, layout_rewrite, layout, winograd)
    coverage = task_coverage(tuned_db, tasks)
    tuned = sum(1 for c in coverage if c.tuned)
    untuned = [t for t, c in zip(tasks, coverage) if not c.tuned]
    # The store's records are ranked among those timed as this model's session would time them.
    cold_weights = log_times_cold(log.session if log is not None else {}, has_records, model.weight_bytes, board)
    stored, from_store = _from_store(untuned, target, schedules, use_schedules, cold_weights)
    say(f"{tuned} of {len(tasks)} tasks tuned in the log"
        + (f", {len(from_store)} from the schedule store" if from_store else "") + "; default schedules for the rest")
    fallback = fallback_database([t for t in untuned if t.name not in from_store], tvm_target)
    # The session's final choice for its large kernels (timed again as the model runs them) comes first.
    choice = log.session.get("finals") if has_records else None
    finals = finals_database(tuned_db.get_all_tuning_records() if choice else [], choice)
    chosen = len(finals.get_all_tuning_records())
    if chosen:
        say(f"{chosen} large kernels take their finalist that ran fastest after a cache flush, as in the model")
    database = ms.database.OrderedUnionDatabase(finals, tuned_db, stored, fallback)
    result = BuildResult(Path(out_dir), model.name, key, target, coverage, estimated_latency_ms(coverage), None,
                         ["model.so", "build.json", "reference/input.npz", "reference/output.npz"], from_store)

    say("compiling the model")
    try:
        executable = compile_tuned(database, model.mod, tvm_target, layout_rewrite, layout, winograd)
    except Exception as err:  # noqa: BLE001 - report TVM's failure in one line
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise EdgetuneError(f"compiling {model.name} failed: {(lines[-1] if lines else type(err).__name__)[:300]}") from None

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    try:
        say(f"linking with {toolchain.compiler}")
        executable.export_library(str(staging / "model.so"), fcompile=toolchain.fcompile())
        inputs, outputs = reference_io(model)
        (staging / "reference").mkdir()
        np.savez(staging / "reference" / "input.npz", **inputs)
        np.savez(staging / "reference" / "output.npz", **{f"output_{i}": o for i, o in enumerate(outputs)})
        host_check = None
        if _host_can_run(target):
            got = run_module(staging / "model.so", [inputs[s.name] for s in model.inputs])
            err = max(float(np.max(np.abs(g.astype("float64") - e.astype("float64")))) for g, e in zip(got, outputs))
            host_check = {"ran_on": "workstation", "max_abs_err": err}
            if compare:
                say("timing the build against ONNX Runtime and TVM's untuned build on this workstation")
                host_check.update(compare_here(model, staging / "model.so", inputs, target))
        info = {
            "format": 1,
            "model": {"name": model.name, "sha256": model.sha256},
            "key": key, "target": target, "board": board, "tvm_version": tvm.__version__,
            "inputs": [s.as_dict() for s in model.inputs], "outputs": [s.as_dict() for s in model.outputs],
            "coverage": {"tasks": result.coverage_dicts(), "tuned": tuned, "from_store": from_store,
                         "fallback": len(coverage) - tuned - len(from_store),
                         "tuned_flops_share": result.tuned_share,
                         "log": str(Path(log_dir).resolve()) if log_dir else None},
            "estimated_latency_ms": result.estimated_latency_ms, "toolchain": toolchain.compiler,
            "host_check": host_check,
            "layout_rewrite": layout_rewrite, "layout": layout, "winograd": winograd, "finals": chosen,
        }
        write_json_atomic(staging / "build.json", info)
        # Replace OUT's files only now that everything is written.
        for name in ("model.so", "build.json"):
            os.replace(staging / name, out_dir / name)
        if (out_dir / "reference").exists():
            shutil.rmtree(out_dir / "reference")
        os.replace(staging / "reference", out_dir / "reference")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {out_dir} for {target_to_json(target)}")
    result.host_check = host_check
    return result


def read_build(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / "build.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgetuneError(f"{out_dir} is not a build folder (no build.json): run `edgetune build` first") from None
