"""Build directories (what `edgetune build -o OUT` writes) made quickly for tests.

The bundled tiny CNN is imported with TVM's ONNX frontend and compiled natively for this machine
(about 2 s, once per process); its expected output comes from ONNX Runtime, as in a real build.

    out = make_build_dir(tmp_path / "out")
    log = make_log_dir(tmp_path / "log")
    package(out, log, tmp_path / "model.etpkg", key_path=...)
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_CNN = REPO / "host" / "data" / "tiny_cnn.onnx"
if not TINY_CNN.is_file():
    TINY_CNN = REPO.parent / "shared" / "models" / "tiny_cnn.onnx"

_cache: dict[str, Path] = {}
_cache_dir: Path | None = None


def native_target() -> dict[str, Any]:
    """A TVM target this machine runs: x86_64 with the newest CPU level its flags allow."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    mcpu = "znver4" if "avx512f" in flags else ("x86-64-v3" if "avx2" in flags else "x86-64")
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": 2}


def _scratch() -> Path:
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="edgetune-test-build-"))
        atexit.register(shutil.rmtree, _cache_dir, True)
    return _cache_dir


def compiled_model(target: dict[str, Any] | None = None) -> Path:
    """``model.so`` of the tiny CNN for ``target`` (default :func:`native_target`), compiled once per process."""
    import onnx
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    target = target or native_target()
    cache_key = json.dumps(target, sort_keys=True)
    if cache_key not in _cache:
        mod = from_onnx(onnx.load(str(TINY_CNN)), keep_params_in_input=False)
        executable = tvm.compile(mod, target=tvm.target.Target(target))
        path = _scratch() / f"model-{len(_cache)}.so"
        executable.export_library(str(path))
        _cache[cache_key] = path
    return _cache[cache_key]


def reference_io(seed: int = 0) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """A reference input of the tiny CNN and ONNX Runtime's outputs for it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(TINY_CNN), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    inputs = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        inputs[i.name] = rng.standard_normal(shape).astype(np.float32)
    return inputs, session.run(None, inputs)


def make_build_dir(
    out: Path,
    *,
    target: dict[str, Any] | None = None,
    declared_target: dict[str, Any] | None = None,
    board: dict[str, Any] | None = None,
    key: str = "test-board",
    alter_expected: bool = False,
) -> Path:
    """Write a build directory for the tiny CNN compiled for ``target``.

    ``declared_target`` is written to build.json instead of the real one (a package that claims another
    board, for compatibility checks). ``alter_expected`` shifts the expected output so the board's
    self-check fails.
    """
    import tvm

    target = target or native_target()
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference").mkdir(exist_ok=True)
    shutil.copyfile(compiled_model(target), out / "model.so")
    inputs, outputs = reference_io()
    if alter_expected:
        outputs = [o + 1.0 for o in outputs]
    np.savez(out / "reference" / "input.npz", **inputs)
    np.savez(out / "reference" / "output.npz", **{f"output_{i}": o for i, o in enumerate(outputs)})
    build = {
        "format": 1,
        "model": {"name": "tiny_cnn", "sha256": "0" * 64},
        "key": key,
        "target": declared_target or target,
        "board": board,
        "tvm_version": tvm.__version__,
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in inputs.items()],
        "outputs": [{"name": f"output_{i}", "shape": list(o.shape), "dtype": str(o.dtype)} for i, o in enumerate(outputs)],
        "coverage": {"tuned": 0, "fallback": 7},
        "estimated_latency_ms": 1.5,
    }
    (out / "build.json").write_text(json.dumps(build, indent=1))
    return out


def make_log_dir(path: Path) -> Path:
    """A small tuning log directory with the files `edgetune tune` writes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "database_workload.json").write_text('["fake-workload"]\n')
    (path / "database_tuning_record.json").write_text('[0, [[], [], [0.001]]]\n')
    (path / "session.json").write_text(json.dumps({"trials": 0}) + "\n")
    return path


def board_features() -> list[str]:
    """This machine's CPU flags (what a board profile lists as features)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(set(line.split(":", 1)[1].split()))
    return []


def this_board_profile() -> dict[str, Any]:
    """A board profile dict for this machine."""
    import platform

    return {"arch": platform.machine(), "cpu": "this CPU", "features": board_features(), "os": "linux"}


def twin_convs_onnx(path: Path, channels: int = 16, size: int = 28) -> Path:
    """A small ONNX model with one conv shape in two places: ``relu(conv(x))``, then
    ``relu(conv(y) + x)`` (a residual block). TVM makes two tuning tasks of it that differ only in
    their epilogue (sibling tasks). Seeded random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)

    def weight(name: str, shape: tuple[int, ...]) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    shape = [1, channels, size, size]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["y"]),
        helper.make_node("Conv", ["y", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "twin_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
        initializer=[weight("w1", (channels, channels, 3, 3)), weight("b1", (channels,)),
                     weight("w2", (channels, channels, 3, 3)), weight("b2", (channels,))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run_kernel(mod, inputs: list[np.ndarray], out_shape) -> np.ndarray:
    """``mod``'s kernel built for this machine and run on ``inputs``: its output, of ``out_shape``."""
    import tvm

    from tests.conftest import HOST_TARGET

    lib = tvm.compile(mod, target=tvm.target.Target(HOST_TARGET))
    device = tvm.cpu()
    args = [tvm.runtime.tensor(a, device) for a in inputs] + [tvm.runtime.tensor(np.zeros(out_shape, "float32"), device)]
    lib["main"](*args)
    return args[-1].numpy()


def searched_schedule(context, space, parallel: int | None = None):
    """A schedule of ``context``'s kernel as the search makes one: a design space with its sampled
    decisions (and, with ``parallel``, the parallel extent mutated as MetaSchedule's MutateParallel does)."""
    from tvm.s_tir import Schedule
    from tvm.s_tir.schedule import Instruction, Trace

    insts = list(space.trace.simplified(remove_postproc=True).insts)
    if parallel is not None:
        [at] = [i for i, inst in enumerate(insts) if inst.kind.name == "Annotate"
                and str(inst.attrs[0]) == "meta_schedule.parallel"]
        inst = insts[at]
        insts[at] = Instruction(inst.kind, [inst.inputs[0], parallel], inst.attrs, inst.outputs)
    decisions = {inst: space.trace.get_decision(inst) for inst in insts if inst.kind.name.startswith("Sample")}
    sch = Schedule(context.mod)
    Trace(insts, decisions).apply_to_schedule(sch, remove_postproc=True)
    sch.enter_postproc()
    assert all(p.apply(sch) for p in context.space_generator.postprocs)
    return sch
