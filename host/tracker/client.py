"""Talking to a tracker and to boards with a deadline on every wait (TVM's ``TrackerSession`` and
its RPC client have none), proving the team key to both (:mod:`device_agent.auth`): every tracker
connection starts with the mutual proof, and a tracker that cannot prove the key is refused; every
RPC handshake carries ``-auth=`` (a proof for the tracker's match key, or a direct-session token)."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from device_agent.auth import (AuthRefused, TeamKey, authenticate_to_tracker, direct_token, handshake_key,
                               session_proof)
from device_agent.schema import TRACKER_SERVICE

from .. import config
from ..errors import EdgetuneError, NoBoardError, TrackerUnreachable
from ..util import parse_hostport
from .teamkey import team_key

logger = logging.getLogger(__name__)

TrackerAddr = tuple[str, int]


def _base():
    from tvm.rpc import base

    return base


class TrackerNotTrusted(TrackerUnreachable):
    """The tracker did not prove the team key (another team's tracker, TVM's own, or an impostor)."""


def _connect(addr: TrackerAddr, timeout: float, key: TeamKey | None = None) -> socket.socket:
    """A tracker connection on which both sides proved the team key (``key``, default the workstation's).

    Raises :class:`TrackerUnreachable`, :class:`TrackerNotTrusted`, or :class:`EdgetuneError` when this
    machine has no team key.
    """
    base = _base()
    key = team_key() if key is None else key
    try:
        sock = socket.create_connection(addr, timeout=timeout)
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except OSError as err:
        raise TrackerUnreachable(
            f"tracker {addr[0]}:{addr[1]} does not answer ({err.strerror or err}): start it with "
            "`edgetune tracker`, check the address, or open the port in the firewall"
        ) from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise TrackerUnreachable(f"{addr[0]}:{addr[1]} is not a TVM RPC tracker: check --tracker")

    def call(message: list) -> object:
        base.sendjson(sock, message)
        return base.recvjson(sock)

    try:
        authenticate_to_tracker(key, call)
    except AuthRefused as err:
        sock.close()
        raise TrackerNotTrusted(
            f"tracker at {addr[0]}:{addr[1]} does not hold this team's key: {err}; run `edgetune tracker` with "
            f"the key in {key.path} (fingerprint {key.fingerprint}) there, or pass --tracker with your team's tracker"
        ) from None
    except OSError as err:  # a timeout: the tracker is slow or gone
        sock.close()
        raise TrackerUnreachable(f"tracker {addr[0]}:{addr[1]} stopped answering ({err or 'timed out'}): is it "
                                 "running?") from None
    return sock


def tracker_summary(addr: TrackerAddr, timeout: float | None = None) -> dict[str, Any]:
    """The tracker's summary (``queue_info`` and ``server_info``). Raises :class:`TrackerUnreachable`."""
    base = _base()
    timeout = config.TRACKER_CONNECT_SEC if timeout is None else timeout
    sock = _connect(addr, timeout)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    except (OSError, ValueError) as err:
        raise TrackerUnreachable(f"tracker {addr[0]}:{addr[1]} stopped answering ({err}): is it running?") from None
    finally:
        sock.close()
    if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
        raise TrackerUnreachable(f"tracker {addr[0]}:{addr[1]} sent an unexpected answer: {value!r}")
    return value[1]


def servers_of_key(summary: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The ``server_info`` entries registered under ``key``."""
    return [s for s in summary.get("server_info", []) if s.get("key") == "server:" + key]


class BoardUnavailable(EdgetuneError, ConnectionError):
    """A board refused the session or stopped answering. A ``ConnectionError`` too: callers that have
    other boards try another one."""


class BoardSilent(BoardUnavailable):
    """A board stopped answering without closing its connection (power cut, cable pulled, frozen agent
    or kernel): no TCP connect, no handshake or no answer within its deadline. ``board`` is ``host:port``,
    ``waited_sec`` how long it was given."""

    def __init__(self, board: str, message: str, waited_sec: float) -> None:
        super().__init__(message)
        self.board = board
        self.waited_sec = waited_sec


# How often the connect watchdog looks whether TVM's connection to a board is up yet.
_CONNECT_POLL_SEC = 0.25
# What a socket deadline set by this module looks like once TVM turns it into an error (EAGAIN).
_TIMED_OUT = "resource temporarily unavailable"
_ESTABLISHED = "ESTABLISHED"  # psutil.CONN_ESTABLISHED

Address = tuple[str, int]


def _board_addresses(host: str, port: int) -> set[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return {(host, port)}
    return {(_plain_ip(info[4][0]), port) for info in infos}


def _plain_ip(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


def _sockets_to(peers: set[Address]) -> dict[int, tuple[Address, Address, str]]:
    """This process's TCP sockets connected (or connecting) to one of ``peers``:
    fd -> (local address, peer address, psutil status)."""
    import psutil

    found: dict[int, tuple[Address, Address, str]] = {}
    try:
        conns = psutil.Process().net_connections(kind="tcp")
    except psutil.Error as err:
        logger.debug("cannot list this process's connections: %s", err)
        return found
    for conn in conns:
        if conn.fd is None or conn.fd < 0 or not conn.raddr:
            continue
        peer = (_plain_ip(conn.raddr.ip), conn.raddr.port)
        if peer in peers:
            found[conn.fd] = ((_plain_ip(conn.laddr.ip), conn.laddr.port), peer, conn.status)
    return found


# Why TVM's own socket is acted on, found by its addresses: ``rpc.connect`` (C++) keeps its socket to
# itself and has no deadlines. A loopback relay thread in this process would deadlock: TVM frees a
# remote object (one round trip to the board) while holding the GIL, so a relay thread could never
# forward the answer. Kernel send/receive timeouts on TVM's socket need no Python code to run, and a
# shutdown of it from another thread wakes a blocked call at once.
class _SessionSocket:
    """TVM's own socket of one session, found by its addresses, acted on through a duplicate of its
    descriptor, and only while it is still that connection."""

    def __init__(self, fd: int, local: Address, peer: Address) -> None:
        self.fd, self.local, self.peer = fd, local, peer

    def _dup(self) -> socket.socket | None:
        try:
            sock = socket.socket(fileno=os.dup(self.fd))
        except OSError:
            return None
        try:
            local, peer = sock.getsockname(), sock.getpeername()
        except OSError:
            local, peer = None, None
        if local is None or (_plain_ip(local[0]), local[1]) != self.local or (_plain_ip(peer[0]), peer[1]) != self.peer:
            sock.close()  # the descriptor was closed and reused meanwhile: not ours to touch
            return None
        return sock

    def set_deadline(self, seconds: float) -> bool:
        """Every send and receive on it fails after ``seconds`` without progress (the kernel enforces
        it, so it also holds while TVM blocks with the GIL held, e.g. freeing a remote object)."""
        sock = self._dup()
        if sock is None:
            return False
        whole = int(seconds)
        timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            return True
        except OSError:
            return False
        finally:
            sock.close()  # the duplicate only

    def cut(self) -> None:
        """Shut the connection down: a TVM call blocked on it (connect, handshake, answer) fails at once."""
        sock = self._dup()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.close()


def _new_session_sockets(peers: set[Address], before: dict, status: str | None = None) -> list[_SessionSocket]:
    """Sockets to ``peers`` that were not there in ``before`` (a :func:`_sockets_to` result)."""
    found = []
    for fd, (local, peer, state) in _sockets_to(peers).items():
        if before.get(fd, (None,))[0] == local or (status is not None and state != status):
            continue
        found.append(_SessionSocket(fd, local, peer))
    return found


class _ConnectWatchdog:
    """Bounds ``rpc.connect``, which has no deadline: the TCP connect gets ``BOARD_CONNECT_SEC``, the
    handshake ``BOARD_HANDSHAKE_SEC`` from the moment the connection is up. Past either, TVM's socket is
    shut down, so its blocked call fails. (TVM releases the GIL while it connects: this thread runs.)"""

    def __init__(self, board: str, peers: set[Address], before: dict) -> None:
        self.board, self._peers, self._before = board, peers, before
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.failure: str | None = None
        self.waited_sec = 0.0
        self._thread = threading.Thread(target=self._watch, name=f"edgetune-connect-{board}", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        with self._lock:
            self._done.set()

    def _watch(self) -> None:
        connect_deadline = time.monotonic() + config.BOARD_CONNECT_SEC
        while not self._done.wait(_CONNECT_POLL_SEC):
            if _new_session_sockets(self._peers, self._before, _ESTABLISHED):
                break
            if time.monotonic() >= connect_deadline:
                self._fire(f"board {self.board} stopped answering: no connection within {config.BOARD_CONNECT_SEC:g} s "
                           "(off, unplugged or unreachable?)", config.BOARD_CONNECT_SEC)
                return
        else:
            return
        if not self._done.wait(config.BOARD_HANDSHAKE_SEC):
            self._fire(f"board {self.board} stopped answering: it accepted the connection but no RPC handshake came "
                       f"within {config.BOARD_HANDSHAKE_SEC:g} s (frozen?)", config.BOARD_HANDSHAKE_SEC)

    def _fire(self, message: str, waited_sec: float) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.failure, self.waited_sec = message, waited_sec
            for sock in _new_session_sockets(self._peers, self._before):
                sock.cut()
        logger.debug("%s: gave up on it", message)


class _SessionWatch:
    """Shuts a session's connection down at its deadline. It holds the connection's identity only, never
    the session: a session the caller drops must close (and free its board) at once."""

    def __init__(self, board: str, sockets: list[_SessionSocket], seconds: float) -> None:
        self.sockets = sockets
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.name = f"edgetune-session-{board}"
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        self.cut()

    def cut(self) -> None:
        for sock in self.sockets:
            sock.cut()

    def stop(self) -> None:
        self._timer.cancel()


class BoardSession:
    """An RPC session to one board, every wait on it bounded (see :func:`connect_board`).

    ``session`` is TVM's ``RPCSession``, ``board`` is ``host:port``, ``answer_within_sec`` the deadline
    on the session (None when it could not be set). Call :meth:`close` when done with it.
    """

    def __init__(self, session: Any, board: str, answer_within_sec: float | None,
                 sockets: list[_SessionSocket]) -> None:
        self.session = session
        self.board = board
        self.answer_within_sec = answer_within_sec
        # A live board ends the session itself by then (its kill timer): past it, nothing will come.
        self._watch = _SessionWatch(board, sockets, answer_within_sec) if answer_within_sec is not None else None

    def stopped_answering(self, error: BaseException | str) -> str | None:
        """The sentence to report when ``error`` (raised by a call on this session) is the board's
        silence past its deadline, else None."""
        if self._watch is None or not (self._watch.expired or _TIMED_OUT in str(error).lower()):
            return None
        return (f"board {self.board} stopped answering: no answer within {self.answer_within_sec:g} s, past its "
                "session timeout (power cut, cable pulled or frozen?)")

    def cut(self) -> None:
        """End the session's connection now: every call on it, pending or later, fails at once (use it
        once the board is known to be gone, so that cleaning up does not wait for it again)."""
        if self._watch is not None:
            self._watch.cut()

    def close(self) -> None:
        """Done with the session: its deadline watch stops (TVM closes the connection when the session
        object is dropped)."""
        if self._watch is not None:
            self._watch.stop()


def connect_board(host: str, port: int, matchkey: str, session_timeout: float,
                  answer_within_sec: float | None = None, proof: str | None = None) -> BoardSession:
    """An RPC session to the board at ``host:port`` (``matchkey`` as the tracker gave it, ``proof`` the
    ``-auth=`` value proving the team key: see :func:`device_agent.auth.session_proof`; None sends none,
    as a stock TVM client does).

    Deadlines, in seconds: ``BOARD_CONNECT_SEC`` for the TCP connect, ``BOARD_HANDSHAKE_SEC`` for the
    handshake, then ``answer_within_sec`` (default: ``session_timeout`` plus ``BOARD_ANSWER_GRACE_SEC``)
    for the session: each answer waits at most that long (the kernel enforces it on TVM's socket, so it
    holds even while TVM waits with the GIL held, as when it frees a remote object), and at that time
    after the handshake the connection is shut down, so later calls fail at once. Raises :class:`BoardSilent`
    when the board does not answer the connect or handshake in time and :class:`BoardUnavailable` when
    it refuses.
    """
    from tvm import rpc

    board = f"{host}:{port}"
    peers = _board_addresses(host, port)
    before = _sockets_to(peers)
    watchdog = _ConnectWatchdog(board, peers, before)
    try:
        key = matchkey if proof is None else handshake_key(matchkey, proof)
        session = rpc.connect(host, port, key, session_timeout=session_timeout)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types for a refused connection
        watchdog.finish()
        if watchdog.failure:
            raise BoardSilent(board, watchdog.failure, watchdog.waited_sec) from None
        raise BoardUnavailable(f"board {board} did not accept the session: {_last_line(err)}") from None
    watchdog.finish()
    answer_within = session_timeout + config.BOARD_ANSWER_GRACE_SEC if answer_within_sec is None else answer_within_sec
    sockets = [s for s in _new_session_sockets(peers, before, _ESTABLISHED) if s.set_deadline(answer_within)]
    if not sockets:
        logger.warning("could not put a deadline on the session with board %s (its connection was not found): "
                       "if the board stops answering, this session waits for it", board)
    return BoardSession(session, board, answer_within if sockets else None, sockets)


def connect_board_direct(host: str, port: int, device_key: str, session_timeout: float,
                         answer_within_sec: float | None = None, key: TeamKey | None = None) -> BoardSession:
    """An RPC session straight to a board of ``device_key`` at ``host:port``, without a tracker (a board
    that has none serves its device key), proven with a one-time direct-session token.

    Raises what :func:`connect_board` raises, and :class:`EdgetuneError` when this machine has no team key.
    """
    key = team_key() if key is None else key
    return connect_board(host, port, device_key, session_timeout, answer_within_sec,
                         proof=direct_token(key, device_key))


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


@dataclass(frozen=True)
class BoardOffer:
    """A board the tracker handed to us: where it serves and the one-time match key to present there."""

    host: str
    port: int
    matchkey: str


def request_board(addr: TrackerAddr, key: str, deadline: float, priority: int = 1,
                  team: TeamKey | None = None) -> BoardOffer:
    """Ask the tracker for a free board of ``key`` (the team key proven both ways first).

    ``deadline`` is a ``time.monotonic()`` value: if no board of the key is given to us by then,
    :class:`NoBoardError` is raised (TVM's ``TrackerSession.request`` would wait forever). Raises
    :class:`TrackerUnreachable` when the tracker is gone, :class:`TrackerNotTrusted` when it does not
    prove the team key.
    """
    base = _base()
    wait = deadline - time.monotonic()
    if wait <= 0:
        raise NoBoardError(f"no board of key {key!r} became free in time")
    sock = _connect(addr, min(config.TRACKER_CONNECT_SEC, max(wait, 0.1)), team)
    try:
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "edgetune", priority])
        sock.settimeout(max(deadline - time.monotonic(), 0.05))
        try:
            value = base.recvjson(sock)
        except socket.timeout:
            raise NoBoardError(f"no board of key {key!r} became free in time") from None
        except (OSError, ValueError) as err:
            raise TrackerUnreachable(f"tracker {addr[0]}:{addr[1]} went away ({err})") from None
    finally:
        # Closing the socket withdraws the pending request from the tracker.
        sock.close()
    if (not isinstance(value, list) or len(value) != 2 or value[0] != base.TrackerCode.SUCCESS
            or not isinstance(value[1], list) or len(value[1]) != 3):
        raise TrackerUnreachable(f"tracker {addr[0]}:{addr[1]} refused the request: {str(value)[:200]!r}")
    host, port, matchkey = value[1]
    return BoardOffer(str(host), int(port), str(matchkey))


def open_board_session(addr: TrackerAddr, key: str, session_timeout: float, deadline: float, priority: int = 1,
                       answer_within_sec: float | None = None) -> BoardSession:
    """Get an RPC session to a free board of ``key`` through the tracker, proving the team key to the
    tracker and to the board.

    ``deadline`` is a ``time.monotonic()`` value for getting a board (see :func:`request_board`). Raises
    what :func:`request_board` and :func:`connect_board` raise.
    """
    team = team_key()
    offer = request_board(addr, key, deadline, priority, team)
    # The tracker hands a board out once per offer, and a board offers itself again only after its
    # session: a board that froze is not handed out again until it thaws and registers again.
    return connect_board(offer.host, offer.port, offer.matchkey, session_timeout, answer_within_sec,
                         proof=session_proof(team, offer.matchkey))


def request_session(addr: TrackerAddr, key: str, session_timeout: float, deadline: float, priority: int = 1):
    """``(session, "host:port")`` of a free board of ``key``, as :func:`open_board_session` opens it (its
    deadlines hold: a board that stops answering fails the session's calls, at the latest
    ``BOARD_ANSWER_GRACE_SEC`` after ``session_timeout``). Raises what :func:`open_board_session` raises."""
    opened = open_board_session(addr, key, session_timeout, deadline, priority)
    return opened.session, opened.board


def find_tracker_by_mdns(timeout: float) -> TrackerAddr | None:
    """The first tracker advertised on mDNS within ``timeout`` seconds that proves the team key, or None
    when none is advertised. Trackers that do not prove it are skipped (anyone can advertise one).

    Raises :class:`TrackerNotTrusted` when trackers were found but none proves the key, and
    :class:`EdgetuneError` when this machine has no team key.
    """
    from device_agent.mdns import TrackerLocator

    key = team_key()
    try:
        locator = TrackerLocator()
    except Exception as err:  # noqa: BLE001 - AgentError or OSError: no mDNS means no tracker found
        logger.debug("mDNS unavailable: %s", err)
        return None
    deadline = time.monotonic() + timeout
    skipped: dict[TrackerAddr, TrackerUnreachable] = {}
    try:
        while locator.wait(max(deadline - time.monotonic(), 0.0)) is not None:
            for addr in locator.candidates():
                if addr in skipped:
                    continue
                try:
                    _connect(addr, config.TRACKER_CONNECT_SEC, key).close()
                    return addr
                except TrackerUnreachable as err:  # TrackerNotTrusted included
                    logger.warning("skipping the tracker advertised at %s:%s: %s", addr[0], addr[1], err)
                    skipped[addr] = err
            if time.monotonic() >= deadline:
                break
            time.sleep(_CONNECT_POLL_SEC)
    finally:
        locator.close()
    untrusted = [err for err in skipped.values() if isinstance(err, TrackerNotTrusted)]
    if untrusted:
        raise TrackerNotTrusted("no tracker on mDNS holds this team's key: " + " | ".join(map(str, untrusted)))
    if skipped:
        raise next(iter(skipped.values()))
    return None


def resolve_tracker(value: str | None, timeout: float | None = None) -> TrackerAddr:
    """``--tracker`` (or ``$EDGETUNE_TRACKER``), else the tracker found on mDNS.

    Raises :class:`EdgetuneError` when neither gives one.
    """
    value = value or os.environ.get("EDGETUNE_TRACKER")
    if value:
        return parse_hostport(value)
    found = find_tracker_by_mdns(config.TRACKER_DISCOVERY_SEC if timeout is None else timeout)
    if found is None:
        raise EdgetuneError(
            f"no tracker given and none found on mDNS ({TRACKER_SERVICE}): run `edgetune tracker`, "
            "or pass --tracker HOST:PORT (or set EDGETUNE_TRACKER)"
        )
    return found
