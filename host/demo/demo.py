"""The whole loop on this machine: a tracker and an agent as real processes, discovery over mDNS,
tuning, build, package, flash (over SSH when it is set up for this machine, else the agent's own
local install), bench tuned against untuned, and a report. Everything started is stopped at the end,
also on Ctrl-C.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from .. import config
from ..errors import EdgetuneError
from ..logs.tuninglog import write_json_atomic
from ..process import LoggedProcess

logger = logging.getLogger(__name__)

DEMO_MODEL = "tiny_cnn"


@dataclass
class DemoResult:
    workdir: str
    key: str
    board: dict[str, Any]
    trials: int
    tuned_p50_ms: float | None
    untuned_p50_ms: float | None
    speedup: float | None
    onnxruntime_p50_ms: float | None
    tuned_over_onnxruntime: float | None
    package: str
    report: str
    flashed_via: str
    installed: dict[str, Any]
    started_pids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bench: str = ""  # bench.json: every build's timing and each round's p50s, as `edgetune bench --json` says them
    rounds: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Process(LoggedProcess):
    """A tracker or agent the demo started."""

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            if self.proc.poll() is not None:
                raise EdgetuneError(f"the demo's {self.name} exited ({self.proc.returncode}): see {self.log_path}")
            time.sleep(0.1)
        raise EdgetuneError(f"the demo's {self.name} did not start within {timeout:g} s: see {self.log_path}")

def _ssh_identity() -> tuple[str, Path] | None:
    """(user, identity file) when SSH to this machine is set up: sshd on 127.0.0.1:22, a key of ours,
    and 127.0.0.1 in known_hosts. Never trusts a host key by itself."""
    home = Path.home() / ".ssh"
    known = home / "known_hosts"
    identities = [home / n for n in ("id_ed25519", "id_ecdsa", "id_rsa") if (home / n).exists()]
    if not identities or not known.exists():
        return None
    text = known.read_text(errors="replace")
    if "127.0.0.1" not in text and "localhost" not in text:
        return None
    try:
        with socket.create_connection(("127.0.0.1", 22), timeout=1.0):
            pass
    except OSError:
        return None
    return getpass.getuser(), identities[0]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_demo(workdir: str | Path, trials: int, say: Callable[[str], None],
             on_tune_event: Callable[[dict], None] | None = None, runs: int = 30) -> DemoResult:
    """Run the demo in ``workdir``. Raises :class:`EdgetuneError`; stops what it started in any case."""
    from device_agent import install_answer
    from device_agent.store import status as store_status
    from device_agent.store import trust

    from ..bench.bench import bench
    from ..build.build import build
    from ..discovery.browse import find_boards
    from ..flash.ssh import FlashTarget, flash
    from ..package.keys import init_keys
    from ..package.package import package
    from ..report.report import make_report
    from ..tracker.client import servers_of_key, tracker_summary
    from ..tracker.teamkey import ensure_team_key
    from ..tuning.session import TuneOptions, run_session

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    # The demo's board is this machine on loopback: keep its mDNS there too (multicast works on lo).
    os.environ.setdefault("EDGETUNE_MDNS_INTERFACES", "127.0.0.1")
    # The team key, as `edgetune tracker` makes it: the demo's tracker, agent and this process share it.
    team, notice = ensure_team_key()
    if notice:
        say(notice)
    env = dict(os.environ)
    env.pop("EDGETUNE_TRACKER", None)
    env.pop("EDGETUNE_OPEN", None)
    env["EDGETUNE_TEAM_KEY_FILE"] = str(team.path)
    key = "demo-" + re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0] or "host")[:40]
    store = work / "store"
    started: list[_Process] = []
    try:
        tracker = _Process("tracker", [_bin("edgetune"), "tracker", "--host", "127.0.0.1", "--port", "0"],
                           logs / "tracker.log", env)
        started.append(tracker)
        port = int(tracker.wait_for_log(r"tracker listening on [\d.]+:(\d+)", config.PROCESS_START_SEC).group(1))
        say(f"started a TVM RPC tracker on 127.0.0.1:{port} (pid {tracker.pid}), advertised on mDNS; it obeys "
            f"only holders of the team key {team.path}")
        # Named explicitly: other trackers may be advertised on this machine; a board on a LAN with one
        # tracker finds it by mDNS (`edgetune-agent serve --key K`).
        agent = _Process("agent", [_bin("edgetune-agent"), "serve", "--key", key, "--name", f"{key}-board",
                                   "--host", "127.0.0.1", "--port", "0", "--store", str(store),
                                   "--tracker", f"127.0.0.1:{port}"],
                         logs / "agent.log", env)
        started.append(agent)
        say(f"started the board agent (pid {agent.pid}), serving TVM RPC to holders of the team key and "
            "advertising itself on mDNS")
        agent.wait_for_log(r"registered with tracker", config.PROCESS_START_SEC)
        deadline = time.monotonic() + config.PROCESS_START_SEC
        boards = []
        while time.monotonic() < deadline:
            boards, _ = find_boards(2.0, ("127.0.0.1", port))
            boards = [b for b in boards if b.key == key and b.record is not None]
            if boards and servers_of_key(tracker_summary(("127.0.0.1", port)), key):
                break
        if not boards:
            raise EdgetuneError(f"the demo's agent did not show up on mDNS: see {logs / 'agent.log'}")
        board = boards[0]
        rec = board.record
        say("\nboards found on mDNS and the tracker:")
        say(f"  {'BOARD':<22} {'KEY':<16} {'STATUS':<14} {'ADDRESS':<16} {'ARCH':<7} TARGET")
        say(f"  {board.name:<22} {board.key:<16} {board.status:<14} {board.addresses[0] + ':' + str(board.rpc_port):<16} "
            f"{rec.arch:<7} {json.dumps(rec.target())}")

        log_dir = work / "tuning-log"
        say(f"\ntuning {DEMO_MODEL} on {board.name}: {trials} trials (XGBoost-guided evolutionary search)")
        session = run_session(TuneOptions(model=DEMO_MODEL, key=key, trials=trials, log_dir=str(log_dir),
                                          tracker=("127.0.0.1", port), target=rec.target(), board=rec.as_dict()),
                              on_tune_event)
        if session.status == "interrupted":
            raise KeyboardInterrupt
        if session.status not in ("completed", "already-complete"):
            raise EdgetuneError(f"tuning stopped: {session.message}")
        say(f"tuned: {session.trials_done} trials in {session.elapsed_s:.0f} s")

        say("building with the tuning log")
        out_dir = work / "build"
        built = build(DEMO_MODEL, key, out_dir, str(log_dir), compare=False)  # the bench below compares on the board
        tuned_tasks = sum(1 for c in built.coverage if c.tuned)
        say(f"  {tuned_tasks}/{len(built.coverage)} kernels tuned ({100 * built.tuned_share:.0f}% of the FLOPs), "
            "the rest on MetaSchedule's default schedules")

        key_path = work / "keys" / "signing_key"
        keyinfo = init_keys(key_path) if not key_path.exists() else None
        pub = key_path.with_name(key_path.name + ".pub")
        trust(pub, store=store)
        pkg = work / f"{DEMO_MODEL}.etpkg"
        packaged = package(out_dir, log_dir, pkg, key_path=key_path)
        say(f"packaged {pkg} ({packaged.size / 1024:.0f} KiB, signed by {packaged.signer}"
            + (", a new demo key" if keyinfo else "") + ")")

        flashed_via = "local install (the agent's own `edgetune-agent install`; no SSH to this machine is set up)"
        installed: dict[str, Any] = {}
        ssh = _ssh_identity()
        if ssh is not None:
            user, identity = ssh
            result = flash(pkg, [FlashTarget(board.name, "127.0.0.1", 22, user, str(identity))],
                           agent_command=_bin("edgetune-agent"), store=str(store))[0]
            if result.ok:
                flashed_via = f"SSH to {user}@127.0.0.1 (paramiko, known_hosts checked)"
                installed = {"slot": result.slot, "self_check_ok": result.self_check_ok, "p50_ms": result.p50_ms}
            else:
                say(f"  SSH flash failed ({result.error}); using the agent's local install instead")
        if not installed:
            out = subprocess.run([_bin("edgetune-agent"), "install", str(pkg), "--store", str(store), "--json"],
                                 capture_output=True, text=True, timeout=config.SSH_INSTALL_SEC, env=env)
            try:
                answer = install_answer.parse(out.stdout)
            except install_answer.InstallAnswerError as err:
                raise EdgetuneError(f"the agent's install failed ({err}): {out.stderr.strip()[-300:]}") from None
            if not answer.ok:
                raise EdgetuneError(f"the agent refused the package: {answer.error}")
            check = answer.self_check
            installed = {"slot": answer.slot, "self_check_ok": check is not None and check.ok,
                         "p50_ms": check.p50_ms if check is not None else None}
        now = store_status(store)
        installed.update(current=now.current, model=now.model_name)
        say(f"flashed via {flashed_via}: slot {installed['slot']}, self-check "
            f"{'passed' if installed['self_check_ok'] else 'FAILED'}")

        say("benchmarking on the board: tuned against ONNX Runtime and TVM's default build")
        measured = bench(DEMO_MODEL, key, ("127.0.0.1", port), log_dir=str(log_dir), runs=runs)
        report = make_report(log_dir, work / "report")
        bench_json = work / "bench.json"
        write_json_atomic(bench_json, measured.as_dict())
        return DemoResult(
            workdir=str(work), key=key, board=board.as_dict(), trials=session.trials_done,
            tuned_p50_ms=measured.tuned.p50_ms if measured.tuned else None,
            untuned_p50_ms=measured.untuned.p50_ms if measured.untuned else None,
            speedup=measured.speedup,
            onnxruntime_p50_ms=measured.onnxruntime.p50_ms if measured.onnxruntime else None,
            tuned_over_onnxruntime=measured.onnxruntime_ratio, package=str(pkg), report=str(report.html), flashed_via=flashed_via,
            installed=installed, started_pids=[p.pid for p in started], notes=measured.notes,
            bench=str(bench_json), rounds=len(measured.rounds),
        )
    finally:
        for proc in reversed(started):
            proc.stop(timeout=config.PROCESS_STOP_SEC)
        # Build workers and anything else this process started and did not stop yet.
        me = psutil.Process()
        leftovers = me.children(recursive=True)
        for child in leftovers:
            try:
                child.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(leftovers, timeout=config.PROCESS_STOP_SEC)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass
