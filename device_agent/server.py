"""The board's TVM RPC server, registered with a tracker.

TVM's own server (``tvm.rpc.Server``) gives up when the tracker has been gone for 60 s, blocks forever
on a connection that never sends its handshake, and runs in a popen worker that outlives its parent
when killed. This loop keeps TVM's wire protocol and its session process (``tvm.rpc.server._serve_loop``,
one forked process per session, as TVM does) and adds what a board on a LAN needs: it reconnects to
the tracker forever (also when the tracker moves, if it was found by mDNS), puts a deadline on every
socket wait, and stops its session process with it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from . import config
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
        tracker: Callable[[], TrackerAddr | None] | None,
        custom_addr: str | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        from tvm.rpc import base  # import here: TVM import is slow and only the server needs it

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
        """Connect and register; False (after a message now and then) when the tracker is not there."""
        addr = self._tracker() if self._tracker else None
        now = time.monotonic()
        if addr is None:
            if now - self._last_wait_report >= config.MDNS_WAIT_REPORT_SEC:
                self._on_event("waiting for a tracker on mDNS (_tvm-tracker._tcp); start `edgetune tracker` "
                               "on the workstation or pass --tracker HOST:PORT")
                self._last_wait_report = now
            return False
        try:
            conn = socket.create_connection(addr, timeout=config.TRACKER_IO_SEC)
            conn.settimeout(config.TRACKER_IO_SEC)
            conn.sendall(struct.pack("<i", self._base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", self._base.recvall(conn, 4))[0]
            if magic != self._base.RPC_TRACKER_MAGIC:
                conn.close()
                raise OSError(f"{addr[0]}:{addr[1]} is not a TVM RPC tracker")
            self._tracker_conn = conn
            info = {"key": "server:" + self.key, "addr": [self._custom_addr, self.port]}
            if self._tracker_call([self._base.TrackerCode.UPDATE_INFO, info]) != self._base.TrackerCode.SUCCESS:
                raise OSError("tracker refused the board's info")
            self._put()
        except OSError as err:
            self._close_tracker()
            if now - self._last_wait_report >= config.MDNS_WAIT_REPORT_SEC:
                self._on_event(f"tracker {addr[0]}:{addr[1]} not reachable ({err}); retrying every "
                               f"{config.TRACKER_RETRY_SEC:g} s")
                self._last_wait_report = now
            return False
        self._tracker_addr = addr
        self.stats.registrations += 1
        self.stats.last_registered = time.monotonic()
        self._last_wait_report = 0.0
        self._on_event(f"registered with tracker {addr[0]}:{addr[1]} as key {self.key!r} (port {self.port})")
        return True

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

    # -- sessions ------------------------------------------------------------------------------
    def _handshake(self, conn: socket.socket) -> dict | None:
        """Read the client's handshake (with a deadline); the session options, or None to drop it."""
        base = self._base
        conn.settimeout(config.HANDSHAKE_SEC)
        try:
            magic = struct.unpack("<i", base.recvall(conn, 4))[0]
            if magic != base.RPC_MAGIC:
                return None
            keylen = struct.unpack("<i", base.recvall(conn, 4))[0]
            if not 0 < keylen < 4096:
                return None
            words = base.recvall(conn, keylen).decode("utf-8").split()
            expected = "client:" + (self._matchkey if self._tracker_conn is not None else self.key)
            if not words or words[0] != expected:
                conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
                return None
            server_key = "server:" + self.key
            conn.sendall(struct.pack("<i", base.RPC_CODE_SUCCESS))
            conn.sendall(struct.pack("<i", len(server_key)))
            conn.sendall(server_key.encode("utf-8"))
        except (OSError, struct.error, UnicodeDecodeError):
            return None
        conn.settimeout(None)
        opts: dict = {}
        for word in words[1:]:
            if word.startswith("-timeout="):
                try:
                    opts["timeout"] = float(word[len("-timeout="):])
                except ValueError:
                    pass
        return opts

    def _serve_session(self, conn: socket.socket, addr: tuple, opts: dict) -> None:
        from tvm.rpc import _ffi_api
        from tvm.rpc.server import _serve_loop
        from tvm.support import utils

        timeout = opts.get("timeout") or config.MAX_SESSION_SEC
        work = utils.tempdir()
        old_cwd = os.getcwd()
        os.chdir(work.path)  # each session's uploads land in their own folder, like TVM's server
        started = time.monotonic()
        try:
            proc = multiprocessing.Process(target=_serve_loop, args=(conn, None, work), daemon=True)
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
            os.chdir(old_cwd)
            work.remove()
            conn.close()
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
        """Serve until :meth:`stop`. Never returns on tracker trouble: it reconnects."""
        try:
            while not self._stop.is_set():
                if self._tracker is not None and self._tracker_conn is None:
                    if not self._connect_tracker():
                        self._stop.wait(config.TRACKER_RETRY_SEC)
                        continue
                ready, _, _ = select.select([self.sock], [], [], config.TRACKER_PING_SEC)
                if self._stop.is_set():
                    break
                if not ready:
                    if self._tracker_conn is not None:
                        try:
                            self._ping_tracker()
                        except (OSError, ValueError, struct.error) as err:
                            self._on_event(f"lost the tracker ({err or 'connection closed'}); reconnecting")
                            self._close_tracker()
                    continue
                conn, addr = self.sock.accept()
                opts = self._handshake(conn)
                if opts is None:
                    conn.close()
                    logger.warning("dropped a connection from %s:%s with a wrong handshake or key", *addr[:2])
                    continue
                self._serve_session(conn, addr, opts)
                # After a session the tracker expects a new offer (TVM's server re-PUTs too).
                if self._tracker_conn is not None:
                    try:
                        self._put()
                    except (OSError, ValueError, struct.error):
                        self._close_tracker()
        finally:
            self._kill_session()
            self._close_tracker()
            self.sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._kill_session()
