"""A tracker and an agent shared by the tuning, build and bench tests, and one 16-trial tuning log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import peers as peers_mod
from tests.peers import EDGETUNE, run_cli

KEY = "x86host"


@pytest.fixture(scope="session")
def tuning_bed(tmp_path_factory, team_key):
    """A tracker and one agent (this machine as a board) for the whole test session, both holding the
    test session's team key (``team_key``, in the environment they inherit)."""
    base = tmp_path_factory.mktemp("bed")
    # Not advertised: it lives for the whole test session and must not be found by agents of other
    # tests that look for a tracker on mDNS.
    tracker = peers_mod.start_tracker(base / "peers", advertise=False)
    agent = None
    try:
        agent = peers_mod.start_agent(base / "peers", KEY, "bench-board", f"127.0.0.1:{tracker.port}", base / "store")
        peers_mod.wait_registered(tracker.port, KEY)
        yield {"tracker": f"127.0.0.1:{tracker.port}", "tracker_port": tracker.port, "key": KEY, "agent": agent,
               "base": base}
    finally:
        if agent is not None:
            agent.stop()
        tracker.stop()


def tune_cli(tracker: str, key: str, log_dir: Path, trials: int, *extra: str, model: str = "tiny_cnn",
             timeout: float = 900):
    return run_cli([EDGETUNE, "tune", model, "--device", key, "--trials", str(trials), "--log", str(log_dir),
                    "--tracker", tracker, "--seed", "1", *extra], timeout=timeout)


@pytest.fixture(scope="module")
def warm_builder():
    """A warm one-worker builder for this machine's target, for tests that build candidates by hand."""
    from host.toolchain import toolchain_for
    from host.tuning.builder import WarmBuilder
    from tests.conftest import HOST_TARGET

    builder = WarmBuilder(toolchain_for(HOST_TARGET), max_workers=1)
    try:
        builder.warm_up()
        yield builder
    finally:
        builder.shutdown()


# The cold log's budget: tiny_cnn's first pass (2 trials for each of its 8 tasks, fewer for a task with
# fewer schedules), its small kernels' extra candidates, and search batches after them.
COLD_TRIALS = 32


@pytest.fixture(scope="session")
def cold_log(tuning_bed):
    """A finished COLD_TRIALS-trial session of tiny_cnn on the shared agent."""
    log_dir = tuning_bed["base"] / "cold-log"
    out = tune_cli(tuning_bed["tracker"], tuning_bed["key"], log_dir, COLD_TRIALS, "--json")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {"dir": log_dir, "events": events}
