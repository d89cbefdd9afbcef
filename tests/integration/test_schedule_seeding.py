"""`tune` adds every session's records to the schedule store and starts the next session from it: the
cost model trained on the store's records of the CPU class, the best schedule of each matching task
measured first. Real tracker and agent (the shared tuning bed), a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

from host.schedules.store import ScheduleStore, cpu_class
from tests.helpers_schedules import retargeted
from tests.integration.conftest import COLD_TRIALS, tune_cli
from tests.integration.test_tuning import history_of, session_of
from tests.peers import EDGETUNE, run_cli


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _store_records(location: Path) -> dict[str, int]:
    with ScheduleStore(str(location)) as store:
        return {c.cpu_class: c.records for c in store.classes()}


def test_a_session_adds_to_the_store_and_the_next_starts_from_it(tuning_bed, host_target, tmp_path):
    store = tmp_path / "schedules.sqlite"
    tracker, key = tuning_bed["tracker"], tuning_bed["key"]
    target = ["--target", json.dumps(host_target)]

    first = tune_cli(tracker, key, tmp_path / "first", 12, "--schedules", str(store), "--json", *target)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "seeded" not in [e["event"] for e in _events(first.stdout)]  # the store was empty
    klass = cpu_class(host_target)
    assert _store_records(store) == {klass: 12}
    assert session_of(tmp_path / "first")["schedules"]["added"] == 12
    measured_tasks = {h["task"] for h in history_of(tmp_path / "first") if h["latency_us"] is not None}

    second = tune_cli(tracker, key, tmp_path / "second", 10, "--schedules", str(store), "--json", *target)
    assert second.returncode == 0, second.stderr[-3000:]
    [seeded] = [e for e in _events(second.stdout) if e["event"] == "seeded"]
    assert seeded["records"] == 12 and seeded["source"] == f"schedule store {store}"
    assert seeded["tasks_matched"] == len(measured_tasks)
    session = session_of(tmp_path / "second")
    cost = session["cost_model"]
    assert cost["seeded_from"] == f"schedule store {store}"
    assert cost["pretrained_on_seed"] == 12
    assert cost["replayed_seed_best"] == len(measured_tasks)
    # Each task a replay measured skips the search's short first pass.
    assert cost["first_pass_skipped"] == len(measured_tasks)
    # The replayed schedules are the session's first trials and count as trials: the best of each matched
    # task, then runners-up of the tasks the first session measured more than once, within a quarter of
    # the budget (10 // 4).
    measured = [h["task"] for h in history_of(tmp_path / "first") if h["latency_us"] is not None]
    runners_up = sorted({t for t in measured if measured.count(t) > 1})
    assert runners_up, "the first session measured no task twice: nothing to check the runners-up on"
    assert cost["replayed_seed"] == len(measured_tasks) + min(2, sum(min(2, measured.count(t) - 1) for t in runners_up))
    history = history_of(tmp_path / "second")
    assert len(history) == 10
    assert sorted(h["task"] for h in history[:len(measured_tasks)]) == sorted(measured_tasks)
    assert {h["task"] for h in history[len(measured_tasks):cost["replayed_seed"]]} <= set(runners_up)
    # The second session's own new records joined the store; the replayed ones were there already.
    assert session["schedules"]["seed_records"] == 12
    assert 12 <= _store_records(store)[klass] <= 22

    cold = tune_cli(tracker, key, tmp_path / "cold", 4, "--schedules", str(store), "--no-schedules", "--json",
                    *target)
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert "seeded" not in [e["event"] for e in _events(cold.stdout)]
    assert "schedules" not in session_of(tmp_path / "cold")
    assert _store_records(store)[klass] <= 22


def test_an_unreachable_store_is_a_one_line_error_before_any_trial(tuning_bed, host_target, tmp_path):
    out = tune_cli(tuning_bed["tracker"], tuning_bed["key"], tmp_path / "log", 4,
                   "--schedules", "postgresql://nobody@127.0.0.1:1/none", "--target", json.dumps(host_target))
    assert out.returncode == 1
    assert "cannot open the schedule store" in out.stderr and "--no-schedules" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "log" / "database_tuning_record.json").exists()


def test_build_fills_the_tasks_a_log_lacks_from_the_store_of_its_cpu_class_only(cold_log, host_target, tmp_path):
    # The store holds the cold session's records; the build has no log, so every task it has a record
    # of comes from the store, and the module still matches ONNX Runtime.
    store = tmp_path / "schedules.sqlite"
    with ScheduleStore(str(store)) as opened:
        assert opened.import_log(cold_log["dir"]).added == COLD_TRIALS
    measured = {h["task_name"] for h in history_of(cold_log["dir"]) if h["latency_us"] is not None}
    out = run_cli([EDGETUNE, "build", "tiny_cnn", "--device", "x86host", "--target", json.dumps(host_target),
                   "-o", str(tmp_path / "out"), "--schedules", str(store), "--no-compare", "--json"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    built = json.loads((tmp_path / "out" / "build.json").read_text())
    assert set(built["coverage"]["from_store"]) == measured
    assert built["coverage"]["tuned"] == 0
    assert built["coverage"]["fallback"] == len(built["coverage"]["tasks"]) - len(measured)
    assert built["host_check"]["max_abs_err"] < 1e-4

    # The same schedules stored as another CPU's: none of them is used for this one.
    other = tmp_path / "other.sqlite"
    with ScheduleStore(str(other)) as opened:
        foreign = dict(host_target, mcpu="cortex-a72", mtriple="aarch64-linux-gnu")
        opened.import_log(retargeted(tmp_path, foreign, source=cold_log["dir"]))
        assert [c.cpu_class for c in opened.classes()] == [cpu_class(foreign)]
    out = run_cli([EDGETUNE, "build", "tiny_cnn", "--device", "x86host", "--target", json.dumps(host_target),
                   "-o", str(tmp_path / "out2"), "--schedules", str(other), "--no-compare", "--json"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "out2" / "build.json").read_text())["coverage"]["from_store"] == []
