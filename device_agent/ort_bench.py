"""ONNX Runtime on the board: the baseline a user would run instead of a tuned model.

The agent registers :data:`FUNCTION` as a TVM RPC function, so a host measures ONNX Runtime on the
board itself, in the same session machinery as the tuned build: upload the ONNX model and an input
``.npz``, call the function, download the outputs it wrote. ONNX Runtime is an optional extra on a
board (``pip install 'edgetune[ort]'``: wheels exist for aarch64 and x86_64 Linux); without it the
function answers ``available: false`` with how to add it, and the host's bench still runs.
"""

from __future__ import annotations

import json
import time
from typing import Any

FUNCTION = "edgetune.onnxruntime_bench"
INSTALL_HINT = ("install ONNX Runtime in the agent's environment to compare with it on the board: "
                "pip install 'edgetune[ort]' (or pip install onnxruntime), then restart the agent")
WARMUP_RUNS = 3


def run(model_path: str, inputs_path: str, outputs_path: str, runs: int) -> dict[str, Any]:
    """Time ``runs`` single runs of the ONNX model at ``model_path`` on the inputs of the ``.npz`` at
    ``inputs_path`` (after warm-up runs) and write its outputs to ``outputs_path`` as ``output_<i>``.

    Returns ``{"available": True, "version", "ms": [per-run milliseconds], "threads"}``, or
    ``{"available": False, "error"}`` when ONNX Runtime is missing or the model does not run.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return {"available": False, "error": f"ONNX Runtime is not installed on this board: {INSTALL_HINT}"}
    import numpy as np

    try:
        session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        with np.load(inputs_path) as data:
            inputs = {name: data[name] for name in data.files}
        for _ in range(WARMUP_RUNS):
            session.run(None, inputs)
        times = []
        for _ in range(max(1, int(runs))):
            start = time.perf_counter()
            session.run(None, inputs)
            times.append((time.perf_counter() - start) * 1000.0)
        outputs = session.run(None, inputs)
        np.savez(outputs_path, **{f"output_{i}": np.asarray(o) for i, o in enumerate(outputs)})
    except Exception as err:  # noqa: BLE001 - whatever ONNX Runtime raises is the answer, in one line
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        return {"available": False, "error": f"ONNX Runtime failed on this board: {(lines[-1] if lines else type(err).__name__)[:300]}"}
    options = session.get_session_options()
    return {"available": True, "version": ort.__version__, "ms": times, "threads": options.intra_op_num_threads}


def register() -> None:
    """Make :data:`FUNCTION` callable by RPC clients of this process (and of the session processes it
    forks). File names are resolved in the session's upload folder."""
    import tvm

    def _rpc_entry(model_name: str, inputs_name: str, outputs_name: str, runs: int) -> str:
        workpath = tvm.get_global_func("tvm.rpc.server.workpath")
        return json.dumps(run(workpath(model_name), workpath(inputs_name), workpath(outputs_name), int(runs)))

    tvm.register_global_func(FUNCTION, _rpc_entry, override=True)
