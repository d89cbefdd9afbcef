"""Import only the tensor intrinsics a CPU board can use.

MetaSchedule's ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose CUDA, ROCm, Metal and
Hexagon registrations take 20-35 s on a 2-core workstation, on every ``edgetune tune``: longer than
the whole search of a small session. edgetune only targets CPUs (llvm), whose schedule rules use the
x86, Arm and RISC-V intrinsics, so the GPU/DSP modules are entered as empty modules before the package
is imported. Call :func:`cpu_intrinsics_only` before the first TuneContext of the process.
"""

from __future__ import annotations

import sys
import types

_GPU_AND_DSP = ("cuda", "rocm", "metal", "hexagon")


def cpu_intrinsics_only() -> None:
    """Make ``import tvm.s_tir.tensor_intrin`` register the CPU intrinsics only (no-op if imported)."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    for name in _GPU_AND_DSP:
        full = f"tvm.s_tir.tensor_intrin.{name}"
        sys.modules.setdefault(full, types.ModuleType(full, "not loaded: edgetune tunes CPU targets only"))
    import tvm.s_tir.tensor_intrin  # noqa: F401
