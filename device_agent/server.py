"""The board's TVM RPC server, registered with a tracker.

TVM's own server (``tvm.rpc.Server``) gives up when the tracker has been gone for 60 s, blocks forever
on a connection that never sends its handshake, and runs in a popen worker that outlives its parent
when killed. This loop keeps TVM's wire protocol and its session process (``tvm.rpc.server._serve_loop``,
one forked process per session, as TVM does) and adds what a board on a LAN needs: it reconnects to
the tracker forever (also when the tracker moves, if it was found by mDNS), puts a deadline on every
socket wait, and stops its session process with it.

Nothing a client sends can stop the board: handshakes are read without blocking, several at once, each
under one deadline for the whole handshake (a client trickling bytes cannot hold the accept loop), their
options are parsed strictly, and an unexpected error while handling one connection is logged and the
loop serves on. Sessions stay one at a time: a board measures one candidate at a time.

Only holders of the team key run code here (see :mod:`device_agent.auth`): a handshake must carry
``-auth=`` with a proof of the key for this match key (through a tracker) or a fresh direct-session
token (no tracker); anything else is refused with a logged reason. The board registers only with a
tracker that proves the key, and proves it in turn. In open mode (``--open``) any client that knows
the match key (or, with no tracker, the device key) gets a session, as with TVM's own server.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import re
import selectors
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from . import config
from .auth import AuthRefused, SessionGate, TeamKey, authenticate_to_tracker
from .errors import AgentError

logger = logging.getLogger(__name__)

TrackerAddr = tuple[str, int]


@dataclass
class ServerStats:
    """Counters the agent reports (and tests read): sessions served and tracker registrations."""

    sessions: int = 0
    failed_sessions: int = 0
    registrations: int = 0
    last_registered: float | None = None  # time.monotonic() of the last successful registration
    history: list[str] = field(default_factory=list)


class HandshakeRefused(AgentError):
    """A client's handshake the board does not accept; the message says why. It is logged and the
    connection closed: it never leaves :meth:`RPCAgentServer.serve_forever`."""


@dataclass(frozen=True)
class SessionOptions:
    """What a client's handshake asked for, checked: the session's time limit in seconds, finite and in
    (0, ``config.MAX_SESSION_SEC``]."""

    timeout: float


# A decimal number as TVM's client writes one (``f"{session_timeout}"``): no inf, nan, hex or "1_000".
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_TIMEOUT_OPTION = b"-timeout="


def parse_session_options(words: list[bytes], max_session: float) -> SessionOptions:
    """The options after the key in a client's handshake (TVM's client sends ``-timeout=S``).

    A timeout must be a decimal number of seconds above 0; one above ``max_session`` (``1e400``
    included) is clamped to it, and none means ``max_session``. Other options are ignored, as TVM's
    server does. Raises :class:`HandshakeRefused` for a timeout that is not a positive number.
    """
    timeout = max_session
    for word in words:
        if not word.startswith(_TIMEOUT_OPTION):
            continue
        raw = word[len(_TIMEOUT_OPTION):]
        text = raw.decode("ascii", errors="replace")
        if not _DECIMAL.fullmatch(text):
            raise HandshakeRefused(f"session timeout {text[:40]!r} is not a number of seconds")
        seconds = float(text)  # finite or inf (1e400); never nan
        if not seconds > 0:
            raise HandshakeRefused(f"session timeout {text[:40]!r} is not above 0 s")
        timeout = min(seconds, max_session)
    return SessionOptions(timeout=timeout)


class PendingHandshake:
    """A connection whose handshake (``[RPC_MAGIC, keylen, key words]``) is being read without blocking,
    under one deadline (a ``time.monotonic()`` value) for all of it."""

    def __init__(self, conn: socket.socket, addr: tuple, deadline: float, magic: int) -> None:
        self.conn = conn
        self.addr = addr
        self.deadline = deadline
        self._magic = magic
        self._data = bytearray()

    def missing(self) -> int:
        """Bytes still to read before the handshake is complete (0: complete).

        Raises :class:`HandshakeRefused` as soon as what arrived cannot be a handshake.
        """
        have = len(self._data)
        if have < 4:
            return 4 - have
        if struct.unpack_from("<i", self._data)[0] != self._magic:
            raise HandshakeRefused("not a TVM RPC client (wrong magic)")
        if have < 8:
            return 8 - have
        keylen = struct.unpack_from("<i", self._data, 4)[0]
        if not 0 < keylen <= config.MAX_HANDSHAKE_KEY_BYTES:
            raise HandshakeRefused(f"a key of {keylen} bytes")
        return 8 + keylen - have

    def read(self) -> bool:
        """Read what the socket has (never more than the handshake); True once it is complete.

        Raises :class:`HandshakeRefused` on a wrong handshake or a closed connection, OSError on socket errors.
        """
        try:
            chunk = self.conn.recv(self.missing())
        except (BlockingIOError, InterruptedError):
            return False
        if not chunk:
            raise HandshakeRefused("closed before the handshake was complete")
        self._data += chunk
        return self.missing() == 0

    def key_words(self) -> list[bytes]:
        """The words of the complete handshake's key: ``client:<key>`` and the options."""
        return bytes(self._data[8:]).split()


def _session_process(conn: socket.socket, work) -> None:
    """The body of a session process: TVM's serve loop on ``conn``, uploads in ``work``.

    The process is forked from the agent and would inherit its SIGTERM/SIGINT handlers, which run the
    agent's shutdown: inside a session being stopped that printed "stopping" and a traceback. A session
    process just ends on these signals.
    """
    from tvm.rpc.server import _serve_loop

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _serve_loop(conn, None, work)


def bind_listen_socket(host: str, port: int | None) -> socket.socket:
    """Bind the RPC listen socket. ``port=None`` scans 9090-9199 like TVM; ``0`` takes any free port.

    Raises :class:`AgentError` when the port is taken or the address is not on this machine.
    """
    candidates = range(9090, 9200) if port is None else [port]
    last_err: OSError | None = None
    for candidate in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as err:
            sock.close()
            last_err = err
            if err.errno == 98:  # EADDRINUSE: try the next one when scanning
                continue
            raise AgentError(
                f"cannot listen on {host}:{candidate} ({err.strerror}): pass --host with an address of "
                "this board (or 0.0.0.0)"
            ) from None
        sock.listen(4)
        return sock
    if port is None:
        raise AgentError("no free port in 9090-9199 for the RPC server: pass --port P (0 = any free port)")
    raise AgentError(
        f"port {port} on {host} is in use ({last_err.strerror if last_err else 'busy'}): pass another "
        "--port, or --port 0 for any free port"
    )


class RPCAgentServer:
    """One board's RPC server. Call :meth:`serve_forever` from the main thread; :meth:`stop` from anywhere."""

    def __init__(
        self,
        listen_sock: socket.socket,
        key: str,
        tracker: Callable[[], list[TrackerAddr]] | None,
        custom_addr: str | None = None,
        on_event: Callable[[str], None] | None = None,
        team_key: TeamKey | None = None,
        open_mode: bool = False,
    ) -> None:
        """``tracker`` returns the trackers to try, preferred first (a fixed one, or those found on mDNS).
        ``team_key`` is required unless ``open_mode``; with it the board proves the key to trackers
        (also in open mode). Raises :class:`AgentError` without a team key outside open mode."""
        from tvm.rpc import base  # import here: TVM import is slow and only the server needs it

        if team_key is None and not open_mode:
            raise AgentError("no team key: pass --team-key-file, or --open to let anyone on the network run code here")

        self._base = base
        self.sock = listen_sock
        self.port: int = listen_sock.getsockname()[1]
        self.key = key
        self._tracker = tracker
        self._custom_addr = custom_addr
        self._on_event = on_event or (lambda msg: logger.info("%s", msg))
        self._stop = threading.Event()
        self._tracker_conn: socket.socket | None = None
        self._tracker_addr: TrackerAddr | None = None
        self._matchkey = key
        self._old_keys: set[str] = set()
        self._unmatched_since: float | None = None
        self._session_proc: multiprocessing.Process | None = None
        self._last_wait_report = 0.0
        self._next_ping = 0.0  # time.monotonic() of the next tracker ping
        self._next_tracker_try = 0.0  # time.monotonic() of the next attempt to reach a tracker
        self._selector: selectors.BaseSelector | None = None
        self._pending: dict[socket.socket, PendingHandshake] = {}
        self._team_key = team_key
        # None in open mode: every handshake with the right key gets a session, as with TVM's server.
        self._gate = None if open_mode else SessionGate(team_key, config.AUTH_SKEW_SEC, config.MAX_DIRECT_NONCES)
        self._untrusted: dict[TrackerAddr, float] = {}  # tracker -> time.monotonic() it failed to prove the key
        self.stats = ServerStats()

    # -- tracker -------------------------------------------------------------------------------
    def _close_tracker(self) -> None:
        if self._tracker_conn is not None:
            try:
                self._tracker_conn.close()
            except OSError:
                pass
        self._tracker_conn = None

    def _tracker_call(self, message: list) -> object:
        assert self._tracker_conn is not None
        self._base.sendjson(self._tracker_conn, message)
        return self._base.recvjson(self._tracker_conn)

    def _put(self) -> None:
        """Offer this board to the tracker under a fresh match key."""
        self._matchkey = self._base.random_key(self.key, cmap=self._old_keys)
        self._old_keys.add(self._matchkey)
        code = self._tracker_call(
            [self._base.TrackerCode.PUT, self.key, (self.port, self._matchkey), self._custom_addr]
        )
        if code != self._base.TrackerCode.SUCCESS:
            raise OSError(f"tracker refused the registration ({code})")
        self._unmatched_since = None

    def _connect_tracker(self) -> bool:
        """Register with the first tracker (of those known) that answers and proves the team key; False
        (after a message now and then) when none does. A tracker that does not prove the key is skipped
        for ``UNTRUSTED_TRACKER_RETRY_SEC`` while the others are tried."""
        found = self._tracker() if self._tracker else []
        now = time.monotonic()
        candidates = [a for a in found
                      if now - self._untrusted.get(a, -config.UNTRUSTED_TRACKER_RETRY_SEC) >= config.UNTRUSTED_TRACKER_RETRY_SEC]
        if not candidates:
            if now - self._last_wait_report >= config.MDNS_WAIT_REPORT_SEC:
                if found:
                    self._on_event("no tracker that holds this team's key yet (skipped "
                                   f"{', '.join(f'{a[0]}:{a[1]}' for a in found)}); still looking")
                else:
                    self._on_event("waiting for a tracker on mDNS (_tvm-tracker._tcp); start `edgetune tracker` "
                                   "on the workstation or pass --tracker HOST:PORT")
                self._last_wait_report = now
            return False
        unreachable: list[str] = []
        for addr in candidates:
            try:
                self._register(addr)
            except AuthRefused as err:
                self._close_tracker()
                self._untrusted[addr] = time.monotonic()
                self._on_event(f"tracker {addr[0]}:{addr[1]} does not hold this team's key ({err}): not registering "
                               "with it; looking for another")
                continue
            except (OSError, ValueError, struct.error) as err:
                self._close_tracker()
                unreachable.append(f"{addr[0]}:{addr[1]} not reachable ({err})")
                continue
            self._untrusted.pop(addr, None)
            self._tracker_addr = addr
            self._next_ping = time.monotonic() + config.TRACKER_PING_SEC
            self.stats.registrations += 1
            self.stats.last_registered = time.monotonic()
            self._last_wait_report = 0.0
            self._on_event(f"registered with tracker {addr[0]}:{addr[1]} as key {self.key!r} (port {self.port})"
                           + ("" if self._team_key is None else ", team key proven both ways"))
            return True
        if unreachable and now - self._last_wait_report >= config.MDNS_WAIT_REPORT_SEC:
            self._on_event(f"tracker {'; '.join(unreachable)}; retrying every {config.TRACKER_RETRY_SEC:g} s")
            self._last_wait_report = now
        return False

    def _register(self, addr: TrackerAddr) -> None:
        """Connect to the tracker at ``addr``, prove the team key both ways, and offer the board.

        Raises :class:`AuthRefused` when the tracker does not prove the key (or refuses ours), OSError
        (ValueError, struct.error) when it is not reachable or not a tracker. The caller closes the
        connection on failure.
        """
        conn = socket.create_connection(addr, timeout=config.TRACKER_IO_SEC)
        self._tracker_conn = conn
        conn.settimeout(config.TRACKER_IO_SEC)
        # Each request is written in two parts (length, JSON): without this, Nagle holds the second
        # until the tracker ACKs the first (~40 ms of delayed ACK), on every re-offer after a session.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(struct.pack("<i", self._base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", self._base.recvall(conn, 4))[0]
        if magic != self._base.RPC_TRACKER_MAGIC:
            raise OSError(f"{addr[0]}:{addr[1]} is not a TVM RPC tracker")
        if self._team_key is not None:
            # Before anything else: a tracker that cannot prove the key never learns of the board.
            authenticate_to_tracker(self._team_key, self._tracker_call)
        info = {"key": "server:" + self.key, "addr": [self._custom_addr, self.port]}
        if self._tracker_call([self._base.TrackerCode.UPDATE_INFO, info]) != self._base.TrackerCode.SUCCESS:
            raise OSError("tracker refused the board's info")
        self._put()

    def _ping_tracker(self) -> None:
        """Renew the match key when a client took it but never came (TVM's server does the same)."""
        pending = self._tracker_call([self._base.TrackerCode.GET_PENDING_MATCHKEYS])
        now = time.monotonic()
        if isinstance(pending, list) and self._matchkey in pending:
            self._unmatched_since = None
        elif self._unmatched_since is None:
            self._unmatched_since = now
        elif now - self._unmatched_since > config.UNMATCHED_KEY_SEC:
            self._put()
        # A tracker found by mDNS stays ours while it answers; when it goes away the reconnect asks
        # mDNS again, so a tracker restarted elsewhere is found (and other trackers on the LAN never
        # pull a working board away).

    def _reoffer(self) -> None:
        """Offer the board under a new match key once the old one was used (TVM's server re-PUTs too)."""
        if self._tracker_conn is not None:
            try:
                self._put()
            except (OSError, ValueError, struct.error):
                self._close_tracker()

    # -- handshakes ----------------------------------------------------------------------------
    def _accept(self) -> None:
        """Accept one connection and start reading its handshake; close it at once when
        ``config.MAX_PENDING_HANDSHAKES`` are already being read."""
        assert self._selector is not None
        try:
            conn, addr = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            logger.warning("accepting an RPC connection failed: %s", err)
            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._stop.wait(config.ACCEPT_RETRY_SEC)
            return
        if len(self._pending) >= config.MAX_PENDING_HANDSHAKES:
            conn.close()
            logger.warning("closed a connection from %s:%s at once: %d handshakes are being read already",
                           addr[0], addr[1], len(self._pending))
            return
        conn.setblocking(False)
        pending = PendingHandshake(conn, addr, time.monotonic() + config.HANDSHAKE_SEC, self._base.RPC_MAGIC)
        self._pending[conn] = pending
        self._selector.register(conn, selectors.EVENT_READ, pending)

    def _forget(self, pending: PendingHandshake) -> None:
        """Stop reading ``pending`` (its socket stays open)."""
        self._pending.pop(pending.conn, None)
        if self._selector is not None:
            try:
                self._selector.unregister(pending.conn)
            except (KeyError, ValueError):
                pass

    def _drop(self, pending: PendingHandshake, reason: str) -> None:
        self._forget(pending)
        pending.conn.close()
        logger.warning("dropped a connection from %s:%s: %s", pending.addr[0], pending.addr[1], reason)

    def _read_handshake(self, pending: PendingHandshake) -> bool:
        """Read what arrived for ``pending``; True when its handshake is complete (it is then no longer
        pending), False while it is not (or when it was dropped)."""
        try:
            complete = pending.read()
        except HandshakeRefused as err:
            self._drop(pending, str(err))
            return False
        except OSError as err:
            self._drop(pending, f"socket error ({err})")
            return False
        if complete:
            self._forget(pending)
        return complete

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self._pending.values() if now >= p.deadline]:
            self._drop(pending, f"no complete handshake within {config.HANDSHAKE_SEC:g} s")

    def _drop_all_handshakes(self) -> None:
        for pending in list(self._pending.values()):
            self._forget(pending)
            pending.conn.close()

    # -- sessions ------------------------------------------------------------------------------
    def _answer(self, conn: socket.socket, addr: tuple, words: list[bytes]) -> None:
        """Check a complete handshake's key and options, answer it, and serve the session it opens."""
        base = self._base
        conn.settimeout(config.HANDSHAKE_SEC)  # the answer is a few bytes: the send buffer takes them
        through_tracker = self._tracker_conn is not None
        expected = ("client:" + (self._matchkey if through_tracker else self.key)).encode()
        if not words or words[0] != expected:
            self._refuse(conn, addr, "a wrong key")
            return
        if self._gate is not None:
            # A refused proof does not use the match key up: the host the tracker gave it to still comes.
            try:
                if through_tracker:
                    self._gate.check_tracker_session(self._matchkey, words[1:])
                else:
                    self._gate.check_direct_session(self.key, words[1:])
            except AuthRefused as err:
                self._refuse(conn, addr, str(err))
                return
        # The key was right, so it is used up whatever happens next: offer the board again afterwards.
        try:
            options = parse_session_options(words[1:], config.MAX_SESSION_SEC)
        except HandshakeRefused as err:
            self._refuse(conn, addr, str(err))
            self._reoffer()
            return
        server_key = ("server:" + self.key).encode("utf-8")
        try:
            conn.sendall(struct.pack("<ii", base.RPC_CODE_SUCCESS, len(server_key)) + server_key)
        except OSError as err:
            conn.close()
            logger.warning("lost the connection from %s:%s while answering its handshake: %s", addr[0], addr[1], err)
            self._reoffer()
            return
        conn.settimeout(None)  # the session process reads and writes the socket blocking
        try:
            self._serve_session(conn, addr, options)
        finally:
            self._reoffer()

    def _refuse(self, conn: socket.socket, addr: tuple, reason: str) -> None:
        """Answer "no" (TVM's client then reports that no server matches its key) and close."""
        try:
            conn.sendall(struct.pack("<i", self._base.RPC_CODE_MISMATCH))
        except OSError:
            pass
        conn.close()
        logger.warning("refused a connection from %s:%s: %s", addr[0], addr[1], reason)

    def _serve_session(self, conn: socket.socket, addr: tuple, options: SessionOptions) -> None:
        from tvm.rpc import _ffi_api
        from tvm.support import utils

        timeout = options.timeout
        old_cwd = os.getcwd()
        started = time.monotonic()
        work = None
        try:
            work = utils.tempdir()
            os.chdir(work.path)  # each session's uploads land in their own folder, like TVM's server
            proc = multiprocessing.Process(target=_session_process, args=(conn, work), daemon=True)
            self._session_proc = proc
            proc.start()
            proc.join(timeout)
            if proc.is_alive():
                _ffi_api.ReturnException(
                    conn.fileno(),
                    f"RPCSessionTimeoutError: Your {timeout}s session has expired, "
                    'try to increase the "session_timeout" value.',
                )
                self._kill_session()
                self.stats.failed_sessions += 1
                outcome = f"killed after {timeout:g} s"
            elif proc.exitcode != 0:
                self.stats.failed_sessions += 1
                outcome = f"session process exited with code {proc.exitcode}"
            else:
                outcome = "ok"
        finally:
            self._session_proc = None
            conn.close()
            os.chdir(old_cwd)
            if work is not None:
                work.remove()
        self.stats.sessions += 1
        self._on_event(
            f"session {self.stats.sessions} from {addr[0]}:{addr[1]} finished in "
            f"{time.monotonic() - started:.2f} s: {outcome}"
        )

    def _kill_session(self) -> None:
        proc = self._session_proc
        if proc is None or proc.pid is None:
            return
        try:
            parent = psutil.Process(proc.pid)
            children = parent.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                child.terminate()
            except psutil.Error:
                pass
        proc.terminate()
        proc.join(config.CHILD_STOP_SEC)
        if proc.is_alive():
            proc.kill()
            proc.join(config.CHILD_STOP_SEC)
        psutil.wait_procs(children, timeout=config.CHILD_STOP_SEC)

    # -- main loop -----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Serve until :meth:`stop`. Never returns on tracker trouble (it reconnects) nor on anything a
        client sends (an unexpected error while handling a connection is logged, and it serves on)."""
        self.sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                try:
                    self._serve_step()
                except Exception:  # noqa: BLE001 - the last resort: one bad connection never stops the board
                    logger.exception("unexpected error in the RPC server loop; serving on")
                    self._on_event("unexpected error in the RPC server (logged); serving on")
                    self._stop.wait(config.ACCEPT_RETRY_SEC)
        finally:
            self._drop_all_handshakes()
            self._selector.close()
            self._selector = None
            self._kill_session()
            self._close_tracker()
            self.sock.close()

    def _serve_step(self) -> None:
        """One turn of the loop: (re)connect the tracker when due, read what arrived, answer complete
        handshakes (serving their sessions one at a time), drop expired ones, ping the tracker when due.

        While no tracker is registered the board still serves: a host that found it on mDNS connects
        straight to it with a direct-session token (or, in open mode, the device key)."""
        assert self._selector is not None
        if self._tracker is not None and self._tracker_conn is None and time.monotonic() >= self._next_tracker_try:
            if not self._connect_tracker():
                self._next_tracker_try = time.monotonic() + config.TRACKER_RETRY_SEC
        now = time.monotonic()
        if self._tracker_conn is not None:
            wake = self._next_ping
        elif self._tracker is not None:
            wake = self._next_tracker_try
        else:
            wake = now + config.TRACKER_PING_SEC
        wake = min([wake, *(p.deadline for p in self._pending.values())])
        events = self._selector.select(max(wake - now, 0.0))
        if self._stop.is_set():
            return
        complete: list[PendingHandshake] = []
        for key, _mask in events:
            if key.fileobj is self.sock:
                self._accept()
            elif key.data.conn in self._pending and self._read_handshake(key.data):
                complete.append(key.data)
        # Read before expiring: a handshake whose bytes arrived during a long session still counts.
        self._expire_handshakes()
        for pending in complete:
            try:
                self._answer(pending.conn, pending.addr, pending.key_words())
            except Exception:  # noqa: BLE001 - whatever one client sent, the board serves the next
                logger.exception("unexpected error serving %s:%s; serving on", pending.addr[0], pending.addr[1])
                self._on_event(f"unexpected error serving {pending.addr[0]}:{pending.addr[1]} (logged); serving on")
            finally:
                pending.conn.close()
        if self._tracker_conn is not None and time.monotonic() >= self._next_ping:
            self._next_ping = time.monotonic() + config.TRACKER_PING_SEC
            try:
                self._ping_tracker()
            except (OSError, ValueError, struct.error) as err:
                self._on_event(f"lost the tracker ({err or 'connection closed'}); reconnecting")
                self._close_tracker()

    def stop(self) -> None:
        self._stop.set()
        self._kill_session()
