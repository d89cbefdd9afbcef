"""`edgetune report` on a real small tuning log (tests/fixtures/logs/small, made by make_small_log.py)."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from host.cli import cli
from host.report import ReportError, make_report

SMALL = Path(__file__).resolve().parents[1] / "fixtures" / "logs" / "small"
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def log_dir(tmp_path: Path) -> Path:
    """A private copy of the fixture log: the report is written inside it."""
    return Path(shutil.copytree(SMALL, tmp_path / "small"))


def _session() -> dict:
    return json.loads((SMALL / "session.json").read_text())


def _history() -> list[dict]:
    return [json.loads(line) for line in (SMALL / "history.jsonl").read_text().splitlines() if line]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_report_writes_pngs_and_one_self_contained_page(log_dir: Path) -> None:
    result = make_report(log_dir)

    assert result.out_dir == log_dir / "report"
    assert result.source == "history"
    assert len(result.pngs) == 2
    for png in result.pngs:
        assert png.parent == result.out_dir
        assert png.stat().st_size > 10_000
        width, height = _png_size(png)
        assert 400 <= width <= 3000 and 200 <= height <= 4000

    page = result.html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for task in _session()["tasks"]:
        assert task["name"] in page
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 2
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from outside"


def test_report_counts_trials_and_failures(log_dir: Path) -> None:
    history = _history()
    result = make_report(log_dir, log_dir / "out")
    assert result.out_dir == log_dir / "out"
    assert result.trials == len(history)
    assert result.failed == sum(1 for h in history if h["latency_us"] is None) >= 1
    by_name = {t.name: t for t in result.tasks}
    session = _session()
    for task in session["tasks"]:
        s = by_name[task["name"]]
        own = [h for h in history if h["task"] == task["index"]]
        ok = [h["latency_us"] for h in own if h["latency_us"] is not None]
        assert s.trials == len(own)
        assert s.failed == len(own) - len(ok)
        assert s.best_us == pytest.approx(min(ok))
        assert s.gflops == pytest.approx(task["flops"] / min(ok) / 1e3)
        assert s.status == "tuned"
        assert any("tile" in line for line in s.decisions)
    expected_ms = sum(t["weight"] * by_name[t["name"]].best_us for t in session["tasks"]) / 1e3
    assert result.estimated_latency_ms == pytest.approx(expected_ms)
    assert result.fallback_tasks == []


def test_stock_metaschedule_work_dir_without_session(tmp_path: Path) -> None:
    for name in DATABASE_FILES:
        shutil.copy(SMALL / name, tmp_path / name)
    result = make_report(tmp_path)

    assert result.source == "database"
    records = (SMALL / "database_tuning_record.json").read_text().splitlines()
    assert result.trials == len([r for r in records if r.strip()])
    # Names come from the workload functions' global_symbol; FLOPs are estimated from their TIR.
    assert sorted(t.name for t in result.tasks) == ["dense_relu", "matmul"]
    assert all(t.flops and t.flops > 0 and t.gflops for t in result.tasks)
    assert all(t.weight == 1 for t in result.tasks)
    page = result.html.read_text(encoding="utf-8")
    assert "no session.json" in page and "matmul" in page
    assert all(p.stat().st_size > 10_000 for p in result.pngs)


def test_task_with_only_failed_trials_is_a_fallback(log_dir: Path) -> None:
    rows = _history()
    for row in rows:
        if row["task_name"] == "matmul":
            row.update(latency_us=None, gflops=None, error="RPCRunner: board went away")
    (log_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = make_report(log_dir)
    matmul = next(t for t in result.tasks if t.name == "matmul")
    assert matmul.status == "fallback" and matmul.best_us is None
    assert matmul.failed == matmul.trials > 0
    assert result.fallback_tasks == ["matmul"]
    assert result.estimated_latency_ms is None
    page = result.html.read_text(encoding="utf-8")
    assert "fallback" in page and "some tasks have no successful trial yet" in page


def test_names_are_escaped_in_the_page(log_dir: Path) -> None:
    evil = '<script>alert("x")</script>'
    session = _session()
    session["model"]["name"] = evil
    session["tasks"][0]["name"] = evil
    (log_dir / "session.json").write_text(json.dumps(session))

    page = make_report(log_dir).html.read_text(encoding="utf-8")
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_a_cut_short_last_history_line_is_ignored(log_dir: Path) -> None:
    with (log_dir / "history.jsonl").open("a") as f:
        f.write('{"trial": 99, "task": 0, "lat')
    assert make_report(log_dir).trials == len(_history())


def test_empty_log_says_to_tune_first(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="edgetune tune"):
        make_report(tmp_path)
    # A session that has not measured anything yet: empty history, empty database.
    (tmp_path / "session.json").write_text(json.dumps(_session()))
    (tmp_path / "history.jsonl").write_text("")
    for name in DATABASE_FILES:
        (tmp_path / name).write_text("")
    with pytest.raises(ReportError, match="no measured trials yet.*edgetune tune"):
        make_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="not a directory"):
        make_report(tmp_path / "nowhere")


def test_cli_prints_paths_as_json(log_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = CliRunner().invoke(cli, ["report", str(log_dir), "-o", str(out), "--json"])
    assert run.exit_code == 0, run.output
    data = json.loads(run.output)
    assert Path(data["html"]) == out / "report.html" and Path(data["html"]).is_file()
    assert [Path(p).name for p in data["pngs"]] == ["convergence_overall.png", "convergence_tasks.png"]
    assert data["trials"] == len(_history())
    assert {t["name"] for t in data["tasks"]} == {t["name"] for t in _session()["tasks"]}


def test_cli_plain_output_and_help(log_dir: Path) -> None:
    run = CliRunner().invoke(cli, ["report", str(log_dir)])
    assert run.exit_code == 0, run.output
    assert f"html: {log_dir / 'report' / 'report.html'}" in run.output
    help_run = CliRunner().invoke(cli, ["report", "--help"])
    assert help_run.exit_code == 0 and "Example:" in help_run.output and "edgetune report" in help_run.output


def test_session_without_history_reports_from_the_database(log_dir: Path) -> None:
    (log_dir / "history.jsonl").unlink()
    result = make_report(log_dir)
    assert result.source == "database"
    session = _session()
    assert [(t.index, t.name, t.weight) for t in result.tasks] == [
        (t["index"], t["name"], t["weight"]) for t in session["tasks"]
    ]
    records = [r for r in (SMALL / "database_tuning_record.json").read_text().splitlines() if r.strip()]
    assert result.trials == len(records) == sum(t.trials for t in result.tasks)
    assert all(t.decisions for t in result.tasks)


def test_session_task_without_workload_hash_finds_its_record_by_name(log_dir: Path) -> None:
    session = _session()
    for task in session["tasks"]:
        task["workload_hash"] = None
    (log_dir / "session.json").write_text(json.dumps(session))
    result = make_report(log_dir)
    assert all(any("tile" in line for line in t.decisions) for t in result.tasks)


def test_onnxruntime_measured_on_the_board_is_in_the_header(log_dir: Path) -> None:
    session = _session()
    assert "baseline" not in session  # the fixture predates the baseline: no row
    assert "ONNX Runtime on the board" not in make_report(log_dir).html.read_text(encoding="utf-8")

    session["baseline"] = {"onnxruntime_p50_ms": 0.25, "board": "127.0.0.1:9090", "runtime": "onnxruntime 1.20"}
    (log_dir / "session.json").write_text(json.dumps(session))
    result = make_report(log_dir)
    page = result.html.read_text(encoding="utf-8")
    row = re.search(r"<dt>ONNX Runtime on the board</dt><dd>([^<]*)</dd>", page)
    assert row, page[:2000]
    assert row.group(1).startswith("0.25 ms (p50")
    assert f"{result.estimated_latency_ms / 0.25:.2f}x that" in row.group(1)


def test_the_curve_starts_at_the_untuned_model_and_only_falls(log_dir: Path) -> None:
    from host.report.load import estimate_curve, load

    before, _, complete_before = estimate_curve(load(log_dir))
    assert not all(complete_before)  # without the untuned kernels it starts as a lower bound
    session = _session()
    tasks = session["tasks"]
    session["untuned_us"] = {str(t["index"]): 5000.0 * (i + 1) for i, t in enumerate(tasks)}
    (log_dir / "session.json").write_text(json.dumps(session))

    xs, ys, complete = estimate_curve(load(log_dir))
    assert xs[0] == 0 and xs[1:] == before
    assert ys[0] == pytest.approx(sum(t["weight"] * 5.0 * (i + 1) for i, t in enumerate(tasks)))
    assert all(complete)
    assert all(later <= earlier for earlier, later in zip(ys, ys[1:]))
    result = make_report(log_dir)
    assert ys[-1] == pytest.approx(result.estimated_latency_ms)
    assert all(_png_size(png)[0] >= 400 for png in result.pngs)
