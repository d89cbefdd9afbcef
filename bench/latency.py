"""Model latency on the board: tuned (after N trials) against TVM's default build, and against ONNX
Runtime on the same machine. Prints JSON with p50s and the ratios."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
from _bed import local_board


def onnxruntime_p50_ms(model_path: str, inputs: dict, runs: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, inputs)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny_cnn")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--log", help="an existing tuning log to use instead of tuning")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("EDGETUNE_MDNS_INTERFACES", "127.0.0.1")
    # MetaSchedule prints its scheduler tables to stdout at INFO: keep stdout for the JSON figures.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)

    from device_agent.probe import read_profile
    from host.bench.bench import bench
    from host.build.build import reference_io
    from host.models.onnx_import import load_onnx
    from host.tuning.session import TuneOptions, run_session

    target = read_profile().target
    with local_board() as bed:
        log_dir = args.log
        tuned_trials = None
        if log_dir is None:
            log_dir = str(bed["work"] / "log")
            result = run_session(TuneOptions(model=args.model, key=bed["key"], trials=args.trials, log_dir=log_dir,
                                             tracker=bed["tracker"], target=target))
            tuned_trials = result.trials_done
        measured = bench(args.model, bed["key"], bed["tracker"], log_dir=log_dir, runs=args.runs)
    model = load_onnx(args.model)
    inputs, _ = reference_io(model)
    ort_ms = onnxruntime_p50_ms(str(model.path), inputs, args.runs)
    figures = {
        "model": args.model, "trials": tuned_trials, "target": target,
        "tuned_p50_ms": round(measured.tuned.p50_ms, 4), "untuned_p50_ms": round(measured.untuned.p50_ms, 4),
        "onnxruntime_p50_ms": round(ort_ms, 4),
        "tuned_vs_untuned_speedup": round(measured.untuned.p50_ms / measured.tuned.p50_ms, 2),
        "tuned_over_onnxruntime": round(measured.tuned.p50_ms / ort_ms, 2),
    }
    json.dump(figures, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
