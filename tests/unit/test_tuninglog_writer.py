"""One writer per tuning log, under a lock; readers never write (tests/fixtures/logs/small as the log).

The lock is an flock, so the writers here are real processes: a lock taken by this test process would
not show what a second `edgetune tune` sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host.errors import EdgetuneError
from host.logs.format import HISTORY_FILE, RECORD_FILE, SESSION_FILE, WORKLOAD_FILE
from host.logs.tuninglog import TuningLog

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "tests" / "fixtures" / "logs" / "small"
APPENDS = 200

# A writer that holds the log until its stdin closes.
HOLDER = """
import sys
from host.logs.tuninglog import TuningLog
log = TuningLog.open(sys.argv[1], create=True)
print("locked", flush=True)
sys.stdin.read()
"""

# A writer that tries once and says what happened.
SECOND = """
import sys
from host.errors import EdgetuneError
from host.logs.tuninglog import TuningLog
try:
    TuningLog.open(sys.argv[1], create=True)
except EdgetuneError as err:
    print(err, file=sys.stderr)
    sys.exit(3)
print("opened")
"""

# A writer that appends records the way MetaSchedule does (open, append one line, close), each line in
# two writes with a pause between, so a reader often finds the last line half written; and one
# history entry per record through the log's own append.
APPENDER = """
import os, sys, time
from host.logs.tuninglog import TuningLog
log = TuningLog.open(sys.argv[1], create=True)
lines = open(sys.argv[2], "rb").read().splitlines(keepends=True)
print("ready", flush=True)
for i, line in enumerate(lines):
    fd = os.open(log.record_file, os.O_WRONLY | os.O_APPEND)
    try:
        half = len(line) // 2
        os.write(fd, line[:half])
        time.sleep(0.002)
        os.write(fd, line[half:])
    finally:
        os.close(fd)
    log.append_history([{"trial": 1000 + i, "task": 0, "latency_us": float(i + 1)}])
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _python(script: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=_env(), text=True, **kw)


def _second_writer(log_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SECOND, str(log_dir)], cwd=ROOT, env=_env(), text=True,
                          capture_output=True, timeout=60)


def _start_holder(log_dir: Path) -> subprocess.Popen:
    proc = _python(HOLDER, str(log_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(f"the first writer did not start: {line!r} {proc.stderr.read()}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def _sha256s(log_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(log_dir.iterdir()) if p.is_file()}


def _complete_records(log_dir: Path) -> list[bytes]:
    return [line for line in (log_dir / RECORD_FILE).read_bytes().splitlines() if line.strip()]


@pytest.fixture
def log_dir(tmp_path) -> Path:
    out = tmp_path / "log"
    shutil.copytree(SMALL, out)
    return out


# --- two writers ------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_at_once_with_one_line_naming_the_first(log_dir) -> None:
    holder = _start_holder(log_dir)
    try:
        started = time.monotonic()
        second = _second_writer(log_dir)
        assert second.returncode == 3, (second.stdout, second.stderr)
        assert time.monotonic() - started < 30  # refused, not queued behind the first
        message = second.stderr.strip()
        assert "\n" not in message
        assert message == (f"the tuning log {log_dir} is being written by another `edgetune tune` "
                           f"(pid {holder.pid}): wait for it or use another --log")
        with pytest.raises(EdgetuneError, match=rf"\(pid {holder.pid}\): wait for it or use another --log"):
            TuningLog.open(log_dir, create=True)
        # A reader is never refused, and still reads everything.
        reader = TuningLog.open(log_dir)
        assert reader.record_count() == len(_complete_records(log_dir))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The first writer is gone: its lock went with it.
    assert _second_writer(log_dir).returncode == 0


def test_a_killed_writer_leaves_no_lock_behind(log_dir) -> None:
    holder = _start_holder(log_dir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    second = _second_writer(log_dir)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "opened"


def test_a_writer_in_this_process_blocks_others_until_closed(log_dir) -> None:
    log = TuningLog.open(log_dir, create=True)
    again = TuningLog.open(log_dir, create=True)  # the same process may reopen its own log (a resume)
    assert again.record_count() == log.record_count()
    second = _second_writer(log_dir)
    assert second.returncode == 3
    assert f"(pid {os.getpid()})" in second.stderr
    log.close()
    assert _second_writer(log_dir).returncode == 3  # `again` still writes
    with again:
        pass
    assert _second_writer(log_dir).returncode == 0


def test_a_new_log_folder_is_created_and_locked(tmp_path) -> None:
    new = tmp_path / "new" / "log"
    with TuningLog.open(new, create=True) as log:
        assert log.path.is_dir()
        assert _second_writer(new).returncode == 3
    assert _second_writer(new).returncode == 0


# --- readers never write -----------------------------------------------------------------------------


def _tear(log_dir: Path) -> int:
    """Append half a line to each JSONL file (a write in progress); returns the complete records."""
    complete = len(_complete_records(log_dir))
    for name in (RECORD_FILE, WORKLOAD_FILE, HISTORY_FILE):
        path = log_dir / name
        first = path.read_bytes().splitlines()[0]
        with open(path, "ab") as stream:
            stream.write(first[: len(first) // 2])
    return complete


def test_a_reader_leaves_a_torn_log_byte_for_byte_and_reads_every_complete_record(log_dir) -> None:
    history_before = [json.loads(x) for x in (log_dir / HISTORY_FILE).read_text().splitlines() if x.strip()]
    complete = _tear(log_dir)
    before = _sha256s(log_dir)

    log = TuningLog.open(log_dir)
    assert log.record_count() == complete
    assert log.history() == history_before
    assert len(log.database().get_all_tuning_records()) == complete
    assert log.session["status"] == "completed"

    assert _sha256s(log_dir) == before  # no repair, no new file, nothing created by TVM either


def test_edgetune_log_show_and_export_read_a_torn_log_without_writing_it(log_dir, tmp_path) -> None:
    from host.logs.ops import export, merge, show

    complete = _tear(log_dir)
    before = _sha256s(log_dir)
    shown = show(log_dir)
    assert shown["trials_done"] == complete
    assert sum(t["trials"] for t in shown["tasks"]) == complete
    exported = export(log_dir, tmp_path / "best")
    assert exported["records"] == len(shown["tasks"])
    merged = merge(log_dir, tmp_path / "best", tmp_path / "merged")
    assert merged["records"] + merged["duplicates_dropped"] == complete + exported["records"]
    assert _sha256s(log_dir) == before


def test_a_reader_creates_no_files_in_a_stock_metaschedule_folder(tmp_path) -> None:
    stock = tmp_path / "stock"
    stock.mkdir()
    shutil.copy(SMALL / RECORD_FILE, stock / RECORD_FILE)
    log = TuningLog.open(stock)
    assert log.session == {}
    with pytest.raises(Exception):  # no workload table: stock TVM refuses, and writes nothing
        log.database()
    assert sorted(p.name for p in stock.iterdir()) == [RECORD_FILE]


def test_the_writer_repairs_a_torn_line_and_stock_tvm_reads_the_result(log_dir) -> None:
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    records_before = (log_dir / RECORD_FILE).read_bytes()
    complete = _tear(log_dir)
    with TuningLog.open(log_dir, create=True) as log:
        assert log.record_count() == complete
    assert (log_dir / RECORD_FILE).read_bytes() == records_before
    db = JSONDatabase(str(log_dir / WORKLOAD_FILE), str(log_dir / RECORD_FILE), allow_missing=False)
    assert len(db.get_all_tuning_records()) == complete


def test_a_reader_running_while_a_writer_appends_never_loses_or_alters_a_record(log_dir, tmp_path) -> None:
    original_records = (log_dir / RECORD_FILE).read_bytes()
    original_history = (log_dir / HISTORY_FILE).read_bytes()
    base = len(_complete_records(log_dir))
    template = json.loads(_complete_records(log_dir)[0])
    appended = []
    for i in range(APPENDS):  # every record its own run time, so a lost or mixed-up one shows
        row = [template[0], [template[1][0], [1e-6 * (i + 1)], *template[1][2:]]]
        appended.append(json.dumps(row, separators=(",", ":")).encode() + b"\n")
    lines_file = tmp_path / "lines.jsonl"
    lines_file.write_bytes(b"".join(appended))

    writer = _python(APPENDER, str(log_dir), str(lines_file), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
        deadline = time.monotonic() + 120
        last = base
        reads = 0
        while writer.poll() is None:
            assert time.monotonic() < deadline, "the writer did not finish"
            log = TuningLog.open(log_dir)
            count = log.record_count()
            assert last <= count <= base + APPENDS
            last = count
            trials = [h["trial"] for h in log.history()]
            assert trials[17:] == list(range(1000, 1000 + len(trials) - 17))
            if reads % 25 == 0:
                assert len(log.database().get_all_tuning_records()) >= count
            reads += 1
        assert writer.wait(timeout=30) == 0, writer.stderr.read()
    finally:
        _stop(writer)
    assert reads > 0
    assert (log_dir / RECORD_FILE).read_bytes() == original_records + b"".join(appended)
    expected_history = b"".join(
        json.dumps({"trial": 1000 + i, "task": 0, "latency_us": float(i + 1)}, sort_keys=True).encode() + b"\n"
        for i in range(APPENDS))
    assert (log_dir / HISTORY_FILE).read_bytes() == original_history + expected_history
    assert TuningLog.open(log_dir).record_count() == base + APPENDS


# --- session.json that is not a session ---------------------------------------------------------------


@pytest.mark.parametrize("content", [b"[1, 2, 3]\n", b"\"running\"\n", b"null\n", b"42", b"{\"format\": 1,",
                                     b"garbage", b"", b"\xff\xfe\x00"],
                         ids=["list", "string", "null", "number", "cut-short", "garbage", "empty", "not-utf8"])
@pytest.mark.parametrize("create", [False, True], ids=["reader", "writer"])
def test_a_session_file_that_is_not_a_json_object_is_one_clear_line(log_dir, content, create) -> None:
    (log_dir / SESSION_FILE).write_bytes(content)
    with pytest.raises(EdgetuneError) as info:
        TuningLog.open(log_dir, create=create)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{log_dir / SESSION_FILE} is damaged (")
    assert message.endswith(": restore it or start a new --log folder")
    if create:  # the refused writer holds no lock: another is refused by the same damaged session only
        second = _second_writer(log_dir)
        assert second.returncode == 3
        assert "is damaged" in second.stderr


def test_a_session_folder_in_place_of_session_json_is_one_clear_line(log_dir) -> None:
    (log_dir / SESSION_FILE).unlink()
    (log_dir / SESSION_FILE).mkdir()
    with pytest.raises(EdgetuneError, match=r"cannot read .*session\.json") as info:
        TuningLog.open(log_dir)
    assert "\n" not in str(info.value)
