"""Build with a tuning log, run on a real agent, bench tuned against untuned."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.peers import EDGETUNE, run_cli, wait_registered


def test_build_coverage_and_module_matches_onnxruntime_on_the_agent(cold_log, tuning_bed, tmp_path):
    from host.bench.bench import time_on_board

    log_dir = cold_log["dir"]
    session = json.loads((log_dir / "session.json").read_text())
    history = [json.loads(x) for x in (log_dir / "history.jsonl").read_text().splitlines() if x.strip()]
    measured = {h["task"] for h in history if h["latency_us"] is not None}

    out_dir = tmp_path / "out"
    out = run_cli([EDGETUNE, "build", "tiny_cnn", "--device", tuning_bed["key"], "--log", str(log_dir),
                   "-o", str(out_dir), "--json"], timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    coverage = {c["name"]: c for c in result["coverage"]}
    assert set(coverage) == {t["name"] for t in session["tasks"]}
    for task in session["tasks"]:
        entry = coverage[task["name"]]
        assert entry["tuned"] == (task["index"] in measured)
        if entry["tuned"]:
            best = min(h["latency_us"] for h in history if h["task"] == task["index"] and h["latency_us"] is not None)
            assert abs(entry["best_us"] - best) <= 1e-6 * best + 1e-3
    total_flops = sum(t["flops"] * t["weight"] for t in session["tasks"])
    for task in session["tasks"]:
        assert abs(coverage[task["name"]]["flops_share"] - task["flops"] * task["weight"] / total_flops) < 1e-5
    assert result["tuned"] + result["fallback"] == len(session["tasks"])

    build_json = json.loads((out_dir / "build.json").read_text())
    assert build_json["target"] == session["target"] and build_json["model"]["sha256"] == session["model"]["sha256"]
    ref_in = np.load(out_dir / "reference" / "input.npz")
    ref_out = np.load(out_dir / "reference" / "output.npz")
    timing = time_on_board(("127.0.0.1", tuning_bed["tracker_port"]), tuning_bed["key"], out_dir / "model.so",
                           [ref_in["input"]], [ref_out["output_0"]], runs=5, label="tuned")
    assert timing.max_abs_err is not None and timing.max_abs_err <= 1e-4
    assert timing.board.startswith("127.0.0.1:")


def test_build_without_log_uses_default_schedules_for_every_task(tmp_path, host_target):
    out = run_cli([EDGETUNE, "build", "tiny_cnn", "--device", "x86host", "--target", json.dumps(host_target),
                   "-o", str(tmp_path / "out"), "--json"], timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tuned"] == 0 and result["fallback"] == result["tasks"] > 0
    check = result["host_check"]
    assert check["max_abs_err"] <= 1e-4
    # This machine runs the target: the build is timed against ONNX Runtime and TVM's untuned build.
    assert check["tuned_p50_ms"] > 0 and check["onnxruntime_p50_ms"] > 0 and check["untuned_p50_ms"] > 0

    text = run_cli([EDGETUNE, "build", "tiny_cnn", "--device", "x86host", "--target", json.dumps(host_target),
                    "-o", str(tmp_path / "out2"), "--no-compare"], timeout=600)
    assert text.returncode == 0, text.stderr
    assert "ran here, max abs error against ONNX Runtime" in text.stdout and "ms ONNX Runtime" not in text.stdout


def test_build_refuses_a_log_of_another_target(cold_log, tmp_path):
    other = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}
    out = run_cli([EDGETUNE, "build", "tiny_cnn", "--device", "rpi4", "--log", str(cold_log["dir"]),
                   "--target", json.dumps(other), "-o", str(tmp_path / "out")], timeout=300)
    assert out.returncode == 1
    assert "records of different targets never mix" in out.stderr
    assert not (tmp_path / "out" / "model.so").exists()


def test_bench_reports_percentiles_and_speedup(cold_log, tuning_bed):
    out = run_cli([EDGETUNE, "bench", "tiny_cnn", "--device", tuning_bed["key"], "--log", str(cold_log["dir"]),
                   "--tracker", tuning_bed["tracker"], "--runs", "20", "--json"], timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for label in ("tuned", "untuned", "onnxruntime"):
        t = result[label]
        assert t["runs"] == 20
        assert 0 < t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"]
        assert t["mean_ms"] > 0 and (t["first_load_ms"] > 0 or label == "onnxruntime")
        assert t["max_abs_err"] <= 1e-4
        assert t["board"].startswith("127.0.0.1:")
    assert result["onnxruntime"]["label"].startswith("onnxruntime ")  # the board's ONNX Runtime, with its version
    # The ratios come from the unrounded medians; the printed medians carry 4 decimals.
    assert result["speedup"] == pytest.approx(result["untuned"]["p50_ms"] / result["tuned"]["p50_ms"], rel=2e-3)
    # The 20 runs of each build were taken in three rounds (7, 7, 6) alternating the builds; the ratio to
    # ONNX Runtime is the median of the rounds' ratios.
    rounds = result["rounds"]
    assert len(rounds) == 3 and all(set(r) == {"tuned", "untuned", "onnxruntime"} for r in rounds), rounds
    assert result["tuned_over_onnxruntime"] == pytest.approx(
        float(np.median([r["tuned"] / r["onnxruntime"] for r in rounds])), rel=2e-3)

    text = run_cli([EDGETUNE, "bench", "tiny_cnn", "--device", tuning_bed["key"], "--log", str(cold_log["dir"]),
                    "--tracker", tuning_bed["tracker"], "--runs", "5"], timeout=600)
    assert text.returncode == 0, text.stderr
    assert "P50 ms" in text.stdout and "P99 ms" in text.stdout and "than TVM's untuned build (p50)" in text.stdout
    assert re.search(r"tuned is [\d.]+x (faster|slower) than ONNX Runtime on the board \(p50\) on tiny_cnn for key "
                     r"'[^']+' \(median of 3 rounds\)", text.stdout), text.stdout

    # Rounds are at least one and at most the runs: anything else is refused before any timing.
    bad = run_cli([EDGETUNE, "bench", "tiny_cnn", "--device", tuning_bed["key"], "--log", str(cold_log["dir"]),
                   "--tracker", tuning_bed["tracker"], "--runs", "5", "--rounds", "6"], timeout=300)
    assert bad.returncode == 1 and "--rounds must be between 1 and --runs (5)" in bad.stderr, bad.stderr


def test_a_plain_tvm_server_has_no_onnxruntime_and_bench_says_so(peers, tmp_path):
    """A stock `python -m tvm.exec.rpc_server` (what a phone runs) cannot time ONNX Runtime: a note, no failure."""
    from host.bench.bench import onnxruntime_on_board
    from host.build.build import reference_io
    from host.models.onnx_import import load_onnx
    from tests.peers import start_stock_server

    tracker = peers.tracker(advertise=False, args=("--allow-plain-key", "stockkey"))  # a stock server has no team key
    server = start_stock_server(tmp_path / "peers", "stockkey", f"127.0.0.1:{tracker.port}")
    try:
        wait_registered(tracker.port, "stockkey")
        model = load_onnx("tiny_cnn")
        inputs, expected = reference_io(model)
        timing, note = onnxruntime_on_board(("127.0.0.1", tracker.port), "stockkey", model.path, inputs, expected, 3)
    finally:
        server.stop()
    assert timing is None
    assert "cannot run ONNX Runtime" in note and "update edgetune-agent" in note
