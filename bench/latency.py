"""Model latency on the board after N trials: tuned against ONNX Runtime (what a user would run
instead, timed on the board itself) and against TVM's default build, all measured in one run.

    python bench/latency.py --models tiny_cnn,mobilenet_v2,resnet18 --trials 500

Prints JSON: per model the p50 of ONNX Runtime, untuned and tuned, the ratios, and the trials and
minutes the tuning took. The builds are timed in ``--rounds`` alternating rounds; the ratio to ONNX
Runtime is the median of the rounds' (each is listed too). The tuning logs are kept (``--logs``, default ``~/.cache/edgetune/bench-logs``)
under a name of model, trials and variant, so a rerun measures again without tuning again (a kept log
of three-stage Winograd kernels, from before the fused ones, gets a ``-fused`` log beside it).
``--layout NCHW`` (the model's own layout, as edgetune tuned before NHWC), ``--no-layout-rewrite``,
``--no-winograd``, ``--hot-weights`` and ``--scheduler gradient|time-share`` tune the A/B variants of
those levers.
Timings are taken only while nothing else is built: tuning first, then the builds, then the timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from _bed import local_board
from host.tuning.layout import DEFAULT as DEFAULT_LAYOUT, LAYOUTS


SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def model_path(name: str) -> str:
    """A model name of ../shared/models (mobilenet_v2, resnet18, resnet34) or anything `tune` takes."""
    shared = SHARED_MODELS / f"{name}.onnx"
    return str(shared) if not Path(name).exists() and shared.exists() else name


def bench_log_dir(logs: str | Path, model: str, trials: int, variant: str) -> Path:
    """Where a benchmark keeps the tuning log of ``model`` after ``trials`` in ``variant``. A kept log
    tuned before the fused Winograd kernel (``"winograd": true`` in its session) builds as it was tuned,
    so a rerun would time the older kernel: a run that tunes Winograd kernels takes a new log beside it."""
    from host.logs.format import read_session
    from host.tuning.winograd import log_winograd

    path = Path(logs) / f"{Path(model).stem}-{trials}-{variant}"
    session = read_session(path / "session.json")
    if "nowino" not in variant.split("-") and session is not None and log_winograd(session, True) is True:
        return path.with_name(f"{path.name}-fused")
    return path


def board_state(bed, target: dict) -> dict[str, float]:
    """The board's state now, from two probe kernels timed on it (p50s).

    ``pool_launch_us``: one launch of TVM's thread pool, a kernel whose only work is a two-way parallel
    loop of 64 additions (serial, the same loop takes ~0.01 us). ``two_core_speedup``: a small
    matrix product per thread (64x64x64, in the core's L1), two of them run in parallel, against one
    run alone: 2.0 when both cores compute at full speed at once.

    A small model's kernels launch the pool several times a run, and they split their work over both
    cores, so these say what state the board is in. On a 2-core VM with nothing else running, both moved
    from one stretch of minutes to the next: the launch between ~0.6 and ~2.3 us (TVM's pool waits by
    calling ``sched_yield``, a ~0.4 us system call there), and in the slow stretches the two vCPUs also
    computed as if they shared one core. tiny_cnn's three-stage Winograd kernel then took 46 against
    20 us (its serial form 38; the fused kernel 13 against 10)."""
    import tempfile

    import numpy as np
    import tvm

    from host.bench.bench import _board_session

    with tempfile.TemporaryDirectory() as folder, \
            _board_session(bed["tracker"], bed["key"], None, "the board-state probe") as (session, _):
        path = Path(folder) / "board-state.so"
        tvm.compile(_probe_kernels(), target=tvm.target.Target(target)).mod.export_library(str(path))
        session.upload(str(path), path.name)
        module = session.load_module(path.name)
        dev = session.cpu()

        def p50(name: str, args: list, number: int) -> float:
            return float(np.median(module.time_evaluator(name, dev, number=number, repeat=7)(*args).results))

        launch = p50("launch", [tvm.runtime.tensor(np.zeros(64, "float32"), dev) for _ in range(2)], 2000)
        a, b = (tvm.runtime.tensor(np.random.rand(2, 64, 64).astype("float32"), dev) for _ in range(2))
        one, two = (p50(name, [a, b, tvm.runtime.tensor(np.zeros((lanes, 64, 64), "float32"), dev)], 200)
                    for name, lanes in (("one", 1), ("two", 2)))
    return {"pool_launch_us": round(launch * 1e6, 3), "two_core_speedup": round(2 * one / two, 2)}


def _probe_kernels():
    """The probes' kernels, made with ``te`` and schedules, not TVMScript: TVMScript's parser keeps the
    frames on the stack alive in a reference cycle, and a frame that then holds the board's session keeps
    the board busy until the garbage collector runs (the next request for a board finds none free).
    ``launch``: ``b = a + 1`` over 64 values in two parallel halves. ``one`` / ``two``: ``c[i] = a[i] @
    b[i]`` for i = 0 only / for both in parallel (vectorised over the columns)."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    a = te.placeholder((64,), "float32", "a")
    b = te.compute((64,), lambda i: a[i] + tvm.tirx.const(1.0, "float32"), name="b")
    sch = Schedule(te.create_prim_func([a, b]))
    (loop,) = sch.get_loops(sch.get_sblock("b"))
    halves, _ = sch.split(loop, [2, 32])
    sch.parallel(halves)
    funcs = {"launch": sch.mod["main"]}
    for name, lanes in (("one", 1), ("two", 2)):
        x, y = te.placeholder((2, 64, 64), "float32", "x"), te.placeholder((2, 64, 64), "float32", "y")
        k = te.reduce_axis((0, 64), "k")
        z = te.compute((lanes, 64, 64), lambda i, m, n: te.sum(x[i, m, k] * y[i, k, n], axis=k), name="z")
        sch = Schedule(te.create_prim_func([x, y, z]))
        block = sch.get_sblock("z")
        i, m, n, k_loop = sch.get_loops(block)
        sch.reorder(i, m, k_loop, n)
        sch.vectorize(n)
        if lanes == 2:
            sch.parallel(i)
        sch.decompose_reduction(block, k_loop)
        funcs[name] = sch.mod["main"]
    return tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in funcs.items()})


def variant_name(args) -> str:
    parts = []
    if args.layout != DEFAULT_LAYOUT:
        parts.append(args.layout.lower())
    if args.no_layout_rewrite:
        parts.append("nolr")
    if args.no_winograd:
        parts.append("nowino")
    if args.hot_weights:
        parts.append("hot")
    if args.no_finals:
        parts.append("nofinals")
    if args.scheduler != "weighted":
        parts.append(args.scheduler)
    if args.seed is not None:
        parts.append(f"seed{args.seed}")
    return "-".join(parts) or "default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny_cnn", help="comma-separated models (shared/models names or paths)")
    parser.add_argument("--trials", type=int, default=64, help="tuning budget per model")
    # Each round times a build in a new session process on the board, and on a shared 2-core VM a
    # process can land where one core is contended (a small model's two-thread kernels then take twice
    # as long, ONNX Runtime's about 1.5x): many short rounds, so their median is not one process's luck.
    parser.add_argument("--runs", type=int, default=300, help="timed runs of each build, in all")
    parser.add_argument("--rounds", type=int, default=15,
                        help="rounds the runs are split into, alternating the builds (the ratio is their median)")
    parser.add_argument("--logs", default=str(Path.home() / ".cache" / "edgetune" / "bench-logs"),
                        help="where the tuning logs are kept (reused by a rerun)")
    parser.add_argument("--layout", default=DEFAULT_LAYOUT, choices=LAYOUTS,
                        help="A/B: the convolutions' data layout (NCHW: the model's own)")
    parser.add_argument("--no-layout-rewrite", action="store_true", help="A/B: tune without weight repacking")
    parser.add_argument("--no-winograd", action="store_true", help="A/B: 3x3 convolutions as direct kernels")
    parser.add_argument("--scheduler", default="weighted", choices=("weighted", "time-share", "gradient"),
                        help="A/B: trials by the model's time alone (time-share), or MetaSchedule's gradient "
                             "scheduler with budget/tasks trials per batch")
    parser.add_argument("--hot-weights", action="store_true",
                        help="A/B: time every candidate with its weights in the caches (repeated runs)")
    parser.add_argument("--no-finals", action="store_true",
                        help="A/B: build each kernel's best by hot time (no finalists timed cold at the end)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("EDGETUNE_MDNS_INTERFACES", "127.0.0.1")
    # MetaSchedule prints its scheduler tables to stdout at INFO: keep stdout for the JSON figures.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)

    from device_agent.probe import read_profile
    from host.bench.bench import bench
    from host.logs.tuninglog import TuningLog
    from host.tuning.session import TuneOptions, run_session

    profile = read_profile()
    target = profile.target
    figures = []
    with local_board() as bed:
        for model in [model_path(m.strip()) for m in args.models.split(",") if m.strip()]:
            log_dir = bench_log_dir(args.logs, model, args.trials, variant_name(args))
            started = time.monotonic()
            result = run_session(TuneOptions(model=model, key=bed["key"], trials=args.trials, log_dir=str(log_dir),
                                             tracker=bed["tracker"], target=target, board=profile.as_dict(),
                                             seed=args.seed,
                                             layout_rewrite=not args.no_layout_rewrite, layout=args.layout,
                                             winograd=not args.no_winograd,
                                             scheduler=args.scheduler,
                                             cold_weights=not args.hot_weights, finals=not args.no_finals,
                                             # Cold sessions: a store would seed one variant from another.
                                             use_schedules=False))
            tuned_now = time.monotonic() - started
            session = TuningLog.open(log_dir).session
            state_before = board_state(bed, target)
            measured = bench(model, bed["key"], bed["tracker"], log_dir=str(log_dir), runs=args.runs,
                             rounds=args.rounds)
            state_after = board_state(bed, target)
            if measured.onnxruntime is None or measured.tuned is None or measured.untuned is None:
                raise SystemExit(f"{model}: incomplete measurement: {measured.notes}")
            ort, tuned, untuned = measured.onnxruntime.p50_ms, measured.tuned.p50_ms, measured.untuned.p50_ms
            figures.append({
                "model": Path(model).stem, "variant": variant_name(args), "trials": result.trials_done,
                "tuning_minutes": round(float(session.get("elapsed_s", tuned_now)) / 60, 2),
                "tuned_this_run": result.trials_this_run > 0, "log": str(log_dir),
                "layout_rewrite": session.get("layout_rewrite"), "layout": session.get("layout"),
                "winograd": session.get("winograd", False),
                "onnxruntime_p50_ms": round(ort, 4), "untuned_p50_ms": round(untuned, 4), "tuned_p50_ms": round(tuned, 4),
                # Median of the rounds' ratios (each round times both builds within seconds).
                "tuned_over_onnxruntime": round(measured.onnxruntime_ratio, 3),
                "rounds_tuned_over_onnxruntime": [round(r["tuned"] / r["onnxruntime"], 3) for r in measured.rounds],
                "untuned_over_tuned": round(untuned / tuned, 2),
                # The sum of the tuned kernels' best times (what the session saw), and the trials that
                # replayed a sibling task's best schedule (host/tuning/siblings.py) over all its runs.
                "estimated_ms": result.estimated_latency_ms,
                # Large kernels whose finalists were timed cold at the end of a run, and how many of them
                # build with another candidate than their best by hot time (host/tuning/finals.py).
                "finals": (session.get("runs") or [{}])[-1].get("finals"),
                "carried_to_siblings": {k: sum(int((r.get("carried_to_siblings") or {}).get(k, 0))
                                               for r in session.get("runs", [])) for k in ("trials", "improved")},
                "max_abs_err": {"tuned": measured.tuned.max_abs_err, "onnxruntime": measured.onnxruntime.max_abs_err},
                # The board's state while the builds were timed, just before and just after (see board_state).
                **{key: {"before": state_before[key], "after": state_after[key]} for key in state_before},
                "target": target,
            })
    json.dump(figures, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
