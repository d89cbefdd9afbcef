"""The schedule store: every schedule ever measured, keyed by its workload and the CPU class it was
measured on, in one SQL database that every session reads and writes.

Embedded by default (SQLite, one file under the user's data directory), or a PostgreSQL server that a
team's workstations share (``postgresql://...``). :class:`ScheduleDatabase` puts one CPU class of it behind
MetaSchedule's ``PyDatabase`` interface, so TVM's own machinery (``ApplyDatabase``, ``tune_tasks``) queries
it directly.

Unlike stock MetaSchedule's JSON database, a record is keyed by the target it was measured on: a query for
one CPU class never returns another CPU's schedule as if it were its own (apache/tvm#15549).

Tables::

    workloads(digest PK, shash, name, mod)  one row per workload IRModule (MetaSchedule's JSON of it)
    records(fingerprint PK, digest, cpu_class, record, mean_us, source, created, timing)
                                            one row per distinct schedule of a workload on a CPU class
                                            and way of timing; ``record`` is the stock TuningRecord JSON,
                                            ``mean_us`` NULL when the trial failed, ``timing`` ``hot`` or
                                            ``cold`` (:mod:`host.tuning.timing`)

A record's fingerprint is the hash of its workload, CPU class, trace and timing: measuring one schedule
again the same way, on this workstation or another, adds nothing (``ON CONFLICT DO NOTHING``), so
concurrent writers neither lose nor duplicate records. A hot and a cold time of one schedule are two
records: they do not compare, and a session is seeded only with records timed as it times (a store of
schema 1, from before cold timing, held hot times only: its rows read as hot).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Sequence

from ..errors import EdgetuneError
from ..logs.format import (RECORD_FILE, SESSION_FILE, WORKLOAD_FILE, TuningLogError, database_key, mean_run_secs,
                           read_database_rows, read_session)
from ..tuning.timing import COLD, HOT, kernel_timing

logger = logging.getLogger(__name__)

# Where the embedded store lives unless EDGETUNE_SCHEDULES says otherwise (XDG's data directory).
DEFAULT_FILE = "schedules.sqlite"
ENV = "EDGETUNE_SCHEDULES"
# EDGETUNE_SCHEDULES=off: sessions neither read nor write a store (as --no-schedules).
OFF = "off"
# A new session learns from at most this many of the store's best records per workload, and this many
# in all: enough for the cost model to rank a CPU class's schedules, bounded in start-up time.
SEED_PER_WORKLOAD = 64
SEED_LIMIT = 3000
# A writer holding SQLite's lock (another session committing a batch) is waited for this long.
SQLITE_BUSY_SEC = 30.0
# The schema this edgetune writes; a store made by a newer one is refused rather than misread, an older
# one is brought up to date when opened (schema 1 had no ``timing``: its records were all timed hot).
SCHEMA_VERSION = 2

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS workloads (digest TEXT PRIMARY KEY, shash TEXT NOT NULL, name TEXT, mod TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS workloads_shash ON workloads (shash)",
    "CREATE TABLE IF NOT EXISTS records (fingerprint TEXT PRIMARY KEY, digest TEXT NOT NULL, "
    "cpu_class TEXT NOT NULL, record TEXT NOT NULL, mean_us DOUBLE PRECISION, source TEXT NOT NULL, "
    "created TEXT NOT NULL, timing TEXT NOT NULL DEFAULT 'hot')",
    "CREATE INDEX IF NOT EXISTS records_class_digest ON records (cpu_class, digest, mean_us)",
)
# Schema 1 -> 2: how each record was timed.
_MIGRATE_1_TO_2 = "ALTER TABLE records ADD COLUMN timing TEXT NOT NULL DEFAULT 'hot'"



class ScheduleStoreError(EdgetuneError):
    """The schedule store cannot be opened, read or written; the message says what to do."""


# ----------------------------------------------------------------------------------------------------
# CPU class


def cpu_class(target: Any) -> str:
    """The CPU class a target's schedules are valid for: ``kind/triple/mcpu`` plus its sorted ``mattr``
    features, e.g. ``llvm/aarch64-linux-gnu/cortex-a72`` or ``llvm/x86_64-linux-gnu/znver3``.

    ``target`` is a TVM ``Target``, its JSON dict, or a JSON string of one. The core count is not part
    of the class: a schedule is valid on any core count of the same CPU (and is measured again before it
    counts). Raises :class:`ScheduleStoreError` for a target that is not a dict.
    """
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except ValueError:
            raise ScheduleStoreError(f"target {target!r} is not JSON: pass the target as a JSON dict") from None
    if not isinstance(target, dict) and hasattr(target, "export"):  # a tvm Target
        target = target.export()
    if not isinstance(target, dict) and hasattr(target, "items"):  # TVM's Map of a target's JSON
        target = {str(k): _plain(v) for k, v in target.items()}
    if not isinstance(target, dict):
        raise ScheduleStoreError(f"target {target!r} is not a target: pass a JSON dict or a tvm Target")
    kind = str(target.get("kind", "?"))
    triple = str(target.get("mtriple") or "")
    mcpu = str(target.get("mcpu") or "")
    mattr = target.get("mattr") or []
    if isinstance(mattr, str):
        mattr = mattr.split(",")
    features = "".join(f"+{f.lstrip('+')}" for f in sorted(str(f) for f in mattr if str(f).strip()))
    return f"{kind}/{triple}/{mcpu}{features}"


# ----------------------------------------------------------------------------------------------------
# Serialising TVM objects


def record_json(record: Any) -> list[Any]:
    """A ``TuningRecord`` as the plain JSON list stock MetaSchedule writes: ``[trace, run_secs, target,
    args_info]``. (TVM's Python ``as_json`` cannot convert the ``IndexMap`` a layout-rewrite trace holds;
    it is kept as TVM's own JSON string of it, which ``TuningRecord.from_json`` reads back.)"""
    from tvm.s_tir.meta_schedule import _ffi_api

    return _plain(_ffi_api.TuningRecordAsJSON(record))


def block_names(script: str) -> list[str]:
    """The names of the blocks of a workload's function (its TVMScript), in the order it lists them."""
    return re.findall(r'T\.sblock\("([^"]+)"', script)


def buffer_names(script: str) -> list[str]:
    """The names of the buffers of a workload's function (its TVMScript): parameters, then allocations."""
    return re.findall(r'(\w+)(?:: T\.Buffer\(| = T\.(?:sblock_)?alloc_buffer\()', script)


def name_map(source_mod: Any, target_mod: Any) -> dict[str, str]:
    """How the names of ``source_mod``'s blocks and buffers read in the structurally equal ``target_mod``.

    Two models' copies of one kernel (one workload to the store) name blocks and buffers after their own
    Relax variables (``lv85_red`` in one, ``lv157_red`` in the other); names are paired in the order both
    modules list them, and only those that differ are kept. Raises :class:`ScheduleStoreError` if the
    modules' blocks or buffers differ."""
    if source_mod.same_as(target_mod):
        return {}
    source_script, target_script = source_mod.script(), target_mod.script()
    names: dict[str, str] = {}
    for names_of in (block_names, buffer_names):
        source, target = names_of(source_script), names_of(target_script)
        if len(source) != len(target):
            raise ScheduleStoreError("a stored schedule does not fit this kernel (its blocks differ)")
        names.update((a, b) for a, b in zip(source, target) if a != b)
    return names


def renamed(record: list[Any], names: dict[str, str]) -> list[Any]:
    """A record's plain JSON (see :func:`record_json`) with the blocks its trace finds renamed by
    ``names`` (see :func:`name_map`). A block the trace made itself is named after the block or buffer it
    came from plus a suffix (``lv157_red_rf``, ``lv74_global``) and is renamed by that prefix."""
    if not names:
        return record
    prefixes = sorted(names, key=len, reverse=True)

    def mapped(name: str) -> str:
        if name in names:
            return names[name]
        for prefix in prefixes:
            if name.startswith(prefix + "_"):
                return names[prefix] + name[len(prefix):]
        return name

    insts, decisions = record[0]
    out = []
    for inst in insts:  # [kind, inputs, attrs, outputs]; GetSBlock's attrs are [block name, function name]
        if inst[0] == "GetSBlock" and inst[2]:
            inst = [inst[0], inst[1], [mapped(inst[2][0]), *inst[2][1:]], *inst[3:]]
        out.append(inst)
    return [[out, decisions], *record[1:]]


def retarget(record: list[Any], source_mod: Any, target_mod: Any) -> list[Any]:
    """A record's plain JSON, made for ``source_mod``, made to apply to ``target_mod``."""
    return renamed(record, name_map(source_mod, target_mod))


def rebind(record: Any, workload: Any) -> Any:
    """``record`` (a ``TuningRecord`` of a structurally equal workload) as a record of ``workload``."""
    from tvm.s_tir.meta_schedule.database import TuningRecord

    return TuningRecord.from_json(retarget(record_json(record), record.workload.mod, workload.mod), workload)


def _plain(value: Any) -> Any:
    import tvm
    import tvm_ffi

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tvm.tirx.IntImm):
        return int(value.value)
    if isinstance(value, tvm.tirx.FloatImm):
        return float(value.value)
    if isinstance(value, (tvm_ffi.Array, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, tvm_ffi.Map):
        return {str(k): _plain(v) for k, v in value.items()}
    return tvm.ir.save_json(value)


def _digest(mod_json: str) -> str:
    return hashlib.sha256(mod_json.encode()).hexdigest()[:32]


def _fingerprint(digest: str, klass: str, record: list[Any], timing: str = HOT) -> str:
    trace = json.dumps(record[0], sort_keys=True, separators=(",", ":"))
    # A hot record keeps schema 1's fingerprint, so importing an old log again still adds nothing.
    text = f"{digest}\n{klass}\n{trace}" + ("" if timing == HOT else f"\n{timing}")
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------------------------------
# The SQL connection (SQLite or PostgreSQL, one dialect: ``?`` parameters, ON CONFLICT DO NOTHING)


class _Sql:
    def __init__(self, location: str) -> None:
        self.location = location
        self.postgres = location.startswith(("postgresql://", "postgres://"))
        self._lock = threading.Lock()  # MetaSchedule calls the database from its worker threads
        try:
            if self.postgres:
                try:
                    import psycopg
                except ImportError:
                    raise ScheduleStoreError(
                        "a PostgreSQL schedule store needs psycopg: pip install 'psycopg[binary]'") from None
                self._conn = psycopg.connect(location, autocommit=True, connect_timeout=10)
            else:
                path = Path(location)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(str(path), timeout=SQLITE_BUSY_SEC, isolation_level=None,
                                             check_same_thread=False)
                self._conn.execute("PRAGMA journal_mode=WAL")
        except ScheduleStoreError:
            raise
        except Exception as err:  # noqa: BLE001 - sqlite3/psycopg errors: one line with what to do
            raise ScheduleStoreError(
                f"cannot open the schedule store {redact(location)}: {_first_line(err)} "
                f"(set {ENV} to a writable file or a reachable postgresql:// URL, or pass --no-schedules)"
            ) from None
        self._create()

    def _create(self) -> None:
        # Two workstations creating (or upgrading) the schema at once: one at a time (PostgreSQL's
        # advisory lock, SQLite's write lock taken up front).
        with self.transaction(immediate=True):
            if self.postgres:
                self.execute("SELECT pg_advisory_xact_lock(7412031)")
            for statement in _SCHEMA:
                self.execute(statement)
            self.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                         ("schema", str(SCHEMA_VERSION)))
            version = int(self.query("SELECT value FROM meta WHERE name = ?", ("schema",))[0][0])
            if version == 1:
                self.execute(_MIGRATE_1_TO_2)
                self.execute("UPDATE meta SET value = ? WHERE name = ?", (str(SCHEMA_VERSION), "schema"))
        if version > SCHEMA_VERSION:
            raise ScheduleStoreError(
                f"the schedule store {redact(self.location)} was made by a newer edgetune (schema {version}): "
                "upgrade edgetune")

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.postgres else statement

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        with self._lock:
            cursor = self._conn.execute(self._sql(statement), tuple(params))
            return cursor.rowcount if cursor.rowcount is not None else 0

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return list(self._conn.execute(self._sql(statement), tuple(params)).fetchall())

    def transaction(self, immediate: bool = False):
        """``immediate``: take SQLite's write lock at the start (a read-then-write transaction)."""
        return _Transaction(self, immediate and not self.postgres)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Transaction:
    def __init__(self, sql: _Sql, immediate: bool = False) -> None:
        self.sql = sql
        self.immediate = immediate

    def __enter__(self) -> None:
        self.sql.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")

    def __exit__(self, kind, value, trace) -> None:
        self.sql.execute("COMMIT" if kind is None else "ROLLBACK")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def redact(location: str) -> str:
    """A store location fit to print: a PostgreSQL URL without its password."""
    if "://" in location and "@" in location:
        scheme, rest = location.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else location
    return location


# ----------------------------------------------------------------------------------------------------
# The store


@dataclass(frozen=True)
class StoredRecord:
    """One measured schedule: its workload (``digest``), CPU class, the stock TuningRecord JSON, its
    mean run time in µs (None: the trial failed), and how it was timed (``hot`` or ``cold``)."""

    digest: str
    cpu_class: str
    record: list[Any]
    mean_us: float | None
    source: str
    timing: str = HOT

    @property
    def args_info(self) -> list[Any]:
        return _args_info(self.record)


@dataclass
class ClassSummary:
    """What the store holds for one CPU class (``schedules ls``)."""

    cpu_class: str
    workloads: int
    records: int
    measured: int  # records whose trial succeeded
    sources: int


@dataclass
class WorkloadBest:
    """The best schedule of one workload on one CPU class (``schedules show``): fastest of all, and fastest
    of each timing (a hot time is not comparable with a cold one)."""

    digest: str
    shash: str
    name: str | None
    records: int
    best_us: float | None
    best_hot_us: float | None = None
    best_cold_us: float | None = None


@dataclass
class ImportResult:
    """What ``import`` took from a folder."""

    source: str
    workloads: int
    records: int  # records in the folder
    added: int  # records new to the store
    classes: list[str] = field(default_factory=list)


def default_location() -> str:
    """``EDGETUNE_SCHEDULES``, else ``$XDG_DATA_HOME/edgetune/schedules.sqlite``
    (``~/.local/share/edgetune/...``)."""
    configured = os.environ.get(ENV, "").strip()
    if configured and configured.lower() != OFF:
        return configured
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "edgetune", DEFAULT_FILE)


def sessions_use_store() -> bool:
    """False when ``EDGETUNE_SCHEDULES=off``: tuning sessions then neither read nor write a store."""
    return os.environ.get(ENV, "").strip().lower() != OFF


class ScheduleStore:
    """The schedule store at ``location`` (a file path or a ``postgresql://`` URL; None: the default).

    Thread-safe. Raises :class:`ScheduleStoreError` when it cannot be opened.
    """

    def __init__(self, location: str | None = None) -> None:
        self.location = location or default_location()
        self._sql = _Sql(self.location)
        self._workloads: dict[str, Any] = {}  # digest -> tvm Workload, loaded once

    def close(self) -> None:
        self._sql.close()

    def __enter__(self) -> "ScheduleStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- writing ---------------------------------------------------------------------------------------

    def add_workload(self, shash: str, mod_json: str, name: str | None = None) -> str:
        """Add a workload (MetaSchedule's ``[shash, mod]`` JSON fields) if missing; its digest. ``name`` is the
        task's name in the session that measured it (kept once known)."""
        digest = _digest(mod_json)
        self._sql.execute("INSERT INTO workloads (digest, shash, name, mod) VALUES (?, ?, ?, ?) ON CONFLICT (digest) "
                          "DO UPDATE SET name = COALESCE(workloads.name, excluded.name)",
                          (digest, shash, name, mod_json))
        return digest

    def add_records(self, records: Iterable[StoredRecord]) -> int:
        """Add records (one transaction); how many were new. A schedule already in the store for the same
        workload and CPU class is left as it is."""
        added = 0
        with self._sql.transaction():
            for r in records:
                added += self._sql.execute(
                    "INSERT INTO records (fingerprint, digest, cpu_class, record, mean_us, source, created, timing) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (_fingerprint(r.digest, r.cpu_class, r.record, r.timing), r.digest, r.cpu_class,
                     json.dumps(r.record, separators=(",", ":")), r.mean_us, r.source, _now(), r.timing))
        return added

    def import_log(self, folder: str | Path, source: str | None = None) -> ImportResult:
        """Add every record of a MetaSchedule JSON database folder (an edgetune tuning log or a stock
        ``tune_tasks`` work dir). Each record's CPU class comes from the target it names, how it was timed
        from the log's session (a stock work dir, or a log from before cold timing, timed hot). Raises
        :class:`ScheduleStoreError` when the folder holds no database or a line is damaged."""
        folder = Path(folder)
        try:
            workload_rows, record_rows = read_database_rows(folder)
        except TuningLogError as err:
            raise ScheduleStoreError(str(err)) from None
        session = _session_of(folder)
        names, cold_weights = _task_names(session), bool(session.get("cold_weights"))
        digests: list[str | None] = []
        for row in workload_rows:
            key = isinstance(row, list) and len(row) == 2 and isinstance(row[1], str) and database_key(row[0])
            digests.append(self.add_workload(str(row[0]), row[1], names.get(key)) if key else None)
        source = source or str(folder.resolve())
        stored, classes = [], set()
        for index, record in record_rows:
            if not (0 <= index < len(digests)) or digests[index] is None or len(record) < 3:
                continue
            klass = cpu_class(record[2])
            classes.add(klass)
            timing = kernel_timing(cold_weights, _args_info(record))
            stored.append(StoredRecord(digests[index], klass, record, _mean_us(record[1]), source, timing))
        added = self.add_records(stored)
        return ImportResult(source, sum(d is not None for d in digests), len(stored), added, sorted(classes))

    # --- reading ---------------------------------------------------------------------------------------

    def classes(self) -> list[ClassSummary]:
        rows = self._sql.query(
            "SELECT cpu_class, COUNT(DISTINCT digest), COUNT(*), COUNT(mean_us), COUNT(DISTINCT source) "
            "FROM records GROUP BY cpu_class ORDER BY cpu_class")
        return [ClassSummary(str(c), int(w), int(n), int(m), int(s)) for c, w, n, m, s in rows]

    def best_by_workload(self, klass: str) -> list[WorkloadBest]:
        """Each workload the class has records of, with its best time (µs), fastest first."""
        rows = self._sql.query(
            "SELECT r.digest, w.shash, COUNT(*), MIN(r.mean_us), "
            f"MIN(CASE WHEN r.timing = '{HOT}' THEN r.mean_us END), MIN(CASE WHEN r.timing = '{COLD}' THEN r.mean_us END) "
            "FROM records r JOIN workloads w ON w.digest = r.digest WHERE r.cpu_class = ? GROUP BY r.digest, w.shash",
            (klass,))

        def us(value: Any) -> float | None:
            return float(value) if value is not None else None

        result = [WorkloadBest(str(d), str(s), self._name(str(d)), int(n), us(b), us(hot), us(cold))
                  for d, s, n, b, hot, cold in rows]
        return sorted(result, key=lambda w: (w.best_us is None, w.best_us or 0.0))

    def records(self, klass: str, digests: Sequence[str] | None = None, measured_only: bool = False,
                limit: int | None = None, timing: str | None = None) -> list[StoredRecord]:
        """The records of a CPU class (of the workloads ``digests``, timed ``timing``), fastest first, failed
        ones last."""
        where, params = ["cpu_class = ?"], [klass]
        if timing is not None:
            where.append("timing = ?")
            params.append(timing)
        if digests is not None:
            if not digests:
                return []
            where.append(f"digest IN ({', '.join('?' for _ in digests)})")
            params.extend(digests)
        if measured_only:
            where.append("mean_us IS NOT NULL")
        statement = (f"SELECT digest, cpu_class, record, mean_us, source, timing FROM records "
                     f"WHERE {' AND '.join(where)} "
                     "ORDER BY CASE WHEN mean_us IS NULL THEN 1 ELSE 0 END, mean_us, fingerprint")
        if limit is not None:
            statement += f" LIMIT {int(limit)}"
        return [StoredRecord(str(d), str(c), json.loads(r), m, str(s), str(t))
                for d, c, r, m, s, t in self._sql.query(statement, params)]

    def best_records(self, klass: str, digests: Sequence[str], cold_weights: bool, limit: int) -> list[StoredRecord]:
        """The fastest measured records of the workloads ``digests`` (structurally equal ones: one kernel)
        timed the way a session timing ``cold_weights`` times that kernel; the other timing's only when the
        store has none of these (a time is compared with times taken the same way only)."""
        wanted = self._timing_of(klass, digests, cold_weights)
        if wanted is None:
            return []
        return (self.records(klass, digests, measured_only=True, limit=limit, timing=wanted)
                or self.records(klass, digests, measured_only=True, limit=limit))

    def find_workloads(self, mod: Any) -> list[str]:
        """The digests of the stored workloads structurally equal to ``mod`` (one, unless two workstations
        serialised the same module differently)."""
        import tvm_ffi

        shash = str(int(tvm_ffi.structural_hash(mod)))
        return [str(digest) for (digest,) in self._sql.query("SELECT digest FROM workloads WHERE shash = ?", (shash,))
                if tvm_ffi.structural_equal(self.workload(str(digest)).mod, mod)]

    def workload(self, digest: str) -> Any:
        """The TVM ``Workload`` of a stored digest (loaded once)."""
        found = self._workloads.get(digest)
        if found is None:
            from tvm.s_tir.meta_schedule.database import Workload

            rows = self._sql.query("SELECT shash, mod FROM workloads WHERE digest = ?", (digest,))
            if not rows:
                raise ScheduleStoreError(f"workload {digest} is not in the store {redact(self.location)}")
            found = Workload.from_json([str(rows[0][0]), str(rows[0][1])])
            self._workloads[digest] = found
        return found

    def _name(self, digest: str) -> str | None:
        rows = self._sql.query("SELECT name FROM workloads WHERE digest = ?", (digest,))
        return str(rows[0][0]) if rows and rows[0][0] else None

    def export(self, klass: str, folder: str | Path) -> int:
        """Write the class's records into the new folder ``folder`` as a stock MetaSchedule JSON database
        (written by TVM's own ``JSONDatabase``, so stock TVM reads it); nothing is left behind if it fails.
        Returns the number of records written. Raises :class:`ScheduleStoreError`."""
        import shutil
        import tempfile

        from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord

        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise ScheduleStoreError(f"{folder} is not empty: export into a new folder")
        stored = self.records(klass)
        if not stored:
            known = ", ".join(c.cpu_class for c in self.classes()) or "none (the store is empty)"
            raise ScheduleStoreError(f"no schedules for CPU class {klass!r}: pick one of {known}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            database = JSONDatabase(path_workload=str(staging / WORKLOAD_FILE),
                                    path_tuning_record=str(staging / RECORD_FILE))
            for record in stored:
                workload = database.commit_workload(self.workload(record.digest).mod)
                database.commit_tuning_record(TuningRecord.from_json(record.record, workload))
            del database
            if folder.exists():
                folder.rmdir()
            staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return len(stored)

    def _timing_of(self, klass: str, digests: Sequence[str], cold_weights: bool) -> str | None:
        """How a session timing ``cold_weights`` times the kernel of ``digests`` (from the arguments of one of
        its measured records); None when the class has no measured record of it."""
        first = self.records(klass, digests, measured_only=True, limit=1)
        return kernel_timing(cold_weights, first[0].args_info) if first else None

    def best_record(self, target: Any, mod: Any, cold_weights: bool = True) -> StoredRecord | None:
        """The fastest measured record of workload ``mod`` on ``target``'s CPU class, None if the store has
        none: of the timing a session timing ``cold_weights`` gives the kernel, when the store has it (by
        default as on a board whose caches are not known: a large kernel cold)."""
        found = self.best_records(cpu_class(target), self.find_workloads(mod), cold_weights, 1)
        return found[0] if found else None

    def seed_records(self, target: Any, cold_weights: bool = False, own: Collection[str] = (),
                     per_workload: int = SEED_PER_WORKLOAD, limit: int = SEED_LIMIT) -> list[Any]:
        """What a new session of ``target`` that times ``cold_weights`` starts from: the best measured
        records of each workload of its CPU class (``per_workload`` each, ``limit`` in all, workloads with
        the fastest records first), as TVM ``TuningRecord`` objects, each workload's of one timing only.
        The session's own kernels (``own``: their workload hashes, as ``session.json`` keys tasks) only
        with records timed as the session will time them: those are replayed and compared with its trials.
        Another model's kernels, which only train the cost model, with the other timing's records when the
        store has none of the session's: the model compares a workload's times with each other only, so a
        kernel timed hot still teaches which of its schedules are fast."""
        from tvm.s_tir.meta_schedule.database import TuningRecord

        klass = cpu_class(target)
        own = set(own)
        seeds: list[Any] = []
        for best in self.best_by_workload(klass):
            if best.best_us is None or len(seeds) >= limit:
                continue
            wanted = self._timing_of(klass, [best.digest], cold_weights)
            room = min(per_workload, limit - len(seeds))
            found = self.records(klass, [best.digest], measured_only=True, timing=wanted, limit=room)
            if not found and database_key(best.shash) not in own:
                found = self.records(klass, [best.digest], measured_only=True, limit=room)
            workload = self.workload(best.digest)
            seeds.extend(TuningRecord.from_json(stored.record, workload) for stored in found)
        return seeds

    def database(self, target: Any, source: str = "", names: dict[str, str] | None = None,
                 cold_weights: bool = False) -> Any:
        """MetaSchedule's view of this store for one target's CPU class (see :class:`ScheduleDatabase`);
        ``names``: ``{workload hash: task name}`` of the session committing through it, ``cold_weights``: how
        that session times (what its records are filed as, and which records its queries rank first)."""
        return ScheduleDatabase(self, cpu_class(target), source, names, cold_weights)


def _session_of(folder: Path) -> dict[str, Any]:
    """A tuning log's session.json ({} for a stock work dir)."""
    try:
        session = read_session(folder / SESSION_FILE) or {}
    except TuningLogError:
        return {}
    return session if isinstance(session, dict) else {}


def _task_names(session: dict[str, Any]) -> dict[str, str]:
    """``{workload hash: task name}`` from a tuning log's session (none for a stock work dir)."""
    tasks = session.get("tasks")
    return {str(t["workload_hash"]): str(t["name"]) for t in tasks if isinstance(t, dict)
            and t.get("workload_hash") and t.get("name")} if isinstance(tasks, list) else {}


def _args_info(record: list[Any]) -> list[Any]:
    """The argument shapes of a record in stock TuningRecord JSON (``[trace, run_secs, target, args_info]``)."""
    return record[3] if len(record) > 3 else []


def _mean_us(run_secs: Any) -> float | None:
    secs = mean_run_secs(run_secs)
    return secs * 1e6 if secs is not None else None


def _make_database_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.database import PyDatabase, TuningRecord, Workload

    @derived_object
    class ScheduleDatabase(PyDatabase):
        """One CPU class of a :class:`ScheduleStore` as a MetaSchedule database. Records committed through it
        are stored under the class of the target they name (this class when they name none); queries see
        this class only."""

        def __init__(self, store: ScheduleStore, klass: str, source: str = "",
                     names: dict[str, str] | None = None, cold_weights: bool = False) -> None:
            super().__init__()
            self.store = store
            self.cpu_class = klass
            self.source = source or "session"
            self.names = names or {}  # {workload hash: task name}
            self.cold_weights = cold_weights

        def _digest_of(self, workload: Any) -> str:
            shash, mod_json = workload.as_json()
            return self.store.add_workload(str(shash), str(mod_json), self.names.get(database_key(shash) or ""))

        def has_workload(self, mod: Any) -> bool:
            return bool(self.store.find_workloads(mod))

        def commit_workload(self, mod: Any) -> Any:
            digests = self.store.find_workloads(mod)
            if digests:
                return self.store.workload(digests[0])
            workload = Workload(mod)
            self._digest_of(workload)
            return workload

        def commit_tuning_record(self, record: Any) -> None:
            plain = record_json(record)
            klass = cpu_class(plain[2]) if len(plain) > 2 and plain[2] else self.cpu_class
            timing = kernel_timing(self.cold_weights, _args_info(plain))
            self.store.add_records([StoredRecord(self._digest_of(record.workload), klass, plain,
                                                 _mean_us(plain[1]), self.source, timing)])

        def get_top_k(self, workload: Any, top_k: int) -> list[Any]:
            if top_k <= 0:
                return []
            digests = self.store.find_workloads(workload.mod)
            names = {digest: name_map(self.store.workload(digest).mod, workload.mod) for digest in digests}
            return [TuningRecord.from_json(renamed(r.record, names[r.digest]), workload)
                    for r in self.store.best_records(self.cpu_class, digests, self.cold_weights, top_k)]

        def get_all_tuning_records(self) -> list[Any]:
            return [TuningRecord.from_json(r.record, self.store.workload(r.digest))
                    for r in self.store.records(self.cpu_class)]

        def __len__(self) -> int:
            rows = self.store._sql.query("SELECT COUNT(*) FROM records WHERE cpu_class = ?", (self.cpu_class,))
            return int(rows[0][0])

    return ScheduleDatabase


_database_class = None


def ScheduleDatabase(store: ScheduleStore, klass: str, source: str = "",  # noqa: N802 - a class to callers
                     names: dict[str, str] | None = None, cold_weights: bool = False) -> Any:
    """A MetaSchedule ``PyDatabase`` over one CPU class of ``store`` (TVM imported on first use)."""
    global _database_class
    if _database_class is None:
        _database_class = _make_database_class()
    return _database_class(store, klass, source, names, cold_weights)


def iter_log_folders(root: str | Path) -> Iterator[Path]:
    """``root`` and every folder under it that holds a MetaSchedule JSON database."""
    root = Path(root)
    for folder in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (folder / WORKLOAD_FILE).exists() and (folder / RECORD_FILE).exists():
            yield folder
