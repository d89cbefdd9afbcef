"""A tracker and an agent on 127.0.0.1 for the benchmarks (this machine as the board)."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import peers  # noqa: E402  (the same real peers the tests use)


@contextlib.contextmanager
def local_board(key: str = "bench"):
    work = Path(tempfile.mkdtemp(prefix="edgetune-bench-"))
    tracker = peers.start_tracker(work / "peers", advertise=False)
    agent = None
    try:
        agent = peers.start_agent(work / "peers", key, "bench-board", f"127.0.0.1:{tracker.port}", work / "store",
                                  advertise=False)
        peers.wait_registered(tracker.port, key)
        yield {"tracker": ("127.0.0.1", tracker.port), "key": key, "work": work}
    finally:
        if agent is not None:
            agent.stop()
        tracker.stop()
