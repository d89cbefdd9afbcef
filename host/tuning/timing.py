"""How a kernel's candidates are timed on a board: hot (its data in the caches, as repeated runs leave
it) or cold (each run after a cache flush, as a kernel whose weights come from memory runs in the model).

The rules live here, without TVM, because three parts apply them: the runner (which evaluator a
candidate gets), the session (which way a new log times), and the schedule store (which way each of its
records was timed, so that a session is seeded only with times it can compare with its own).
"""

from __future__ import annotations

from typing import Any

HOT = "hot"
COLD = "cold"
TIMINGS = (HOT, COLD)

# Only a kernel whose arguments do not fit in a core's L2 (512 KiB on Zen 3, 1 MiB shared on a Pi 4's
# A72) is timed cold: a small one stays in the caches in the model as well, and a single run of a kernel
# of microseconds after a flush times the thread pool waking up more than the kernel. The choice is per
# task (its arguments' shapes), so every candidate of a task is timed the same way.
COLD_ABOVE_BYTES = 512 * 1024


def working_set_bytes(args_info: Any) -> int:
    """Bytes of a kernel's tensor arguments (MetaSchedule ``ArgInfo`` JSON: ["TENSOR", dtype, shape])."""
    import numpy as np

    total = 0
    for info in args_info or []:
        if isinstance(info, (list, tuple)) and len(info) == 3 and info[0] == "TENSOR":
            total += int(np.prod([int(d) for d in info[2]], dtype=np.int64)) * np.dtype(str(info[1])).itemsize
    return total


def kernel_timing(cold_weights: bool, args_info: Any) -> str:
    """How a session that times ``cold_weights`` times a kernel of these arguments: COLD or HOT."""
    return COLD if cold_weights and working_set_bytes(args_info) > COLD_ABOVE_BYTES else HOT


def board_llc_kib(board: dict[str, Any] | None) -> int:
    """The last-level cache a board profile says its target cores have, in KiB; 0 when it does not say."""
    return int((board or {}).get("llc_kib") or 0)


def weights_leave_the_caches(weight_bytes: int, board: dict[str, Any] | None) -> bool:
    """Whether a model's weights are larger than the board's last-level cache, so that in the model each
    large kernel fetches its weights from memory (then its candidates are timed cold). A board that does
    not say its cache (an older agent, a phone, plain TVM RPC) is taken to have a small one, as most
    boards do (a Raspberry Pi 4 has 1 MiB)."""
    llc_kib = board_llc_kib(board)
    return llc_kib <= 0 or weight_bytes > llc_kib * 1024


def log_times_cold(session: dict[str, Any], has_records: bool, weight_bytes: int, board: dict[str, Any] | None,
                   cold_weights: bool = True) -> bool:
    """Whether a tuning log times its large kernels cold (its session's ``cold_weights``): a log with
    records keeps what it recorded (hot when it is from before the choice was recorded); a new one times
    them cold when ``cold_weights`` asks for it and the model's weights leave the board's caches."""
    from ..logs.format import kernel_form

    return bool(kernel_form(session, "cold_weights", has_records, False,
                            cold_weights and weights_leave_the_caches(weight_bytes, board),
                            lambda value: isinstance(value, bool)))
