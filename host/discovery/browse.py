"""Boards found by mDNS, merged with what the tracker knows (free / busy / not registered).

A board is one row whatever number of addresses it answers on: one advertisement (mDNS service
instance) per board id. Plain TVM RPC servers (no agent, e.g. an Android phone running TVM's RPC app)
are known only to the tracker and are listed too, marked as such.

Anyone on the LAN can advertise, so a board id advertised by two services, or a name used by two
board ids, is a conflict: each of those rows says so in ``conflict`` (one may be an impostor), and
``flash`` skips them until the user picks one by address. TXT strings are cleaned where they are
parsed (:meth:`device_agent.schema.BoardRecord.from_txt`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from device_agent.errors import AgentError
from device_agent.mdns import open_zeroconf
from device_agent.schema import EDGETUNE_SERVICE, BoardRecord, clean_text

from .. import config
from ..errors import EdgetuneError, TrackerUnreachable
from ..tracker.client import TrackerAddr, tracker_summary

logger = logging.getLogger(__name__)

FREE, BUSY, NOT_REGISTERED, UNKNOWN = "free", "busy", "not registered", "unknown"


@dataclass
class Board:
    """One board, as mDNS and the tracker see it."""

    name: str
    key: str
    addresses: list[str]
    rpc_port: int
    board_id: str | None = None
    record: BoardRecord | None = None
    status: str = UNKNOWN  # free | busy | not registered | unknown (no tracker)
    agent: bool = True  # False: a plain TVM RPC server seen only through the tracker
    service: str | None = None  # the mDNS service instance that advertised it
    conflict: str | None = None  # another advertisement claims its board id or its name

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "board_id": self.board_id,
            "key": self.key,
            "addresses": list(self.addresses),
            "rpc_port": self.rpc_port,
            "status": self.status,
            "agent": self.agent,
            "service": self.service,
            "conflict": self.conflict,
        }
        if self.record is not None:
            rec = self.record
            data.update(
                arch=rec.arch, triple=rec.triple, cpu=rec.cpu, cores=rec.cores, features=list(rec.features),
                os=rec.os, model=rec.model, tvm_version=rec.tvm_version, agent_version=rec.agent_version,
                llc_kib=rec.llc_kib, target=rec.target(),
            )
        return data


@dataclass
class _Seen:
    record: BoardRecord
    addresses: list[str] = field(default_factory=list)


def resolve_services(service: str, timeout: float, zc: Zeroconf | None = None,
                     wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, ServiceInfo]]:
    """Listen ``timeout`` seconds for instances of the mDNS ``service`` type and yield each one (its name
    and resolved info) once; instances whose name ``wanted`` refuses are not resolved.

    Raises :class:`EdgetuneError` when mDNS cannot run here.
    """
    own = zc is None
    if zc is None:
        try:
            zc = open_zeroconf()
        except AgentError as err:
            raise EdgetuneError(str(err).replace("pass --no-advertise and --tracker HOST:PORT",
                                                 "pass --tracker HOST:PORT")) from None
    lock = threading.Lock()
    names: set[str] = set()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            with lock:
                names.add(name)

    browser = ServiceBrowser(zc, service, handlers=[on_change])
    try:
        deadline = time.monotonic() + timeout
        done: set[str] = set()
        while True:
            with lock:
                pending = names - done
            for name in pending:
                if wanted is not None and not wanted(name):
                    done.add(name)
                    continue
                remaining = max(deadline - time.monotonic(), 0.3)
                info = zc.get_service_info(service, name, timeout=int(min(remaining, 3.0) * 1000))
                if info is None:
                    continue
                done.add(name)
                yield name, info
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    finally:
        browser.cancel()
        if own:
            zc.close()


def browse_boards(timeout: float, zc: Zeroconf | None = None) -> dict[str, _Seen]:
    """Listen ``timeout`` seconds for ``_edgetune._tcp`` boards; service instance name -> record and
    addresses (a board id may come in several: see :func:`merge`).

    Raises :class:`EdgetuneError` when mDNS cannot run here.
    """
    seen: dict[str, _Seen] = {}
    for name, info in resolve_services(EDGETUNE_SERVICE, timeout, zc):
        service = clean_text(name)
        try:
            record = BoardRecord.from_txt(info.properties)
        except AgentError as err:
            logger.warning("ignoring %s: %s", service, err)
            continue
        entry = seen.setdefault(service, _Seen(record))
        for address in info.parsed_addresses(IPVersion.V4Only):
            if address not in entry.addresses:
                entry.addresses.append(address)
    return seen


def _status_of(server: dict[str, Any], queue: dict[str, Any]) -> str:
    if "free" in server:  # edgetune's tracker says which board exactly
        return FREE if server["free"] else BUSY
    free = int(queue.get("free", 0))
    return FREE if free > 0 else BUSY


def merge(seen: dict[str, _Seen], summary: dict[str, Any] | None) -> list[Board]:
    """One row per advertisement: mDNS boards with their tracker status (conflicts flagged), then
    tracker-only (plain TVM) servers."""
    boards: list[Board] = []
    for service, entry in seen.items():
        rec = entry.record
        boards.append(Board(
            name=rec.name, key=rec.key, addresses=entry.addresses, rpc_port=rec.rpc_port, board_id=rec.board_id,
            record=rec, status=UNKNOWN if summary is None else NOT_REGISTERED, service=service,
        ))
    flag_conflicts(boards)
    if summary is None:
        return boards
    queue_info = summary.get("queue_info", {})
    for server in summary.get("server_info", []):
        full_key = server.get("key", "")
        if not full_key.startswith("server:"):
            continue
        key = full_key[len("server:"):]
        ip, port = server.get("addr", [None, None])[:2]
        status = _status_of(server, queue_info.get(key, {}))
        candidates = [b for b in boards if b.agent and b.key == key and b.rpc_port == port]
        exact = [b for b in candidates if ip in b.addresses]
        # An agent bound to 0.0.0.0 is seen by the tracker at the address it connected from, which
        # need not be one it advertises: match on key and port when that is unambiguous.
        match = exact[0] if exact else (candidates[0] if len(candidates) == 1 else None)
        if match is not None and match.status in (NOT_REGISTERED, UNKNOWN):
            match.status = status
            if ip and ip not in match.addresses:
                match.addresses.append(ip)
            continue
        boards.append(Board(name=f"{ip}:{port}", key=key, addresses=[ip] if ip else [], rpc_port=port or 0,
                            status=status, agent=False))
    return boards


def _where(board: Board) -> str:
    return f"{board.service or board.name} at {', '.join(board.addresses) or 'no address'}"


def flag_conflicts(boards: list[Board]) -> None:
    """Set ``conflict`` on every advertised board whose board id is advertised by another service, or
    whose name another board id uses: one of them may be an impostor, so none of them is trusted by name."""
    advertised = [b for b in boards if b.board_id is not None]
    for board in advertised:
        same_id = [b for b in advertised if b.board_id == board.board_id]
        same_name = [b for b in advertised if b.name == board.name and b.board_id != board.board_id]
        if len(same_id) > 1:
            board.conflict = (f"board id {board.board_id} is advertised {len(same_id)} times "
                              f"({'; '.join(_where(b) for b in same_id)})")
        elif same_name:
            named = [board, *same_name]
            board.conflict = (f"{len(named)} boards are named {board.name!r} "
                              f"({'; '.join(f'id {b.board_id} by {_where(b)}' for b in named)})")


def find_boards(timeout: float | None = None, tracker: TrackerAddr | None = None) -> tuple[list[Board], str | None]:
    """Every board on mDNS and on the tracker. Returns the boards and a note (e.g. tracker problems).

    ``tracker=None`` lists mDNS boards only (status unknown).
    """
    timeout = config.DISCOVERY_SEC if timeout is None else timeout
    seen = browse_boards(timeout)
    summary = None
    note = None
    if tracker is not None:
        try:
            summary = tracker_summary(tracker)
        except TrackerUnreachable as err:
            note = str(err)
    boards = merge(seen, summary)
    boards.sort(key=lambda b: (b.key, b.name))
    return boards, note
