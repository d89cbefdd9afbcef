"""How the runner times a candidate on a real agent: hot (repeated runs), or cold (single runs after a
cache flush) for a kernel whose arguments do not fit in the caches, when the session asks for it."""

from __future__ import annotations

from tests.conftest import HOST_TARGET

SMALL = 64  # floats: 256 bytes
LARGE = 512 * 1024  # floats: 2 MiB, above the runner's COLD_ABOVE_BYTES


def _add_one(n: int):
    from tvm.script import tirx as T

    @T.prim_func
    def add_one(A: T.Buffer((n,), "float32"), B: T.Buffer((n,), "float32")):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        for i in range(n):
            B[i] = A[i] + T.float32(1)

    return add_one


def _runner(tuning_bed, cold_weights: bool):
    from host.tuning.runner import BoardRunner

    return BoardRunner(("127.0.0.1", tuning_bed["tracker_port"]), tuning_bed["key"], cold_weights=cold_weights,
                       session_timeout_sec=30, no_board_deadline_sec=60)


def _timed_runs(builder, runner, n: int) -> list[float]:
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    func = _add_one(n)
    (built,) = builder.build([BuilderInput(tvm.IRModule({"main": func}), tvm.target.Target(HOST_TARGET))])
    assert built.error_msg is None, built.error_msg
    (future,) = runner.run([RunnerInput(built.artifact_path, "cpu", ArgInfo.from_prim_func(func))])
    result = future.result()
    assert result.error_msg is None, result.error_msg
    return [float(s) for s in result.run_secs]


def test_cold_session_times_large_kernels_cold_and_small_ones_hot(tuning_bed, warm_builder):
    from host.tuning.runner import COLD_RUNS_KEPT
    from host.tuning.timing import COLD_ABOVE_BYTES

    assert SMALL * 4 * 2 < COLD_ABOVE_BYTES < LARGE * 4 * 2
    runner = _runner(tuning_bed, cold_weights=True)
    try:
        large = _timed_runs(warm_builder, runner, LARGE)
        small = _timed_runs(warm_builder, runner, SMALL)
    finally:
        runner.shutdown()
    # Cold: five single runs after a flush, the fastest three kept, fastest first.
    assert len(large) == COLD_RUNS_KEPT and large == sorted(large) and all(0 < s < 1.0 for s in large)
    # Hot: one round of repeated runs (the small kernel stays in the caches in a model too).
    assert len(small) == 1 and 0 < small[0] < 1.0


def test_hot_session_times_every_kernel_hot(tuning_bed, warm_builder):
    runner = _runner(tuning_bed, cold_weights=False)
    try:
        large = _timed_runs(warm_builder, runner, LARGE)
    finally:
        runner.shutdown()
    assert len(large) == 1 and 0 < large[0] < 1.0


def test_working_set_counts_every_tensor_argument():
    from host.tuning.timing import working_set_bytes

    assert working_set_bytes([["TENSOR", "float32", [1, 64, 56, 56]], ["TENSOR", "float32", [64, 64, 3, 3]],
                              ["TENSOR", "int8", [10]]]) == 4 * 64 * 56 * 56 + 4 * 64 * 64 * 9 + 10
    assert working_set_bytes([]) == 0
