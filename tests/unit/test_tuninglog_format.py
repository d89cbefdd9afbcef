"""The tuning log as one model: its format (names, line policy, failed-trial rule, statuses, hashes), the
typed per-task result and its table, and the stock MetaSchedule database both ways (stock TVM reads what
edgetune writes, byte for byte what it writes itself; edgetune reads what stock TVM wrote, without writing).

The records are real MetaSchedule records: tests/fixtures/logs/small (made by make_small_log.py).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from host.cli import cli
from host.logs.format import (
    FAILED_RUN_SECS,
    HISTORY_FILE,
    LOG_FILES,
    RECORD_FILE,
    SESSION_FILE,
    WORKLOAD_FILE,
    Status,
    Trial,
    TuningLogError,
    complete_lines,
    database_key,
    hash_key,
    mean_run_secs,
    mean_run_us,
    workload_key,
)
from host.logs.ops import export, summarize
from host.logs.results import (
    RESULT_COLUMNS,
    TaskResult,
    best_records,
    estimated_latency_ms,
    gflops,
    results_table,
    session_results,
    tally_records,
    tally_trials,
)
from host.logs.tuninglog import TuningLog, repair_jsonl

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "tests" / "fixtures" / "logs" / "small"


def _stock_database(folder: Path, allow_missing: bool = False):
    """Stock MetaSchedule's own database class on a folder, as any TVM user would open it."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    return JSONDatabase(str(folder / WORKLOAD_FILE), str(folder / RECORD_FILE), allow_missing=allow_missing)


def _fixture_records() -> list:
    return list(_stock_database(SMALL).get_all_tuning_records())


def _commit(db, records) -> None:
    from tvm.s_tir.meta_schedule.database import TuningRecord

    for record in records:
        workload = db.commit_workload(record.workload.mod)
        db.commit_tuning_record(TuningRecord(record.trace, workload, record.run_secs, record.target,
                                             record.args_info))


def _sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --- the format -----------------------------------------------------------------------------------


def test_statuses_are_one_enum_written_as_their_names() -> None:
    assert {s.value for s in Status} == {"running", "completed", "already-complete", "stopped-no-board",
                                        "interrupted", "failed", "killed", "merged", "exported"}
    assert json.dumps({"status": Status.STOPPED_NO_BOARD}) == '{"status": "stopped-no-board"}'
    assert Status.parse("killed") is Status.KILLED and Status.COMPLETED == "completed"
    assert Status.parse("a status of a newer edgetune") is None and Status.parse(None) is None
    assert Status.parse(["completed"]) is None


@pytest.mark.parametrize("run_secs", [None, [], [1e10], [FAILED_RUN_SECS], [2e-6, 1e10], [math.nan], [-1e-6], [0.0],
                                      ["not a time"]])
def test_one_rule_for_a_failed_trial(run_secs) -> None:
    assert mean_run_secs(run_secs) is None and mean_run_us(run_secs) is None


def test_a_measured_trial_is_the_mean_of_its_run_times() -> None:
    assert mean_run_secs([1e-6, 3e-6]) == pytest.approx(2e-6)
    assert mean_run_us([2e-6, 4e-6]) == pytest.approx(3.0)


def test_a_history_line_is_a_typed_trial() -> None:
    trial = Trial(trial=3, task=1, task_name="matmul", latency_us=12.5, gflops=gflops(2e6, 12.5), board="b:1",
                  elapsed_s=1.5, time="2026-01-01T00:00:00+00:00")
    assert Trial.from_dict(json.loads(json.dumps(trial.as_dict())), 99) == trial
    failed = Trial.from_dict({"trial": 4, "task": 0, "latency_us": None}, 4)
    assert failed is not None and failed.failed and failed.error == "no latency recorded" and failed.gflops is None
    assert Trial.from_dict({"task": 0, "latency_us": -3.0, "error": "build failed"}, 7) == \
        Trial(trial=7, task=0, error="build failed")
    for not_a_trial in ([1, 2], {"trial": 1}, {"task": "0"}, {"task": True}):
        assert Trial.from_dict(not_a_trial, 1) is None


def test_workload_hashes_have_one_spelling() -> None:
    # session.json spells a hash in 16 hex digits, even when they are all decimal digits;
    # the database spells it in decimal.
    assert hash_key("1234567890123456") == "1234567890123456"
    assert database_key("1234567890123456") == format(1234567890123456, "016x")
    assert database_key("not a number") is None
    rows = [json.loads(line) for line in (SMALL / WORKLOAD_FILE).read_text().splitlines() if line.strip()]
    from tvm.s_tir.meta_schedule.database import Workload

    for row in rows:
        assert workload_key(Workload.from_json(row).mod) == database_key(row[0])


def test_one_line_policy_torn_last_line_skipped_damaged_line_named(tmp_path: Path) -> None:
    path = tmp_path / HISTORY_FILE
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\n{"c": 3')  # a write in progress
    assert [line for _, line in complete_lines(path)] == [b'{"a": 1}', b'{"b": 2}']
    path.write_bytes(b'{"a": 1}\n{"b": 2}')  # complete JSON without its newline counts
    assert len(complete_lines(path)) == 2
    path.write_bytes(b'{"a": 1}\n{"b": \n{"c": 3}\n')  # damage inside the file
    with pytest.raises(TuningLogError, match=rf"{HISTORY_FILE}:2 is not valid JSON: .*remove that line"):
        complete_lines(path)
    assert path.read_bytes() == b'{"a": 1}\n{"b": \n{"c": 3}\n'  # a reader never writes
    assert repair_jsonl(path) == 1  # only a writer does
    assert path.read_bytes() == b'{"a": 1}\n{"c": 3}\n'
    assert complete_lines(tmp_path / "absent.jsonl") == []


def test_log_files_are_named_once_and_packaged_from_that_list() -> None:
    """One owner per format: in the code that consumes a tuning log (session, build, report, `log`, package)
    nothing but host/logs/format.py spells a log file's name (docstrings may describe them) or a status."""
    names = {WORKLOAD_FILE, RECORD_FILE, SESSION_FILE, HISTORY_FILE}
    assert set(LOG_FILES) == names
    statuses = {s.value for s in Status}
    consumers = ("host/logs", "host/report", "host/tuning/session.py", "host/tuning/command.py", "host/build",
                 "host/package")
    offenders = []
    for path in sorted((ROOT / "host").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "host/logs/format.py" or not rel.startswith(consumers):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and any(name in node.value for name in names):
                offenders.append(f"{rel}:{node.lineno} names a log file: {node.value!r}")
            offenders += [f"{rel}:{getattr(node, 'lineno', 0)} spells a status: {text!r}"
                          for text in _status_strings(node, statuses)]
    assert offenders == []


def _status_strings(node: ast.AST, statuses: set[str]) -> list[str]:
    """String constants used as a status: compared, or given as a ``status`` (key, keyword or item)."""
    def text(value: ast.AST | None) -> str | None:
        if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value in statuses:
            return value.value
        return None

    found: list[ast.AST | None] = []
    if isinstance(node, ast.Compare):
        for operand in [node.left, *node.comparators]:
            found += list(operand.elts) if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
    elif isinstance(node, ast.Dict):
        found += [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "status"]
    elif isinstance(node, ast.keyword) and node.arg == "status":
        found.append(node.value)
    elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                                              and t.slice.value == "status" for t in node.targets):
        found.append(node.value)
    return [t for t in map(text, found) if t is not None]


# --- the per-task result ------------------------------------------------------------------------------


def test_a_task_result_counts_trials_and_keeps_the_best() -> None:
    result = TaskResult(0, "conv", weight=2, flops=4e6)
    assert result.status == "fallback" and not result.tuned and result.gflops is None
    assert result.count(None, 1) is False
    assert result.count(20.0, 2) is True and result.count(25.0, 3) is False and result.count(10.0, 4) is True
    assert (result.trials, result.failed, result.best_us, result.best_trial) == (4, 1, 10.0, 4)
    assert result.status == "tuned" and result.gflops == pytest.approx(4e6 / 10e-6 / 1e9)
    other = TaskResult(1, "add", weight=3)
    assert estimated_latency_ms([result, other]) is None  # a task without a successful trial
    other.count(1.0)
    assert estimated_latency_ms([result, other]) == pytest.approx((2 * 10.0 + 3 * 1.0) / 1000)
    data = result.as_dict()
    assert data["status"] == "tuned" and data["gflops"] == pytest.approx(400.0) and "record" not in data
    json.dumps(data)


def test_the_results_table_has_one_set_of_columns() -> None:
    results = [TaskResult(0, "conv", weight=2, flops=4e6, trials=3, failed=1, best_us=10.0),
               TaskResult(None, "stock_kernel")]
    rows, header = results_table(results)
    assert header == list(RESULT_COLUMNS) == ["#", "TASK", "WEIGHT", "STATUS", "TRIALS", "FAILED", "BEST us", "GFLOPS"]
    assert [str(c) for c in rows[0]] == ["0", "conv", "2", "tuned", "3", "1", "10.0", "400.00"]
    assert [str(c) for c in rows[1]] == ["-", "stock_kernel", "1", "fallback", "0", "0", "-", "-"]
    rows, header = results_table(results, [0.75, 0.25])
    assert header[-1] == "FLOPS SHARE" and rows[0][-1] == "75.0%"


def test_results_from_the_history_and_from_the_database_agree_on_the_fixture() -> None:
    session = json.loads((SMALL / SESSION_FILE).read_text())
    from_history = tally_trials(session_results(session), TuningLog.open(SMALL).trials())
    from_records = tally_records(session_results(session), _fixture_records())
    from_files = {r.name: r for r in best_records(SMALL)}
    for h, r in zip(from_history, from_records):
        assert h.name == r.name
        assert h.best_us == pytest.approx(r.best_us) == pytest.approx(from_files[r.name].best_us)
        assert r.trials == from_files[r.name].trials and r.record is not None
        assert h.trials >= r.trials  # the history also has the trial whose build failed (no record)


# --- stock MetaSchedule both ways -------------------------------------------------------------------


def test_stock_tvm_reads_a_log_edgetune_wrote_which_is_byte_for_byte_what_it_writes_itself(tmp_path) -> None:
    records = _fixture_records()
    stock, ours = tmp_path / "stock", tmp_path / "ours"
    stock.mkdir()
    _commit(_stock_database(stock, allow_missing=True), records)
    with TuningLog.open(ours, create=True) as log:
        _commit(log.database(), records)
        log.session = {"tasks": json.loads((SMALL / SESSION_FILE).read_text())["tasks"], "status": Status.COMPLETED}
        log.save_session()
        log.append_history([Trial(trial=1, task=0, latency_us=1.0)])
    for name in (WORKLOAD_FILE, RECORD_FILE):
        assert (ours / name).read_bytes() == (stock / name).read_bytes(), name

    read_back = list(_stock_database(ours).get_all_tuning_records())
    assert len(read_back) == len(records)
    by_name = {r.name: r for r in best_records(ours)}
    db = _stock_database(ours)
    for record in records:
        top = db.get_top_k(db.commit_workload(record.workload.mod), 1)[0]
        assert mean_run_us(top.run_secs) == pytest.approx(next(
            r.best_us for r in by_name.values() if r.workload_hash == workload_key(record.workload.mod)))


def test_edgetune_reads_a_log_stock_tvm_wrote_and_leaves_it_as_it_was(tmp_path) -> None:
    from host.report import make_report

    stock = tmp_path / "stock"
    stock.mkdir()
    _commit(_stock_database(stock, allow_missing=True), _fixture_records())
    before = _sha256s(stock)

    found = best_records(stock)
    assert sorted(r.name for r in found) == ["dense_relu", "matmul"]  # named after their functions
    assert all(r.index is None and r.tuned and r.record is not None for r in found)
    assert sum(r.trials for r in found) == len(_fixture_records())
    summary = summarize(stock)
    assert summary.status is None and all(t.decisions for t in summary.tasks)
    report = make_report(stock, tmp_path / "report")
    assert report.source == "database" and report.trials == len(_fixture_records())

    assert _sha256s(stock) == before and sorted(before) == sorted([WORKLOAD_FILE, RECORD_FILE])


def test_an_export_is_a_stock_database_of_the_best_records(tmp_path) -> None:
    log_dir = Path(shutil.copytree(SMALL, tmp_path / "small"))
    exported = export(log_dir, tmp_path / "best")
    db = _stock_database(tmp_path / "best")
    best = {r.workload_hash: r.best_us for r in best_records(log_dir)}
    records = list(db.get_all_tuning_records())
    assert exported["records"] == len(records) == len(best)
    assert {workload_key(r.workload.mod): mean_run_us(r.run_secs) for r in records} == pytest.approx(best)
    assert TuningLog.open(tmp_path / "best").status is Status.EXPORTED


# --- edgetune log show ------------------------------------------------------------------------------


def test_log_show_prints_the_results_table_and_the_same_as_json(tmp_path) -> None:
    log_dir = Path(shutil.copytree(SMALL, tmp_path / "small"))
    text = CliRunner().invoke(cli, ["log", "show", str(log_dir)])
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    header = next(line for line in lines if line.startswith("#"))
    assert header.split() == ["#", "TASK", "WEIGHT", "STATUS", "TRIALS", "FAILED", "BEST", "us", "GFLOPS"]
    assert "status completed" in lines[0]
    as_json = CliRunner().invoke(cli, ["log", "show", str(log_dir), "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["status"] == "completed"
    for task in data["tasks"]:
        row = next(line for line in lines if f" {task['name']} " in line)
        assert f"{task['best_us']:.1f}" in row and f"{task['gflops']:.2f}" in row and "tuned" in row
        assert any("tile" in line for line in task["decisions"])
