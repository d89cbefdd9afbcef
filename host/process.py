"""Stopping a child process that runs in its own process group, children included.

TVM's popen workers keep ports open when only their parent dies, so every process edgetune (or its
tests) starts with ``start_new_session=True`` is stopped through its group.
"""

from __future__ import annotations

import os
import signal
import subprocess


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
