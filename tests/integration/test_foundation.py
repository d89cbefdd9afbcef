"""The foundation with real peers: tracker and agents as processes on 127.0.0.1, mDNS on loopback."""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np

from tests.peers import AGENT, EDGETUNE, free_port, run_cli, tracker_servers, wait_for, wait_registered


def devices(tracker_port: int | None, timeout: float = 3.0) -> dict:
    argv = [EDGETUNE, "devices", "--json", "--timeout", str(timeout)]
    if tracker_port:
        argv += ["--tracker", f"127.0.0.1:{tracker_port}"]
    out = run_cli(argv, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_two_agents_listed_by_devices_and_stock_query(peers, host_target):
    tracker = peers.tracker(args=("--open",))  # TVM's own query_rpc_tracker below holds no team key
    addr = f"127.0.0.1:{tracker.port}"
    # A key of its own: the session-wide tuning agent of other tests also serves "x86host".
    a = peers.agent("dual", "board-a", addr)
    b = peers.agent("dual", "board-b", addr)
    wait_registered(tracker.port, "dual", count=2, timeout=60)

    # mDNS answers can take a moment after registration: poll, as a user would re-run the command.
    def both_listed():
        rows = {r["name"]: r for r in devices(tracker.port)["boards"] if r["key"] == "dual"}
        return rows if set(rows) == {"board-a", "board-b"} else None

    boards = wait_for(both_listed, 30, "both agents in `edgetune devices`", interval=0.5)
    for row, peer in ((boards["board-a"], a), (boards["board-b"], b)):
        assert row["agent"] is True
        assert row["status"] == "free"
        assert row["rpc_port"] == peer.port
        assert row["addresses"] == ["127.0.0.1"]
        assert row["arch"] == "x86_64"
        assert row["target"] == host_target
        assert row["cores"] == host_target["num-cores"]
        assert "avx2" in row["features"]
        assert re.fullmatch(r"[0-9a-f]{32}", row["board_id"])
        assert row["tvm_version"].startswith("0.27")
    assert boards["board-a"]["board_id"] != boards["board-b"]["board_id"]

    stock = run_cli([sys.executable, "-m", "tvm.exec.query_rpc_tracker", "--host", "127.0.0.1",
                     "--port", str(tracker.port)], timeout=60)
    assert stock.returncode == 0, stock.stderr
    assert re.search(r"dual\s+2\s+2\s+0", stock.stdout), stock.stdout  # total, free, pending


def test_board_id_survives_restart(peers, tmp_path):
    tracker = peers.tracker()
    addr = f"127.0.0.1:{tracker.port}"
    store = tmp_path / "store-same"
    first = peers.agent("idkey", "board-id", addr, store=store)
    wait_registered(tracker.port, "idkey")
    before = {r["name"]: r for r in devices(tracker.port)["boards"]}["board-id"]["board_id"]
    first.stop()
    wait_for(lambda: not tracker_servers(tracker.port, "idkey"), 30, "the old agent to leave the tracker")
    peers.agent("idkey", "board-id", addr, store=store)
    wait_registered(tracker.port, "idkey")
    rows = [r for r in devices(tracker.port)["boards"] if r["key"] == "idkey"]
    assert len(rows) == 1 and rows[0]["board_id"] == before


def test_agent_reregisters_after_tracker_restart(peers):
    tracker = peers.tracker(advertise=False)
    port = tracker.port
    agent = peers.agent("rekey", "board-r", f"127.0.0.1:{port}", advertise=False)
    wait_registered(port, "rekey")
    # The tracker lists the board as soon as its info arrives, a moment before the agent's offer is
    # acknowledged: kill the tracker only once the agent has finished registering.
    wait_for(lambda: "registered with tracker" in agent.log(), 30, "the first registration in the log")
    tracker.kill()
    assert not tracker_servers(port, "rekey")
    restarted = peers.tracker(port=port, advertise=False, name="tracker-2")
    start = time.monotonic()
    wait_registered(restarted.port, "rekey", timeout=15)
    took = time.monotonic() - start
    assert took < 15
    assert agent.alive()
    try:
        wait_for(lambda: agent.log().count("registered with tracker") >= 2, 30, "the second registration in the log")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n--- agent log ---\n{agent.log()}\n--- tracker log ---\n{restarted.log()}") from None


def test_agent_without_tracker_finds_it_by_mdns(peers):
    agent = peers.agent("mdnskey", "board-m", None)  # starts before any tracker exists
    wait_for(lambda: "waiting for a tracker on mDNS" in agent.log(), 30, "the agent to say it is waiting")
    tracker = peers.tracker()  # advertised as _tvm-tracker._tcp on loopback
    wait_registered(tracker.port, "mdnskey", timeout=30)
    wait_for(lambda: f"registered with tracker 127.0.0.1:{tracker.port}" in agent.log(), 10,
             "the agent to report the tracker it found")


def test_stock_tvm_server_listed_as_plain_board(peers):
    tracker = peers.tracker(args=("--allow-plain-key", "phone"))  # a stock server holds no team key
    stock = peers.stock_server("phone", f"127.0.0.1:{tracker.port}")
    wait_registered(tracker.port, "phone", timeout=60)
    rows = [r for r in devices(tracker.port)["boards"] if r["key"] == "phone"]
    assert len(rows) == 1
    assert rows[0]["agent"] is False
    assert rows[0]["status"] == "free"
    assert rows[0]["rpc_port"] == stock.port


def test_rpc_session_through_tracker_runs_compiled_function(peers, host_target, tmp_path):
    import tvm
    from tvm import te

    from host.tracker.client import request_session

    tracker = peers.tracker()
    peers.agent("runkey", "board-run", f"127.0.0.1:{tracker.port}")
    wait_registered(tracker.port, "runkey")

    n = 64
    a = te.placeholder((n,), name="a")
    b = te.compute((n,), lambda i: a[i] * 2.0 + 1.0, name="b")
    lib = tvm.compile(te.create_prim_func([a, b]).with_attr("global_symbol", "affine"), target=host_target)
    path = tmp_path / "affine.so"
    lib.export_library(str(path))

    session, board = request_session(("127.0.0.1", tracker.port), "runkey", 30, time.monotonic() + 30)
    session.upload(str(path))
    remote = session.load_module("affine.so")
    dev = session.cpu()
    x = np.arange(n, dtype="float32")
    a_nd = tvm.runtime.tensor(x, dev)
    b_nd = tvm.runtime.tensor(np.zeros(n, dtype="float32"), dev)
    remote["affine"](a_nd, b_nd)
    np.testing.assert_allclose(b_nd.numpy(), x * 2 + 1)
    assert board.startswith("127.0.0.1:")


def test_bad_inputs_are_one_line_errors(tmp_path):
    cases = [
        ([AGENT, "serve", "--key", "a:b", "--port", "0", "--store", str(tmp_path)], "contains ':'"),
        ([EDGETUNE, "devices", "--tracker", f"127.0.0.1:{free_port()}"], "does not answer"),
        ([EDGETUNE, "devices", "--tracker", "no-port-here"], "is not HOST:PORT"),
    ]
    for argv, expected in cases:
        out = run_cli(argv, timeout=60)
        assert out.returncode != 0, argv
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0], out.stderr
        assert "Traceback" not in out.stderr

    # a port that is taken
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = run_cli([AGENT, "serve", "--key", "k", "--host", "127.0.0.1", "--port", str(port),
                       "--tracker", "127.0.0.1:9", "--no-advertise", "--store", str(tmp_path)], timeout=60)
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in out.stderr
    assert "Traceback" not in out.stderr

    # no interface that can do multicast (the configured interface does not exist here)
    from tests.peers import peer_env

    out = run_cli([AGENT, "serve", "--key", "k", "--port", "0", "--store", str(tmp_path)], timeout=60,
                  env=peer_env(EDGETUNE_MDNS_INTERFACES="10.254.254.254"))
    assert out.returncode == 1 and "no network interface with multicast" in out.stderr
    assert "Traceback" not in out.stderr

    # with -v the traceback is there
    out = run_cli([AGENT, "-v", "serve", "--key", "a:b", "--port", "0", "--store", str(tmp_path)], timeout=60)
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_the_board_runs_kernels_on_as_many_threads_as_they_were_compiled_for(peers):
    """TVM's runtime, left alone, takes half the hardware threads of an x86-64 CPU (it guesses that half are
    hyper-threads): on a 2-core board without them the tuned model ran on one core while ONNX Runtime used
    both. The agent's sessions run on the ``num-cores`` of the board's target."""
    from device_agent import probe
    from host.tracker.client import request_session

    cores = int(probe.read_profile().target["num-cores"])
    tracker = peers.tracker()
    agent = peers.agent("threadkey", "board-threads", f"127.0.0.1:{tracker.port}")
    wait_registered(tracker.port, "threadkey")
    session, _ = request_session(("127.0.0.1", tracker.port), "threadkey", 30, time.monotonic() + 30)
    assert session.get_function("runtime.NumThreads")() == cores
    assert f"x{cores}, {cores} runtime threads" in agent.log()
