"""A tracker and an agent on 127.0.0.1 for the benchmarks (this machine as the board), sharing a team key
of their own (in the bench's temporary folder)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import peers  # noqa: E402  (the same real peers the tests use)


@contextlib.contextmanager
def local_board(key: str = "bench", open_mode: bool = False):
    """``open_mode``: tracker and agent also serve stock TVM clients (stock MetaSchedule's RPCRunner).

    While the bed is up, whatever is printed goes to stderr: stdout is for the figures' JSON printed
    after it, and MetaSchedule's loggers print their tables to stdout from a process's second session
    on (its logger set-up puts them back at DEBUG), whatever level the bench set."""
    from device_agent.auth import TEAM_KEY_ENV, create_team_key

    work = Path(tempfile.mkdtemp(prefix="edgetune-bench-"))
    os.environ[TEAM_KEY_ENV] = str(create_team_key(work / "team.key").path)  # this process and the peers
    extra = ("--open",) if open_mode else ()
    tracker = peers.start_tracker(work / "peers", advertise=False, args=extra)
    agent = None
    try:
        agent = peers.start_agent(work / "peers", key, "bench-board", f"127.0.0.1:{tracker.port}", work / "store",
                                  advertise=False, args=extra)
        peers.wait_registered(tracker.port, key)
        with contextlib.redirect_stdout(sys.stderr):
            yield {"tracker": ("127.0.0.1", tracker.port), "key": key, "work": work}
    finally:
        if agent is not None:
            agent.stop()
        tracker.stop()
