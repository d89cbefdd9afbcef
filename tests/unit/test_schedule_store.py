"""The schedule store (embedded SQLite): import, target-aware queries through MetaSchedule's database
interface, commits, export that stock TVM reads, and the CLI. Uses the real small tuning log fixture."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from host.cli import cli
from host.logs.format import RECORD_FILE, WORKLOAD_FILE, mean_run_secs
from host.schedules.store import ScheduleStore, ScheduleStoreError, cpu_class

from tests.helpers_schedules import A72, A72_TARGET, SMALL, ZNVER4, records_of, retargeted, timed_cold

def _edgetune(*args: str) -> subprocess.CompletedProcess:
    """The installed CLI as a user runs it (errors are one line on stderr)."""
    return subprocess.run([str(Path(sys.executable).with_name("edgetune")), *args], capture_output=True, text=True,
                          timeout=120)


def best_secs(folder: Path, workload_index: int) -> float:
    return min(mean_run_secs(r[1]) for i, r in records_of(folder) if i == workload_index)


@pytest.fixture()
def store(tmp_path: Path):
    with ScheduleStore(str(tmp_path / "schedules.sqlite")) as opened:
        yield opened


def test_cpu_class_keys_kind_triple_cpu_and_features_not_cores():
    assert cpu_class({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2}) == ZNVER4
    assert cpu_class({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 16}) == ZNVER4
    with_features = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]}
    assert cpu_class(with_features) == "llvm/aarch64-linux-gnu/cortex-a76+dotprod+neon"
    assert cpu_class(json.dumps(with_features)) == cpu_class({**with_features, "mattr": ["+dotprod", "+neon"]})


def test_import_counts_and_never_duplicates(store: ScheduleStore):
    first = store.import_log(SMALL)
    assert (first.workloads, first.records, first.added, first.classes) == (2, 16, 16, [ZNVER4])
    assert store.import_log(SMALL).added == 0
    [summary] = store.classes()
    assert (summary.cpu_class, summary.workloads, summary.records, summary.measured) == (ZNVER4, 2, 16, 16)
    best = store.best_by_workload(ZNVER4)
    assert {w.name for w in best} == {t["name"] for t in json.loads((SMALL / "session.json").read_text())["tasks"]}
    assert min(w.best_us for w in best) == pytest.approx(min(best_secs(SMALL, 0), best_secs(SMALL, 1)) * 1e6)


def test_a_query_for_one_cpu_never_returns_another_cpus_schedule(store: ScheduleStore, tmp_path: Path):
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    # The same workloads measured on a Cortex-A72, where every schedule is 10x slower.
    store.import_log(SMALL)
    store.import_log(retargeted(tmp_path, A72_TARGET, scale=10.0))
    assert [c.cpu_class for c in store.classes()] == [A72, ZNVER4]

    stock = JSONDatabase(work_dir=str(SMALL))
    workload = stock.get_all_tuning_records()[0].workload
    for target, klass, scale in ((json.loads((SMALL / "session.json").read_text())["target"], ZNVER4, 1.0),
                                 (A72_TARGET, A72, 10.0)):
        database = store.database(target)
        assert len(database) == 16
        assert database.has_workload(workload.mod)
        records = database.get_all_tuning_records()
        assert {cpu_class(r.target.export()) for r in records} == {klass}
        [top] = database.get_top_k(database.commit_workload(workload.mod), 1)
        expected = min(mean_run_secs(r.run_secs) for r in stock.get_top_k(workload, 100)) * scale
        assert mean_run_secs(top.run_secs) == pytest.approx(expected)
    other = store.database({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"})
    assert len(other) == 0
    assert other.get_top_k(other.commit_workload(workload.mod), 5) == []


def test_metaschedule_commits_through_the_store(store: ScheduleStore):
    from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord

    stock = JSONDatabase(work_dir=str(SMALL))
    target = json.loads((SMALL / "session.json").read_text())["target"]
    database = store.database(target, source="test")
    for record in stock.get_all_tuning_records():
        workload = database.commit_workload(record.workload.mod)
        database.commit_tuning_record(TuningRecord(record.trace, workload, record.run_secs, record.target,
                                                   record.args_info))
    assert len(database) == 16
    # The same schedules committed again (a second session measuring them) add nothing.
    for record in stock.get_all_tuning_records():
        database.commit_tuning_record(record)
    assert len(database) == 16
    # What MetaSchedule's own query finds is the fastest record, read back intact.
    import tvm

    for record in stock.get_all_tuning_records():
        found = database.query_tuning_record(record.workload.mod, tvm.target.Target(target), "main")
        fastest = min(mean_run_secs(r.run_secs) for r in stock.get_top_k(record.workload, 100))
        assert mean_run_secs(found.run_secs) == pytest.approx(fastest)
        assert found.trace is not None and len(found.trace.insts) > 0


def test_export_is_a_stock_database_and_refuses_a_non_empty_folder(store: ScheduleStore, tmp_path: Path):
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    store.import_log(SMALL)
    store.import_log(retargeted(tmp_path, A72_TARGET))
    out = tmp_path / "exported"
    assert store.export(ZNVER4, out) == 16
    exported = JSONDatabase(work_dir=str(out))
    assert len(exported.get_all_tuning_records()) == 16
    assert {r.target.export()["mcpu"] for r in exported.get_all_tuning_records()} == {"znver4"}
    with pytest.raises(ScheduleStoreError, match="not empty"):
        store.export(ZNVER4, out)
    with pytest.raises(ScheduleStoreError, match="no schedules for CPU class 'llvm/x/y'"):
        store.export("llvm/x/y", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_damaged_store_is_a_one_line_error(tmp_path: Path):
    bad = tmp_path / "schedules.sqlite"
    bad.write_bytes(b"this is not a database\n" * 100)
    with pytest.raises(ScheduleStoreError) as err:
        ScheduleStore(str(bad))
    assert "\n" not in str(err.value) and "EDGETUNE_SCHEDULES" in str(err.value)


def test_cli_import_ls_show_export(tmp_path: Path):
    location = str(tmp_path / "s.sqlite")
    runner = CliRunner()
    logs = tmp_path / "runs"
    shutil.copytree(SMALL, logs / "a")
    retargeted(logs, A72_TARGET)  # runs/small-cortex-a72
    result = runner.invoke(cli, ["schedules", "import", str(logs), "--schedules", location, "--json"])
    assert result.exit_code == 0, result.output
    assert sorted((r["records"], r["added"]) for r in json.loads(result.output)) == [(16, 16), (16, 16)]

    listing = json.loads(runner.invoke(cli, ["schedules", "ls", "--schedules", location, "--json"]).output)
    assert {c["cpu_class"]: c["records"] for c in listing} == {ZNVER4: 16, A72: 16}

    shown = runner.invoke(cli, ["schedules", "show", A72, "--schedules", location, "--json"])
    assert shown.exit_code == 0 and len(json.loads(shown.output)) == 2

    missing = _edgetune("schedules", "show", "llvm/none/none", "--schedules", location)
    assert missing.returncode != 0 and "pick one of" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    out = tmp_path / "best"
    exported = runner.invoke(cli, ["schedules", "export", A72, "-o", str(out), "--schedules", location, "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.output)["records"] == 16
    assert (out / WORKLOAD_FILE).exists() and (out / RECORD_FILE).exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = _edgetune("schedules", "import", str(empty), "--schedules", location)
    assert nothing.returncode != 0 and "holds no tuning log" in nothing.stderr
    assert len(nothing.stderr.strip().splitlines()) == 1


def _mean_kernel(block: str, buffer: str):
    """A row mean whose block and input are named ``block`` and ``buffer``: two models' copies of one
    kernel differ only in such names (after their own Relax variables)."""
    import tvm
    from tvm import te

    a = te.placeholder((1, 512, 49), "float32", name=buffer)
    k = te.reduce_axis((0, 49), name="k")
    red = te.compute((1, 512), lambda n, c: te.sum(a[n, c, k], axis=k), name=block)
    out = te.compute((1, 512), lambda n, c: red[n, c] / 49.0, name="T_divide")
    return tvm.IRModule({"main": te.create_prim_func([a, out]).with_attr("global_symbol", "main")})


def test_a_schedule_of_one_model_applies_to_the_same_kernel_of_another(store: ScheduleStore, tmp_path: Path):
    """Block names come from each model's own variables; the store serves a record to either model."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord, Workload

    from host.schedules.store import rebind

    ours, theirs = _mean_kernel("lv157_red", "lv157"), _mean_kernel("lv85_red", "lv85")
    assert tvm_ffi.structural_equal(ours, theirs)  # one workload to the store
    target = json.loads((SMALL / "session.json").read_text())["target"]
    sch = Schedule(ours)
    # As MetaSchedule's traces do: blocks the trace makes (an rfactor, a cache read) are found again by
    # their names, which derive from the model's own names.
    _, inner = sch.split(sch.get_loops(sch.get_sblock("lv157_red"))[2], factors=[None, 7])
    sch.rfactor(inner, factor_axis=0)
    sch.cache_read(sch.get_sblock("lv157_red_rf"), 0, "global")
    sch.parallel(sch.get_loops(sch.get_sblock("lv157_red_rf"))[1])
    sch.compute_at(sch.get_sblock("lv157_global"), sch.get_loops(sch.get_sblock("lv157_red_rf"))[1])
    record = TuningRecord(sch.trace, Workload(ours), [2e-5], tvm.target.Target(target),
                          ArgInfo.from_prim_func(ours["main"]))
    database = store.database(target, source="test")
    database.commit_workload(ours)
    database.commit_tuning_record(record)

    # MetaSchedule's own query for the other model's kernel applies the stored schedule to it.
    found = database.query_schedule(theirs, tvm.target.Target(target), "main")
    assert found is not None and "T.parallel" in found.mod.script()
    # A session files a seed under its own kernel: the log it writes loads again (stock TVM reads it).
    (tmp_path / "log").mkdir()
    log = JSONDatabase(work_dir=str(tmp_path / "log"))
    rebound = rebind(record, log.commit_workload(theirs))
    log.commit_tuning_record(rebound)
    reread = JSONDatabase(work_dir=str(tmp_path / "log")).get_all_tuning_records()
    assert len(reread) == 1 and "lv85_red_rf" in str(reread[0].trace) and "lv157" not in str(reread[0].trace)


# The small fixture's two kernels: 57,600 bytes of arguments (a dense layer) and 49,152 (a matmul).
# With the threshold between them the first is a "large" kernel, timed cold by a cold session.
LARGE_KERNEL_BYTES = 50_000


def test_records_are_filed_and_served_by_how_they_were_timed(store: ScheduleStore, tmp_path: Path, monkeypatch):
    import tvm_ffi
    from tvm.s_tir.meta_schedule.database import Workload

    from host.tuning import timing

    monkeypatch.setattr(timing, "COLD_ABOVE_BYTES", LARGE_KERNEL_BYTES)
    cold = store.import_log(timed_cold(tmp_path, scale=3.0))  # the large kernel's 4 records cold, 12 hot
    assert (cold.records, cold.added) == (16, 16)
    hot = store.import_log(SMALL)  # the hot log: the small kernel's 12 are already there, timed the same way
    assert (hot.records, hot.added) == (16, 4)
    large, small = (Workload.from_json(json.loads(line)).mod  # workloads 0 and 1 of the log
                    for line in (SMALL / WORKLOAD_FILE).read_text().splitlines() if line.strip())
    [large_digest] = store.find_workloads(large)
    assert {r.timing for r in store.records(ZNVER4, [large_digest])} == {"hot", "cold"}
    [small_digest] = store.find_workloads(small)
    assert {r.timing for r in store.records(ZNVER4, [small_digest])} == {"hot"}

    fastest_hot = best_secs(SMALL, 0) * 1e6
    [shown] = [w for w in store.best_by_workload(ZNVER4) if w.digest == large_digest]
    assert (shown.best_hot_us, shown.best_cold_us) == (pytest.approx(fastest_hot), pytest.approx(3 * fastest_hot))

    # A session that times cold is seeded with the cold times of the large kernel, never the faster hot
    # ones; a hot session with the hot ones. The small kernel is hot either way.
    target = json.loads((SMALL / "session.json").read_text())["target"]
    for cold_weights, scale in ((True, 3.0), (False, 1.0)):
        seeds = store.seed_records(target, cold_weights)
        assert len(seeds) == 16
        large_seeds = [r for r in seeds if tvm_ffi.structural_equal(r.workload.mod, large)]
        assert sorted(mean_run_secs(r.run_secs) * 1e6 for r in large_seeds) == pytest.approx(
            sorted(mean_run_secs(r[1]) * 1e6 * scale for i, r in records_of(SMALL) if i == 0))
        best = store.best_record(target, large, cold_weights)
        assert best.timing == ("cold" if cold_weights else "hot")
        assert best.mean_us == pytest.approx(fastest_hot * scale)
        top = store.database(target, cold_weights=cold_weights).get_top_k(store.workload(large_digest), 1)
        assert mean_run_secs(top[0].run_secs) * 1e6 == pytest.approx(fastest_hot * scale)


def test_another_models_kernel_timed_the_other_way_still_seeds_the_cost_model(store: ScheduleStore, monkeypatch):
    from tvm.s_tir.meta_schedule.database import Workload

    from host.logs.format import workload_key
    from host.tuning import timing

    monkeypatch.setattr(timing, "COLD_ABOVE_BYTES", LARGE_KERNEL_BYTES)
    store.import_log(SMALL)  # timed hot: the large kernel's 4 records too
    large = Workload.from_json(json.loads((SMALL / WORKLOAD_FILE).read_text().splitlines()[0])).mod
    target = json.loads((SMALL / "session.json").read_text())["target"]
    # A cold session of another model: the large kernel's hot records seed it (its cost model compares
    # them with each other only), each workload's records of one timing.
    seeds = store.seed_records(target, cold_weights=True)
    assert len(seeds) == 16
    assert sorted(mean_run_secs(r.run_secs) for r in seeds) == pytest.approx(
        sorted(mean_run_secs(r[1]) for _, r in records_of(SMALL)))
    # A cold session whose own kernel it is gets none of them: they would be replayed and compared with
    # its cold trials. The small kernel is timed hot by both.
    own = store.seed_records(target, cold_weights=True, own=[workload_key(large)])
    assert len(own) == 12 and not any(workload_key(r.workload.mod) == workload_key(large) for r in own)


def test_a_seeded_session_measures_the_best_of_every_task_first_then_runners_up_within_a_quarter():
    from host.logs.results import session_results
    from host.logs.tuninglog import TuningLog
    from host.tuning.session import replay_order, seed_tops

    log = TuningLog.open(SMALL)
    records = list(log.database().get_all_tuning_records())
    tasks = session_results(log.session)
    tops = seed_tops(tasks, records, 3)
    assert len(tops) == 2  # both kernels of the fixture have measured records
    for index, chosen in tops.items():
        times = [mean_run_secs(r.run_secs) for r in chosen]
        own = sorted(t for t in (mean_run_secs(r[1]) for i, r in records_of(SMALL)
                                 if database_key_of(log, i) == tasks[index].workload_hash) if t is not None)
        assert times == pytest.approx(own[:3])  # its three fastest, fastest first
    order = replay_order(tops, budget=8)
    assert order[:2] == [(i, tops[i][0]) for i in sorted(tops)]
    assert len(order) == 2 + 8 // 4 and all(r is tops[i][1] for i, r in order[2:])
    assert len(replay_order(tops, budget=100)) == 6 and len(replay_order(tops, budget=3)) == 2
    # With the tasks' weights and untuned times, the best that saves the most goes first: here the
    # second task, whose seed is far below its untuned kernel, though it runs once.
    first, second = sorted(tops)
    seed_us = {i: mean_run_secs(tops[i][0].run_secs) * 1e6 for i in tops}
    weights = {first: 2.0, second: 1.0}
    untuned = {first: seed_us[first] * 1.1, second: seed_us[second] + 10 * seed_us[first]}
    weighted = replay_order(tops, budget=8, weights=weights, untuned_us=untuned)
    assert [i for i, _ in weighted[:2]] == [second, first]
    # Runners-up by what a faster schedule could still save (weight x seed's time), a quarter at most.
    later = sorted(tops, key=lambda i: -weights[i] * mean_run_secs(tops[i][1].run_secs))
    assert [i for i, _ in weighted[2:]] == later and all(r is tops[i][1] for i, r in weighted[2:])
    # A task whose untuned time is unknown ranks by its weighted seed time (2 x its seed, against the
    # other's saving of 10 x that seed).
    assert [i for i, _ in replay_order(tops, 8, weights, {first: None, second: untuned[second]})[:2]] == [second, first]


def database_key_of(log, workload_index: int) -> str | None:
    from host.logs.format import database_key

    line = (log.path / WORKLOAD_FILE).read_text().splitlines()[workload_index]
    return database_key(json.loads(line)[0])


def test_a_store_of_schema_1_is_upgraded_and_its_records_read_as_hot(tmp_path: Path):
    import sqlite3

    from host.schedules.store import SCHEMA_VERSION

    location = tmp_path / "old.sqlite"
    with ScheduleStore(str(location)) as store:  # a store with one hot record, then made schema 1 again
        store.import_log(SMALL)
    old = sqlite3.connect(str(location))
    kept = old.execute("SELECT fingerprint FROM records ORDER BY fingerprint LIMIT 1").fetchone()[0]
    old.executescript(f"""
        CREATE TABLE v1 (fingerprint TEXT PRIMARY KEY, digest TEXT NOT NULL, cpu_class TEXT NOT NULL,
            record TEXT NOT NULL, mean_us DOUBLE PRECISION, source TEXT NOT NULL, created TEXT NOT NULL);
        INSERT INTO v1 SELECT fingerprint, digest, cpu_class, record, mean_us, source, created FROM records
            WHERE fingerprint = '{kept}';
        DROP TABLE records; ALTER TABLE v1 RENAME TO records;
        UPDATE meta SET value = '1' WHERE name = 'schema';""")
    old.commit()
    assert [c[1] for c in old.execute("PRAGMA table_info(records)")].count("timing") == 0
    old.close()

    with ScheduleStore(str(location)) as store:
        assert store._sql.query("SELECT value FROM meta WHERE name = 'schema'") == [(str(SCHEMA_VERSION),)]
        assert [r.timing for r in store.records(ZNVER4)] == ["hot"]
        # The old row keeps its fingerprint: importing the log it came from adds only the other 15.
        assert store.import_log(SMALL).added == 15
    with ScheduleStore(str(location)) as store:  # opened again: nothing to upgrade
        assert len(store.records(ZNVER4)) == 16


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path):
    import sqlite3

    location = tmp_path / "new.sqlite"
    ScheduleStore(str(location)).close()
    newer = sqlite3.connect(str(location))
    newer.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")
    newer.commit()
    newer.close()
    with pytest.raises(ScheduleStoreError, match="newer edgetune"):
        ScheduleStore(str(location))
