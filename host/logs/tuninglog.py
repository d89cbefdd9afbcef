"""A tuning log folder, open for reading or for writing (the files are named in :mod:`host.logs.format`).

Records of different targets never mix: a folder belongs to one target and one model, and a session
for another is refused.

One writer, many readers. The writer (``TuningLog.open(DIR, create=True)``: `edgetune tune`, and the new
folder of `edgetune log merge|export`) holds an exclusive ``flock`` on ``DIR/.edgetune.lock`` for as long
as it lives (or until :meth:`TuningLog.close`); a second writer is refused at once, and a killed writer's
lock goes away with its process. A line cut short by a crash (SIGKILL, power loss) is dropped by the next
writer when it opens the log, so a resumed session never trips on it. Readers (`edgetune build`, `bench`,
`report`, `log show`, ``--from-log``) never write to DIR: they ignore, in memory, a last line still being
appended, and read the MetaSchedule database from a private copy of its complete lines, so a log being
tuned can be read at any time and is left byte for byte as it was.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.fsutil import write_atomic
from device_agent.schema import target_to_json

from .format import (
    FORMAT,
    HISTORY_FILE,
    LOCK_FILE,
    RECORD_FILE,
    SESSION_FILE,
    WORKLOAD_FILE,
    Status,
    Trial,
    TuningLogError,
    complete_lines,
    read_bytes,
    read_jsonl,
    read_session,
    split_jsonl,
)

logger = logging.getLogger(__name__)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON crash-safely: a reader never sees half a file."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def repair_jsonl(path: Path) -> int:
    """Drop lines that are not complete JSON (a write cut off by a crash). Returns lines dropped.

    Only the writer of a log may call this (it rewrites the file): see :meth:`TuningLog.open`.
    """
    raw = read_bytes(path)
    if not raw:
        return 0
    good, damaged, torn = split_jsonl(raw)
    dropped = len(damaged) + int(torn)
    if dropped or not raw.endswith(b"\n"):
        write_atomic(path, b"".join(line + b"\n" for _, line in good))
        if dropped:
            logger.warning("%s: dropped %d incomplete line(s) left by an interrupted write", path, dropped)
    return dropped


def json_database(folder: Path, allow_missing: bool = False):
    """Stock MetaSchedule's ``JSONDatabase`` on the two database files of ``folder``."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    return JSONDatabase(str(folder / WORKLOAD_FILE), str(folder / RECORD_FILE), allow_missing=allow_missing)


class _WriterLock:
    """The flock of one log folder, held by this process while a writer :class:`TuningLog` uses it."""

    _held: "weakref.WeakValueDictionary[tuple[int, int, int], _WriterLock]" = weakref.WeakValueDictionary()
    _guard = threading.Lock()

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)  # closing the fd releases the flock

    @classmethod
    def take(cls, folder: Path) -> "_WriterLock":
        """Lock ``folder`` for writing, or raise :class:`TuningLogError` naming the process that holds it.

        A writer of this process that still lives shares its lock (a resume in the same process must not
        be refused by a log object not yet collected); another process is refused at once.
        """
        lock_path = folder / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise TuningLogError(f"cannot lock the tuning log {folder} ({err.strerror}): check that the folder "
                                "is writable, or use another --log") from None
        try:
            st = os.fstat(fd)
            key = (os.getpid(), st.st_dev, st.st_ino)
            with cls._guard:
                held = cls._held.get(key)
                if held is not None:
                    os.close(fd)
                    return held
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    pid = holder if holder.isdigit() else "unknown"
                    raise TuningLogError(f"the tuning log {folder} is being written by another `edgetune tune` "
                                        f"(pid {pid}): wait for it or use another --log") from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                lock = cls(fd)
                cls._held[key] = lock
                return lock
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


@dataclass
class TuningLog:
    """A tuning log directory, open for reading or (one process at a time) for writing."""

    path: Path
    session: dict[str, Any] = field(default_factory=dict)
    writer: bool = False
    _lock: _WriterLock | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def workload_file(self) -> Path:
        return self.path / WORKLOAD_FILE

    @property
    def record_file(self) -> Path:
        return self.path / RECORD_FILE

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY_FILE

    @classmethod
    def open(cls, path: str | Path, create: bool = False, *, writer: bool | None = None) -> "TuningLog":
        """Open a log directory. Raises :class:`TuningLogError` if it is not one, or if it is to be written
        and another process writes it.

        ``writer`` (default: ``create``) opens it for writing: the folder is locked against other writers
        until :meth:`close` or the end of the process, and lines cut short by a crash are repaired. A reader
        writes nothing (a torn last line is ignored in memory).
        """
        path = Path(path)
        writer = create if writer is None else writer
        if not path.exists():
            if not create:
                raise TuningLogError(f"tuning log {path} does not exist: run `edgetune tune ... --log {path}` first")
            try:
                path.mkdir(parents=True)
            except OSError as err:
                raise TuningLogError(f"cannot create the tuning log folder {path} ({err.strerror}): choose another --log") from None
        elif not path.is_dir():
            raise TuningLogError(f"--log {path} is a file, not a folder: give a folder for the tuning log")
        log = cls(path, writer=writer)
        if writer:
            log._lock = _WriterLock.take(path)
        try:
            log.session = read_session(path / SESSION_FILE)
            if log.session is None:
                log.session = {}
                if not create and not log.record_file.exists():
                    raise TuningLogError(f"{path} holds no tuning log (no {RECORD_FILE}): check the path, or run "
                                         f"`edgetune tune MODEL --device KEY --trials N --log {path}` first")
            elif log.session.get("format") != FORMAT:
                raise TuningLogError(f"{path / SESSION_FILE} has format {log.session.get('format')!r}; this "
                                     f"edgetune reads {FORMAT}: use the edgetune that wrote it, or another --log")
            if writer:  # only the writer may rewrite a file: no one else appends to it now
                for file in (log.workload_file, log.record_file, log.history_file):
                    repair_jsonl(file)
        except BaseException:
            log.close()
            raise
        return log

    def close(self) -> None:
        """Stop writing: another process may open the log for writing once no writer of this process
        holds it. (The end of the process, or of this object, does the same.)"""
        self._lock = None

    def __enter__(self) -> "TuningLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_writer(self, what: str) -> None:
        if not self.writer or self._lock is None:
            raise RuntimeError(f"{what}: the tuning log {self.path} is not open for writing")

    def save_session(self) -> None:
        self._check_writer("save_session")
        self.session["format"] = FORMAT
        write_json_atomic(self.path / SESSION_FILE, self.session)

    def check_compatible(self, model_sha256: str, target: dict[str, Any]) -> None:
        """Refuse a session for another model or target than the log's. Raises :class:`TuningLogError`."""
        if not self.session:
            if self.record_file.exists() and self.record_file.stat().st_size > 0:
                raise TuningLogError(
                    f"{self.path} holds records from a session edgetune did not write (no {SESSION_FILE}): "
                    "use another --log folder, or pass this one as --from-log"
                )
            return
        old_target = self.session.get("target")
        if old_target is not None and target_to_json(old_target) != target_to_json(target):
            raise TuningLogError(
                f"{self.path} is a tuning log for target {target_to_json(old_target)}, not {target_to_json(target)}: "
                "records of different targets never mix: use another --log folder (pass this one as --from-log "
                "to learn from it)"
            )
        old_model = (self.session.get("model") or {}).get("sha256")
        if old_model and old_model != model_sha256:
            raise TuningLogError(
                f"{self.path} is a tuning log of another model ({(self.session.get('model') or {}).get('name')}, "
                f"sha256 {old_model[:12]}...): use another --log folder"
            )

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Path]:
        """A private folder holding the complete lines of this log's MetaSchedule database (and a copy of
        its ``session.json``), for code that reads a stock database folder. Nothing in the log is written;
        the folder is removed on exit.

        The record table is read before the workload table: a record is committed after its workload, so
        every record of the copy finds its workload.
        """
        records = complete_lines(self.record_file)
        workloads = complete_lines(self.workload_file)
        folder = Path(tempfile.mkdtemp(prefix="edgetune-log-"))
        try:
            (folder / WORKLOAD_FILE).write_bytes(b"".join(line + b"\n" for _, line in workloads))
            (folder / RECORD_FILE).write_bytes(b"".join(line + b"\n" for _, line in records))
            if self.session:
                (folder / SESSION_FILE).write_text(json.dumps(self.session))
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def database(self):
        """MetaSchedule's JSONDatabase on this folder (the stock format).

        The writer's commits go to the log's files; a reader's database is loaded from a :meth:`snapshot`
        (read-only in effect: a commit to it is lost), so that reading neither trips on a record being
        appended nor creates or changes a file.
        """
        if self.writer:
            self._check_writer("database")
            return json_database(self.path, allow_missing=True)
        with self.snapshot() as folder:  # JSONDatabase reads both tables when it is made
            return json_database(folder)

    @property
    def status(self) -> Status | None:
        """The session's status (``None`` for a stock MetaSchedule folder or an unknown status)."""
        return Status.parse(self.session.get("status"))

    def record_count(self) -> int:
        """Complete records (a record being appended is not counted yet)."""
        return len(complete_lines(self.record_file))

    def history(self) -> list[dict[str, Any]]:
        """The lines of ``history.jsonl`` as written (see :meth:`trials` for them typed)."""
        return [entry for _, entry in read_jsonl(self.history_file)]

    def trials(self) -> list[Trial]:
        """The trials of ``history.jsonl``, in the order they were measured. Raises :class:`TuningLogError`
        naming a line that is not a trial entry."""
        out = []
        for position, (number, entry) in enumerate(read_jsonl(self.history_file), start=1):
            trial = Trial.from_dict(entry, position)
            if trial is None:
                raise TuningLogError(f"{self.history_file}:{number} is not a trial entry: the history is damaged; "
                                     "remove that line")
            out.append(trial)
        return out

    def append_history(self, entries: list[Trial] | list[dict[str, Any]]) -> None:
        """Append trials to ``history.jsonl`` (one line each, flushed to disk). Writer only."""
        self._check_writer("append_history")
        with open(self.history_file, "a") as stream:
            for entry in entries:
                data = entry.as_dict() if isinstance(entry, Trial) else entry
                stream.write(json.dumps(data, sort_keys=True) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
