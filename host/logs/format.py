"""The format of a tuning log folder: its file names, how its lines are read, what a failed trial is,
its session statuses and the hash that keys a workload. Everything else imports these; nothing else
spells them.

```
DIR/database_workload.json       MetaSchedule JSONDatabase, workload table (stock TVM reads and writes it)
DIR/database_tuning_record.json  MetaSchedule JSONDatabase, one line per measured trial, failed ones included
DIR/session.json                 edgetune: model hash, board, target, budget used, runs, tasks, cost model
DIR/history.jsonl                edgetune: one line per trial (see :class:`Trial`)
DIR/.edgetune.lock               edgetune: the writer's flock (see :mod:`host.logs.tuninglog`)
```

The two database files are exactly what stock MetaSchedule's ``JSONDatabase`` writes and reads; edgetune
only ever appends to them through ``JSONDatabase`` itself.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path
from typing import Any, Callable

from ..errors import EdgetuneError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
SESSION_FILE = "session.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".edgetune.lock"
# The files that make up a tuning log (what a package carries), database first.
LOG_FILES = (WORKLOAD_FILE, RECORD_FILE, SESSION_FILE, HISTORY_FILE)
# The version of session.json this edgetune writes and reads.
FORMAT = 1
# MetaSchedule records a failed measurement with a run time of 1e10 s; anything at or above this failed.
FAILED_RUN_SECS = 1e9


class TuningLogError(EdgetuneError):
    """A tuning log is missing, damaged, locked or of another model or target. The message says what to do."""


class Status(enum.StrEnum):
    """The status of a session (``session.json``'s ``status``), of one of its runs (``runs[].status``) and
    of :func:`host.tuning.session.run_session`'s result."""

    RUNNING = "running"  # a run in progress (or killed before it could say otherwise)
    COMPLETED = "completed"  # the budget is spent, or the search ended early
    ALREADY_COMPLETE = "already-complete"  # a result only: the log already held the budget, nothing ran
    STOPPED_NO_BOARD = "stopped-no-board"  # no board of the key came back before the deadline
    INTERRUPTED = "interrupted"  # Ctrl-C
    FAILED = "failed"  # an unexpected error; the records measured so far stay
    KILLED = "killed"  # a run still RUNNING when the next one started: its process was killed
    MERGED = "merged"  # a log made by `edgetune log merge`
    EXPORTED = "exported"  # a log made by `edgetune log export`

    @classmethod
    def parse(cls, value: Any) -> "Status | None":
        """The status a log file names, ``None`` for a missing or unknown one (a newer edgetune's)."""
        try:
            return cls(value)
        except (TypeError, ValueError):
            return None


def mean_run_secs(run_secs: Any) -> float | None:
    """The one rule for "this trial failed": the mean of a record's ``run_secs`` in seconds, or ``None``
    when the trial failed (no run times, MetaSchedule's 1e10 failure marker, or a value that is not a
    positive finite time).

    ``run_secs`` is a list of seconds (floats, or TVM ``FloatImm``) or ``None``.
    """
    if not run_secs:
        return None
    try:
        secs = [float(getattr(s, "value", s)) for s in run_secs]
    except (TypeError, ValueError):
        return None
    if any(not math.isfinite(s) or s < 0 or s >= FAILED_RUN_SECS for s in secs):
        return None
    mean = sum(secs) / len(secs)
    return mean if mean > 0 else None


def mean_run_us(run_secs: Any) -> float | None:
    """:func:`mean_run_secs` in microseconds."""
    secs = mean_run_secs(run_secs)
    return None if secs is None else secs * 1e6


def latency_or_none(value: Any) -> float | None:
    """A latency read from a history line: a positive finite number, else ``None`` (the trial failed)."""
    number = _finite(value)
    return number if number is not None and number > 0 else None


@dataclasses.dataclass
class Trial:
    """One trial of a session: a line of ``history.jsonl``. ``latency_us`` is ``None`` for a failed trial
    (``error`` then says why); ``elapsed_s`` counts the session's tuning time, all runs together;
    ``carried_from`` names the sibling task whose best schedule the trial replayed, ``variant`` the
    small-kernel candidate it is (``serial`` or ``unscheduled``, see ``host/tuning/variants.py``); each is
    written only when set."""

    trial: int
    task: int
    task_name: str | None = None
    latency_us: float | None = None
    gflops: float | None = None
    error: str | None = None
    board: str | None = None
    elapsed_s: float | None = None
    time: str | None = None
    carried_from: str | None = None
    variant: str | None = None

    @property
    def failed(self) -> bool:
        return self.latency_us is None

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for optional in ("carried_from", "variant"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, entry: Any, number: int) -> "Trial | None":
        """A history line as a trial (``number`` when it names none); ``None`` when it is not a trial entry."""
        if not isinstance(entry, dict) or not isinstance(entry.get("task"), int) or isinstance(entry["task"], bool):
            return None
        latency = latency_or_none(entry.get("latency_us"))
        error = entry.get("error")
        if latency is None and not error:
            error = "no latency recorded"
        trial = entry.get("trial")
        elapsed = _finite(entry.get("elapsed_s"))
        return cls(
            trial=trial if isinstance(trial, int) and not isinstance(trial, bool) else number,
            task=entry["task"],
            task_name=str(entry["task_name"]) if entry.get("task_name") is not None else None,
            latency_us=latency,
            gflops=latency_or_none(entry.get("gflops")) if latency is not None else None,
            error=str(error) if latency is None else None,
            board=str(entry["board"]) if entry.get("board") is not None else None,
            elapsed_s=elapsed,
            time=str(entry["time"]) if entry.get("time") is not None else None,
            carried_from=str(entry["carried_from"]) if entry.get("carried_from") is not None else None,
            variant=str(entry["variant"]) if entry.get("variant") is not None else None,
        )


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def hash_key(value: Any) -> str | None:
    """A workload hash as the 16 lowercase hex digits ``session.json`` keys tasks on; ``None`` when it is
    not a hash. Takes an int, 16 hex digits (``session.json``'s spelling, with or without ``0x``) or a
    decimal string (the database's spelling: use :func:`database_key` for a database row, which is never hex).
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return format(value & 0xFFFFFFFFFFFFFFFF, "016x")
    text = str(value).strip().lower()
    hexadecimal = text.startswith("0x") or any(c in "abcdef" for c in text) or len(text) == 16
    try:
        number = int(text, 16) if hexadecimal else int(text)
    except ValueError:
        return None
    return format(number & 0xFFFFFFFFFFFFFFFF, "016x")


def database_key(shash: Any) -> str | None:
    """The key of a line of ``database_workload.json`` from its first field (MetaSchedule's structural hash,
    written in decimal); ``None`` when it is not a number."""
    try:
        return hash_key(int(str(shash).strip()))
    except ValueError:
        return None


def workload_key(mod: Any) -> str:
    """The key of a workload IRModule: its structural hash (the first field of its line in
    ``database_workload.json``, where MetaSchedule writes it in decimal) as :func:`hash_key` spells it."""
    import tvm_ffi

    return hash_key(int(tvm_ffi.structural_hash(mod))) or ""


# ----------------------------------------------------------------------------------------------------
# Reading JSON lines: the one policy.
#
# A line without its newline at the end of a file that is not complete JSON is a write in progress (or
# cut short by a crash): every reader leaves it out, in memory. Any other line that is not JSON is
# damage: a reader names it (file:line) and stops; the next writer of the log drops it (and says so).


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # UnicodeDecodeError too
        return False
    return True


def split_jsonl(raw: bytes) -> tuple[list[tuple[int, bytes]], list[int], bool]:
    """The complete JSON lines of ``raw`` as ``(line number, bytes without newline)``, the numbers of the
    complete lines that are not JSON, and whether the last line is torn (no newline, not JSON).

    A last line without its newline that is complete JSON counts as complete: no proper prefix of a JSON
    array or object line is itself JSON, so it cannot be a write still in progress.
    """
    lines = raw.split(b"\n")
    tail = lines.pop()  # what follows the last newline ("" when the file ends with one)
    good: list[tuple[int, bytes]] = []
    damaged: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if _is_json(line):
            good.append((number, line))
        else:
            damaged.append(number)
    torn = False
    if tail.strip():
        if _is_json(tail):
            good.append((len(lines) + 1, tail))
        else:
            torn = True
    return good, damaged, torn


def read_bytes(path: Path) -> bytes:
    """A log file's bytes; ``b""`` when it does not exist. Raises :class:`TuningLogError`."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as err:
        raise TuningLogError(f"cannot read {path} ({err.strerror}): check its permissions") from None


def complete_lines(path: Path) -> list[tuple[int, bytes]]:
    """The complete JSON lines of a JSONL log file with their line numbers, read without writing.

    Raises :class:`TuningLogError` naming the first damaged line (not the torn last one).
    """
    good, damaged, _ = split_jsonl(read_bytes(path))
    if damaged:
        raise TuningLogError(
            f"{path}:{damaged[0]} is not valid JSON: the tuning log is damaged; remove that line "
            "(running `edgetune tune` on this log again drops it)"
        )
    return good


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """The entries of a JSONL log file as ``(line number, value)``, by :func:`complete_lines`' policy."""
    return [(number, json.loads(line)) for number, line in complete_lines(path)]


def read_session(path: Path) -> dict[str, Any] | None:
    """``session.json`` as a dict, ``None`` when there is none. Raises :class:`TuningLogError` (one line)
    when it cannot be read or is not a JSON object."""
    what_to_do = "restore it or start a new --log folder"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise TuningLogError(f"cannot read {path} ({err.strerror}): {what_to_do}") from None
    try:
        data = json.loads(raw)
    except ValueError:  # UnicodeDecodeError too
        raise TuningLogError(f"{path} is damaged (not JSON): {what_to_do}") from None
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(type(data), "a number")
        raise TuningLogError(f"{path} is damaged (not a JSON object but {kind}): {what_to_do}")
    return data


def read_database_rows(folder: Path) -> tuple[list[Any], list[tuple[int, list[Any]]]]:
    """The raw rows of a MetaSchedule JSON database, in file (= commit) order, by the one line policy.

    Returns the workload rows (``[shash, workload json]``, by workload index) and the records as
    ``(workload_index, [trace, run_secs, target, args_info])``. Raises :class:`TuningLogError` when the
    folder holds no database or a line is damaged.
    """
    wl_path, rec_path = folder / WORKLOAD_FILE, folder / RECORD_FILE
    if not wl_path.exists() or not rec_path.exists():
        raise TuningLogError(
            f"{folder} holds no tuning database ({WORKLOAD_FILE}, {RECORD_FILE}): "
            f"run `edgetune tune MODEL --device KEY --trials N --log {folder}` first"
        )
    # Records before workloads: a record is committed after its workload, so while a writer appends,
    # every record read finds its workload.
    record_rows = read_jsonl(rec_path)
    workloads = []
    for number, row in read_jsonl(wl_path):
        if not isinstance(row, list) or not row:
            raise TuningLogError(f"{wl_path}:{number} is not a workload row: the tuning log is damaged")
        workloads.append(row)
    records = []
    for number, row in record_rows:
        well_formed = isinstance(row, list) and len(row) == 2 and isinstance(row[0], int)
        if not (well_formed and isinstance(row[1], list)):
            raise TuningLogError(f"{rec_path}:{number} is not a tuning record row: the tuning log is damaged")
        if not 0 <= row[0] < len(workloads):
            raise TuningLogError(
                f"{rec_path}:{number} refers to workload {row[0]}, which {WORKLOAD_FILE} lacks: "
                "the tuning log is damaged"
            )
        records.append((row[0], row[1]))
    return workloads, records


def kernel_form(session: dict[str, Any], key: str, has_records: bool, before: Any, wanted: Any,
                valid: Callable[[Any], bool]) -> Any:
    """One choice of how a tuning log's kernels are tuned (``key`` of its session: the layout, the weight
    repacking, the cold timing). A log with records keeps the form they were measured in, whatever is
    asked now: what its session recorded when it is ``valid``, else ``before`` (the form of every log
    from before the choice was recorded). A log without records takes ``wanted``."""
    if not has_records:
        return wanted
    recorded = session.get(key)
    return recorded if valid(recorded) else before
