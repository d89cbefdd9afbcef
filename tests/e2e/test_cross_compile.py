"""The cross-compile path end to end, on the emulated Raspberry Pi 4 running ``edgetune-agent``.

One board and one ``edgetune tracker`` (on the host end of the board's veth link) serve the whole
module. The host finds the board by the agent's own mDNS advertisement across the link, tunes the
tiny CNN on it with candidates cross-compiled for aarch64, builds the model with that tuning log,
packages and flashes it over SSH; the board's self-check runs the aarch64 module against ONNX
Runtime's output. Packages the board cannot run (x86_64, or aarch64 with SVE on a Cortex-A72) are
refused at install and leave the installed model current.

Every command is the real CLI in a subprocess; host commands use mDNS on the link only
(``EDGETUNE_MDNS_INTERFACES=<host end>``). Emulated timings are slow: deadlines are generous.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests import helpers_build
from tests import peers

try:
    from . import board
except ImportError:  # tests/e2e is not a package: pytest put this directory on sys.path
    import board

pytestmark = pytest.mark.e2e

KEY = "rpi4-xc"
NAME = "emu-pi4-xc"
STORE = board.DEFAULT_STORE
TRIALS = 16

# Timing constants, in seconds.
# The agent imports TVM (~10-20 s emulated), probes the board and registers: 20-60 s seen.
REGISTER_TIMEOUT_S = 300.0
# mDNS answers from the emulated board; each `edgetune devices` listens this long.
DISCOVERY_LISTEN_S = 5.0
DISCOVERY_TIMEOUT_S = 120.0
# 16 trials: builder-bound on the host, each measurement a session under qemu.
TUNE_TIMEOUT_S = 1800.0
# With no free board, the session gives up after this long (`tune --deadline`).
NO_BOARD_DEADLINE_S = 300.0
# Whole-model compile on the host (default schedules for untuned kernels included).
BUILD_TIMEOUT_S = 900.0
# Quick host commands (keys, package) and board commands over SSH (TVM import under qemu).
QUICK_TIMEOUT_S = 300.0
# flash: upload, verify, self-check (TVM import + runs under qemu).
FLASH_TIMEOUT_S = 900.0
# Poll period of the candidate watcher.
WATCH_POLL_S = 0.1

EM_AARCH64 = 183
EM_X86_64 = 62
PI4_SVE_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon", "+sve"],
                  "num-cores": 2}

SESSION_LINE = r"session \d+ from {host}:\d+ finished in [\d.]+ s: ok"

TIMINGS: dict[str, float] = {}


def _timed(name: str, started: float) -> float:
    seconds = time.monotonic() - started
    TIMINGS[name] = seconds
    print(f"[timing] {name}: {seconds:.1f} s", flush=True)
    return seconds


def elf_class_and_machine(head: bytes) -> tuple[int, int] | None:
    """(EI_CLASS, e_machine) of an ELF header, None if ``head`` is not one (little-endian only)."""
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] != 1:
        return None
    return head[4], struct.unpack_from("<H", head, 18)[0]


def elf_of(path: Path) -> tuple[int, int] | None:
    with open(path, "rb") as fh:
        return elf_class_and_machine(fh.read(64))


def json_out(proc: subprocess.CompletedProcess) -> Any:
    """The JSON document a command printed on stdout (after any progress lines)."""
    text = proc.stdout
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    assert start >= 0, f"no JSON on stdout (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(text[start:])


def failure(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


@dataclass
class Bed:
    """The board, the tracker on its link and what host commands need to reach them."""

    handle: board.BoardHandle
    tracker: str
    base: Path
    signing_key: Path

    def env(self, **extra: str) -> dict[str, str]:
        return peers.peer_env(EDGETUNE_MDNS_INTERFACES=self.handle.host_ip,
                              EDGETUNE_SIGNING_KEY=str(self.signing_key), **extra)

    def cli(self, *argv: str, timeout: float = QUICK_TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
        return peers.run_cli([peers.EDGETUNE, *argv], timeout=timeout, env=self.env(**env))

    def ssh(self, command: str, *, input: str | None = None, timeout: float = QUICK_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(self.handle.ssh_argv(command), capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)

    def board_status(self) -> dict[str, Any]:
        proc = self.ssh(f"edgetune-agent status --store {STORE} --json")
        assert proc.returncode == 0, failure(proc)
        return json_out(proc)

    def flash(self, pkg: Path) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
        h = self.handle
        proc = self.cli("flash", str(pkg), "--host", h.board_ip, "--user", h.ssh_user, "--identity", str(h.ssh_key),
                        "--known-hosts", str(h.known_hosts), "--json", timeout=FLASH_TIMEOUT_S)
        results = json_out(proc)
        assert isinstance(results, list) and len(results) == 1, failure(proc)
        return proc, results[0]

    def package(self, out: Path, log_dir: Path, pkg: Path) -> dict[str, Any]:
        proc = self.cli("package", str(out), "--log", str(log_dir), "-o", str(pkg), "--json")
        assert proc.returncode == 0, failure(proc)
        return json_out(proc)


def _wait_registered(tracker: str, key: str, timeout: float) -> list[dict]:
    from host.errors import TrackerUnreachable
    from host.tracker.client import servers_of_key, tracker_summary

    host, port = tracker.rsplit(":", 1)

    def registered() -> list[dict] | None:
        try:
            return servers_of_key(tracker_summary((host, int(port)), timeout=3), key) or None
        except TrackerUnreachable:
            return None

    return peers.wait_for(registered, timeout, f"a board of key {key!r} on tracker {tracker}", interval=1.0)


@pytest.fixture(scope="module")
def bed(start_emulated_board_module, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """One emulated Pi 4 running the agent, registered with `edgetune tracker` on the host end of its link."""
    base = tmp_path_factory.mktemp("cross")
    started: list[peers.Peer] = []

    def start_tracker(host_ip: str) -> str:
        env = peers.peer_env(EDGETUNE_MDNS_INTERFACES=host_ip)
        peer = peers.start_tracker(base / "peers", host=host_ip, env=env)
        started.append(peer)
        return f"{host_ip}:{peer.port}"

    try:
        t0 = time.monotonic()
        handle = start_emulated_board_module(tracker=start_tracker, key=KEY, name=NAME, store=STORE)
        _timed("board start (overlay, agent install, sshd)", t0)
        try:
            _wait_registered(handle.tracker, KEY, REGISTER_TIMEOUT_S)
        except TimeoutError:
            log = handle.agent_log.read_text(errors="replace") if handle.agent_log else ""
            pytest.fail(f"the agent did not register with {handle.tracker}:\n{log[-3000:]}")
        _timed("board start until the agent registered", t0)
        yield Bed(handle=handle, tracker=handle.tracker, base=base, signing_key=base / "keys" / "signing_key")
    finally:
        for peer in reversed(started):
            peer.stop()
        if TIMINGS:
            print("[timing] " + "; ".join(f"{k}: {v:.1f} s" for k, v in TIMINGS.items()), flush=True)


class CandidateWatcher(threading.Thread):
    """Reads the ELF header of every candidate the builder links under ``root`` (its TMPDIR) before the
    runner uploads and deletes it: proof of what the host cross-compiled."""

    def __init__(self, root: Path) -> None:
        super().__init__(name="candidate-watcher", daemon=True)
        self.root = root
        self.headers: dict[str, tuple[int, int] | None] = {}
        self._sizes: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(WATCH_POLL_S):
            for path in self.root.glob("edgetune-build-*/edgetune-cand-*/candidate.so"):
                name = str(path)
                if name in self.headers:
                    continue
                try:
                    size = path.stat().st_size
                    # Linked once the size holds still across a poll.
                    if size >= 64 and self._sizes.get(name) == size:
                        self.headers[name] = elf_of(path)
                except OSError:
                    continue  # measured and removed in between
                self._sizes[name] = size

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


@pytest.fixture(scope="module")
def tuned(bed: Bed) -> dict[str, Any]:
    """`edgetune tune tiny_cnn` with 16 trials on the board; its log, events and the candidates seen."""
    log_dir = bed.base / "log"
    cand_tmp = bed.base / "tmp"
    cand_tmp.mkdir()
    watcher = CandidateWatcher(cand_tmp)
    watcher.start()
    t0 = time.monotonic()
    try:
        proc = bed.cli("tune", "tiny_cnn", "--device", KEY, "--trials", str(TRIALS), "--log", str(log_dir),
                       "--tracker", bed.tracker, "--deadline", str(NO_BOARD_DEADLINE_S), "--seed", "1", "--json",
                       timeout=TUNE_TIMEOUT_S, TMPDIR=str(cand_tmp))
    finally:
        watcher.stop()
    seconds = _timed(f"tune {TRIALS} trials", t0)
    assert proc.returncode == 0, failure(proc)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"log": log_dir, "events": events, "seconds": seconds, "candidates": dict(watcher.headers)}


@pytest.fixture(scope="module")
def installed(bed: Bed, tuned: dict[str, Any]) -> dict[str, Any]:
    """Build with the tuning log, trust a fresh signing key on the board, package and flash."""
    out = bed.base / "out"
    t0 = time.monotonic()
    build = bed.cli("build", "tiny_cnn", "--device", KEY, "--log", str(tuned["log"]), "-o", str(out), "--json",
                    timeout=BUILD_TIMEOUT_S)
    _timed("build (whole model, log applied)", t0)
    assert build.returncode == 0, failure(build)

    keys = bed.cli("keys", "init", "--json")
    assert keys.returncode == 0, failure(keys)
    key_info = json_out(keys)
    # Copy the public key to the board over SSH and trust it there, as a user would.
    copy = bed.ssh("cat > /tmp/edgetune-signing.pub", input=Path(key_info["public_path"]).read_text())
    assert copy.returncode == 0, failure(copy)
    trust = bed.ssh(f"edgetune-agent trust /tmp/edgetune-signing.pub --store {STORE} --json")
    assert trust.returncode == 0, failure(trust)

    pkg = bed.base / "tiny_cnn-rpi4.etpkg"
    packaged = bed.package(out, tuned["log"], pkg)

    t0 = time.monotonic()
    flash, result = bed.flash(pkg)
    _timed("flash (upload, verify, self-check on the board)", t0)
    return {"out": out, "build": json_out(build), "keys": key_info, "trust": json_out(trust), "package": packaged,
            "pkg": pkg, "flash": flash, "result": result}


# --------------------------------------------------------------------------------------------------
# 1. discovery
# --------------------------------------------------------------------------------------------------
def test_devices_finds_the_board_by_its_own_mdns_advertisement(bed: Bed) -> None:
    h = bed.handle
    # The agent keeps its board id in its own state directory beside the store (config.rpc_state_dir).
    board_id = (h.rootfs / (STORE + "-rpc").lstrip("/") / "board-id").read_text().strip()
    rows: list[dict[str, Any]] = []
    last: subprocess.CompletedProcess | None = None

    def found() -> dict[str, Any] | None:
        nonlocal last, rows
        last = bed.cli("devices", "--json", "--tracker", bed.tracker, "--timeout", str(DISCOVERY_LISTEN_S),
                       timeout=QUICK_TIMEOUT_S)
        if last.returncode != 0:
            return None
        rows = json_out(last)["boards"]
        return next((r for r in rows if r.get("agent") and r.get("board_id") == board_id), None)

    try:
        row = peers.wait_for(found, DISCOVERY_TIMEOUT_S, "the board's mDNS record on the host", interval=1.0)
    except TimeoutError:
        pytest.fail(f"the board (id {board_id}) was not found by mDNS on {h.host_ip}; rows: {rows}\n"
                    + (failure(last) if last else ""))

    assert json_out(last)["tracker"] == bed.tracker
    # From the agent's TXT record, which crossed the veth link:
    assert row["agent"] is True
    assert row["name"] == NAME
    assert row["key"] == KEY
    assert row["addresses"] and row["addresses"][0] == h.board_ip
    assert row["arch"] == "aarch64"
    assert row["cpu"] == "cortex-a72"
    assert row["os"] == "linux"
    assert row["model"] == board.PI4_MODEL
    target = row["target"]
    assert target["mtriple"] == "aarch64-linux-gnu"
    assert target["mcpu"] == "cortex-a72"
    assert "+neon" in target["mattr"]
    assert not any("sve" in attr for attr in target["mattr"] if attr.startswith("+"))
    # Merged with the tracker's view: registered and idle.
    assert row["status"] == "free"
    assert row["rpc_port"] > 0


# --------------------------------------------------------------------------------------------------
# 2. tuning: cross-compiled on the host, measured on the board, recorded
# --------------------------------------------------------------------------------------------------
def test_tune_cross_compiles_measures_on_the_board_and_records(bed: Bed, tuned: dict[str, Any]) -> None:
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    h = bed.handle
    log_dir: Path = tuned["log"]
    events = tuned["events"]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end", events[-3:]
    end = events[-1]
    assert end["status"] == "completed", end
    assert end["trials_done"] == TRIALS and end["trials_this_run"] == TRIALS
    assert events[0]["target"]["mtriple"] == "aarch64-linux-gnu"

    # Compiled on the host for the board's CPU: every candidate linked during the run is an aarch64 ELF.
    headers = tuned["candidates"]
    assert headers, "no candidate library was seen in the builder's TMPDIR"
    assert set(headers.values()) == {(2, EM_AARCH64)}, headers

    # The session's target is the one the board proposed.
    session = json.loads((log_dir / "session.json").read_text())
    assert session["status"] == "completed" and session["trials_done"] == TRIALS
    assert session["key"] == KEY
    assert session["target"]["mtriple"] == "aarch64-linux-gnu"
    assert session["target"]["mcpu"] == "cortex-a72"
    assert "+neon" in session["target"]["mattr"]
    assert session["board"]["arch"] == "aarch64"
    # The board is another machine (its own address behind the veth link): the workstation built each
    # next batch while the board measured the current one.
    assert events[0]["overlap"] is True
    run = session["runs"][-1]
    assert run["overlap"] is True and run["overlapped_batches"] >= 1 and run["prepared_while_measuring_s"] > 0, run

    # Measured on the board: each trial names it; most have a latency.
    history = [json.loads(line) for line in (log_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    assert [entry["trial"] for entry in history] == list(range(1, TRIALS + 1))
    boards = {entry["board"] for entry in history}
    assert len(boards) == 1, boards
    board_addr = boards.pop()
    assert board_addr.startswith(f"{h.board_ip}:"), board_addr
    measured = [entry for entry in history if entry["latency_us"] is not None]
    assert len(measured) >= TRIALS * 3 // 4, [entry.get("error") for entry in history]
    assert all(entry["latency_us"] > 0 for entry in measured)
    assert set(end["measured_by"]) == {board_addr}
    assert session["measured_by"] == {board_addr: end["measured_by"][board_addr]}

    # The agent on the board served those sessions (for the host, over the link).
    agent_log = h.agent_log.read_text(errors="replace")
    sessions = re.findall(SESSION_LINE.format(host=re.escape(h.host_ip)), agent_log)
    assert len(sessions) >= len(measured), agent_log[-3000:]
    assert len(re.findall(r"load_module \S*/candidate\.so", agent_log)) >= len(measured), agent_log[-3000:]
    print(f"[cross-compile] {len(headers)} candidates seen linked for aarch64; {len(measured)}/{TRIALS} trials "
          f"measured on {board_addr}; {len(sessions)} agent sessions", flush=True)

    # Recorded: TVM's own JSON database reads the log.
    record_lines = [line for line in (log_dir / "database_tuning_record.json").read_text().splitlines() if line.strip()]
    assert len(record_lines) == TRIALS
    db = JSONDatabase(str(log_dir / "database_workload.json"), str(log_dir / "database_tuning_record.json"),
                      allow_missing=False)
    records = list(db.get_all_tuning_records())
    assert len(records) == TRIALS
    assert sum(1 for r in records if r.run_secs is not None) >= TRIALS * 3 // 4
    assert {str(r.target.attrs["mtriple"]) for r in records} == {"aarch64-linux-gnu"}


# --------------------------------------------------------------------------------------------------
# 3. build, package, flash: the board runs the aarch64 module and matches ONNX Runtime
# --------------------------------------------------------------------------------------------------
def test_build_package_flash_runs_the_aarch64_module_on_the_board(bed: Bed, installed: dict[str, Any]) -> None:
    out: Path = installed["out"]
    build = installed["build"]
    assert build["key"] == KEY
    assert build["target"]["mtriple"] == "aarch64-linux-gnu" and build["target"]["mcpu"] == "cortex-a72"
    assert build["tuned"] >= 1, build  # the tuning log was applied
    assert build["host_check"] is None  # the workstation cannot run aarch64 code

    assert elf_of(out / "model.so") == (2, EM_AARCH64)
    build_json = json.loads((out / "build.json").read_text())
    assert build_json["target"]["mtriple"] == "aarch64-linux-gnu"
    assert build_json["toolchain"] == "aarch64-linux-gnu-g++"
    for name in ("input.npz", "output.npz"):
        assert (out / "reference" / name).is_file()

    assert installed["trust"]["fingerprint"] == installed["keys"]["fingerprint"]
    assert installed["package"]["key"] == KEY
    assert installed["package"]["target"]["mtriple"] == "aarch64-linux-gnu"

    flash, result = installed["flash"], installed["result"]
    assert flash.returncode == 0, failure(flash)
    assert result["ok"] is True, result
    assert result["model_name"] == "tiny_cnn"
    check = result["install"]["self_check"]
    assert check["ok"] is True, check
    assert result["self_check_ok"] is True
    assert check["max_abs_err"] is not None and check["max_abs_err"] <= 1e-4, check
    assert check["p50_ms"] and check["p50_ms"] > 0

    status = bed.board_status()
    assert status["current"] == result["slot"]
    assert status["model_name"] == "tiny_cnn" and status["key"] == KEY
    assert status["target"]["mtriple"] == "aarch64-linux-gnu"
    assert status["self_check_ok"] is True
    assert status["max_abs_err"] <= 1e-4


# --------------------------------------------------------------------------------------------------
# 4. and 5. packages the board cannot run are refused at install
# --------------------------------------------------------------------------------------------------
def _assert_still_current_and_runs(bed: Bed, slot: str) -> None:
    status = bed.board_status()
    assert status["current"] == slot, status
    assert status["model_name"] == "tiny_cnn" and status["self_check_ok"] is True
    # The installed model still loads and matches its reference output on the board.
    proc = bed.ssh(f"python -m device_agent.selfcheck {STORE}/current --json")
    assert proc.returncode == 0, failure(proc)
    check = json.loads(proc.stdout.strip().splitlines()[-1])
    assert check["ok"] is True and check["max_abs_err"] <= 1e-4, check


def _flash_refused_by_compatibility(bed: Bed, pkg: Path, slot: str):
    """Flash ``pkg``: the board's compatibility check refuses it and ``slot`` stays current."""
    flash, result = bed.flash(pkg)
    assert flash.returncode != 0, failure(flash)
    assert result["ok"] is False
    assert result["install"]["step"] == "compatibility", result
    assert result["current"] == slot
    return flash, result


def test_x86_64_package_is_refused_naming_the_architecture(bed: Bed, tuned: dict[str, Any],
                                                           installed: dict[str, Any]) -> None:
    slot = installed["result"]["slot"]
    assert slot
    target = helpers_build.native_target()
    out = helpers_build.make_build_dir(bed.base / "out-x86", target=target, key=KEY)
    assert elf_of(out / "model.so") == (2, EM_X86_64)
    pkg = bed.base / "tiny_cnn-x86.etpkg"
    bed.package(out, tuned["log"], pkg)

    flash, result = _flash_refused_by_compatibility(bed, pkg, slot)
    assert result["install"]["rolled_back"] is False  # refused before it reached the store
    error = result["error"]
    assert "x86_64" in error and "aarch64" in error, error
    print(f"[cross-compile] x86_64 package refused: {error}", flush=True)
    assert "failed" in flash.stderr, flash.stderr  # one line, exit non-zero

    _assert_still_current_and_runs(bed, slot)


def test_sve_module_for_a_cortex_a72_is_refused_at_install(bed: Bed, tuned: dict[str, Any],
                                                           installed: dict[str, Any]) -> None:
    slot = installed["result"]["slot"]
    out = bed.base / "out-sve"
    t0 = time.monotonic()
    build = bed.cli("build", "tiny_cnn", "--device", KEY, "--target", json.dumps(PI4_SVE_TARGET), "-o", str(out),
                    "--json", timeout=BUILD_TIMEOUT_S)
    _timed("build for +sve (default schedules)", t0)
    assert build.returncode == 0, failure(build)
    assert elf_of(out / "model.so") == (2, EM_AARCH64)
    assert "+sve" in json.loads((out / "build.json").read_text())["target"]["mattr"]
    pkg = bed.base / "tiny_cnn-sve.etpkg"
    bed.package(out, tuned["log"], pkg)

    # Refused by the compatibility check, not left to crash in the self-check.
    _, result = _flash_refused_by_compatibility(bed, pkg, slot)
    assert result["install"]["self_check"] is None
    assert "sve" in result["error"], result["error"]
    print(f"[cross-compile] +sve package refused: {result['error']}", flush=True)

    _assert_still_current_and_runs(bed, slot)
