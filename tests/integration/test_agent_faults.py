"""What a client can send the board agent's RPC port: bad options, slow handshakes, fuzzed bytes.

Each test runs a real tracker and a real agent process on 127.0.0.1 and speaks TVM's RPC handshake
(``[RPC_MAGIC, keylen, "client:<matchkey> [-timeout=S]"]``) over raw sockets. The match key is taken
from the tracker as a genuine client would, so a handshake can get past the key check and reach the
option parser. Afterwards the agent must still be alive and give a genuine client a working session.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time

import psutil
import pytest

from host.errors import EdgetuneError
from tests.peers import peer_env, wait_for, wait_registered

RPC_MAGIC = 0xFF271  # tvm.rpc.base.RPC_MAGIC; a literal so the module imports without TVM
RPC_CODE_SUCCESS = RPC_MAGIC
RPC_CODE_MISMATCH = RPC_MAGIC + 2
# Timing (in seconds) and sizes of these tests.
SLOW_BYTE_INTERVAL_SEC = 1.0  # the slowloris client sends one byte this often
SHORT_HANDSHAKE_SEC = 3.0  # the agent's whole-handshake deadline in the slowloris tests
GENUINE_SESSION_SEC = 8.0  # a genuine client must have a working session within this long
SHORT_SESSION_SEC = 3.0  # the agent's MAX_SESSION_SEC where a test checks that sessions end
FUZZ_CASES = 2000
FUZZ_BUDGET_SEC = 40.0  # the fuzz loop stops here even if FUZZ_CASES are not all sent
FUZZ_RSS_GROWTH_MB = 50.0
FUZZ_FD_GROWTH = 8  # open files of the agent: a leaked socket per case would show as hundreds


def start_bed(peers, key: str, **env: str):
    """A tracker and one agent of ``key`` registered with it; ``env`` overrides the agent's config."""
    tracker = peers.tracker(advertise=False)
    agent = peers.agent(key, f"board-{key}", f"127.0.0.1:{tracker.port}", advertise=False,
                        env=peer_env(**env))
    wait_registered(tracker.port, key)
    return tracker, agent


def take_matchkey(tracker_port: int, key: str, timeout: float = 30.0) -> tuple[str, int, str]:
    """Ask the tracker for a board of ``key`` as a genuine client does (the team key proven):
    (host, port, matchkey) of the board."""
    from host.tracker.client import request_board

    offer = request_board(("127.0.0.1", tracker_port), key, time.monotonic() + timeout)
    return offer.host, offer.port, offer.matchkey


def client_words(matchkey: str) -> str:
    """``client:<matchkey> -auth=<proof>``: a genuine client's key words (the test session's team key), so a
    handshake gets past the key and proof checks to the option parser."""
    from device_agent.auth import handshake_key, load_team_key, session_proof, workstation_key_path

    team = load_team_key(workstation_key_path())
    return "client:" + handshake_key(matchkey, session_proof(team, matchkey))


def handshake(words: bytes, keylen: int | None = None, magic: int = RPC_MAGIC) -> bytes:
    """The bytes of an RPC handshake carrying ``words`` (``keylen`` defaults to their length)."""
    return struct.pack("<ii", magic, len(words) if keylen is None else keylen) + words


def send_handshake(port: int, payload: bytes, reply_wait: float = 5.0, half_close: bool = False) -> int | None:
    """Send ``payload`` to the agent; the agent's 4-byte reply code, or None if it closed without one.

    ``half_close`` shuts our sending side after the payload, as a client that gives up would.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=reply_wait) as sock:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return None
                reply += chunk
        except OSError:  # reset, not connected (the agent closed it first), timed out
            return None
        return struct.unpack("<i", reply)[0]


def genuine_session(tracker_port: int, key: str, timeout: float = GENUINE_SESSION_SEC) -> float:
    """A session through the tracker, as `edgetune tune` gets one, used for a file round trip.

    Runs in a thread so that an agent which never answers fails the test instead of hanging it.
    Returns the seconds it took; raises AssertionError when it did not work within ``timeout``.
    """
    from host.tracker.client import request_session

    result: dict = {}

    def run() -> None:
        try:
            start = time.monotonic()
            session, _board = request_session(("127.0.0.1", tracker_port), key, 30, start + timeout)
            blob = bytearray(random.randbytes(4096))
            session.upload(blob, "fault-probe.bin")
            assert bytes(session.download("fault-probe.bin")) == bytes(blob)
            result["took"] = time.monotonic() - start
            del session  # closes the connection: the board is offered again
        except BaseException as err:  # noqa: BLE001 - reported by the caller
            result["error"] = err

    thread = threading.Thread(target=run, name="genuine-client", daemon=True)
    thread.start()
    thread.join(timeout + 2)
    if thread.is_alive():
        raise AssertionError(f"no working session within {timeout:g} s (the client is still waiting)")
    if "error" in result:
        raise AssertionError(f"the genuine client failed: {result['error']!r}") from result["error"]
    return result["took"]


def assert_agent_fine(agent) -> None:
    """Alive, and it never needed its last-resort handler (that would hide a bug behind "serving on")."""
    assert agent.alive(), f"the agent exited:\n{agent.log()[-4000:]}"
    log = agent.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]


# -- a) option values that must never crash the agent --------------------------------------------
BAD_TIMEOUTS = ["inf", "nan", "1e400", "-1", "0", "garbage", "-inf", ""]


@pytest.mark.parametrize("value", BAD_TIMEOUTS)
def test_bad_timeout_option_does_not_kill_the_agent(peers, value):
    tracker, agent = start_bed(peers, "optkey", EDGETUNE_UNMATCHED_KEY_SEC="1", EDGETUNE_TRACKER_PING_SEC="0.5",
                               EDGETUNE_MAX_SESSION_SEC=str(SHORT_SESSION_SEC))
    _host, port, matchkey = take_matchkey(tracker.port, "optkey")
    with socket.create_connection(("127.0.0.1", port), timeout=SHORT_SESSION_SEC + 5) as sock:
        sock.sendall(handshake(f"{client_words(matchkey)} -timeout={value}".encode()))
        code = struct.unpack("<i", recv_exact(sock, 4))[0]
        # Refused, or a session the board ends within its own limit (the value clamped to it).
        assert code in (RPC_CODE_SUCCESS, RPC_CODE_MISMATCH), hex(code)
        ended_after = None
        if code == RPC_CODE_SUCCESS:
            start = time.monotonic()
            while sock.recv(4096):  # the session: we send nothing, the board ends it at its deadline
                pass
            ended_after = time.monotonic() - start
    print(f"-timeout={value!r}: {'session' if code == RPC_CODE_SUCCESS else 'refused'}"
          + (f", ended by the board after {ended_after:.2f} s" if ended_after is not None else ""))
    if ended_after is not None:
        assert ended_after <= SHORT_SESSION_SEC + 2.0
    time.sleep(0.5)  # give a crash a moment to show
    assert_agent_fine(agent)
    took = genuine_session(tracker.port, "optkey", timeout=20)
    assert_agent_fine(agent)
    print(f"-timeout={value!r}: genuine session after {took:.2f} s")


def recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        if not chunk:
            raise AssertionError(f"the agent closed the connection after {len(data)} of {nbytes} bytes")
        data += chunk
    return data


# -- b) slowloris ------------------------------------------------------------------------------------
class SlowClient:
    """Opens a connection to the agent and sends one handshake byte every ``interval`` seconds.

    The handshake announces a long key, so it never completes; the client records when the agent
    closed the connection (``closed_after``: seconds since connect, or None while open).
    """

    def __init__(self, port: int, interval: float = SLOW_BYTE_INTERVAL_SEC, give_up: float = 30.0) -> None:
        self.payload = handshake(b"client:" + b"x" * 4000)
        self.interval = interval
        self.give_up = give_up
        self.sent = 0
        self.closed_after: float | None = None
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.connected_at = time.monotonic()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="slowloris", daemon=True)
        self.thread.start()

    def _closed(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and time.monotonic() - self.connected_at < self.give_up:
                try:
                    self.sock.sendall(self.payload[self.sent:self.sent + 1])
                    self.sent += 1
                except OSError:
                    self.closed_after = time.monotonic() - self.connected_at
                    return
                wake = time.monotonic() + self.interval
                while time.monotonic() < wake:
                    readable, _, _ = select.select([self.sock], [], [], max(wake - time.monotonic(), 0))
                    if readable and self._closed():
                        self.closed_after = time.monotonic() - self.connected_at
                        return
        finally:
            self.sock.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(self.interval + 2)


def test_slowloris_does_not_hold_the_board(peers):
    tracker, agent = start_bed(peers, "slowkey", EDGETUNE_HANDSHAKE_SEC=str(SHORT_HANDSHAKE_SEC))
    slow = SlowClient(agent.port)
    try:
        time.sleep(1.5)  # the slow client is mid-handshake now
        assert slow.closed_after is None and slow.sent >= 2
        took = genuine_session(tracker.port, "slowkey")
        slow.thread.join(SHORT_HANDSHAKE_SEC + 5)
    finally:
        slow.stop()
    print(f"genuine session while a slow client was connected: {took:.2f} s; slow client closed by the agent "
          f"after {slow.closed_after} s ({slow.sent} bytes sent, deadline {SHORT_HANDSHAKE_SEC:g} s)")
    assert took < GENUINE_SESSION_SEC
    assert slow.closed_after is not None, "the agent never closed the slow connection"
    assert SHORT_HANDSHAKE_SEC - 0.5 <= slow.closed_after <= SHORT_HANDSHAKE_SEC + 2.0
    assert_agent_fine(agent)


def test_handshakes_beyond_the_bound_are_closed_at_once(peers):
    bound = 3
    tracker, agent = start_bed(peers, "boundkey", EDGETUNE_HANDSHAKE_SEC=str(SHORT_HANDSHAKE_SEC),
                               EDGETUNE_MAX_PENDING_HANDSHAKES=str(bound))
    slow = []
    try:
        for _ in range(bound + 2):
            slow.append(SlowClient(agent.port))
            time.sleep(0.2)  # accepted in this order
        wait_for(lambda: all(s.closed_after is not None for s in slow), SHORT_HANDSHAKE_SEC + 5,
                 "the agent to close every slow connection")
    finally:
        for s in slow:
            s.stop()
    figures = [round(s.closed_after, 2) for s in slow]
    print(f"slow connections closed after (s): {figures}, bound {bound}, deadline {SHORT_HANDSHAKE_SEC:g} s")
    assert all(SHORT_HANDSHAKE_SEC - 0.5 <= t <= SHORT_HANDSHAKE_SEC + 2.0 for t in figures[:bound]), figures
    assert all(t < 1.0 for t in figures[bound:]), figures
    assert_agent_fine(agent)
    genuine_session(tracker.port, "boundkey")


# -- c) handshake fuzz ------------------------------------------------------------------------------
TIMEOUT_VALUES = ["inf", "-inf", "nan", "NaN", "1e400", "-1e400", "-1", "0", "-0", "0.0", "1e-300", "5e-324",
                  "1e308", "600", "600.0000001", "1", "2.5", "0x10", "1_000", "\u0661\u0662", "", " ", "=",
                  "1e", "e5", "+3", ".5", "5.", "1" * 400, "\x00", "\ud800"]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a byte
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:  # delete a span
            del data[pos:pos + rng.randint(1, 8)]
        else:  # insert a separator or an invalid UTF-8 byte
            data[pos:pos] = rng.choice([b" ", b"\t", b"\n", b"\x00", b"\xff", b"\xc3", b":", b"-timeout="])
    return bytes(data)


def _options(rng: random.Random) -> bytes:
    words = []
    for _ in range(rng.randint(0, 3)):
        kind = rng.randrange(3)
        if kind == 0:
            words.append("-timeout=" + rng.choice(TIMEOUT_VALUES))
        elif kind == 1:
            words.append("-timeout=" + repr(rng.uniform(-1e6, 1e6)))
        else:
            words.append("-" + rng.choice(["key", "x", "timeout", "", "="]) + "=" + rng.choice(TIMEOUT_VALUES))
    return (" " + " ".join(words)).encode("utf-8", "surrogatepass") if words else b""


def fuzz_case(rng: random.Random, key_words: bytes) -> tuple[str, bytes]:
    """One random or mutated handshake: (kind, bytes)."""
    kind = rng.choice(["random", "truncated", "wrong-magic", "keylen", "mutated-key", "options"])
    if kind == "random":
        return kind, rng.randbytes(rng.randint(0, 64))
    if kind == "truncated":
        full = handshake(key_words + _options(rng))
        return kind, full[:rng.randrange(len(full))]
    if kind == "wrong-magic":
        return kind, handshake(key_words, magic=rng.choice([0, -1, RPC_MAGIC + 1, RPC_MAGIC - 1, 0x2F271,
                                                            rng.randint(-2**31, 2**31 - 1)]))
    if kind == "keylen":
        keylen = rng.choice([0, -1, -2**31, 2**31 - 1, 4095, 4096, 65536, 1 << 30, rng.randint(-2**31, 2**31 - 1)])
        return kind, handshake(key_words[:rng.randint(0, len(key_words))], keylen=keylen)
    if kind == "mutated-key":
        return kind, handshake(_mutate(rng, key_words + _options(rng)))
    return kind, handshake(key_words + _options(rng))  # the right key with fuzzed options


def agent_usage(agent) -> tuple[float, int]:
    """Resident memory (MB) and open files of the agent process and all its children."""
    proc = psutil.Process(agent.pid)
    rss = fds = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.Error:
            pass
    return rss / 2**20, fds


def test_handshake_fuzz(peers):
    tracker, agent = start_bed(peers, "fuzzkey", EDGETUNE_HANDSHAKE_SEC="2", EDGETUNE_UNMATCHED_KEY_SEC="1",
                               EDGETUNE_TRACKER_PING_SEC="0.5")
    genuine_session(tracker.port, "fuzzkey", timeout=20)  # warm: the session code is imported now
    time.sleep(1.0)
    rss_before, fds_before = agent_usage(agent)
    rng = random.Random(20261202)
    _host, port, matchkey = take_matchkey(tracker.port, "fuzzkey")
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    replies = {"success": 0, "refused": 0, "closed": 0}
    start = time.monotonic()
    sent = 0
    while sent < FUZZ_CASES and time.monotonic() - start < FUZZ_BUDGET_SEC:
        case_start = time.monotonic()
        kind, payload = fuzz_case(rng, client_words(matchkey).encode())
        code = send_handshake(port, payload, reply_wait=5.0, half_close=True)
        replies["closed" if code is None else "success" if code == RPC_CODE_SUCCESS else "refused"] += 1
        sent += 1
        if kind == "options":
            # The right key was used: the board offers itself again under a new one (after a session,
            # or at once when the options were refused); take it so later cases reach the parser too.
            try:
                _host, port, matchkey = take_matchkey(tracker.port, "fuzzkey", timeout=5)
            except (OSError, AssertionError, ValueError, EdgetuneError):
                pass
        counts[kind] = counts.get(kind, 0) + 1
        seconds[kind] = seconds.get(kind, 0.0) + time.monotonic() - case_start
        if not agent.alive():
            break
    took = time.monotonic() - start
    assert_agent_fine(agent)
    time.sleep(1.0)
    rss_after, fds_after = agent_usage(agent)
    session_took = genuine_session(tracker.port, "fuzzkey", timeout=20)
    per_kind = ", ".join(f"{k} {counts[k]} ({seconds[k]:.1f} s)" for k in sorted(counts))
    print(f"fuzz: {sent} handshakes in {took:.1f} s: {per_kind}; answers {replies}; agent RSS {rss_before:.1f} MB "
          f"before, {rss_after:.1f} MB after ({rss_after - rss_before:+.1f} MB); open files {fds_before} before, "
          f"{fds_after} after; genuine session afterwards in {session_took:.2f} s")
    assert sent >= min(FUZZ_CASES, 500), sent
    assert rss_after - rss_before < FUZZ_RSS_GROWTH_MB
    assert fds_after - fds_before < FUZZ_FD_GROWTH
    assert_agent_fine(agent)
