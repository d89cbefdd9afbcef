"""Candidates that fail to build, crash the build worker, crash the board's process or hang it.

Each is a failed trial with a message, and the next good candidate is built by the same warm workers
and measured on the same (real) agent: the session goes on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import HOST_TARGET


def _funcs():
    from tvm.script import tirx as T

    @T.prim_func
    def good(A: T.Buffer((64,), "float32")):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        for i in range(64):
            A[i] = A[i] + T.float32(1)

    @T.prim_func
    def unbuildable(A: T.Buffer((64,), "float32")):
        # A GPU thread binding has no lowering on a CPU target: the build itself fails.
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        tx = T.launch_thread("threadIdx.x", 64)
        A[tx] = A[tx] + T.float32(1)

    @T.prim_func
    def kills_the_builder(A: T.Buffer((64,), "float32")):
        # An LLVM intrinsic id that does not exist: code generation dies with SIGSEGV in the worker.
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        for i in range(64):
            A[i] = T.call_llvm_pure_intrin("float32", T.uint32(987654), T.uint32(1), A[i])

    @T.prim_func
    def crashes_the_board(A: T.Buffer((64,), "float32")):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        T.evaluate(T.call_extern("int32", "abort"))
        for i in range(64):
            A[i] = A[i] + T.float32(1)

    @T.prim_func
    def hangs_the_board(A: T.Buffer((64,), "float32")):
        # 2**42 dependent floating-point steps: hours, unless the session deadline ends it.
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        for _ in T.serial(T.int64(1) << T.int64(42)):
            A[0] = A[0] * T.float32(1.0000001) + T.float32(1)

    return {"good": good, "unbuildable": unbuildable, "kills_the_builder": kills_the_builder,
            "crashes_the_board": crashes_the_board, "hangs_the_board": hangs_the_board}


@pytest.fixture(scope="module")
def tools(tuning_bed, warm_builder):
    from host.tuning.runner import BoardRunner

    runner = BoardRunner(("127.0.0.1", tuning_bed["tracker_port"]), tuning_bed["key"],
                         session_timeout_sec=10, no_board_deadline_sec=60)
    try:
        yield warm_builder, runner
    finally:
        runner.shutdown()


def _build(builder, name):
    import tvm
    from tvm.s_tir.meta_schedule.builder import BuilderInput

    func = _funcs()[name]
    (result,) = builder.build([BuilderInput(tvm.IRModule({"main": func}), tvm.target.Target(HOST_TARGET))])
    return func, result


def _measure(runner, func, artifact):
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    (future,) = runner.run([RunnerInput(artifact, "cpu", ArgInfo.from_prim_func(func))])
    return future.result()


def _good_trial(builder, runner):
    func, built = _build(builder, "good")
    assert built.error_msg is None, built.error_msg
    result = _measure(runner, func, built.artifact_path)
    assert result.error_msg is None, result.error_msg
    assert len(result.run_secs) == 1 and 0 < float(result.run_secs[0]) < 1.0


@pytest.mark.parametrize("name", ["unbuildable", "kills_the_builder"])
def test_a_candidate_that_fails_to_build_is_a_failed_trial(tools, name):
    builder, runner = tools
    _, built = _build(builder, name)
    assert built.artifact_path is None
    expected = "worker crashed" if name == "kills_the_builder" else "not implemented"
    assert built.error_msg.startswith("build failed:") and expected in built.error_msg, built.error_msg
    assert "\n" not in built.error_msg
    _good_trial(builder, runner)  # the same warm pool builds the next candidate


@pytest.mark.parametrize("name", ["crashes_the_board", "hangs_the_board"])
def test_a_candidate_that_crashes_or_hangs_the_board_is_a_failed_trial(tools, tuning_bed, name):
    builder, runner = tools
    func, built = _build(builder, name)
    assert built.error_msg is None, built.error_msg
    result = _measure(runner, func, built.artifact_path)
    assert result.run_secs is None
    expected = "session has expired" if name == "hangs_the_board" else "crashed the board's session process"
    assert result.error_msg.startswith("on board ") and expected in result.error_msg, result.error_msg
    assert tuning_bed["agent"].alive()
    _good_trial(builder, runner)  # the agent serves the next candidate
    outcome = "killed after 10 s" if name == "hangs_the_board" else "exited with code"
    assert outcome in tuning_bed["agent"].log()


def test_candidates_never_measured_are_removed_with_the_session(tmp_path):
    # A session that stops between build and measurement (no board, Ctrl-C) leaves its candidates
    # unmeasured: the builder's shutdown removes them, and a candidate that failed to build left nothing.
    from host.toolchain import toolchain_for
    from host.tuning.builder import WarmBuilder

    builder = WarmBuilder(toolchain_for(HOST_TARGET), max_workers=1)
    try:
        _, built = _build(builder, "good")
        _, failed = _build(builder, "unbuildable")
        root = Path(builder.root)
        assert failed.artifact_path is None
        assert [p.parent for p in root.glob("edgetune-cand-*/candidate.so")] == [Path(built.artifact_path).parent]
        assert len(list(root.iterdir())) == 1
    finally:
        builder.shutdown()
    assert not root.exists()
