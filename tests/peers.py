"""Real peers for tests: the tracker, board agents and stock TVM servers as separate processes.

Each runs in its own session (process group) so that stopping it stops its children too (TVM's
popen workers keep ports otherwise). Ports come from the OS.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from host.process import LoggedProcess

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EDGETUNE = str(BIN / "edgetune")
AGENT = str(BIN / "edgetune-agent")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("EDGETUNE_MDNS_INTERFACES", "127.0.0.1")
    env.pop("EDGETUNE_TRACKER", None)
    env.pop("TVM_NUM_THREADS", None)  # a board sizes its runtime's thread pool itself
    env.update(extra)
    return env


class Peer(LoggedProcess):
    """A tracker, agent or stock server started by a test; ``port`` is where it serves."""

    port: int | None = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL, timeout=5)


def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Peer:
    log_dir.mkdir(parents=True, exist_ok=True)
    return Peer(name, argv, log_dir / f"{name}.log", env or peer_env())


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def start_tracker(log_dir: Path, port: int | None = None, advertise: bool = True, name: str = "tracker",
                  env: dict[str, str] | None = None, host: str = "127.0.0.1", args: tuple[str, ...] = ()) -> Peer:
    """``edgetune tracker``; ``args`` adds options (e.g. ``("--allow-plain-key", "phone")`` for a stock server)."""
    port = free_port() if port is None else port
    argv = [EDGETUNE, "tracker", "--host", host, "--port", str(port), *args]
    if not advertise:
        argv.append("--no-advertise")
    peer = spawn(name, argv, log_dir, env)
    peer.port = port
    wait_for(lambda: "tracker listening" in peer.log() or not peer.alive(), 60, "the tracker to listen")
    if not peer.alive():
        raise RuntimeError(f"tracker did not start:\n{peer.log()}")
    return peer


def start_agent(log_dir: Path, key: str, name: str, tracker: str | None, store: Path,
                advertise: bool = True, env: dict[str, str] | None = None, host: str = "127.0.0.1",
                args: tuple[str, ...] = ()) -> Peer:
    """``edgetune-agent serve``; ``args`` adds options (e.g. ``("--open",)``)."""
    argv = [AGENT, "serve", "--key", key, "--name", name, "--host", host, "--port", "0", "--store", str(store), *args]
    if tracker:
        argv += ["--tracker", tracker]
    if not advertise:
        argv.append("--no-advertise")
    peer = spawn(name, argv, log_dir, env)
    match = wait_for(lambda: re.search(r"serving TVM RPC on [\d.]+:(\d+)", peer.log()) or (not peer.alive() and "dead"),
                     120, f"agent {name} to serve")
    if match == "dead":
        raise RuntimeError(f"agent {name} died:\n{peer.log()}")
    peer.port = int(match.group(1))
    return peer


def start_stock_server(log_dir: Path, key: str, tracker: str, name: str = "stock-server") -> Peer:
    port = free_port()
    argv = [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", tracker, "--key", key,
            "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    peer = spawn(name, argv, log_dir)
    peer.port = port
    return peer


def tracker_servers(tracker_port: int, key: str | None = None) -> list[dict]:
    """Servers registered at the tracker (optionally of one key); [] when it does not answer."""
    from host.errors import TrackerUnreachable
    from host.tracker.client import tracker_summary

    try:
        summary = tracker_summary(("127.0.0.1", tracker_port), timeout=3)
    except TrackerUnreachable:
        return []
    servers = summary.get("server_info", [])
    return [s for s in servers if key is None or s.get("key") == f"server:{key}"]


def wait_registered(tracker_port: int, key: str, count: int = 1, timeout: float = 60) -> list[dict]:
    return wait_for(lambda: (lambda s: s if len(s) >= count else None)(tracker_servers(tracker_port, key)),
                    timeout, f"{count} board(s) of key {key!r} on the tracker")


def run_cli(argv: list[str], timeout: float = 600, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env or peer_env(),
                          stdin=subprocess.DEVNULL, **kw)
