"""Only the team's hosts run code on a board, and the tracker obeys only the team (the team key).

Each test runs real trackers and agents as processes on 127.0.0.1 and attacks them as a stranger on the
LAN would: with TVM's own protocol over raw sockets, TVM's stock client, a host holding another team's
key, a replayed handshake, and a rogue tracker advertised on mDNS (python-zeroconf on loopback). The
test session's team key (tests/conftest.py ``team_key``) is what the genuine host and boards hold.
"""

from __future__ import annotations

import json
import random
import secrets
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from device_agent.auth import TeamKey, direct_token, handshake_key, session_proof
from host.tracker.client import (BoardUnavailable, TrackerNotTrusted, connect_board, connect_board_direct,
                                 find_tracker_by_mdns, request_board, tracker_summary)
from tests.integration.conftest import tune_cli
from tests.peers import free_port, spawn, wait_for, wait_registered

RPC_MAGIC = 0xFF271  # tvm.rpc.base.RPC_MAGIC
RPC_CODE_SUCCESS = RPC_MAGIC
RPC_CODE_MISMATCH = RPC_MAGIC + 2
TRACKER_MAGIC = 0x2F271  # tvm.rpc.base.RPC_TRACKER_MAGIC
# tvm.rpc.base.TrackerCode
FAIL, SUCCESS, STOP, PUT, REQUEST, UPDATE_INFO, SUMMARY = -1, 0, 2, 3, 4, 5, 6
# Seconds: one answer from a local peer, a session's time limit, waiting for logs and registrations.
ANSWER_SEC = 10.0
SESSION_SEC = 30.0
LOG_WAIT_SEC = 30.0
REGISTER_SEC = 60.0
MDNS_SEC = 5.0  # a host looking for a tracker on mDNS


def other_team() -> TeamKey:
    """A key of another team: a host or tracker holding it is a stranger here."""
    return TeamKey(secrets.token_bytes(32), Path("other-team.key"))


def start_bed(peers, key: str):
    tracker = peers.tracker(advertise=False)
    agent = peers.agent(key, f"board-{key}", f"127.0.0.1:{tracker.port}", advertise=False)
    wait_registered(tracker.port, key)
    return tracker, agent


def stranger_call(port: int, *messages: list) -> list[object]:
    """Send ``messages`` on one tracker connection without proving the team key, as any TVM client does.
    The answers; None for each one after the tracker closed the connection."""
    from tvm.rpc import base

    answers: list[object] = []
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_SEC) as sock:
        sock.sendall(struct.pack("<i", TRACKER_MAGIC))
        assert struct.unpack("<i", base.recvall(sock, 4))[0] == TRACKER_MAGIC
        for message in messages:
            try:
                base.sendjson(sock, message)
                answers.append(base.recvjson(sock))
            except (OSError, ValueError, struct.error):
                answers.append(None)
    return answers


def handshake_code(port: int, words: str) -> int | None:
    """Send an RPC handshake with ``words`` to the board; its answer code (None if it closed without one).
    The connection is closed right after: a session it opened ends at once."""
    payload = struct.pack("<ii", RPC_MAGIC, len(words.encode())) + words.encode()
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_SEC) as sock:
        sock.sendall(payload)
        reply = b""
        try:
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return None
                reply += chunk
        except OSError:
            return None
    return struct.unpack("<i", reply)[0]


def round_trip(session) -> None:
    """Use a session: upload a file and read it back."""
    blob = random.randbytes(4096)
    session.upload(bytearray(blob), "team-probe.bin")
    assert bytes(session.download("team-probe.bin")) == blob


def in_thread(fn, timeout: float):
    """``fn()`` in a thread, so a peer that never answers fails the test instead of hanging it."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"no answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_a_client_without_the_key_gets_no_session_through_the_tracker(peers, team_key):
    tracker, agent = start_bed(peers, "lockkey")
    addr = ("127.0.0.1", tracker.port)

    # A stock TVM client asks the tracker for the board: refused, and the connection closed.
    assert stranger_call(tracker.port, [REQUEST, "lockkey", "stranger", 1], [SUMMARY]) == [FAIL, None]
    # A host of another team: the tracker cannot prove that key, and the host says so.
    with pytest.raises(TrackerNotTrusted, match="does not hold this team's key"):
        request_board(addr, "lockkey", time.monotonic() + ANSWER_SEC, team=other_team())

    # Even with the board's match key in hand (sniffed, say), no proof or another team's proof gets no session.
    offer = request_board(addr, "lockkey", time.monotonic() + ANSWER_SEC)
    assert handshake_code(offer.port, f"client:{offer.matchkey}") == RPC_CODE_MISMATCH
    forged = handshake_key(offer.matchkey, session_proof(other_team(), offer.matchkey))
    assert handshake_code(offer.port, f"client:{forged}") == RPC_CODE_MISMATCH
    wait_for(lambda: "no proof of the team key" in agent.log() and "a wrong proof of the team key" in agent.log(),
             LOG_WAIT_SEC, "the agent to log both refusals")
    assert "session 1 from" not in agent.log()
    wait_for(lambda: "refused REQUEST from 127.0.0.1" in tracker.log(), LOG_WAIT_SEC, "the tracker to log the refusal")

    # The host the tracker gave the match key to still gets its session with it.
    opened = connect_board(offer.host, offer.port, offer.matchkey, SESSION_SEC,
                           proof=session_proof(team_key, offer.matchkey))
    try:
        round_trip(opened.session)
    finally:
        opened.close()
    print("through the tracker: stranger REQUEST refused, no-proof and forged handshakes refused, genuine session ok")


def test_a_client_without_the_key_gets_no_session_straight_to_the_board(peers):
    # No tracker where the agent looks: it serves straight, as to a host that found it on mDNS.
    agent = peers.agent("directkey", "board-direct", f"127.0.0.1:{free_port()}", advertise=False)
    wait_for(lambda: "not reachable" in agent.log(), LOG_WAIT_SEC, "the agent to find no tracker")

    # A stock TVM client with the device key (it is in the board's mDNS record): refused.
    with pytest.raises(BoardUnavailable):
        in_thread(lambda: connect_board("127.0.0.1", agent.port, "directkey", SESSION_SEC), ANSWER_SEC * 3)
    # A host of another team: its token does not prove this team's key.
    with pytest.raises(BoardUnavailable):
        in_thread(lambda: connect_board_direct("127.0.0.1", agent.port, "directkey", SESSION_SEC, key=other_team()),
                  ANSWER_SEC * 3)
    wait_for(lambda: "no proof of the team key" in agent.log() and "a wrong proof of the team key" in agent.log(),
             LOG_WAIT_SEC, "the agent to log both refusals")

    # The team's host gets its session.
    opened = in_thread(lambda: connect_board_direct("127.0.0.1", agent.port, "directkey", SESSION_SEC),
                       ANSWER_SEC * 3)
    try:
        round_trip(opened.session)
    finally:
        opened.close()
    assert agent.alive()


def test_a_replayed_handshake_is_refused(peers, team_key):
    # Straight to the board: a token seen on the network, sent again.
    agent = peers.agent("replaykey", "board-replay", f"127.0.0.1:{free_port()}", advertise=False)
    wait_for(lambda: "not reachable" in agent.log(), LOG_WAIT_SEC, "the agent to find no tracker")
    words = "client:" + handshake_key("replaykey", direct_token(team_key, "replaykey"))
    assert handshake_code(agent.port, words) == RPC_CODE_SUCCESS
    wait_for(lambda: "session 1 from" in agent.log(), LOG_WAIT_SEC, "the first session to end")
    assert handshake_code(agent.port, words) == RPC_CODE_MISMATCH
    # A token from outside the window (an old capture) is refused as well.
    stale = direct_token(team_key, "replaykey", now=time.time() - 3600)
    assert handshake_code(agent.port, "client:" + handshake_key("replaykey", stale)) == RPC_CODE_MISMATCH
    wait_for(lambda: "a replayed direct-session token" in agent.log() and "outside the" in agent.log(),
             LOG_WAIT_SEC, "the agent to log the replay and the stale token")

    # Through a tracker: the proof is for one match key, which the board renews after the session.
    tracker = peers.tracker(advertise=False)
    agent2 = peers.agent("replaykey2", "board-replay2", f"127.0.0.1:{tracker.port}", advertise=False)
    wait_registered(tracker.port, "replaykey2")
    offer = request_board(("127.0.0.1", tracker.port), "replaykey2", time.monotonic() + ANSWER_SEC)
    words = "client:" + handshake_key(offer.matchkey, session_proof(team_key, offer.matchkey))
    assert handshake_code(offer.port, words) == RPC_CODE_SUCCESS
    wait_for(lambda: "session 1 from" in agent2.log(), LOG_WAIT_SEC, "the first session to end")
    assert handshake_code(offer.port, words) == RPC_CODE_MISMATCH
    assert "session 2 from" not in agent2.log()
    assert agent.alive() and agent2.alive()


def test_stop_from_an_unauthenticated_client_leaves_the_tracker_running(peers, team_key):
    from device_agent.auth import authenticate_to_tracker
    from tvm.rpc import base

    tracker, _agent = start_bed(peers, "stopkey")
    # TVM's tracker stops for STOP with its stop key; edgetune's was a constant, "edgetune-tracker".
    for stop_key in ("edgetune-tracker", "", None):
        assert stranger_call(tracker.port, [STOP, stop_key])[0] in (FAIL, None)
    time.sleep(1.0)
    assert tracker.alive(), tracker.log()[-2000:]
    assert len(wait_registered(tracker.port, "stopkey")) == 1  # it still serves, the board still registered
    assert "refused STOP from 127.0.0.1" in tracker.log()

    # A connection that proved the team key may stop it.
    with socket.create_connection(("127.0.0.1", tracker.port), timeout=ANSWER_SEC) as sock:
        sock.sendall(struct.pack("<i", TRACKER_MAGIC))
        assert struct.unpack("<i", base.recvall(sock, 4))[0] == TRACKER_MAGIC

        def call(message):
            base.sendjson(sock, message)
            return base.recvjson(sock)

        authenticate_to_tracker(team_key, call)
        assert call([STOP, None]) == SUCCESS
    wait_for(lambda: not tracker.alive(), ANSWER_SEC, "the tracker to stop on a proven STOP")


def test_a_put_from_an_unauthenticated_connection_registers_nothing(peers):
    tracker = peers.tracker(advertise=False, args=("--allow-plain-key", "phone"))
    fake_port = free_port()
    info = {"key": "server:fakekey", "addr": ["127.0.0.1", fake_port]}
    answers = stranger_call(tracker.port, [UPDATE_INFO, info], [PUT, "fakekey", [fake_port, "fakekey:123"], None])
    assert answers == [FAIL, None]
    # PUT first, without the info: refused too; a plain key admits its own key only.
    assert stranger_call(tracker.port, [PUT, "fakekey", [fake_port, "fakekey:456"], None]) == [FAIL]
    answers = stranger_call(tracker.port, [UPDATE_INFO, {"key": "server:phone", "addr": [None, fake_port]}],
                            [PUT, "fakekey", [fake_port, "fakekey:789"], None])
    assert answers == [SUCCESS, FAIL]
    summary = tracker_summary(("127.0.0.1", tracker.port))
    text = json.dumps(summary)
    print(f"summary after the fake registrations: {text}")
    assert "fakekey" not in text
    assert "refused UPDATE_INFO from 127.0.0.1" in tracker.log() and "refused PUT from 127.0.0.1" in tracker.log()
    assert "warning: --allow-plain-key phone" in tracker.log()


ROGUE_NAME = "rogue tracker"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def advertise_tracker(port: int):
    """Advertise a tracker at 127.0.0.1:``port`` on mDNS, as anyone on the LAN can. Returns the Zeroconf
    instance (close it to withdraw the advertisement)."""
    from zeroconf import IPVersion, ServiceInfo, Zeroconf

    from device_agent.schema import TRACKER_SERVICE

    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    info = ServiceInfo(TRACKER_SERVICE, f"{ROGUE_NAME} {port}.{TRACKER_SERVICE}",
                       addresses=[socket.inet_aton("127.0.0.1")], port=port, properties={"by": "edgetune"},
                       server=f"rogue-{port}.local.")
    zc.register_service(info)
    return zc


def test_an_agent_skips_a_rogue_tracker_on_mdns_and_registers_with_the_genuine_one(peers, tmp_path):
    import sys

    # The rogue: TVM's own tracker (it holds no team key), advertised as _tvm-tracker._tcp.
    port = free_port()
    rogue = spawn("rogue-tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                    "--port", str(port), "--port-end", str(port + 1)], tmp_path / "rogue")
    zc = None
    try:
        wait_for(lambda: port_open(port) or not rogue.alive(), REGISTER_SEC, "the rogue tracker to listen")
        assert rogue.alive(), rogue.log()
        zc = advertise_tracker(port)
        agent = peers.agent("roguekey", "board-rogue", None)  # finds trackers on mDNS
        wait_for(lambda: f"tracker 127.0.0.1:{port} does not hold this team's key" in agent.log(), REGISTER_SEC,
                 "the agent to skip the rogue tracker")
        # A host looking for a tracker on mDNS skips it too; named directly, it is refused with the reason.
        with pytest.raises(TrackerNotTrusted, match="no tracker on mDNS holds this team's key"):
            find_tracker_by_mdns(MDNS_SEC)
        with pytest.raises(TrackerNotTrusted, match=f"tracker at 127.0.0.1:{port} does not hold this team's key"):
            tracker_summary(("127.0.0.1", port))

        genuine = peers.tracker()  # advertised on mDNS too
        wait_registered(genuine.port, "roguekey", timeout=REGISTER_SEC)
        wait_for(lambda: f"registered with tracker 127.0.0.1:{genuine.port}" in agent.log(), LOG_WAIT_SEC,
                 "the agent to report the genuine tracker")
        assert f"registered with tracker 127.0.0.1:{port}" not in agent.log()
        assert find_tracker_by_mdns(MDNS_SEC) == ("127.0.0.1", genuine.port)
        # The rogue never heard of the board.
        rogue_view = stranger_call(port, [SUMMARY])[0]
        print(f"rogue tracker's summary: {rogue_view}")
        assert rogue_view[0] == SUCCESS and "roguekey" not in json.dumps(rogue_view[1])
    finally:
        if zc is not None:
            zc.close()
        rogue.stop()


def test_open_mode_accepts_a_stock_tvm_client_and_warns(peers):
    from tvm import rpc

    tracker = peers.tracker(advertise=False, args=("--open",))
    agent = peers.agent("openkey", "board-open", f"127.0.0.1:{tracker.port}", args=("--open",))
    wait_registered(tracker.port, "openkey")
    assert "warning: open mode (--open)" in tracker.log()
    wait_for(lambda: "warning: open mode (--open): anyone on the network can run code on this board" in agent.log(),
             LOG_WAIT_SEC, "the agent to warn about open mode")

    def stock_session() -> None:
        session = rpc.connect_tracker("127.0.0.1", tracker.port).request("openkey", session_timeout=SESSION_SEC)
        round_trip(session)

    in_thread(stock_session, SESSION_SEC)
    wait_for(lambda: "session 1 from" in agent.log(), LOG_WAIT_SEC, "the stock client's session to end")
    # STOP still needs the key.
    assert stranger_call(tracker.port, [STOP, "edgetune-tracker"])[0] in (FAIL, None)
    assert tracker.alive()
    # The board says on mDNS that it is open.
    from host.discovery.browse import find_boards

    boards = [b for b in find_boards(3.0)[0] if b.key == "openkey" and b.record is not None]
    assert boards and boards[0].record.extra.get("auth") == "open", boards


def test_after_the_attacks_a_genuine_host_tunes(peers, tmp_path, host_target):
    tracker, agent = start_bed(peers, "tunekey")
    # A stranger tries everything: a fake board, a request, a stop, a handshake without proof.
    stranger_call(tracker.port, [UPDATE_INFO, {"key": "server:tunekey", "addr": ["127.0.0.1", free_port()]}])
    stranger_call(tracker.port, [PUT, "tunekey", [free_port(), "tunekey:1"], None])
    stranger_call(tracker.port, [REQUEST, "tunekey", "stranger", 1])
    stranger_call(tracker.port, [STOP, "edgetune-tracker"])
    assert handshake_code(agent.port, "client:tunekey") == RPC_CODE_MISMATCH
    assert len(wait_registered(tracker.port, "tunekey")) == 1

    out = tune_cli(f"127.0.0.1:{tracker.port}", "tunekey", tmp_path / "log", 8, "--json",
                   "--target", json.dumps(host_target))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    session = json.loads((tmp_path / "log" / "session.json").read_text())
    assert list(session["measured_by"]) == [f"127.0.0.1:{agent.port}"]
    assert sum(session["measured_by"].values()) >= 1
    assert tracker.alive() and agent.alive()
