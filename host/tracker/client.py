"""Talking to a tracker with a deadline on every wait (TVM's ``TrackerSession`` has none)."""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from typing import Any

from device_agent.schema import TRACKER_SERVICE

from .. import config
from ..errors import EdgetuneError, NoBoardError, TrackerUnreachable
from ..util import parse_hostport

logger = logging.getLogger(__name__)

TrackerAddr = tuple[str, int]


def _base():
    from tvm.rpc import base

    return base


def _connect(addr: TrackerAddr, timeout: float) -> socket.socket:
    base = _base()
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


def request_session(addr: TrackerAddr, key: str, session_timeout: float, deadline: float, priority: int = 1):
    """Get an RPC session to a free board of ``key`` through the tracker.

    ``deadline`` is a ``time.monotonic()`` value: if no board of the key is given to us by then,
    :class:`NoBoardError` is raised (TVM's ``TrackerSession.request`` would wait forever). Raises
    :class:`TrackerUnreachable` when the tracker is gone.
    """
    from tvm import rpc

    base = _base()
    wait = deadline - time.monotonic()
    if wait <= 0:
        raise NoBoardError(f"no board of key {key!r} became free in time")
    sock = _connect(addr, min(config.TRACKER_CONNECT_SEC, max(wait, 0.1)))
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
    if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
        raise TrackerUnreachable(f"tracker {addr[0]}:{addr[1]} refused the request: {value!r}")
    host, port, matchkey = value[1]
    board = f"{host}:{port}"
    try:
        session = rpc.connect(host, port, matchkey, session_timeout=session_timeout)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types for a refused connection
        raise ConnectionError(f"board {board} did not accept the session: {err}") from None
    return session, board


def find_tracker_by_mdns(timeout: float) -> TrackerAddr | None:
    """The first tracker advertised on mDNS within ``timeout`` seconds, or None."""
    from device_agent.mdns import TrackerLocator

    try:
        locator = TrackerLocator()
    except Exception as err:  # noqa: BLE001 - AgentError or OSError: no mDNS means no tracker found
        logger.debug("mDNS unavailable: %s", err)
        return None
    try:
        return locator.wait(timeout)
    finally:
        locator.close()


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
