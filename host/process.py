"""Stopping a child process that runs in its own process group, children included.

TVM's popen workers keep ports open when only their parent dies, so every process edgetune (or its
tests) starts with ``start_new_session=True`` is stopped through its group.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Send ``sig`` to the group led by ``proc``, wait up to ``timeout`` seconds, then SIGKILL whatever of
    the group is left (children included) and reap ``proc``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children left behind, if any
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class LoggedProcess:
    """A child process in its own process group, its stdout and stderr appended to ``log_path``.

    The file keeps earlier runs' output; :meth:`log` returns only this run's, so a readiness line
    ("listening on ...", "registered ...") is never matched from a previous run."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as stream:
            self.log_offset = stream.seek(0, os.SEEK_END)
            self.proc = subprocess.Popen(argv, stdout=stream, stderr=stream, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """What this run of the process wrote (earlier runs' lines in the same file excluded)."""
        try:
            with open(self.log_path, "rb") as stream:
                stream.seek(self.log_offset)
                return stream.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the process and every process of its group; SIGKILL after ``timeout`` seconds."""
        stop_process_group(self.proc, sig, timeout)
