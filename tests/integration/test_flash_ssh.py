"""`edgetune flash` against a real OpenSSH server on a loopback port, with this machine as the board.

The fixture starts ``sshd -D -e -f CONFIG`` with a throwaway host key and client key; the board side is
the repo's ``edgetune-agent`` with its store in a temporary directory. Nothing is mocked: paramiko talks
to sshd, sshd runs the agent, the agent runs the self-check in its own process.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import paramiko
import pytest

from device_agent.manifest import SIGNATURE_NAME
from host.flash import FlashResult, FlashTarget, flash
from host.package import init_keys, package
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


def _wait_for_banner(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_SEC
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sshd did not answer on port {port} within {START_SEC} s: {log.read_text()}")


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    _ensure_sshd()
    d = tmp_path_factory.mktemp("sshd")
    _keygen(d / "host_key")
    _keygen(d / "client_key")
    shutil.copyfile(d / "client_key.pub", d / "authorized_keys")
    # sshd refuses to start without its privilege separation directory (normally made by its service).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_pub = (d / "host_key.pub").read_text().split()
    proc: subprocess.Popen[bytes] | None = None
    log = d / "sshd.log"
    try:
        for _attempt in range(3):  # the port may be taken between choosing and binding it
            port = _free_port()
            (d / "sshd_config").write_text(
                f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {d / 'authorized_keys'}\nPubkeyAuthentication yes\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                "PermitRootLogin prohibit-password\nStrictModes no\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n"
            )
            with open(log, "wb") as err:
                proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                                        stdout=subprocess.DEVNULL, stderr=err)
            try:
                _wait_for_banner(port, proc, log)
                break
            except RuntimeError:
                if proc.poll() is None:
                    raise
        else:
            raise RuntimeError(f"sshd did not start: {log.read_text()}")
        known = d / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        store = d / "store"
        agent = _agent_command()
        yield Board(host="127.0.0.1", port=port, client_key=d / "client_key", host_pub=" ".join(host_pub[:2]),
                    known_hosts=known, store=store, agent=agent, workdir=d)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_SEC)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_SEC)


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
