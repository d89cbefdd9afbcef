"""`edgetune demo`: the whole loop with this machine as the board, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import psutil

from tests.peers import EDGETUNE, peer_env, run_cli, wait_for


def test_demo_completes_with_a_measured_speedup_and_an_installed_package(tmp_path):
    work = tmp_path / "demo"
    out = run_cli([EDGETUNE, "demo", "--trials", "16", "--runs", "10", "--workdir", str(work)], timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "edgetune demo: summary" in text
    # The summary leads with ONNX Runtime, measured on the board in the same run.
    summary = text[text.index("edgetune demo: summary"):].splitlines()
    versus = re.search(r"([\d.]+) ms tuned vs ([\d.]+) ms with ONNX Runtime on the board: tuned is ([\d.]+)x "
                       r"(faster|slower) than ONNX Runtime", summary[1])
    assert versus, text
    tuned_ms, ort_ms, factor = (float(g) for g in versus.groups()[:3])
    # The factor is the median of the rounds' ratios (each round times both builds within seconds), as
    # the timings file beside the package says; the p50s are over all rounds.
    timings = json.loads((work / "bench.json").read_text())
    assert re.search(r"timings:\s+(\S+)", text).group(1) == str(work / "bench.json")
    assert abs(timings["tuned"]["p50_ms"] - tuned_ms) < 0.0006 and abs(timings["onnxruntime"]["p50_ms"] - ort_ms) < 0.0006
    per_round = sorted(r["tuned"] / r["onnxruntime"] for r in timings["rounds"])
    assert len(per_round) == 3 and f"the median of 3 rounds' ratios" in summary[1]
    ratio = timings["tuned_over_onnxruntime"]
    assert abs(per_round[1] - ratio) < 0.01 * ratio, (ratio, timings["rounds"])
    expected = 1 / ratio if versus.group(4) == "faster" else ratio
    assert (versus.group(4) == "faster") == (ratio <= 1.0)
    assert tuned_ms > 0 and ort_ms > 0 and abs(factor - expected) < 0.006 + 0.001 * expected, (factor, ratio)
    speedup = re.search(r"([\d.]+) ms tuned vs ([\d.]+) ms with TVM's default build: ([\d.]+)x faster", text)
    assert speedup, text
    tuned, untuned, ratio = (float(g) for g in speedup.groups())
    assert tuned > 0 and untuned > 0 and abs(ratio - untuned / tuned) < 0.02 * ratio + 0.01
    assert "boards found on mDNS" in text
    package = re.search(r"package:\s+(\S+\.etpkg)", text).group(1)
    assert os.path.isfile(package)
    slot = re.search(r"installed: slot (\S+), current = (\S+),", text)
    assert slot and slot.group(1) == slot.group(2)
    report = re.search(r"report:\s+(\S+\.html)", text).group(1)
    assert os.path.isfile(report)

    # The agent's own view of its store agrees: the package is installed and current.
    status = run_cli([str(EDGETUNE).replace("edgetune", "edgetune-agent"), "status", "--store", str(work / "store"),
                      "--json"], timeout=120)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["current"] == slot.group(1) and state["model_name"] == "tiny_cnn"
    assert state["self_check_ok"] is True
    # Nothing the demo started is still running.
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", text)]
    assert len(pids) == 2
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)

    # A second run in the same folder: its tracker listens on a new port, and the readiness lines of
    # the first run (still in the appended logs) must not be taken for this run's.
    again = run_cli([EDGETUNE, "demo", "--trials", "16", "--runs", "10", "--workdir", str(work)], timeout=1500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "edgetune demo: summary" in again.stdout
    ports = re.findall(r"tracker listening on [\d.]+:(\d+)", (work / "logs" / "tracker.log").read_text())
    assert len(ports) == 2, ports


def test_ctrl_c_in_the_middle_of_the_demo_leaves_no_process_behind(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.Popen([EDGETUNE, "demo", "--trials", "200", "--workdir", str(work)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=peer_env(), start_new_session=True)
    lines: list[str] = []
    try:
        def tuning_started():
            line = proc.stdout.readline()
            if line:
                lines.append(line)
            return any("trials" in ln and "[" in ln for ln in lines)

        wait_for(tuning_started, 600, "the demo to start tuning", interval=0)
        family = psutil.Process(proc.pid).children(recursive=True)
        started = [int(p) for p in re.findall(r"\(pid (\d+)\)", "".join(lines))]
        assert len(started) == 2 and {p.pid for p in family} >= set(started)
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, "".join(lines) + rest
    time.sleep(1)
    survivors = []
    for p in family:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                survivors.append((p.pid, p.cmdline()))
        except psutil.NoSuchProcess:
            pass
    assert not survivors, survivors
