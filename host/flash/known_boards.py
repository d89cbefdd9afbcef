"""The known-boards file: the SSH host key each board id presented when it was first flashed.

mDNS says which board id is where, but anyone on the LAN can advertise a board's id. The SSH host
key is what a board cannot fake, so ``flash`` binds the two on first use: once a board id has been
flashed with a verified host key (in known_hosts, or recorded there by ``--trust-new-host``), that id
is only ever flashed again on a host that presents the same key, at whatever address.

One line per board, like OpenSSH's known_hosts: ``BOARD-ID KEY-TYPE BASE64 [NAME]`` (the name only
says which board it was, for people). Lines are only appended; for a board id listed twice the first
line counts. ``#`` starts a comment.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko

from device_agent.schema import clean_text

from ..errors import EdgetuneError

logger = logging.getLogger(__name__)

DEFAULT_KNOWN_BOARDS = "~/.config/edgetune/known_boards"


@dataclass(frozen=True)
class BoardKey:
    """The host key a board id was bound to."""

    board_id: str
    key_type: str
    key_base64: str
    name: str = ""

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
        digest = hashlib.sha256(base64.b64decode(self.key_base64)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def same_key(self, key: paramiko.PKey) -> bool:
        return (key.get_name(), key.get_base64()) == (self.key_type, self.key_base64)


class KnownBoards:
    """The known-boards file of one flash, shared by its threads; read once, appended under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keys: dict[str, BoardKey] | None = None

    def _load(self) -> dict[str, BoardKey]:
        if self._keys is not None:
            return self._keys
        keys: dict[str, BoardKey] = {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as err:
            raise EdgetuneError(
                f"cannot read known boards {self.path} ({err}): fix the file or pass --known-boards FILE") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split(maxsplit=3)
            if len(parts) < 3 or not _is_base64(parts[2]):
                raise EdgetuneError(
                    f"known boards {self.path} line {number} is not 'BOARD-ID KEY-TYPE BASE64 [NAME]': "
                    "fix or remove that line"
                )
            if parts[0] not in keys:
                keys[parts[0]] = BoardKey(parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else "")
        self._keys = keys
        return keys

    def lookup(self, board_id: str) -> BoardKey | None:
        """The key ``board_id`` was bound to, or None if it was never flashed. Raises :class:`EdgetuneError`
        when the file cannot be read."""
        with self._lock:
            return self._load().get(board_id)

    def bind(self, board_id: str, name: str, key: paramiko.PKey) -> BoardKey | None:
        """Bind ``board_id`` to the verified host ``key``; returns the new binding, or None if it was bound
        to that key already. Raises :class:`EdgetuneError` if it is bound to another key (:func:`changed`),
        or the file cannot be written."""
        with self._lock:
            known = self._load()
            bound = known.get(board_id)
            if bound is not None:
                if not bound.same_key(key):
                    raise changed(bound, name, key, self.path)
                return None
            entry = BoardKey(board_id, key.get_name(), key.get_base64(), clean_text(name))
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(f"{entry.board_id} {entry.key_type} {entry.key_base64} {entry.name}".rstrip() + "\n")
            except OSError as err:
                raise EdgetuneError(
                    f"cannot record board {name} in {self.path} ({err.strerror or err}): "
                    "make it writable or pass --known-boards FILE"
                ) from None
            known[board_id] = entry
            logger.info("bound board id %s to host key %s in %s", board_id, entry.fingerprint, self.path)
            return entry


def changed(bound: BoardKey, name: str, key: paramiko.PKey, path: Path) -> EdgetuneError:
    """The error for a board id that presents another host key than the one it was bound to."""
    return EdgetuneError(
        f"board {name} presents a different SSH host key than before: {key.get_name()} {key.fingerprint} for "
        f"board id {bound.board_id}, which {path} binds to {bound.fingerprint}; not flashed (something else may "
        f"be advertising the board's id): if the board was reinstalled, remove its line "
        f"(`sed -i '/^{bound.board_id} /d' {path}`) and flash it once with --trust-new-host"
    )


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True
