"""`edgetune flash` against a real OpenSSH server on a loopback port, with this machine as the board.

The fixture starts ``sshd -D -e -f CONFIG`` with a throwaway host key and client key; the board side is
the repo's ``edgetune-agent`` with its store in a temporary directory. Nothing is mocked: paramiko talks
to sshd, sshd runs the agent, the agent runs the self-check in its own process.

An impostor is a second sshd on 127.0.0.2 with its own host key and a fake ``edgetune-agent`` on its
PATH; boards are advertised with python-zeroconf on loopback, as an agent (or a spoofer) does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import paramiko
import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from device_agent.install_answer import InstallAnswer, InstallStatus
from device_agent.selfcheck import SelfCheckResult
from device_agent.manifest import SIGNATURE_NAME
from device_agent.schema import EDGETUNE_SERVICE, BoardRecord
from host.flash import FlashResult, FlashTarget, flash
from host.package import init_keys, package, read_package_manifest
from tests.helpers_build import make_build_dir, make_log_dir

REPO = Path(__file__).resolve().parents[2]
SSHD = Path("/usr/sbin/sshd")
START_SEC = 20.0
STOP_SEC = 10.0
A72_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}


@dataclass
class Board:
    host: str
    port: int
    client_key: Path
    host_pub: str
    known_hosts: Path
    store: Path
    agent: str
    workdir: Path

    @property
    def uploads(self) -> Path:
        """Where flash uploads packages on the board (its --remote-dir)."""
        path = self.workdir / "uploads"
        path.mkdir(exist_ok=True)
        return path

    def target(self, name: str = "board", port: int | None = None, key: Path | None = None) -> FlashTarget:
        return FlashTarget(name=name, host=self.host, port=port or self.port, user="root",
                           key_file=str(key or self.client_key))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_sshd() -> None:
    if SSHD.exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"],
                   check=True, env=env, capture_output=True, timeout=600)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgetune-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


def _agent_command() -> str:
    """The board's agent: this virtualenv's `edgetune-agent` (the project is installed editable if it is not)."""
    agent = Path(sys.executable).parent / "edgetune-agent"
    if not agent.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
                       check=True, capture_output=True, timeout=600)
    return str(agent)


def _wait_for_banner(address: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_SEC
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection((address, port), timeout=1.0) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sshd did not answer on {address}:{port} within {START_SEC} s: {log.read_text()}")


def _start_sshd(d: Path, address: str, port: int | None, authorized_keys: Path,
                extra_config: str = "") -> tuple[subprocess.Popen[bytes], int]:
    """sshd on ``address`` with the host key ``d/host_key``; a port from the OS when ``port`` is None."""
    # sshd refuses to start without its privilege separation directory (normally made by its service).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = d / "sshd.log"
    for _attempt in range(3 if port is None else 1):  # the port may be taken between choosing and binding it
        chosen = port or _free_port()
        (d / "sshd_config").write_text(
            f"ListenAddress {address}\nPort {chosen}\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {authorized_keys}\nPubkeyAuthentication yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n"
            + extra_config
        )
        with open(log, "wb") as err:
            proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait_for_banner(address, chosen, proc, log)
            return proc, chosen
        except RuntimeError:
            if proc.poll() is None:
                _stop_sshd(proc)
                raise
    raise RuntimeError(f"sshd did not start: {log.read_text()}")


def _stop_sshd(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_SEC)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_SEC)


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    _ensure_sshd()
    d = tmp_path_factory.mktemp("sshd")
    _keygen(d / "host_key")
    _keygen(d / "client_key")
    shutil.copyfile(d / "client_key.pub", d / "authorized_keys")
    host_pub = (d / "host_key.pub").read_text().split()
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, port = _start_sshd(d, "127.0.0.1", None, d / "authorized_keys")
        known = d / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        store = d / "store"
        agent = _agent_command()
        yield Board(host="127.0.0.1", port=port, client_key=d / "client_key", host_pub=" ".join(host_pub[:2]),
                    known_hosts=known, store=store, agent=agent, workdir=d)
    finally:
        if proc is not None:
            _stop_sshd(proc)


@pytest.fixture(scope="module")
def packages(board: Board, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The good package and the bad ones, all made like `edgetune package` makes them."""
    w = tmp_path_factory.mktemp("packages")
    key = Path(init_keys(w / "signing_key").path)
    other_key = Path(init_keys(w / "other_key").path)
    log = make_log_dir(w / "log")
    pkgs = {
        "good": package(make_build_dir(w / "out"), log, w / "good.etpkg", key_path=key).path,
        "good2": package(make_build_dir(w / "out2", key="test-board-2"), log, w / "good2.etpkg", key_path=key).path,
        "wrong_key": package(make_build_dir(w / "out"), log, w / "wrong_key.etpkg", key_path=other_key).path,
        "arm": package(make_build_dir(w / "out-arm", declared_target=A72_TARGET), log, w / "arm.etpkg",
                       key_path=key).path,
        "bad_output": package(make_build_dir(w / "out-bad", alter_expected=True), log, w / "bad.etpkg",
                              key_path=key).path,
    }
    good = Path(pkgs["good"])
    with tarfile.open(good, "r:gz") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]
    for name, change in (
        ("tampered", lambda n, d: d[:-1] + bytes([d[-1] ^ 1]) if n == "model.so" else d),
        ("unsigned", lambda n, d: None if n == SIGNATURE_NAME else d),
    ):
        path = w / f"{name}.etpkg"
        with tarfile.open(path, "w:gz") as tar:
            for n, data in members:
                new = change(n, data)
                if new is not None:
                    info = tarfile.TarInfo(n)
                    info.size = len(new)
                    tar.addfile(info, io.BytesIO(new))
        pkgs[name] = str(path)
    data = good.read_bytes()
    (w / "truncated.etpkg").write_bytes(data[: len(data) // 2])
    pkgs["truncated"] = str(w / "truncated.etpkg")
    # The board trusts the signing key, through the agent's own command.
    subprocess.run([board.agent, "trust", str(key) + ".pub", "--store", str(board.store)], check=True,
                   capture_output=True, timeout=60)
    return {k: Path(v) for k, v in pkgs.items()}


def _flash(board: Board, pkg: Path, **kwargs: object) -> FlashResult:
    kwargs.setdefault("known_hosts", board.known_hosts)
    kwargs.setdefault("remote_dir", str(board.uploads))
    target = kwargs.pop("target", None) or board.target()
    results = flash(pkg, [target], agent_command=board.agent, store=str(board.store), **kwargs)  # type: ignore[arg-type]
    assert len(results) == 1
    return results[0]


def _status(board: Board) -> dict:
    proc = subprocess.run([board.agent, "status", "--store", str(board.store), "--json"], capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(proc.stdout)


def _current_runs(board: Board) -> None:
    proc = subprocess.run([sys.executable, "-m", "device_agent.selfcheck", str(board.store / "current"), "--json"],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] is True


@pytest.fixture(scope="module")
def installed(board: Board, packages: dict[str, Path]) -> FlashResult:
    result = _flash(board, packages["good"])
    assert result.ok, result.error
    return result


def _assert_refused(board: Board, installed: FlashResult, result: FlashResult, *needles: str) -> None:
    assert not result.ok
    assert result.error and "\n" not in result.error
    for needle in needles:
        assert needle in result.error, result.error
    status = _status(board)
    assert status["current"] == installed.slot
    _current_runs(board)
    leftovers = list(board.uploads.iterdir())
    assert not leftovers, leftovers


def test_flash_installs_and_status_shows_it(board: Board, installed: FlashResult) -> None:
    assert installed.slot and installed.self_check_ok is True
    assert installed.p50_ms is not None and installed.p50_ms > 0
    assert installed.max_abs_err is not None and installed.max_abs_err <= 1e-4
    status = _status(board)
    assert status["current"] == installed.slot
    assert status["model_name"] == "tiny_cnn" and status["key"] == "test-board" and status["self_check_ok"] is True
    _current_runs(board)


def test_tampered_package_is_refused(board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    result = _flash(board, packages["tampered"])
    _assert_refused(board, installed, result, "model.so does not match its sha256")


def test_unsigned_package_is_refused(board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    result = _flash(board, packages["unsigned"])
    _assert_refused(board, installed, result, "not signed")


def test_wrongly_signed_package_is_refused(board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    result = _flash(board, packages["wrong_key"])
    _assert_refused(board, installed, result, "signature verification failed", "edgetune-agent trust")


def test_other_architecture_is_refused(board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    result = _flash(board, packages["arm"])
    _assert_refused(board, installed, result, "built for aarch64", "rebuild")


def test_cut_off_upload_is_refused(board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    # A package cut off in transfer, flashed as such: the agent finds it incomplete.
    result = _flash(board, packages["truncated"])
    _assert_refused(board, installed, result)
    assert "incomplete" in result.error or "damaged" in result.error  # type: ignore[operator]
    # An upload that never completed stays a .part file: the agent refuses to install it.
    client = paramiko.SSHClient()
    client.load_host_keys(str(board.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(board.host, port=board.port, username="root", key_filename=str(board.client_key),
                   allow_agent=False, look_for_keys=False, timeout=15)
    try:
        part = f"{board.uploads}/edgetune-cutoff.etpkg.part"
        with client.open_sftp() as sftp:
            sftp.putfo(io.BytesIO(packages["good"].read_bytes()[:10000]), part, confirm=True)
        try:
            _, stdout, _ = client.exec_command(f"{board.agent} install {part} --store {board.store} --json", timeout=60)
            answer = json.loads(stdout.read().decode())
            assert stdout.channel.recv_exit_status() == 1
        finally:
            client.exec_command(f"rm -f {part}")[1].channel.recv_exit_status()
    finally:
        client.close()
    assert answer["ok"] is False and "unfinished upload" in answer["error"]
    assert _status(board)["current"] == installed.slot


def test_unknown_host_key_is_refused(board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    empty = board.workdir / "empty_known_hosts"
    empty.write_text("")
    result = _flash(board, packages["good2"], known_hosts=empty)
    _assert_refused(board, installed, result, "host key of [127.0.0.1]", "unknown", "--trust-new-host")
    assert empty.read_text() == ""


def test_changed_host_key_is_refused_even_when_trusting_new_hosts(
        board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    _keygen(board.workdir / "impostor")
    impostor = (board.workdir / "impostor.pub").read_text().split()
    changed = board.workdir / "changed_known_hosts"
    changed.write_text(f"[127.0.0.1]:{board.port} {impostor[0]} {impostor[1]}\n")
    result = _flash(board, packages["good2"], known_hosts=changed, trust_new_host=True)
    _assert_refused(board, installed, result, "CHANGED", "ssh-keygen -R")


def test_wrong_client_key_is_refused(board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    _keygen(board.workdir / "stranger")
    result = _flash(board, packages["good2"], target=board.target(key=board.workdir / "stranger"))
    _assert_refused(board, installed, result, "SSH login as root refused", "--identity")


def test_failed_self_check_is_rolled_back(board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    result = _flash(board, packages["bad_output"])
    assert result.rolled_back and result.self_check_ok is False
    assert result.current == installed.slot
    _assert_refused(board, installed, result, "self-check failed", "rolled back")


def test_trust_new_host_records_the_key(board: Board, installed: FlashResult, packages: dict[str, Path]) -> None:
    fresh = board.workdir / "fresh_known_hosts"
    result = _flash(board, packages["good"], known_hosts=fresh, trust_new_host=True)
    assert result.ok, result.error
    assert any("recorded" in note for note in result.notes)
    assert fresh.read_text().split() == [f"[127.0.0.1]:{board.port}", *board.host_pub.split()]
    # now known: a second flash needs no --trust-new-host
    again = _flash(board, packages["good"], known_hosts=fresh)
    assert again.ok, again.error
    assert not again.notes
    assert _status(board)["current"] == again.slot


def test_two_boards_one_unreachable(board: Board, packages: dict[str, Path]) -> None:
    closed = _free_port()  # nothing listens there once the probe socket is closed
    cmd = [sys.executable, "-m", "host.cli", "flash", str(packages["good2"]),
           "--host", f"127.0.0.1:{board.port}", "--host", f"127.0.0.1:{closed}",
           "--identity", str(board.client_key), "--known-hosts", str(board.known_hosts),
           "--agent-command", board.agent, "--store", str(board.store)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    ok_row = next(line for line in lines if line.startswith(f"127.0.0.1:{board.port} "))
    bad_row = next(line for line in lines if line.startswith(f"127.0.0.1:{closed} "))
    assert " ok " in ok_row and "passed" in ok_row
    assert " failed " in bad_row and "Connection refused" in bad_row
    assert "1 of 2 boards flashed, 1 failed" in proc.stdout
    status = _status(board)
    assert status["key"] == "test-board-2"
    _current_runs(board)

    proc = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 1, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["ok"] for r in results] == [True, False]
    assert results[0]["slot"] == _status(board)["current"]
    assert "Connection refused" in results[1]["error"]


# -- who answers: board ids bound to host keys, conflicting advertisements, the install answer ---------
# An impostor on the LAN: its own sshd (its own host key) on another loopback address, the same port as
# the board's, with a fake `edgetune-agent` first on the PATH of its SSH sessions that prints whatever
# the test puts in its `answer` file and exits with its `status` file.
FAKE_AGENT = """#!/bin/sh
echo "$@" >> {dir}/calls
cat {dir}/answer
exit "$(cat {dir}/status)"
"""


@dataclass
class Impostor:
    host: str
    port: int
    known_hosts: Path  # the board's known_hosts plus the impostor's key
    workdir: Path

    def answers(self, text: str, status: int = 0) -> None:
        (self.workdir / "answer").write_text(text)
        (self.workdir / "status").write_text(str(status))

    @property
    def calls(self) -> list[str]:
        path = self.workdir / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def target(self, board: Board) -> FlashTarget:
        return FlashTarget(name="impostor", host=self.host, port=self.port, user="root",
                           key_file=str(board.client_key))


@pytest.fixture(scope="module")
def impostor(board: Board, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Impostor]:
    d = tmp_path_factory.mktemp("impostor")
    _keygen(d / "host_key")
    bin_dir = d / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "edgetune-agent"
    fake.write_text(FAKE_AGENT.format(dir=d))
    fake.chmod(0o755)
    host_pub = (d / "host_key.pub").read_text().split()
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, port = _start_sshd(d, "127.0.0.2", board.port, board.workdir / "authorized_keys",
                                 f"SetEnv PATH={bin_dir}:/usr/local/bin:/usr/bin:/bin\n")
        known = d / "known_hosts"
        known.write_text(board.known_hosts.read_text() + f"[127.0.0.2]:{port} {host_pub[0]} {host_pub[1]}\n")
        impostor = Impostor(host="127.0.0.2", port=port, known_hosts=known, workdir=d)
        impostor.answers("")
        yield impostor
    finally:
        if proc is not None:
            _stop_sshd(proc)


@contextlib.contextmanager
def _advertised(record: BoardRecord, address: str, instance: str) -> Iterator[None]:
    """``record`` advertised on mDNS (real python-zeroconf on loopback) at ``address``, as ``instance``."""
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    info = ServiceInfo(EDGETUNE_SERVICE, f"{instance}.{EDGETUNE_SERVICE}", addresses=[socket.inet_aton(address)],
                       port=record.rpc_port, properties=record.to_txt(), server=f"{instance}.local.")
    try:
        zc.register_service(info)
        try:
            yield
        finally:
            zc.unregister_service(info)
    finally:
        zc.close()


def _record(key: str, name: str = "pi-id", board_id: str | None = None) -> BoardRecord:
    return BoardRecord(board_id=board_id or uuid.uuid4().hex, name=name, key=key, arch="x86_64",
                       triple="x86_64-linux-gnu", cpu="", cores=2, rpc_port=9)


def _fresh_store(board: Board, packages: dict[str, Path], tmp_path: Path) -> Path:
    """A store of its own that trusts the packages' signing key: each test starts from an empty board."""
    store = tmp_path / "store"
    subprocess.run([board.agent, "trust", str(packages["good"].parent / "signing_key.pub"), "--store", str(store)],
                   check=True, capture_output=True, timeout=60)
    return store


def _flash_cli(board: Board, pkg: Path, store: Path, known_hosts: Path, known_boards: Path,
               *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "host.cli", "flash", str(pkg), *args, "--port", str(board.port),
           "--identity", str(board.client_key), "--known-hosts", str(known_hosts), "--known-boards", str(known_boards),
           "--store", str(store), "--remote-dir", str(board.uploads), "--timeout", "3"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(REPO))


def _store_current(board: Board, store: Path) -> str | None:
    proc = subprocess.run([board.agent, "status", "--store", str(store), "--json"], capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(proc.stdout)["current"]


def test_a_spoofed_board_id_with_another_host_key_is_not_flashed(
        board: Board, impostor: Impostor, packages: dict[str, Path], tmp_path: Path) -> None:
    key = f"spoofed-{uuid.uuid4().hex[:6]}"
    record = _record(key)
    store = _fresh_store(board, packages, tmp_path)
    known_boards = tmp_path / "known_boards"
    # The board, found by its key: flashed, and its board id bound to the host key it presented.
    with _advertised(record, "127.0.0.1", "pi-id"):
        proc = _flash_cli(board, packages["good"], store, board.known_hosts, known_boards,
                          "--key", key, "--all", "--agent-command", board.agent, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads(proc.stdout)
    assert result["ok"] and result["board_id"] == record.board_id
    assert result["install"]["package_sha256"] == hashlib.sha256(packages["good"].read_bytes()).hexdigest()
    assert known_boards.read_text().split() == [record.board_id, *board.host_pub.split(), "pi-id"]
    installed_slot = _store_current(board, store)
    assert installed_slot == result["slot"]

    # The board is away; an impostor advertises its record (same key, same board id) at another address,
    # with its own host key. Even with --trust-new-host it is refused before anything is uploaded.
    trusting = tmp_path / "known_hosts"
    shutil.copyfile(board.known_hosts, trusting)
    with _advertised(record, impostor.host, "pi-id"):
        proc = _flash_cli(board, packages["good"], store, trusting, known_boards,
                          "--key", key, "--all", "--trust-new-host", "--agent-command", board.agent, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (result,) = json.loads(proc.stdout)
    assert not result["ok"] and result["board_id"] == record.board_id and result["address"].endswith(
        f"@{impostor.host}:{board.port}")
    assert result["error"].startswith("board pi-id presents a different SSH host key than before: ")
    assert "\n" not in result["error"] and "sed -i" in result["error"]
    assert trusting.read_text() == board.known_hosts.read_text()  # its host key was not recorded
    assert len(known_boards.read_text().splitlines()) == 1
    assert not impostor.calls and not list(board.uploads.iterdir())
    assert _store_current(board, store) == installed_slot

    # Without --json: the row says so in one line and the command exits non-zero.
    with _advertised(record, impostor.host, "pi-id"):
        proc = _flash_cli(board, packages["good"], store, trusting, known_boards,
                          "--key", key, "--all", "--trust-new-host", "--agent-command", board.agent)
    assert proc.returncode == 1
    row = next(line for line in proc.stdout.splitlines() if line.startswith("pi-id "))
    assert " failed " in row and "presents a different SSH host key than before" in row
    assert "0 of 1 boards flashed, 1 failed" in proc.stdout
    assert not impostor.calls


def test_a_board_id_advertised_twice_is_flagged_and_neither_is_flashed(
        board: Board, impostor: Impostor, packages: dict[str, Path], tmp_path: Path) -> None:
    key = f"twice-{uuid.uuid4().hex[:6]}"
    record = _record(key)
    store = _fresh_store(board, packages, tmp_path)
    known_boards = tmp_path / "known_boards"
    devices = [sys.executable, "-m", "host.cli", "devices", "--timeout", "3"]
    with _advertised(record, "127.0.0.1", "pi-id"), _advertised(record, impostor.host, "pi-id-copy"):
        listed = subprocess.run(devices + ["--json"], capture_output=True, text=True, timeout=120, cwd=str(REPO))
        shown = subprocess.run(devices, capture_output=True, text=True, timeout=120, cwd=str(REPO))
        proc = _flash_cli(board, packages["good"], store, board.known_hosts, known_boards,
                          "--key", key, "--all", "--trust-new-host", "--agent-command", board.agent, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [r for r in json.loads(listed.stdout)["boards"] if r["key"] == key]
    assert sorted(r["addresses"][0] for r in rows) == ["127.0.0.1", impostor.host], rows
    for row in rows:
        assert row["board_id"] == record.board_id
        assert row["conflict"].startswith(f"board id {record.board_id} is advertised 2 times"), row
        assert "127.0.0.1" in row["conflict"] and impostor.host in row["conflict"]
    assert shown.returncode == 0, shown.stderr
    assert sum(line.startswith("! pi-id ") for line in shown.stdout.splitlines()) == 2, shown.stdout
    assert shown.stderr.count("warning: ! pi-id: board id") == 2, shown.stderr

    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == 2 and not any(r["ok"] for r in results)
    for result in results:
        assert result["error"].startswith(f"not flashed: board id {record.board_id} is advertised 2 times")
        assert "--host ADDRESS" in result["error"] and "\n" not in result["error"]
    assert _store_current(board, store) is None and not impostor.calls and not known_boards.exists()

    # Picked by address, the board is flashed.
    proc = _flash_cli(board, packages["good"], store, board.known_hosts, known_boards,
                      "--host", "127.0.0.1", "--agent-command", board.agent, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _store_current(board, store) == json.loads(proc.stdout)[0]["slot"]


def test_an_escape_sequence_in_a_board_name_is_printed_cleaned(tmp_path: Path) -> None:
    key = f"ansi-{uuid.uuid4().hex[:6]}"
    record = _record(key, name="evil\x1b[31mred\x1b[0m\x1b[2J\nfake-row")
    devices = [sys.executable, "-m", "host.cli", "devices", "--timeout", "3"]
    with _advertised(record, "127.0.0.1", "ansi-board"):
        listed = subprocess.run(devices + ["--json"], capture_output=True, text=True, timeout=120, cwd=str(REPO))
        shown = subprocess.run(devices, capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert listed.returncode == 0 and shown.returncode == 0, listed.stderr + shown.stderr
    (row,) = [r for r in json.loads(listed.stdout)["boards"] if r["key"] == key]
    assert row["name"] == "evilred?fake-row"
    assert "\x1b" not in listed.stdout and "\\u001b" not in listed.stdout
    assert "\x1b" not in shown.stdout + shown.stderr
    (line,) = [line for line in shown.stdout.splitlines() if key in line]
    assert line.startswith("evilred?fake-row ")
    assert not any(line.startswith("fake-row") for line in shown.stdout.splitlines())


def _genuine_answer(pkg: Path) -> dict:
    """A well-formed installed answer for ``pkg``, as `edgetune-agent install --json` would print it."""
    manifest = read_package_manifest(pkg)
    return InstallAnswer(
        status=InstallStatus.INSTALLED, current="20261203T031500Z-1a2b3c4d", slot="20261203T031500Z-1a2b3c4d",
        model_name=manifest.model_name, model_sha256=manifest.model_sha256, key=manifest.key,
        package_sha256=hashlib.sha256(pkg.read_bytes()).hexdigest(), signer="SHA256:x",
        installed_at="2026-12-03T03:15:00+00:00", store="/var/lib/edgetune",
        self_check=SelfCheckResult(ok=True, max_abs_err=0.0, p50_ms=0.2, load_ms=30.0, runs=10),
    ).as_dict()


def _forged(pkg: Path, packages: dict[str, Path]) -> dict[str, tuple[str, int, str]]:
    genuine = _genuine_answer(pkg)
    text = json.dumps(genuine, indent=2)
    return {
        # name: (stdout, exit status, what the board's error says)
        "bare ok true": ('{"ok": true}\n', 0, 'unreadable install answer (it lacks "version")'),
        "truncated": (text[: len(text) // 2], 0, "unreadable install answer (not JSON"),
        "extra field": (json.dumps({**genuine, "trusted": True}), 0, 'unreadable install answer (it has unknown field'),
        "wrong type": (json.dumps({**genuine, "self_check": "passed"}), 0,
                       'unreadable install answer ("self_check" is'),
        "two documents": (text + "\n" + text, 0, "unreadable install answer (more text follows"),
        "exit status contradicts": (text, 1, "unreadable install answer (it says installed, but the command exited 1)"),
        "wrong package hash": (json.dumps({**genuine, "package_sha256": _genuine_answer(packages["good2"])[
            "package_sha256"]}), 0, "the install answer is not for the package sent (package_sha256 "),
        "another model": (json.dumps({**genuine, "model_name": "resnet18"}), 0,
                          "the install answer is not for the package sent (model_name "),
    }


FORGED_CASES = ["bare ok true", "truncated", "extra field", "wrong type", "two documents", "exit status contradicts",
                "wrong package hash", "another model"]


@pytest.mark.parametrize("case", FORGED_CASES)
def test_a_forged_or_malformed_install_answer_counts_as_failed(
        board: Board, impostor: Impostor, packages: dict[str, Path], case: str) -> None:
    stdout, status, reason = _forged(packages["good"], packages)[case]
    impostor.answers(stdout, status)
    calls = len(impostor.calls)
    (result,) = flash(packages["good"], [impostor.target(board)], known_hosts=impostor.known_hosts,
                      remote_dir=str(board.uploads))
    assert len(impostor.calls) == calls + 1  # the fake agent on the impostor's PATH did answer
    assert not result.ok and result.slot is None
    assert result.error and result.error.startswith(reason), result.error
    assert "\n" not in result.error and len(result.error) < 600
    assert not list(board.uploads.iterdir())


def test_a_bound_board_id_is_judged_by_its_host_key_at_any_address(
        board: Board, impostor: Impostor, packages: dict[str, Path], tmp_path: Path) -> None:
    board_id = uuid.uuid4().hex
    store = _fresh_store(board, packages, tmp_path)
    known_boards = tmp_path / "known_boards"
    before = board.known_hosts.read_text()

    def flash_at(host: str, known_hosts: Path) -> FlashResult:
        target = FlashTarget(name="pi-id", host=host, port=board.port, user="root", key_file=str(board.client_key),
                             board_id=board_id)
        (result,) = flash(packages["good"], [target], known_hosts=known_hosts, known_boards=known_boards,
                          agent_command=board.agent, store=str(store), remote_dir=str(board.uploads))
        return result

    first = flash_at("127.0.0.1", board.known_hosts)
    assert first.ok, first.error
    assert any(note.startswith(f"board id {board_id} bound to host key ") for note in first.notes), first.notes
    # The same board at an address known_hosts does not list: its host key says it is the board.
    moved = flash_at("localhost", board.known_hosts)
    assert moved.ok, moved.error
    assert any("presents the host key board id" in note for note in moved.notes), moved.notes
    assert board.known_hosts.read_text() == before
    # An impostor whose own host key known_hosts lists for its address: still not this board id.
    impostor.answers(json.dumps(_genuine_answer(packages["good"])))
    calls = len(impostor.calls)
    spoofed = flash_at(impostor.host, impostor.known_hosts)
    assert not spoofed.ok and spoofed.error
    assert spoofed.error.startswith("board pi-id presents a different SSH host key than before: "), spoofed.error
    assert len(impostor.calls) == calls and not list(board.uploads.iterdir())
    assert _store_current(board, store) == moved.slot
    assert len(known_boards.read_text().splitlines()) == 1
