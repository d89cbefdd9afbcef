"""The tuning log directory: MetaSchedule's JSON database plus edgetune's session files.

```
DIR/database_workload.json       MetaSchedule JSONDatabase (stock TVM reads it)
DIR/database_tuning_record.json  one line per measured trial, failed ones included
DIR/session.json                 model hash, board, target, budget used, runs, tasks, cost model
DIR/history.jsonl                one line per trial: task, time, latency, GFLOPS, error, board
```

Records of different targets never mix: a DIR belongs to one target and one model, and a session
for another is refused. A line cut short by a crash (SIGKILL, power loss) is dropped when the log is
opened again, so a resumed session never trips on it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.fsutil import write_atomic
from device_agent.schema import target_to_json

from ..errors import EdgetuneError

logger = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
SESSION_FILE = "session.json"
HISTORY_FILE = "history.jsonl"
FORMAT = 1


def mean_run_secs(run_secs) -> float | None:
    """Mean of a record's ``run_secs`` in seconds; ``None`` for a failed trial (no times, or MetaSchedule's
    1e10 failure marker)."""
    if run_secs is None:
        return None
    values = [float(s) for s in run_secs]
    if not values or max(values) >= 1e9:
        return None
    return sum(values) / len(values)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON crash-safely: a reader never sees half a file."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())

def repair_jsonl(path: Path) -> int:
    """Drop lines that are not complete JSON (a write cut off by a crash). Returns lines dropped."""
    if not path.exists():
        return 0
    raw = path.read_bytes()
    if not raw:
        return 0
    good: list[bytes] = []
    dropped = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            dropped += 1
            continue
        good.append(line)
    if dropped or not raw.endswith(b"\n"):
        write_atomic(path, b"".join(g + b"\n" for g in good))
        if dropped:
            logger.warning("%s: dropped %d incomplete line(s) left by an interrupted write", path, dropped)
    return dropped


def read_jsonl(path: Path) -> list[Any]:
    if not path.exists():
        return []
    out = []
    with open(path) as stream:
        for line in stream:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


@dataclass
class TuningLog:
    """A tuning log directory."""

    path: Path
    session: dict[str, Any] = field(default_factory=dict)

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
    def open(cls, path: str | Path, create: bool = False) -> "TuningLog":
        """Open (and repair) a log directory. Raises :class:`EdgetuneError` if it is not one."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise EdgetuneError(f"tuning log {path} does not exist: run `edgetune tune ... --log {path}` first")
            try:
                path.mkdir(parents=True)
            except OSError as err:
                raise EdgetuneError(f"cannot create the tuning log folder {path} ({err.strerror}): choose another --log") from None
        elif not path.is_dir():
            raise EdgetuneError(f"--log {path} is a file, not a folder: give a folder for the tuning log")
        log = cls(path)
        session_path = path / SESSION_FILE
        if session_path.exists():
            try:
                log.session = json.loads(session_path.read_text())
            except ValueError:
                raise EdgetuneError(f"{session_path} is damaged (not JSON): restore it or start a new --log folder") from None
            if log.session.get("format") != FORMAT:
                raise EdgetuneError(f"{session_path} has format {log.session.get('format')!r}; this edgetune reads {FORMAT}")
        elif not create and not log.record_file.exists():
            raise EdgetuneError(f"{path} holds no tuning log (no {RECORD_FILE}): check the path")
        for file in (log.workload_file, log.record_file, log.history_file):
            repair_jsonl(file)
        return log

    def save_session(self) -> None:
        self.session["format"] = FORMAT
        write_json_atomic(self.path / SESSION_FILE, self.session)

    def check_compatible(self, model_sha256: str, target: dict[str, Any]) -> None:
        """Refuse a session for another model or target than the log's. Raises :class:`EdgetuneError`."""
        if not self.session:
            if self.record_file.exists() and self.record_file.stat().st_size > 0:
                raise EdgetuneError(
                    f"{self.path} holds records from a session edgetune did not write (no {SESSION_FILE}): "
                    "use another --log folder, or pass this one as --from-log"
                )
            return
        old_target = self.session.get("target")
        if old_target is not None and target_to_json(old_target) != target_to_json(target):
            raise EdgetuneError(
                f"{self.path} is a tuning log for target {target_to_json(old_target)}, not {target_to_json(target)}: "
                "records of different targets never mix: use another --log folder (pass this one as --from-log "
                "to learn from it)"
            )
        old_model = (self.session.get("model") or {}).get("sha256")
        if old_model and old_model != model_sha256:
            raise EdgetuneError(
                f"{self.path} is a tuning log of another model ({(self.session.get('model') or {}).get('name')}, "
                f"sha256 {old_model[:12]}...): use another --log folder"
            )

    def database(self):
        """MetaSchedule's JSONDatabase on this folder (the stock format)."""
        from tvm.s_tir.meta_schedule.database import JSONDatabase

        return JSONDatabase(str(self.workload_file), str(self.record_file), allow_missing=True)

    def record_count(self) -> int:
        if not self.record_file.exists():
            return 0
        with open(self.record_file, "rb") as stream:
            return sum(1 for line in stream if line.strip())

    def history(self) -> list[dict[str, Any]]:
        return read_jsonl(self.history_file)

    def append_history(self, entries: list[dict[str, Any]]) -> None:
        with open(self.history_file, "a") as stream:
            for entry in entries:
                stream.write(json.dumps(entry, sort_keys=True) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
