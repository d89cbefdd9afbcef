"""Which boards `flash` connects to: given by address, or found by mDNS by name or key.

A board found by mDNS carries its board id into its :class:`FlashTarget`, so the SSH host key it
presents is checked against the one that id is bound to. Boards whose advertisement conflicts with
another (the same board id advertised twice, or one name for two board ids) are not flashed: one of
them may be an impostor, and only the user can say which address is the board (``--host``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import EdgetuneError
from .ssh import FlashResult, FlashTarget

if TYPE_CHECKING:
    from ..discovery.browse import Board


@dataclass
class Plan:
    """The boards to flash, and the ones found but skipped (each a failed result saying why)."""

    targets: list[FlashTarget] = field(default_factory=list)
    skipped: list[FlashResult] = field(default_factory=list)


def parse_host(value: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` to (host, port). Raises :class:`EdgetuneError`."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if not host or (port and (not port.isdigit() or not 0 < int(port) < 65536)):
        raise EdgetuneError(f"--host {value!r} is not HOST or HOST:PORT (e.g. --host 192.168.1.20:22)")
    return host, int(port) if port else default_port


def by_address(hosts: tuple[str, ...], user: str, key_file: str | None, port: int) -> Plan:
    """Targets for ``--host`` values (named by the value as typed)."""
    plan = Plan()
    for value in hosts:
        host, board_port = parse_host(value, port)
        plan.targets.append(FlashTarget(name=value, host=host, port=board_port, user=user, key_file=key_file))
    return plan


def by_mdns(boards: "list[Board]", device: str | None, key: str | None, all_boards: bool, timeout: float,
            user: str, key_file: str | None, port: int) -> Plan:
    """Targets for ``--device NAME`` (a name or board id) or ``--key KEY``, among the boards mDNS found
    in ``timeout`` seconds. Raises :class:`EdgetuneError` when none matches, or several match ``--key``
    without ``all_boards``; conflicting boards go to ``skipped``."""
    advertised = [b for b in boards if b.board_id is not None]
    if device:
        chosen = [b for b in advertised if device in (b.name, b.board_id)]
        if not chosen:
            names = ", ".join(sorted({b.name for b in advertised})) or "none"
            raise EdgetuneError(f"no board named {device!r} answered on mDNS within {timeout:g} s (found: {names}): "
                                "check it runs `edgetune-agent serve`, or pass --host ADDRESS")
    else:
        chosen = [b for b in advertised if b.key == key]
        if not chosen:
            raise EdgetuneError(f"no board with key {key!r} answered on mDNS within {timeout:g} s: "
                                f"check they run `edgetune-agent serve --key {key}`, or pass --host ADDRESS")
        if len(chosen) > 1 and not all_boards:
            names = ", ".join(b.name for b in chosen)
            raise EdgetuneError(f"{len(chosen)} boards have key {key!r} ({names}): pass --all to flash every one, "
                                "or --device NAME for one")
    plan = Plan()
    for board in chosen:
        address = board.addresses[0] if board.addresses else None
        shown = f"{user}@{address}:{port}" if address else "-"
        if board.conflict:
            plan.skipped.append(FlashResult(
                name=board.name, address=shown, ok=False, board_id=board.board_id,
                error=(f"not flashed: {board.conflict}; one may be an impostor: check which address is the board "
                       "and flash it with --host ADDRESS"),
            ))
            continue
        if address is None:
            raise EdgetuneError(f"board {board.name} has no address on mDNS: pass --host ADDRESS")
        host, board_port = parse_host(address, port)
        plan.targets.append(FlashTarget(name=board.name, host=host, port=board_port, user=user, key_file=key_file,
                                        board_id=board.board_id))
    return plan
