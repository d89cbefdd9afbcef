"""Tuning sessions against real agents through a real tracker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import COLD_TRIALS, tune_cli
from tests.peers import EDGETUNE, free_port, peer_env, run_cli, wait_for, wait_registered


def records_of(log_dir: Path) -> list:
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    db = JSONDatabase(str(log_dir / "database_workload.json"), str(log_dir / "database_tuning_record.json"),
                      allow_missing=False)
    return list(db.get_all_tuning_records())


def history_of(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "history.jsonl").read_text().splitlines() if line.strip()]


def session_of(log_dir: Path) -> dict:
    return json.loads((log_dir / "session.json").read_text())


def unique_records(records) -> int:
    import tvm_ffi

    return len({(tvm_ffi.structural_hash(r.workload.mod), str(r.trace)) for r in records})


def tune_then(argv: list[str], log_dir: Path, action, timeout: float = 900) -> tuple[int, str, str]:
    """Run `edgetune tune` as a process; after its first measured trials call ``action`` (e.g. kill a board);
    return its exit code and output. The tuner is killed if it outlives the test."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=peer_env(),
                            start_new_session=True)
    try:
        wait_for(lambda: (log_dir / "history.jsonl").exists() and len(history_of(log_dir)) >= 2, 600,
                 "the first measured trials")
        action()
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return proc.returncode, stdout, stderr


def test_tune_writes_stock_database_and_log_show_lists_every_task(cold_log):
    log_dir = cold_log["dir"]
    records = records_of(log_dir)
    assert len(records) == COLD_TRIALS
    assert unique_records(records) == COLD_TRIALS
    assert sum(1 for r in records if r.run_secs is not None) >= 12  # measured, not just recorded

    session = session_of(log_dir)
    assert session["status"] == "completed" and session["trials_done"] == COLD_TRIALS
    assert session["target"]["mtriple"] == "x86_64-linux-gnu"
    assert len(session["model"]["sha256"]) == 64
    history = history_of(log_dir)
    assert [h["trial"] for h in history] == list(range(1, COLD_TRIALS + 1))
    assert all(h["board"] and h["board"].startswith("127.0.0.1:") for h in history)

    events = cold_log["events"]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    progress = [e for e in events if e["event"] == "trials"]
    assert progress and progress[-1]["done"] == COLD_TRIALS and progress[-1]["budget"] == COLD_TRIALS

    out = run_cli([EDGETUNE, "log", "show", str(log_dir), "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    names = {t["name"] for t in shown["tasks"]}
    assert names == {t["name"] for t in session["tasks"]}
    tuned = [t for t in shown["tasks"] if t["best_us"] is not None]
    assert tuned and all(t["gflops"] and t["gflops"] > 0 for t in tuned if t["flops"])
    conv = next(t for t in tuned if t["name"].startswith("fused_conv2d"))
    assert any("tile" in line for line in conv["decisions"])


def test_untuned_kernels_are_measured_first_and_start_the_curve(cold_log):
    """Before its first trial a session times every kernel without a schedule (not a trial, not in the
    database): the report's curve starts at the untuned model and only falls."""
    from host.report.load import estimate_curve, load

    log_dir = cold_log["dir"]
    session = session_of(log_dir)
    untuned = session["untuned_us"]
    assert sorted(untuned) == sorted(str(t["index"]) for t in session["tasks"])
    assert all(v is not None and v > 0 for v in untuned.values())
    best = {t["index"]: min(h["latency_us"] for h in history_of(log_dir) if h["task"] == t["index"]
                            and h["latency_us"] is not None) for t in session["tasks"]}
    assert sum(untuned[str(i)] for i in best) > sum(best.values())  # tuning paid on this board
    event = next(e for e in cold_log["events"] if e["event"] == "untuned")
    weights = {str(t["index"]): t["weight"] for t in session["tasks"]}
    assert event["estimated_ms"] == pytest.approx(sum(weights[k] * v for k, v in untuned.items()) / 1e3, rel=1e-3)
    assert len(records_of(log_dir)) == session["trials_done"] == COLD_TRIALS  # not trials, not records

    xs, ys, complete = estimate_curve(load(log_dir))
    assert xs[0] == 0 and ys[0] == pytest.approx(event["estimated_ms"], rel=1e-3) and all(complete)
    assert all(later <= earlier for earlier, later in zip(ys, ys[1:]))


def test_two_agents_under_one_key_both_measure(peers, tmp_path):
    tracker = peers.tracker()
    addr = f"127.0.0.1:{tracker.port}"
    a = peers.agent("pair", "pair-a", addr)
    b = peers.agent("pair", "pair-b", addr)
    wait_registered(tracker.port, "pair", count=2)
    out = tune_cli(addr, "pair", tmp_path / "log", 14, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    measured_by = session_of(tmp_path / "log")["measured_by"]
    assert set(measured_by) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert all(count > 0 for count in measured_by.values())
    for agent in (a, b):
        assert "session 1 from" in agent.log()


def test_sigkill_mid_run_then_resume(tuning_bed, tmp_path):
    log_dir = tmp_path / "log"
    argv = [EDGETUNE, "tune", "tiny_cnn", "--device", tuning_bed["key"], "--trials", "24", "--log", str(log_dir),
            "--tracker", tuning_bed["tracker"], "--seed", "3", "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=peer_env(),
                            start_new_session=True)
    try:
        wait_for(lambda: (log_dir / "history.jsonl").exists() and len(history_of(log_dir)) >= 4, 600,
                 "the first measured trials")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    killed_at = len(records_of(log_dir))
    assert 4 <= killed_at < 24

    out = tune_cli(tuning_bed["tracker"], tuning_bed["key"], log_dir, 24, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    start = json.loads(out.stdout.splitlines()[0])
    assert start["resumed"] is True and start["done"] == killed_at
    records = records_of(log_dir)
    assert len(records) == 24
    assert unique_records(records) == 24
    history = history_of(log_dir)
    assert len(history) == 24 and len({h["trial"] for h in history}) == 24
    session = session_of(log_dir)
    assert [r["status"] for r in session["runs"]] == ["killed", "completed"]  # closed by the resume
    assert [r["trials"] for r in session["runs"]] == [killed_at, 24 - killed_at]
    assert session["cost_model"]["pretrained_on_own"] >= 1


def test_board_killed_mid_run_session_continues_on_the_other(peers, tmp_path):
    tracker = peers.tracker()
    addr = f"127.0.0.1:{tracker.port}"
    a = peers.agent("duo", "duo-a", addr)
    b = peers.agent("duo", "duo-b", addr)
    wait_registered(tracker.port, "duo", count=2)
    log_dir = tmp_path / "log"
    argv = [EDGETUNE, "tune", "tiny_cnn", "--device", "duo", "--trials", "20", "--log", str(log_dir),
            "--tracker", addr, "--deadline", "30", "--json"]
    code, _, stderr = tune_then(argv, log_dir, a.kill)
    assert code == 0, stderr[-3000:]
    assert len(records_of(log_dir)) == 20
    later = [h for h in history_of(log_dir)[4:] if h["latency_us"] is not None]
    assert later and all(h["board"] == f"127.0.0.1:{b.port}" for h in later[-5:])


def test_only_board_killed_stops_with_deadline_and_intact_log(peers, tmp_path):
    tracker = peers.tracker()
    addr = f"127.0.0.1:{tracker.port}"
    agent = peers.agent("solo", "solo-a", addr)
    wait_registered(tracker.port, "solo")
    log_dir = tmp_path / "log"
    argv = [EDGETUNE, "tune", "tiny_cnn", "--device", "solo", "--trials", "200", "--log", str(log_dir),
            "--tracker", addr, "--deadline", "8"]
    code, _, stderr = tune_then(argv, log_dir, agent.kill, timeout=300)
    assert code == 3, stderr[-3000:]
    assert "no board of key 'solo' was available for 8 s" in stderr
    assert "run the same command again to resume" in stderr
    assert "waiting:" in stderr
    assert "Traceback" not in stderr
    from device_agent.probe import read_llc_kib

    llc_kib = read_llc_kib("/", 0)  # what the agent advertised: tiny_cnn's 0.2 MB fit unless it is unknown
    assert (f"timing: kernels timed hot (weights 0.2 MB, the board's last-level cache {llc_kib} KiB)" in stderr
            if llc_kib else "timing: kernels over 512 KiB timed cold (weights 0.2 MB" in stderr), stderr[-3000:]
    session = session_of(log_dir)
    assert session["status"] == "stopped-no-board"
    records = records_of(log_dir)
    assert len(records) == session["trials_done"] == len(history_of(log_dir))
    assert 2 <= len(records) < 200


def test_from_log_starts_with_trained_model_and_a_good_first_batch(cold_log, tuning_bed, tmp_path):
    cold = cold_log["dir"]
    log_dir = tmp_path / "warm"
    out = tune_cli(tuning_bed["tracker"], tuning_bed["key"], log_dir, 10, "--from-log", str(cold), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    session = session_of(log_dir)
    cost = session["cost_model"]
    assert cost["seeded_from"] == str(cold)
    assert cost["pretrained_on_seed"] >= 12
    assert cost["trained_before_first_trial"] is True
    tasks = len(session["tasks"])
    assert cost["replayed_seed_best"] == tasks
    assert tasks < cost["replayed_seed"] <= tasks + 10 // 4  # then runners-up, within a quarter of the budget

    # The first batch of the seeded session re-measures the cold log's best schedule of each task: its
    # first trial of every task is that schedule (the same trace), not one the search found again.
    def in_order(folder: Path) -> list[tuple[str, list, list]]:
        """(workload hash, trace, run seconds) of each record, in the order they were committed."""
        hashes = [json.loads(line)[0] for line in (folder / "database_workload.json").read_text().splitlines()
                  if line.strip()]
        rows = [json.loads(line) for line in (folder / "database_tuning_record.json").read_text().splitlines()
                if line.strip()]
        return [(hashes[w], record[0], [float(x) for x in record[1] or []]) for w, record in rows]

    cold_best: dict[str, tuple[float, list]] = {}
    for workload, trace, secs in in_order(cold):
        if secs and max(secs) < 1e9 and (workload not in cold_best or sum(secs) / len(secs) < cold_best[workload][0]):
            cold_best[workload] = (sum(secs) / len(secs), trace)
    first_warm: dict[str, list] = {}
    for workload, trace, _ in in_order(log_dir):
        first_warm.setdefault(workload, trace)
    assert len(cold_best) == tasks and set(first_warm) == set(cold_best)
    assert all(first_warm[w] == cold_best[w][1] for w in cold_best)
    assert sorted(h["task"] for h in history_of(log_dir)[:tasks]) == list(range(tasks))


def test_bad_inputs_give_one_line_errors(tuning_bed, tmp_path):
    corrupt = tmp_path / "broken.onnx"
    corrupt.write_bytes(b"\x08\x07this is not a protobuf model" * 10)
    cases = [
        (["tune", str(corrupt), "--device", tuning_bed["key"]], "is not a valid ONNX file"),
        (["tune", "tiny_cnn", "--device", "no-such-key", "--target",
          '{"kind":"llvm","mtriple":"x86_64-linux-gnu","mcpu":"znver4","num-cores":2}'],
         "no board is registered under key 'no-such-key'"),
        (["tune", "tiny_cnn", "--device", tuning_bed["key"], "--tracker", f"127.0.0.1:{free_port()}"],
         "does not answer"),
    ]
    for extra, expected in cases:
        argv = [EDGETUNE, *extra, "--trials", "4", "--log", str(tmp_path / "bad-log")]
        if "--tracker" not in extra:
            argv += ["--tracker", tuning_bed["tracker"]]
        out = run_cli(argv, timeout=300)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == 1, out.stderr
        assert len(lines) == 1 and expected in lines[0], out.stderr
    out = run_cli([EDGETUNE, "tune", "tiny_cnn", "--device", tuning_bed["key"], "--trials", "4", "--log",
                   str(tmp_path / "bad-log"), "--strategy", "annealing"], timeout=120)
    assert out.returncode == 2 and "'annealing' is not one of 'xgb', 'random'" in out.stderr
    # nothing half-made was left behind by the refused runs
    assert not (tmp_path / "bad-log" / "database_tuning_record.json").exists()


def test_early_stopping_ends_tasks_that_stop_improving(tuning_bed, tmp_path):
    log_dir = tmp_path / "log"
    out = tune_cli(tuning_bed["tracker"], tuning_bed["key"], log_dir, 40, "--early-stopping", "1", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    session = session_of(log_dir)
    stopped = session["runs"][-1]["early_stopped"]
    assert stopped, "no task stopped early with --early-stopping 1"
    history = history_of(log_dir)
    assert len(history) == session["trials_done"] <= 40
    names = {t["index"]: t["name"] for t in session["tasks"]}
    for name in stopped:
        # The search's own trials (a small kernel's extra candidates are timed beside the search, see
        # variants.py, and do not count for its early stop).
        trials = [h for h in history if names[h["task"]] == name and not h.get("variant")]
        prior = [h["latency_us"] for h in trials[:-1] if h["latency_us"] is not None]
        last = trials[-1]["latency_us"]
        # the task's last trial did not beat its best so far: that is what stopped it
        assert prior and (last is None or last >= min(prior))


def test_tracker_gone_mid_run_stops_with_a_clear_message(peers, tmp_path):
    tracker = peers.tracker(advertise=False)
    addr = f"127.0.0.1:{tracker.port}"
    peers.agent("gone", "gone-a", addr, advertise=False)
    wait_registered(tracker.port, "gone")
    log_dir = tmp_path / "log"
    argv = [EDGETUNE, "tune", "tiny_cnn", "--device", "gone", "--trials", "200", "--log", str(log_dir),
            "--tracker", addr, "--deadline", "8", "--target",
            '{"kind":"llvm","mtriple":"x86_64-linux-gnu","mcpu":"znver4","num-cores":2}']
    code, _, stderr = tune_then(argv, log_dir, tracker.kill, timeout=300)
    assert code == 3, stderr[-3000:]
    assert "does not answer" in stderr or "went away" in stderr  # the waiting message names the tracker
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    assert len(records_of(log_dir)) == session_of(log_dir)["trials_done"] == len(history_of(log_dir))


def test_log_merge_and_export(cold_log, tmp_path):
    cold = cold_log["dir"]
    out = run_cli([EDGETUNE, "log", "merge", str(cold), str(cold), "-o", str(tmp_path / "merged"), "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    merged = json.loads(out.stdout)
    assert merged["records"] == COLD_TRIALS and merged["duplicates_dropped"] == COLD_TRIALS  # kept once
    assert len(records_of(tmp_path / "merged")) == COLD_TRIALS

    out = run_cli([EDGETUNE, "log", "export", str(cold), "-o", str(tmp_path / "best"), "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    best = records_of(tmp_path / "best")
    tuned_tasks = {h["task"] for h in history_of(cold) if h["latency_us"] is not None}
    assert len(best) == len(tuned_tasks)

    other = tmp_path / "other"
    other.mkdir()
    session = session_of(cold)
    session["target"] = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "num-cores": 4}
    (other / "session.json").write_text(json.dumps(session))
    (other / "database_tuning_record.json").write_text("")
    out = run_cli([EDGETUNE, "log", "merge", str(cold), str(other), "-o", str(tmp_path / "mixed")], timeout=300)
    assert out.returncode == 1 and "records of different targets never mix" in out.stderr


def test_every_task_is_measured_in_a_short_first_pass_then_trials_follow_model_time(cold_log):
    from host.tuning.scheduler import batch_sizes

    session, history = session_of(cold_log["dir"]), history_of(cold_log["dir"])
    assert session["layout_rewrite"] is True and session["layout"] == "NHWC"
    # tiny_cnn's one 3x3 stride-1 convolution (16 -> 32 channels at 32x32) is a Winograd kernel.
    assert session["winograd"] == "fused"
    assert len([t for t in session["tasks"] if "winograd" in t["name"]]) == 1, [t["name"] for t in session["tasks"]]
    # Timed cold only when the weights do not fit in the board's last-level cache (the agent says its
    # size; tiny_cnn's 180 kB fit in any this machine has).
    from device_agent.probe import read_llc_kib

    llc_kib = read_llc_kib("/", 0)
    assert session["board"]["llc_kib"] == llc_kib
    assert session["cold_weights"] is (llc_kib == 0 or 180_008 > llc_kib * 1024)
    (start,) = [e for e in cold_log["events"] if e["event"] == "start"]
    assert (start["cold_weights"], start["weight_mb"], start["llc_kib"]) == (session["cold_weights"], 0.2, llc_kib)
    assert start["winograd_tasks"] == 1
    # ONNX Runtime was timed on the board before the first trial: the latency the session has to beat.
    assert session["baseline"]["onnxruntime_p50_ms"] > 0 and session["baseline"]["board"].startswith("127.0.0.1:")
    assert [e["event"] for e in cold_log["events"]].index("baseline") < [e["event"] for e in cold_log["events"]].index("trials")
    tasks = session["tasks"]
    first, _ = batch_sizes(session["budget"], len(tasks))
    # One batch = consecutive trials of one task recorded together; a small kernel's extra candidates
    # (variants.py) are trials of their own, timed between batches.
    batches: list[list[dict]] = []
    for entry in (e for e in history if not e.get("variant")):
        if batches and batches[-1][0]["task"] == entry["task"] and batches[-1][0]["elapsed_s"] == entry["elapsed_s"]:
            batches[-1].append(entry)
        else:
            batches.append([entry])
    assert [b[0]["task"] for b in batches[:len(tasks)]] == list(range(len(tasks)))
    assert all(len(b) <= first for b in batches[:len(tasks)])
    assert len(batches) > len(tasks), "the budget left after the first pass was not spent"
    # What the scheduler knew when it chose the batch after the first pass: every trial before it.
    best = {}
    for entry in history[:history.index(batches[len(tasks)][0])]:
        if entry["latency_us"] is not None:
            best[entry["task"]] = min(best.get(entry["task"], entry["latency_us"]), entry["latency_us"])
    weight = {t["index"]: t["weight"] for t in tasks}
    unmeasured = [t["index"] for t in tasks if t["index"] not in best]  # retried before anything else
    # The largest claim: weight x best latency, counted up to twice for a kernel below the model's best
    # FLOP rate (scheduler.room).
    from host.tuning.scheduler import ROOM_WEIGHT

    flops = {t["index"]: t["flops"] for t in tasks}
    rates = {i: flops[i] / best[i] for i in best if flops[i] > 0}
    top = max(rates.values())
    heaviest = max(best, key=lambda i: (weight[i] * best[i] * (1 + ROOM_WEIGHT * (1 - rates.get(i, top) / top)), -i))
    assert batches[len(tasks)][0]["task"] == (unmeasured[0] if unmeasured else heaviest)


def test_a_new_best_schedule_is_carried_over_to_its_sibling_task(tuning_bed, tmp_path):
    """One conv shape in two places (with and without a residual add): each task's new best schedule is
    measured on the other as a trial of it, inside the budget, and lands in the log like any trial."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    from tests.helpers_build import twin_convs_onnx

    model = twin_convs_onnx(tmp_path / "twin.onnx")
    log_dir = tmp_path / "log"
    out = tune_cli(tuning_bed["tracker"], tuning_bed["key"], log_dir, 16, "--json", "--no-schedules", model=str(model))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    session, history = session_of(log_dir), history_of(log_dir)
    convs = [t["index"] for t in session["tasks"] if "conv2d" in t["name"]]
    assert len(convs) == 2
    carried = session["runs"][-1]["carried_to_siblings"]
    assert carried["trials"] >= 1 and 0 <= carried["improved"] <= carried["trials"]
    # Inside the budget: every trial, carried or searched, is one line of the history and one record.
    assert len(history) == session["trials_done"] == 16
    assert len(JSONDatabase(work_dir=str(log_dir)).get_all_tuning_records()) == 16
    # The first conv's first batch is followed by its best schedule measured on the other conv, before the
    # other's own first batch (it has no time yet, so the carried schedule is worth a trial).
    first = history[0]["task"]
    assert first in convs
    after = next(i for i, e in enumerate(history) if e["task"] != first)
    sibling = next(c for c in convs if c != first)
    assert history[after]["task"] == sibling and history[after]["elapsed_s"] != history[after + 1]["elapsed_s"]
    assert history[after]["latency_us"] is not None
    assert history[after]["carried_from"] == session["tasks"][first]["name"]
    assert sum(1 for e in history if e.get("carried_from")) == carried["trials"]
    end = json.loads(out.stdout.strip().splitlines()[-1])
    assert end["event"] == "end" and end["carried_to_siblings"] == carried
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    carried_events = [e for e in events if e.get("carried_from")]
    assert len(carried_events) == carried["trials"]
    assert {e["task"] for e in carried_events} <= {session["tasks"][c]["name"] for c in convs}


def test_small_kernels_are_also_timed_on_one_thread_and_unscheduled_after_the_first_pass(tuning_bed, tmp_path):
    """tiny_cnn's sub-microsecond kernels (its mean, its classifier): once every task has had its first
    batch, each small task's best schedule is timed with its parallel loops run serially and the kernel
    without a schedule, as trials inside the budget; the build takes whichever record is fastest."""
    from host.build.build import build
    from host.tuning.variants import SERIAL, SMALL_KERNEL_US, UNSCHEDULED
    from tests.helpers_build import TINY_CNN

    log_dir = tmp_path / "log"
    out = tune_cli(tuning_bed["tracker"], tuning_bed["key"], log_dir, 40, "--json", "--no-schedules",
                   model=str(TINY_CNN))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    session, history = session_of(log_dir), history_of(log_dir)
    tasks = session["tasks"]
    variants = [(i, e) for i, e in enumerate(history) if e.get("variant")]
    assert variants and {e["variant"] for _, e in variants} <= {SERIAL, UNSCHEDULED}
    # Not before the first pass is over: every task had its first batch.
    assert {e["task"] for e in history[:variants[0][0]]} == set(range(len(tasks)))
    for i, entry in variants:  # only for a task whose best so far ran in under SMALL_KERNEL_US
        before = [e["latency_us"] for e in history[:i] if e["task"] == entry["task"] and e["latency_us"] is not None]
        assert before and min(before) < SMALL_KERNEL_US, entry
    names = {t["index"]: t["name"] for t in tasks}
    unscheduled = {names[e["task"]] for _, e in variants if e["variant"] == UNSCHEDULED}
    assert {"mean1", "fused_matmul_add51"} <= unscheduled, unscheduled
    # Each candidate once per task (an unscheduled kernel is one schedule).
    assert len(unscheduled) == sum(1 for _, e in variants if e["variant"] == UNSCHEDULED)
    # Trials like any other: inside the budget, one record each, counted in the run and in the end event.
    assert len(history) == session["trials_done"] == 40 == len(records_of(log_dir))
    small = session["runs"][-1]["small_kernels"]
    assert small["trials"] == len(variants) and 0 <= small["improved"] <= small["trials"]
    end = json.loads(out.stdout.strip().splitlines()[-1])
    assert end["event"] == "end" and end["small_kernels"] == small
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [e["variant"] for e in events if e.get("variant")] == [e["variant"] for _, e in variants]

    built = build(str(TINY_CNN), "test-board", tmp_path / "out", log_dir=str(log_dir), compare=False,
                  use_schedules=False)
    info = json.loads((tmp_path / "out" / "build.json").read_text())
    assert info["host_check"]["max_abs_err"] < 1e-4
    assert all(c.tuned for c in built.coverage)


def test_a_hot_session_ends_by_timing_its_large_kernels_best_candidates_cold_and_the_build_uses_the_fastest(
        tuning_bed, tmp_path):
    """Timed hot, a session's last step times each large kernel's best few candidates again after a cache
    flush (as the model runs them): not trials (no budget, no record); the build applies the fastest."""
    import sys

    from tests.conftest import HOST_TARGET
    from tests.helpers_build import twin_convs_onnx

    from host.build.build import build
    from host.tuning.finals import FINALISTS
    from host.tuning.timing import COLD_ABOVE_BYTES

    # Two 3x3 convs of 32 channels at 64x64: 1.1 MB of arguments each, above COLD_ABOVE_BYTES.
    model = twin_convs_onnx(tmp_path / "twin.onnx", channels=32, size=64)
    assert 2 * 32 * 64 * 64 * 4 > COLD_ABOVE_BYTES
    log_dir = tmp_path / "log"
    # The session in a process of its own, as `tune` runs it, timed hot (the CLI decides that by the
    # board's cache; the options say it here).
    script = (
        "import json, sys\n"
        "from host.tuning.session import TuneOptions, run_session\n"
        "emit = lambda event: print(json.dumps(event, default=str), flush=True)\n"
        f"result = run_session(TuneOptions(model={str(model)!r}, key={tuning_bed['key']!r}, trials=24, "
        f"log_dir={str(log_dir)!r}, tracker=('127.0.0.1', {tuning_bed['tracker_port']}), "
        f"target={HOST_TARGET!r}, seed=1, use_schedules=False, cold_weights=False), emit)\n"
        "sys.exit(0 if result.status == 'completed' else 1)\n")
    out = run_cli([sys.executable, "-c", script], timeout=900, cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    session = session_of(log_dir)
    assert session["cold_weights"] is False
    names = {t["workload_hash"]: t["name"] for t in session["tasks"]}
    convs = {h for h, name in names.items() if "conv2d" in name}
    finals = session["finals"]
    # Both convs are there (the output's transpose, 1 MB of arguments too, may be).
    assert convs <= set(finals) <= set(names), (finals.keys(), names)
    for workload, entry in finals.items():
        finalists = entry["finalists"]
        assert entry["task"] == names[workload] and 2 <= len(finalists) <= FINALISTS
        logged = [f["logged_us"] for f in finalists]
        assert logged == sorted(logged) and all(f["cold_us"] > 0 for f in finalists)  # best hot first, all ran
        assert entry["chosen"] == min(finalists, key=lambda f: f["cold_us"])["key"]
    (event,) = [e for e in events if e["event"] == "finals"]
    assert event["tasks"] == len(finals) and event["timed"] == sum(len(e["finalists"]) for e in finals.values())
    assert session["runs"][-1]["finals"] == {k: event[k] for k in ("tasks", "timed", "changed")}
    # Not trials: the budget went to the search, and the log holds one record per trial.
    assert len(history_of(log_dir)) == session["trials_done"] == 24 == len(records_of(log_dir))

    built = build(str(model), "test-board", tmp_path / "out", log_dir=str(log_dir), compare=False,
                  use_schedules=False)
    info = json.loads((tmp_path / "out" / "build.json").read_text())
    assert info["finals"] == len(finals) and info["host_check"]["max_abs_err"] < 1e-4
    assert all(c.tuned for c in built.coverage)


def test_overlap_builds_the_next_batch_while_the_board_measures_and_loses_nothing(tuning_bed, tmp_path):
    """The board here is this machine, so by default nothing is built while it times (a build would skew
    the timing); forced on, the next batch is built while the board measures, and every trial is still
    measured, recorded once and in the history."""
    plain = tmp_path / "plain"
    out = tune_cli(tuning_bed["tracker"], tuning_bed["key"], plain, 24, "--strategy", "random", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    start = json.loads(out.stdout.splitlines()[0])
    assert start["event"] == "start" and start["overlap"] is False
    run = session_of(plain)["runs"][-1]
    assert run["overlap"] is False and run["overlapped_batches"] == 0 and run["prepared_while_measuring_s"] == 0

    log_dir = tmp_path / "overlap"
    out = tune_cli(tuning_bed["tracker"], tuning_bed["key"], log_dir, 24, "--strategy", "random", "--overlap")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "builds overlap measurements" in out.stderr
    session = session_of(log_dir)
    run = session["runs"][-1]
    assert session["status"] == "completed" and run["overlap"] is True
    assert run["overlapped_batches"] >= 1 and run["prepared_while_measuring_s"] > 0, run
    history = history_of(log_dir)
    records = records_of(log_dir)
    assert [h["trial"] for h in history] == list(range(1, 25)) and len(records) == 24 == unique_records(records)
    assert {h["task"] for h in history} == set(range(len(session["tasks"])))
    assert sum(1 for h in history if h["latency_us"] is not None) >= 20
