"""Boards that stop answering without closing their connection, and SSH commands that never finish.

A power cut, a pulled cable or a hung kernel leaves the workstation's TCP connection open with nobody
answering. Here that is a real agent whose whole process group (the RPC server and its session
process) is SIGSTOPped: its kernel still accepts connections and acknowledges bytes, but no answer
ever comes. On the flashing side, a real sshd runs a remote command that never answers, or one that
never stops printing. Every test thaws or kills what it stopped in ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from host.flash import flash
from host.package import init_keys, package
from tests.helpers_build import make_build_dir, make_log_dir
from tests.integration.conftest import tune_cli
from tests.integration.test_flash_ssh import REPO, Board, board  # noqa: F401 - the sshd fixture
from tests.integration.test_tuning import history_of, records_of, session_of, tune_then
from tests.peers import EDGETUNE, peer_env, tracker_servers, wait_for, wait_registered

# Short deadlines for the workstation side (each a host/config.py constant, overridden through the
# environment as a user would): a board's session lasts at most 8 s, so a board silent for 8 + 2 s is
# taken as gone; a frozen agent that accepted a connection gets 3 s to answer the handshake.
FAULT_ENV = {
    "EDGETUNE_MEASURE_SESSION_SEC": "8",
    "EDGETUNE_BOARD_ANSWER_GRACE_SEC": "2",
    "EDGETUNE_BOARD_CONNECT_SEC": "3",
    "EDGETUNE_BOARD_HANDSHAKE_SEC": "3",
}
NO_BOARD_SEC = 8
# From the freeze to the end of `edgetune tune` when the frozen board was the only one: detecting it
# (at most 10 s) plus the no-board deadline (8 s) plus closing the session. Before the fix: never.
STOP_LIMIT_SEC = 60


def _tune_argv(key: str, tracker: str, log_dir: Path, trials: int, target: dict, model: str = "tiny_cnn") -> list[str]:
    # The random strategy keeps the search itself fast (the cost model is not what is tested here);
    # the target is this machine's own (the agents run here), given so no mDNS is needed.
    return [EDGETUNE, "tune", model, "--device", key, "--trials", str(trials), "--log", str(log_dir),
            "--tracker", tracker, "--deadline", str(NO_BOARD_SEC), "--strategy", "random", "--seed", "1",
            "--target", json.dumps(target), "--json"]


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def freeze(agent) -> float:
    """SIGSTOP the agent's process group (server and session process); the time it froze."""
    os.killpg(agent.pid, signal.SIGSTOP)
    return time.monotonic()


def thaw(agent) -> None:
    try:
        os.killpg(agent.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _serving_a_client(agent, tracker_port: int, min_age: float = 0.0) -> bool:
    """True while the agent's session process (at least ``min_age`` seconds old) is up and still connected
    to the workstation."""
    try:
        for child in psutil.Process(agent.pid).children():
            if time.time() - child.create_time() < min_age:
                continue
            for conn in child.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_ESTABLISHED and conn.raddr and conn.raddr.port != tracker_port:
                    return True
    except psutil.Error:
        pass
    return False


# A measurement session spends its first few tens of milliseconds uploading and loading the candidate,
# and then at least the evaluator's min_repeat_ms (40 ms) timing it: this far in, it is measuring.
MEASURING_AFTER_SEC = 0.03


def freeze_in_session(agent, tracker_port: int, timeout: float = 60) -> float:
    """Freeze the agent while it measures a candidate (as a power cut mid-measurement would)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _serving_a_client(agent, tracker_port, MEASURING_AFTER_SEC):
            frozen_at = freeze(agent)
            if _serving_a_client(agent, tracker_port):  # still in that session now that it cannot move
                return frozen_at
            thaw(agent)
        time.sleep(0.002)
    raise TimeoutError(f"agent {agent.name} served no session within {timeout:g} s")


def _board_is_free(tracker_port: int, key: str) -> bool:
    return any(s.get("free") for s in tracker_servers(tracker_port, key))


def freeze_where_awaited(agent, tracker_port: int, key: str, timeout: float = 60) -> float:
    """Freeze the agent at a moment the workstation will wait for it: in a session, or offered by the
    tracker. (Frozen in the instant between a session's end and its next offer, a board is never handed
    out again, so nobody waits for it and no deadline is involved.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frozen_at = freeze(agent)
        if _serving_a_client(agent, tracker_port) or _board_is_free(tracker_port, key):
            return frozen_at
        thaw(agent)
        time.sleep(0.01)
    raise TimeoutError(f"agent {agent.name} was neither serving nor offered within {timeout:g} s")


def test_only_board_frozen_mid_run_stops_in_bounded_time_with_a_resumable_log(peers, host_target, tmp_path,
                                                                               monkeypatch):
    for name, value in FAULT_ENV.items():
        monkeypatch.setenv(name, value)
    tracker = peers.tracker(advertise=False)
    addr = f"127.0.0.1:{tracker.port}"
    agent = peers.agent("frozen", "frozen-a", addr, advertise=False)
    wait_registered(tracker.port, "frozen")
    board = f"127.0.0.1:{agent.port}"
    log_dir = tmp_path / "log"
    frozen_at: list[float] = []
    started = time.monotonic()
    try:
        code, stdout, stderr = tune_then(_tune_argv("frozen", addr, log_dir, 24, host_target), log_dir,
                                         lambda: frozen_at.append(freeze_where_awaited(agent, tracker.port, "frozen")),
                                         timeout=STOP_LIMIT_SEC)
        finished = time.monotonic() - frozen_at[0]
    finally:
        thaw(agent)
    events = _events(stdout)
    lost = [e for e in events if e["event"] == "board-lost"]
    given_up = lost[0]["silent_s"] if lost else "?"
    print(f"\nfrozen {frozen_at[0] - started:.1f} s into the run; given up after {given_up} s of silence; "
          f"run ended {finished:.1f} s after the freeze")
    assert code == 3, stderr[-3000:]
    assert finished < STOP_LIMIT_SEC
    assert lost and lost[0]["board"] == board and "stopped answering" in lost[0]["reason"], events[-5:]
    assert f"no board of key 'frozen' was available for {NO_BOARD_SEC} s" in stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    session = session_of(log_dir)
    assert session["status"] == "stopped-no-board"
    stopped_at = session["trials_done"]
    assert 2 <= stopped_at < 24
    assert len(records_of(log_dir)) == stopped_at == len(history_of(log_dir))

    # The board comes back (it offers itself to the tracker again) and the same command resumes.
    wait_for(lambda: _board_is_free(tracker.port, "frozen"), 30, "the thawed board to be free again")
    resumed = time.monotonic()
    out = tune_cli(addr, "frozen", log_dir, stopped_at + 2, "--strategy", "random", "--target",
                   json.dumps(host_target), "--json", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    start = _events(out.stdout)[0]
    assert start["resumed"] is True and start["done"] == stopped_at
    assert len(records_of(log_dir)) == stopped_at + 2 == len(history_of(log_dir))
    assert [r["status"] for r in session_of(log_dir)["runs"]] == ["stopped-no-board", "completed"]
    print(f"resumed to {stopped_at + 2} trials in {time.monotonic() - resumed:.1f} s")


def test_one_of_two_boards_frozen_mid_session_the_other_finishes_the_budget(peers, host_target, tmp_path,
                                                                             monkeypatch):
    for name, value in FAULT_ENV.items():
        monkeypatch.setenv(name, value)
    tracker = peers.tracker(advertise=False)
    addr = f"127.0.0.1:{tracker.port}"
    a = peers.agent("pair", "pair-frozen", addr, advertise=False)
    b = peers.agent("pair", "pair-alive", addr, advertise=False)
    wait_registered(tracker.port, "pair", count=2)
    frozen, alive = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
    log_dir = tmp_path / "log"
    frozen_at: list[float] = []
    history_at_freeze: list[int] = []

    def freeze_a() -> None:
        frozen_at.append(freeze_in_session(a, tracker.port))
        history_at_freeze.append(len(history_of(log_dir)))

    started = time.monotonic()
    try:
        code, stdout, stderr = tune_then(_tune_argv("pair", addr, log_dir, 16, host_target), log_dir, freeze_a,
                                         timeout=120)
        finished = time.monotonic() - frozen_at[0]
    finally:
        thaw(a)
    events = _events(stdout)
    lost = [e for e in events if e["event"] == "board-lost"]
    print(f"\nfrozen {frozen_at[0] - started:.1f} s into the run ({lost[0]['during'] if lost else '?'}); "
          f"given up after {lost[0]['silent_s'] if lost else '?'} s of silence; the budget was done "
          f"{finished:.1f} s after the freeze")
    assert code == 0, stderr[-3000:]
    assert lost and {e["board"] for e in lost} == {frozen}, lost
    assert "stopped answering" in stderr  # said once, in words, also without --json
    history = history_of(log_dir)
    assert len(records_of(log_dir)) == 16 == len(history) == session_of(log_dir)["trials_done"]
    if lost[0]["during"] == "measuring":
        # The candidate it was measuring is a failed trial that names the board.
        failed = [h for h in history if h["board"] == frozen and h["error"] and "stopped answering" in h["error"]]
        assert len(failed) == 1, history
    # After the batch it froze in, only the other board measured.
    later = [h for h in history[history_at_freeze[0] + 2:] if h["latency_us"] is not None]
    assert later and all(h["board"] == alive for h in later), history


# -- flash ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("fault-pkg")
    key = Path(init_keys(w / "signing_key").path)
    return Path(package(make_build_dir(w / "out"), make_log_dir(w / "log"), w / "model.etpkg", key_path=key).path)


def _flash_with(board: Board, pkg: Path, agent_command: str):  # noqa: F811 - board is the sshd fixture
    (result,) = flash(pkg, [board.target()], known_hosts=board.known_hosts, agent_command=agent_command,
                      remote_dir=str(board.uploads))
    return result


def test_flash_of_a_board_whose_install_never_answers_fails_at_the_deadline(
        board: Board, small_package: Path, monkeypatch) -> None:  # noqa: F811
    from host import config

    monkeypatch.setattr(config, "SSH_INSTALL_SEC", 3.0)
    started = time.monotonic()
    result = _flash_with(board, small_package, "sleep 30 #")  # `sleep 30 # install PKG --json`
    took = time.monotonic() - started
    print(f"\nsilent install: failed after {took:.1f} s (deadline 3 s)")
    assert not result.ok and "did not finish within 3 s" in result.error and "\n" not in result.error
    assert 3.0 <= took < 15.0
    assert not list(board.uploads.iterdir())  # the upload was removed all the same


def test_flash_of_a_board_that_never_stops_printing_reads_a_capped_amount(
        board: Board, small_package: Path, monkeypatch) -> None:  # noqa: F811
    from host import config
    from host.flash import ssh

    monkeypatch.setattr(config, "SSH_INSTALL_SEC", 30.0)
    started = time.monotonic()
    result = _flash_with(board, small_package, "yes edgetune-agent-output #")
    took = time.monotonic() - started
    print(f"\nendless output: failed after {took:.1f} s, cap {ssh.MAX_OUTPUT_BYTES} bytes")
    assert not result.ok and f"more than {ssh.MAX_OUTPUT_BYTES // 1024} KiB" in result.error, result.error
    assert took < 15.0  # stopped at the cap, long before the 30 s deadline
    assert not list(board.uploads.iterdir())


def test_ctrl_c_during_flash_reports_every_board_at_once(
        board: Board, small_package: Path, tmp_path: Path) -> None:  # noqa: F811
    # Two boards (the same sshd under two names), both stuck in an install that never answers.
    known = tmp_path / "known_hosts"
    host_key = " ".join(board.host_pub.split()[:2])
    known.write_text(f"[127.0.0.1]:{board.port} {host_key}\n[localhost]:{board.port} {host_key}\n")
    cmd = [sys.executable, "-m", "host.cli", "flash", str(small_package), "--host", f"127.0.0.1:{board.port}",
           "--host", f"localhost:{board.port}", "--identity", str(board.client_key), "--known-hosts", str(known),
           "--agent-command", "sleep 30 #", "--remote-dir", str(board.uploads)]
    # A test run started in the background (`make test &`) ignores SIGINT, and a child would inherit
    # that: give the flash Ctrl-C's default, as a terminal's foreground process has it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                            env=peer_env(EDGETUNE_SSH_INSTALL_SEC="600"), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    progress: list[str] = []
    reader = threading.Thread(target=lambda: progress.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: sum("installing" in line for line in progress) >= 2 or proc.poll() is not None, 60,
                 "both boards to be installing")
        assert proc.poll() is None, "".join(progress) + proc.stdout.read()
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout = proc.stdout.read()
        proc.wait(30)
        took = time.monotonic() - interrupted
        reader.join(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    print(f"\nCtrl-C: both boards reported {took:.1f} s after the interrupt")
    assert proc.returncode == 130, "".join(progress) + stdout
    assert took < 10.0
    assert "Aborted." in "".join(progress)  # click's word for a KeyboardInterrupt (exit 130)
    # Every board has its row: failed, saying what the interrupt left it in.
    for name in (f"127.0.0.1:{board.port}", f"localhost:{board.port}"):
        row = next(line for line in stdout.splitlines() if line.startswith(name + " "))
        assert " failed " in row and "interrupted (Ctrl-C) while installing" in row, stdout
    assert "0 of 2 boards flashed, 2 failed" in stdout


def _bench_frozen(peers, host_target, key: str, runs: int, freeze_when) -> None:
    """`edgetune bench` of the tiny CNN on a board of its own, frozen by ``freeze_when(agent, tracker_port)``
    (which returns when it froze): the bench fails within the session's deadline, naming the board. A
    board's bench session lasts at most 8 s here, so one silent for 8 + 2 s is taken as gone."""
    env = {**peer_env(), "EDGETUNE_BENCH_SESSION_SEC": "8", "EDGETUNE_BOARD_ANSWER_GRACE_SEC": "2"}
    tracker = peers.tracker(advertise=False)
    addr = f"127.0.0.1:{tracker.port}"
    agent = peers.agent(key, key.replace("bench", "bench-"), addr, advertise=False)
    wait_registered(tracker.port, key)
    proc = subprocess.Popen([EDGETUNE, "bench", "tiny_cnn", "--device", key, "--tracker", addr,
                             "--target", json.dumps(host_target), "--runs", str(runs), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        frozen_at = freeze_when(agent, tracker.port)
        _, stderr = proc.communicate(timeout=STOP_LIMIT_SEC)
        ended = time.monotonic() - frozen_at
    finally:
        thaw(agent)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\nbench ended {ended:.1f} s after the board froze")
    assert proc.returncode == 1, stderr[-3000:]
    assert f"board 127.0.0.1:{agent.port} stopped answering" in stderr and "Traceback" not in stderr
    assert ended < 8 + 2 + 10


def test_bench_on_a_board_frozen_mid_measurement_fails_at_its_deadline(peers, host_target):
    # Enough timed runs of the untuned tiny CNN to keep the board measuring for longer than the session.
    _bench_frozen(peers, host_target, "benchfrozen", 1000000,
                  lambda agent, port: freeze_in_session(agent, port, timeout=240))


def _in_onnxruntime_session(agent) -> bool:
    """True once a session process of the agent holds the ONNX model a bench uploads for ONNX Runtime
    (the session's uploads land in its working folder)."""
    try:
        for child in psutil.Process(agent.pid).children():
            if any(p.name.startswith("bench-ort-") and p.suffix == ".onnx" for p in Path(child.cwd()).iterdir()):
                return True
    except (psutil.Error, OSError):
        pass
    return False


def test_bench_on_a_board_frozen_inside_the_onnxruntime_session_fails_at_its_deadline(peers, host_target):
    # The same deadline as for a build's timing holds in the session that times ONNX Runtime on the board,
    # and nothing after it (removing the uploads from a board that no longer answers) waits again.
    def when_onnxruntime_runs(agent, _port) -> float:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if _in_onnxruntime_session(agent):
                return freeze(agent)
            time.sleep(0.002)
        raise TimeoutError("the bench never opened an ONNX Runtime session on the board")

    _bench_frozen(peers, host_target, "benchortfrozen", 3000, when_onnxruntime_runs)


def test_a_board_frozen_during_the_finals_stops_the_finals_not_the_run(peers, host_target, tmp_path, monkeypatch):
    # Every trial is measured and logged before the finals start: a board lost in them leaves a completed
    # run whose large kernels build with their logged best, and the session ends at the usual deadline.
    from tests.helpers_build import twin_convs_onnx

    for name, value in FAULT_ENV.items():
        monkeypatch.setenv(name, value)
    model = twin_convs_onnx(tmp_path / "twin.onnx", channels=32, size=64)  # two kernels with finals
    tracker = peers.tracker(advertise=False)
    addr = f"127.0.0.1:{tracker.port}"
    agent = peers.agent("finalsfrozen", "finals-frozen", addr, advertise=False)
    wait_registered(tracker.port, "finalsfrozen")
    log_dir = tmp_path / "log"
    argv = _tune_argv("finalsfrozen", addr, log_dir, 24, host_target, model=str(model))
    frozen_at: list[float] = []

    def freeze_in_the_finals() -> None:
        wait_for(lambda: len(history_of(log_dir)) == 24, 600, "every trial measured")
        measured = time.time()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            newer = [c for c in psutil.Process(agent.pid).children() if c.create_time() > measured]
            if newer and _serving_a_client(agent, tracker.port, MEASURING_AFTER_SEC):
                frozen_at.append(freeze(agent))
                return
            time.sleep(0.005)
        raise TimeoutError("no finals session opened on the board")

    try:
        code, stdout, stderr = tune_then(argv, log_dir, freeze_in_the_finals, timeout=STOP_LIMIT_SEC)
        ended = time.monotonic() - frozen_at[0]
    finally:
        thaw(agent)
    print(f"\ntune ended {ended:.1f} s after the board froze in the finals")
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr and ended < 8 + 2 + 10 + 5
    events = _events(stdout)
    stopped = [e for e in events if e["event"] == "finals-stopped"]
    assert stopped and "stopped answering" in stopped[0]["reason"], events[-5:]
    session = session_of(log_dir)
    assert session["status"] == "completed" and session["trials_done"] == 24
    assert len(records_of(log_dir)) == 24 == len(history_of(log_dir))
    assert session["runs"][-1]["finals"]["tasks"] == len(session["finals"]) < 2
