"""Fixtures shared by every test: real peers on loopback, cleaned up by PID in ``finally``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# mDNS on loopback only (multicast works there), so tests never touch the LAN.
os.environ.setdefault("EDGETUNE_MDNS_INTERFACES", "127.0.0.1")
os.environ.pop("EDGETUNE_TRACKER", None)
# Sessions in tests start cold and leave no records behind: no schedule store unless a test names one.
os.environ["EDGETUNE_SCHEDULES"] = "off"

# The target this machine's own probe proposes: a fixed CPU (it was znver4) runs candidates with
# instructions that another CI machine (znver3, no AVX-512) does not have.
from device_agent.probe import read_profile  # noqa: E402

HOST_TARGET = read_profile().target


def matmul_workload():
    """A 64x64 float32 matmul as a one-function IRModule: a small real workload for MetaSchedule tests."""
    import tvm
    from tvm import te

    a = te.placeholder((64, 64), "float32", name="A")
    b = te.placeholder((64, 64), "float32", name="B")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((64, 64), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")})


@pytest.fixture(scope="session", autouse=True)
def team_key(tmp_path_factory):
    """One team key for the whole test session, as a set-up following the README has: every tracker, agent
    and host command a test starts (they inherit this environment) and the host code tests call in-process
    hold it. A test that needs a stranger starts it with another key or none."""
    from device_agent.auth import OPEN_ENV, TEAM_KEY_ENV, create_team_key

    saved = {name: os.environ.get(name) for name in (TEAM_KEY_ENV, OPEN_ENV)}
    key = create_team_key(tmp_path_factory.mktemp("team") / "team.key")
    os.environ[TEAM_KEY_ENV] = str(key.path)
    os.environ.pop(OPEN_ENV, None)
    try:
        yield key
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def peers(tmp_path):
    """Start peers through this list; all are stopped (with their children) at the end."""
    from tests import peers as peers_mod

    started: list = []

    class Peers:
        log_dir = tmp_path / "peers"

        def tracker(self, **kw):
            peer = peers_mod.start_tracker(self.log_dir, **kw)
            started.append(peer)
            return peer

        def agent(self, key, name, tracker, **kw):
            store = kw.pop("store", tmp_path / f"store-{name}")
            peer = peers_mod.start_agent(self.log_dir, key, name, tracker, store, **kw)
            started.append(peer)
            return peer

        def stock_server(self, key, tracker, **kw):
            peer = peers_mod.start_stock_server(self.log_dir, key, tracker, **kw)
            started.append(peer)
            return peer

    try:
        yield Peers()
    finally:
        for peer in reversed(started):
            peer.stop()


@pytest.fixture(scope="session")
def host_target():
    """The TVM target this machine's own probe proposes (the host CPU as a board)."""
    from device_agent.probe import read_profile

    return read_profile().target
