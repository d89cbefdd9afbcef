"""Run TVM's tracker (its own ``TrackerServerHandler``) in this process, obeying only the team.

TVM's ``Tracker`` class runs it in a popen worker that keeps the port when its parent is killed; here
the tracker lives in the calling process, so SIGTERM stops it and frees the port. The summary gains a
per-server ``free`` flag (which exact board is busy), which stock clients simply ignore.

TVM's tracker obeys anyone: STOP with its key, PUT of made-up boards, REQUEST of any board. Here each
connection must first prove the team key (the mutual proof of :mod:`device_agent.auth`, a message code
of its own in TVM's JSON protocol); until it has, it may do nothing else, and it is closed when it has
not within ``TRACKER_AUTH_SEC``. STOP needs a proven connection. Two explicit exceptions, each announced
with a warning when the tracker starts: open mode (stock TVM clients may do what TVM allows, except
STOP), and plain keys (stock RPC servers, e.g. phones running TVM's ``tvm_rpc``, may register under
those keys only, and do nothing else).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Callable

from device_agent.auth import (AUTH_HELLO, AUTH_PROOF, TRACKER_AUTH, TRACKER_FAIL, TRACKER_SUCCESS, TeamKey,
                               is_nonce, new_nonce, peer_proof, proof_matches, tracker_proof)
from device_agent.schema import check_key

from .. import config
from ..errors import AgentError, EdgetuneError

logger = logging.getLogger(__name__)


def bind_tracker_socket(host: str, port: int) -> socket.socket:
    """Bind the tracker's listen socket (``port=0``: any free port). Raises :class:`EdgetuneError`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise EdgetuneError(
                f"port {port} on {host} is in use (another tracker?): pass --port with a free port, or --port 0"
            ) from None
        raise EdgetuneError(f"cannot listen on {host}:{port} ({err.strerror}): pass --host with an address of this machine") from None
    sock.listen(64)
    return sock


@dataclass(frozen=True)
class TrackerPolicy:
    """Who the tracker obeys: holders of ``team_key``; in ``open_mode`` also stock TVM clients (all but
    STOP); and stock RPC servers registering under one of ``plain_keys``."""

    team_key: TeamKey
    open_mode: bool = False
    plain_keys: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for key in self.plain_keys:
            try:
                check_key(key)
            except AgentError as err:
                raise EdgetuneError(f"--allow-plain-key: {err}") from None


def _handler_class(policy: TrackerPolicy):
    from tvm.rpc import base
    from tvm.rpc.tracker import TCPEventHandler, TrackerServerHandler

    codes = base.TrackerCode
    names = {value: name for name, value in vars(codes).items() if isinstance(value, int)}

    class TeamConnection(TCPEventHandler):
        """One tracker connection, obeyed once it proved the team key (or within the policy's exceptions)."""

        def __init__(self, tracker, sock, addr) -> None:
            super().__init__(tracker, sock, addr)
            self.authenticated = False
            self.plain_key: str | None = None  # set when a stock server registers under an allowed key
            self._nonces: tuple[str, str] | None = None  # (peer's, ours) once it said hello
            self._refused = False  # answered FAIL and closing: what it sent after that is ignored
            tracker._ioloop.call_later(config.TRACKER_AUTH_SEC, self._check_proven)

        def _where(self) -> str:
            return f"{self._addr[0]}:{self._addr[1]}"

        def _check_proven(self) -> None:
            if self._sock is None or self.authenticated or self.plain_key is not None or policy.open_mode:
                return
            logger.warning("closed the connection from %s: it did not prove the team key within %g s",
                           self._where(), config.TRACKER_AUTH_SEC)
            self.close()

        def _refuse(self, what: str, why: str) -> None:
            logger.warning("refused %s from %s: %s", what, self._where(), why)
            self._refused = True
            try:
                self.ret_value(TRACKER_FAIL)
            except OSError:
                pass
            self.signal_close()  # after the answer is out

        def call_handler(self, args) -> None:
            if self._refused:
                return
            if not isinstance(args, list) or not args or not isinstance(args[0], int):
                self._refuse("a malformed message", "not [code, ...]")
                return
            code = args[0]
            what = names.get(code, f"code {code}")
            if code == TRACKER_AUTH:
                self._authenticate(args)
            elif code == codes.STOP:
                # No stop key: TVM's is a constant anyone can read. Only a proven connection stops it.
                if not self.authenticated:
                    self._refuse("STOP", "the connection did not prove the team key")
                    return
                logger.warning("stopping: STOP from %s (team key proven)", self._where())
                self.ret_value(TRACKER_SUCCESS)
                self._tracker.stop()
            elif self.authenticated or policy.open_mode or self._plain_server_may(code, args):
                super().call_handler(args)
            else:
                self._refuse(what, "the connection did not prove the team key (a client without the key, or "
                             "a stock TVM client: start the tracker with --open or --allow-plain-key KEY for those)")

        def _plain_server_may(self, code: int, args: list) -> bool:
            """A stock RPC server registering under an allowed key: its info, offers and match-key pings."""
            if not policy.plain_keys:
                return False
            if code == codes.UPDATE_INFO and len(args) == 2 and isinstance(args[1], dict):
                key = args[1].get("key")
                plain = key[len("server:"):] if isinstance(key, str) and key.startswith("server:") else None
                if plain in policy.plain_keys and self.plain_key in (None, plain):
                    self.plain_key = plain
                    return True
                return False
            if code == codes.PUT and len(args) >= 3 and isinstance(args[1], str) and args[1] in policy.plain_keys:
                if self.plain_key in (None, args[1]):
                    self.plain_key = args[1]
                    return True
                return False
            return self.plain_key is not None and code in (codes.GET_PENDING_MATCHKEYS, codes.PING)

        def _authenticate(self, args: list) -> None:
            step = args[1] if len(args) == 3 else None
            if step == AUTH_HELLO and self._nonces is None and is_nonce(args[2]):
                ours = new_nonce()
                self._nonces = (args[2], ours)
                self.ret_value([TRACKER_SUCCESS, ours, tracker_proof(policy.team_key, args[2], ours)])
            elif step == AUTH_PROOF and self._nonces is not None and not self.authenticated:
                if proof_matches(peer_proof(policy.team_key, *self._nonces), args[2]):
                    self.authenticated = True
                    self.ret_value(TRACKER_SUCCESS)
                else:
                    self._refuse("a connection", "a wrong proof of the team key (a board or host of another team?)")
            else:
                self._refuse("a connection", "a malformed or out-of-order proof of the team key")

    class EdgetuneTrackerHandler(TrackerServerHandler):
        def _on_event(self, _events) -> None:
            # TVM's loop, with connections that must prove the team key.
            while True:
                try:
                    conn, addr = self._sock.accept()
                except OSError as err:
                    if err.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK):
                        break
                    logger.warning("accepting a tracker connection failed: %s", err)
                    break
                TeamConnection(self, conn, addr)

        def summary(self):
            data = super().summary()
            free_values = set()
            for scheduler in self._scheduler_map.values():
                free_values.update(id(v) for v in getattr(scheduler, "_values", []))
            for conn in self._connections:
                info = conn.summary()
                if info.get("key", "").startswith("server"):
                    # conn._info is the dict the summary holds, so this shows in ``data`` too.
                    info["free"] = any(id(v) in free_values for v in conn.put_values)
            return data

    return EdgetuneTrackerHandler


def run_tracker(sock: socket.socket, policy: TrackerPolicy, ready: Callable[[int], None] | None = None,
                stop_event: threading.Event | None = None) -> None:
    """Serve the tracker on ``sock`` under ``policy`` in the calling thread until ``stop_event`` is set
    (or a proven STOP arrives, or forever)."""
    from tornado import ioloop

    asyncio.set_event_loop(asyncio.new_event_loop())
    # TVM's handler wants a stop key; STOP is decided above, so this one is never compared.
    handler = _handler_class(policy)(sock, stop_key=secrets.token_hex(16))
    loop = ioloop.IOLoop.current()
    if stop_event is not None:
        def _check() -> None:
            if stop_event.is_set():
                handler.stop()

        ioloop.PeriodicCallback(_check, 200).start()
    if ready:
        loop.add_callback(ready, sock.getsockname()[1])
    handler.run()
