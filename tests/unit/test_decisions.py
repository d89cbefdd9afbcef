"""Decisions of real MetaSchedule records (tests/fixtures/logs/small, made by make_small_log.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from host.logs.decisions import decisions_dict, describe_trace
from host.logs.format import TuningLogError, database_key, hash_key, mean_run_us
from host.logs.results import best_records

SMALL = Path(__file__).resolve().parents[1] / "fixtures" / "logs" / "small"


@pytest.fixture(scope="module")
def best() -> dict[str, object]:
    return {b.name: b for b in best_records(SMALL)}


def _record_rows() -> list[list]:
    lines = (SMALL / "database_tuning_record.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def test_best_records_name_every_workload_after_its_session_task(best) -> None:
    session = json.loads((SMALL / "session.json").read_text())
    assert set(best) == {t["name"] for t in session["tasks"]}
    for task in session["tasks"]:
        b = best[task["name"]]
        assert b.index == task["index"]
        assert b.workload_hash == task["workload_hash"]


def test_best_record_is_the_fastest_and_trials_are_counted(best) -> None:
    rows = _record_rows()
    workload_hashes = [
        database_key(json.loads(line)[0])
        for line in (SMALL / "database_workload.json").read_text().splitlines()
        if line
    ]
    for b in best.values():
        own = [r for r in rows if workload_hashes[r[0]] == b.workload_hash]
        latencies = [mean_run_us(r[1][1]) for r in own]
        assert b.trials == len(own)
        assert b.failed == sum(1 for x in latencies if x is None)
        assert b.best_us == pytest.approx(min(x for x in latencies if x is not None))
        assert mean_run_us(b.record.run_secs) == pytest.approx(b.best_us)
    assert sum(b.trials for b in best.values()) == len(rows)


def test_matmul_tile_sizes_cover_each_loop(best) -> None:
    rec = best["matmul"].record
    d = decisions_dict(rec.trace, rec.workload.mod)
    assert d["loop_names"] == "workload"
    tiles = {t["loop"]: t for t in d["tiles"] if t["block"] == "C"}
    assert set(tiles) == {"i", "j", "k"}
    for t in tiles.values():
        assert t["extent"] == 64
        assert math.prod(t["factors"]) == 64
    assert len(tiles["i"]["factors"]) == 4 and len(tiles["k"]["factors"]) == 2  # SSRSRS tiling
    assert {"block": "C", "structure": "SSRSRS"} in d["tiling"]
    sampled = [u for u in d["unroll"] if u["kind"] in ("explicit", "implicit")]
    assert sampled and sampled[0]["value"] in sampled[0]["candidates"]
    json.dumps(d)  # plain JSON all the way down

    lines = describe_trace(rec.trace, rec.workload.mod)
    for loop in ("i", "j", "k"):
        assert f"C tile {loop}(64): {tiles[loop]['factors']}" in lines
    assert any(line.startswith("limits: ") for line in lines)


def test_trace_alone_gives_the_same_tiles_with_positional_loop_names(best) -> None:
    rec = best["matmul"].record
    with_mod = decisions_dict(rec.trace, rec.workload.mod)
    alone = decisions_dict(rec.trace)
    assert alone["loop_names"] == "trace"
    assert [t["factors"] for t in alone["tiles"]] == [t["factors"] for t in with_mod["tiles"]]
    assert [t["loop"] for t in alone["tiles"]] == ["loop0", "loop1", "loop2"]
    assert [t["extent"] for t in alone["tiles"]] == [64, 64, 64]
    assert describe_trace(rec.trace)[0] == "C: multi-level tiling SSRSRS"


def test_dense_layer_records_compute_locations(best) -> None:
    rec = best["dense_relu"].record
    d = decisions_dict(rec.trace, rec.workload.mod)
    tiles = {t["loop"]: t for t in d["tiles"] if t["block"] == "D"}
    assert {k: t["extent"] for k, t in tiles.items()} == {"i": 32, "j": 64, "r": 128}
    # The bias add and the ReLU are either inlined or placed inside the dense loops.
    placed = set(d["inlined"]) | {c["block"] for c in d["compute_at"]}
    assert placed & {"B", "Y", "D_global"}


def test_postprocessed_loops_have_extents(best) -> None:
    for b in best.values():
        d = decisions_dict(b.record.trace, b.mod)
        loops = [p for p in d["parallel"] + d["vectorize"] if p["loop"] is not None]
        assert loops, b.task
        assert all(p["postproc"] and isinstance(p["extent"], int) and p["extent"] > 0 for p in loops)


def test_hash_key_reads_every_spelling() -> None:
    value = 0x45ABB59EA8398EAE
    spellings = [value, str(value), "45abb59ea8398eae", "0x45ABB59EA8398EAE"]
    assert {hash_key(s) for s in spellings} == {"45abb59ea8398eae"}
    assert hash_key(None) is None and hash_key("not a hash") is None


def test_failed_run_secs_have_no_latency() -> None:
    assert mean_run_us([1e10]) is None
    assert mean_run_us(None) is None and mean_run_us([]) is None
    assert mean_run_us([2e-6, 4e-6]) == pytest.approx(3.0)


def test_directory_without_database_says_to_tune_first(tmp_path: Path) -> None:
    with pytest.raises(TuningLogError, match="edgetune tune"):
        best_records(tmp_path)


def test_damaged_record_line_is_named(tmp_path: Path) -> None:
    for name in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy(SMALL / name, tmp_path / name)
    with (tmp_path / "database_tuning_record.json").open("a") as f:
        f.write("[0, [\n")
    with pytest.raises(TuningLogError, match=r"database_tuning_record\.json:\d+"):
        best_records(tmp_path)


def test_stock_work_dir_has_records_without_task_names(tmp_path: Path) -> None:
    for name in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy(SMALL / name, tmp_path / name)
    found = best_records(tmp_path)
    assert len(found) == 2
    assert all(b.index is None and b.record is not None and b.best_us > 0 for b in found)


def test_failed_records_in_the_database_are_counted_not_ranked(tmp_path: Path) -> None:
    """edgetune commits failed candidates too, with ``run_secs`` null; stock MetaSchedule may write 1e10."""
    for name in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy(SMALL / name, tmp_path / name)
    rows = _record_rows()
    with (tmp_path / "database_tuning_record.json").open("a") as f:
        for run_secs in (None, [1e10]):
            workload, (trace, _, target, args) = rows[0]
            f.write(json.dumps([workload, [trace, run_secs, target, args]]) + "\n")
    workload_lines = (SMALL / "database_workload.json").read_text().splitlines()
    first_workload = database_key(json.loads(workload_lines[rows[0][0]])[0])
    before = {b.workload_hash: b for b in best_records(SMALL)}
    for b in best_records(tmp_path):
        held = before[b.workload_hash]
        extra = 2 if b.workload_hash == first_workload else 0
        assert (b.trials, b.failed) == (held.trials + extra, held.failed + extra)
        assert b.best_us == pytest.approx(held.best_us)
