"""The schedule store on a real PostgreSQL server (started by this test, on a port from the OS): what the
embedded store does, and two workstations writing to it at once lose nothing and duplicate nothing."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from host.schedules.store import ScheduleStore, ScheduleStoreError, redact

from tests.helpers_schedules import A72, SMALL, ZNVER4, retargeted

START_SEC = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own (Debian's postgresql package; `make test` installs it), stopped after."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    assert binaries, "PostgreSQL is not installed: run `make test` (scripts/install-system-deps.sh installs it)"
    bindir = Path(binaries[-1]).parent
    # The server refuses to run as root: as root, run it as the package's postgres user.
    user = "postgres" if os.geteuid() == 0 else None
    data = Path(tempfile.mkdtemp(prefix="edgetune-pg-"))
    if user:
        shutil.chown(data, user)
    port = _free_port()
    server = None
    try:
        subprocess.run([str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "edgetune", "--no-sync"],
                       user=user, check=True, capture_output=True, timeout=120)
        server = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data / "db"), "-p", str(port), "-k", str(data),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            user=user, stdout=subprocess.DEVNULL, stderr=open(data / "server.log", "wb"))
        url = f"postgresql://edgetune@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + START_SEC
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                ScheduleStore(url).close()
                break
            except (OSError, ScheduleStoreError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("PostgreSQL did not start: " + (data / "server.log").read_text()[-2000:])
                time.sleep(0.3)
        yield url
    finally:
        if server is not None:
            server.terminate()  # smart shutdown: the server stops its own children
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture()
def fresh_url(postgres_url: str):
    """A new empty database on the server for one test."""
    import psycopg

    name = f"t{time.monotonic_ns()}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_url.rsplit("/", 1)[0] + "/" + name


def test_postgresql_store_is_target_aware_like_the_embedded_one(fresh_url: str, tmp_path: Path):
    with ScheduleStore(fresh_url) as store:
        assert store.import_log(SMALL).added == 16
        assert store.import_log(retargeted(tmp_path, {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                      "mcpu": "cortex-a72"})).added == 16
        assert {c.cpu_class: c.records for c in store.classes()} == {ZNVER4: 16, A72: 16}
        target = json.loads((SMALL / "session.json").read_text())["target"]
        records = store.database(target).get_all_tuning_records()
        assert len(records) == 16 and {r.target.export()["mcpu"] for r in records} == {"znver4"}
        out = tmp_path / "exported"
        assert store.export(A72, out) == 16


def test_two_workstations_writing_at_once_lose_and_duplicate_nothing(fresh_url: str, tmp_path: Path):
    # Each "workstation" is its own process with its own connection, importing the same two logs in
    # opposite orders, several times over, at the same moment.
    a72 = retargeted(tmp_path, {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    script = (
        "import sys\n"
        "from host.schedules.store import ScheduleStore\n"
        "url, first, second = sys.argv[1:4]\n"
        "added = 0\n"
        "with ScheduleStore(url) as store:\n"
        "    for _ in range(5):\n"
        "        for folder in (first, second):\n"
        "            added += store.import_log(folder).added\n"
        "print(added)\n"
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, fresh_url, *order], stdout=subprocess.PIPE, text=True)
               for order in ((str(SMALL), str(a72)), (str(a72), str(SMALL)))]
    added = []
    for worker in workers:
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0
        added.append(int(out.strip()))
    assert sum(added) == 32  # every record added exactly once, by one workstation or the other
    with ScheduleStore(fresh_url) as store:
        assert {c.cpu_class: (c.workloads, c.records) for c in store.classes()} == {ZNVER4: (2, 16), A72: (2, 16)}


def test_a_wrong_postgresql_url_is_a_one_line_error_without_the_password(postgres_url: str):
    url = postgres_url.replace("edgetune@", "nobody:s3cret@").rsplit("/", 1)[0] + "/missing"
    with pytest.raises(ScheduleStoreError) as err:
        ScheduleStore(url)
    message = str(err.value)
    assert "\n" not in message and "s3cret" not in message and redact(url) in message
