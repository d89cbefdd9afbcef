"""The team key: who may run code on a board and command the tracker.

A team key is 32 random bytes, kept as 64 hex digits in a file only its owner can read. The workstation
keeps it in ``~/.config/edgetune/team.key``, a board in ``/etc/edgetune/team.key``
(``EDGETUNE_TEAM_KEY_FILE`` moves either). Everything else here is HMAC-SHA256 under that key:

- **Tracker connections** (a new message code, :data:`TRACKER_AUTH`, in TVM's JSON tracker protocol):
  the connecting side sends a nonce, the tracker answers with its own nonce and its proof
  ``HMAC(key, "tracker" | peer nonce | tracker nonce)``; the connecting side checks it and answers with
  ``HMAC(key, "peer" | peer nonce | tracker nonce)``. Both sides prove the key, neither sends it, and a
  proof is worth nothing on another connection (fresh nonces from both sides).
- **RPC sessions on a board**: the client adds ``-auth=PROOF`` to its handshake options (TVM's server
  ignores options it does not know, so the same client works with stock servers). Through a tracker the
  proof is ``HMAC(key, "session" | match key)``; the board renews its match key after every session, so a
  proof is good once. Straight to a board (no tracker), it is a time-bounded token
  ``UNIX_TIME.NONCE.HMAC(key, "direct" | device key | UNIX_TIME | NONCE)``, good within a skew window and
  once (the board remembers the nonces it has seen in that window).

Sessions are authenticated, not encrypted: anyone who can read the traffic sees what runs. Use a VPN
(WireGuard) or an SSH tunnel on a network you do not trust.

This module is shared by the board and the workstation (``host`` imports it; it imports nothing from
``host`` and nothing of TVM).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import AgentError

# --- where the key lives, and the switches -----------------------------------------------------------------
TEAM_KEY_ENV = "EDGETUNE_TEAM_KEY_FILE"
OPEN_ENV = "EDGETUNE_OPEN"
BOARD_TEAM_KEY = Path("/etc/edgetune/team.key")
KEY_BYTES = 32
NONCE_BYTES = 16
# A key file is one line of 64 hex digits; anything much longer is not a key file.
_MAX_KEY_FILE_BYTES = 4096
_KEY_TEXT = re.compile(r"[0-9a-fA-F]{64}")
_NONCE = re.compile(r"[0-9a-f]{%d}" % (2 * NONCE_BYTES))

# --- the tracker protocol --------------------------------------------------------------------------------
# A message code next to TVM's TrackerCode values (1-7): [TRACKER_AUTH, "hello", nonce] and
# [TRACKER_AUTH, "proof", proof]. A stock TVM tracker closes the connection on a code it does not know.
TRACKER_AUTH = 100
AUTH_HELLO = "hello"
AUTH_PROOF = "proof"
# tvm.rpc.base.TrackerCode.SUCCESS / FAIL, as literals: this module never imports TVM.
TRACKER_SUCCESS = 0
TRACKER_FAIL = -1

# --- the RPC handshake -------------------------------------------------------------------------------------
AUTH_OPTION = b"-auth="
_DIRECT_TOKEN = re.compile(r"(\d{1,12})\.([0-9a-f]{%d})\.([0-9a-f]{64})" % (2 * NONCE_BYTES))
_PROOF = re.compile(r"[0-9a-f]{64}")

# --- the board's mDNS TXT record --------------------------------------------------------------------------
TXT_AUTH = "auth"
AUTH_TEAM = "team"  # sessions only for holders of the team key
AUTH_OPEN = "open"  # anyone on the network can run code on the board

OPEN_WARNING = "anyone on the network can run code on this board"


class TeamKeyError(AgentError):
    """The team key file is missing, unreadable, readable by every user, or not a team key."""


class TeamKeyMissing(TeamKeyError):
    """There is no team key file at the path."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


class AuthRefused(AgentError):
    """A peer did not prove the team key; the message says how (missing, wrong, stale, replayed)."""


@dataclass(frozen=True)
class TeamKey:
    """The team's secret and the file it came from."""

    secret: bytes = field(repr=False)
    path: Path

    @property
    def fingerprint(self) -> str:
        """16 hex digits that identify the key without revealing it: compare them on the workstation and
        a board to see that both hold the same key."""
        return hmac.new(self.secret, b"edgetune team key fingerprint", hashlib.sha256).hexdigest()[:16]

    def mac(self, label: str, *parts: str) -> str:
        """HMAC-SHA256 of ``label`` and ``parts`` joined by newlines, as hex. ``parts`` never hold a newline
        (nonces, times and keys are single words), so the join is unambiguous."""
        for part in parts:
            if "\n" in part:
                raise ValueError("a MAC part holds a newline")
        message = "\n".join([label, *parts]).encode("utf-8")
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()


def _same(expected: str, given: object) -> bool:
    """Constant-time comparison of a proof; False for anything that is not a string."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(expected.encode("ascii"), given.encode("utf-8", "replace"))


# --- the key file -------------------------------------------------------------------------------------------
def workstation_key_path() -> Path:
    """The workstation's team key: ``$EDGETUNE_TEAM_KEY_FILE``, else ``~/.config/edgetune/team.key``."""
    env = os.environ.get(TEAM_KEY_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "edgetune" / "team.key"


def board_key_path() -> Path:
    """A board's team key: ``$EDGETUNE_TEAM_KEY_FILE``, else ``/etc/edgetune/team.key``, else (a board
    without root, e.g. Termux, or the agent on the workstation) the workstation's path when a key is there."""
    env = os.environ.get(TEAM_KEY_ENV)
    if env:
        return Path(env).expanduser()
    if BOARD_TEAM_KEY.exists():
        return BOARD_TEAM_KEY
    home = Path.home() / ".config" / "edgetune" / "team.key"
    return home if home.exists() else BOARD_TEAM_KEY


def parse_team_key(text: str, path: Path) -> bytes:
    """The secret in a key file's text (64 hex digits, white space around ignored).

    Raises :class:`TeamKeyError` for anything else."""
    value = text.strip()
    if not _KEY_TEXT.fullmatch(value):
        raise TeamKeyError(f"{path} is not a team key (one line of 64 hex digits): copy the file "
                           "`edgetune tracker` created on the workstation (~/.config/edgetune/team.key)")
    return bytes.fromhex(value)


def load_team_key(path: Path) -> TeamKey:
    """Read the team key at ``path``.

    Raises :class:`TeamKeyMissing` when there is no file, :class:`TeamKeyError` when it cannot be read,
    is readable or writable by every user, or is not a key.
    """
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise TeamKeyMissing(path, f"no team key at {path}") from None
    except OSError as err:
        raise TeamKeyError(f"cannot read the team key {path} ({err.strerror}): make it readable by this user "
                           "(on a board: root-owned, group of the agent's user, mode 640)") from None
    if not stat.S_ISREG(info.st_mode):
        raise TeamKeyError(f"the team key {path} is not a regular file: copy the key file there")
    if info.st_mode & 0o007:
        raise TeamKeyError(f"the team key {path} is open to every user of this machine (mode "
                           f"{stat.S_IMODE(info.st_mode):o}): chmod 600 {path} (640 on a board, group of the agent's user)")
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise TeamKeyError(f"{path} is not a team key (over {_MAX_KEY_FILE_BYTES} bytes)")
    return TeamKey(parse_team_key(data.decode("ascii", errors="replace"), path), path)


def create_team_key(path: Path) -> TeamKey:
    """Write a new random team key to ``path`` (mode 600, its folder 700 when created). A key that appears
    there meanwhile is kept and returned. Raises :class:`TeamKeyError` when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_team_key(path)
    except OSError as err:
        raise TeamKeyError(f"cannot create the team key {path} ({err.strerror}): set {TEAM_KEY_ENV} to a "
                           "writable path") from None
    secret = secrets.token_bytes(KEY_BYTES)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secret.hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        path.unlink(missing_ok=True)
        raise TeamKeyError(f"cannot write the team key {path} ({err.strerror})") from None
    return TeamKey(secret, path)


def load_or_create_team_key(path: Path) -> tuple[TeamKey, bool]:
    """The team key at ``path``, created when there is none: ``(key, created)``. Raises :class:`TeamKeyError`."""
    try:
        return load_team_key(path), False
    except TeamKeyMissing:
        return create_team_key(path), True


def open_mode_from_env() -> bool:
    """``EDGETUNE_OPEN`` set to 1/true/yes."""
    return os.environ.get(OPEN_ENV, "").strip().lower() in ("1", "true", "yes")


# --- tracker connections ----------------------------------------------------------------------------------
def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def is_nonce(value: object) -> bool:
    return isinstance(value, str) and _NONCE.fullmatch(value) is not None


def tracker_proof(key: TeamKey, peer_nonce: str, tracker_nonce: str) -> str:
    """What a tracker answers to prove the key."""
    return key.mac("tracker", peer_nonce, tracker_nonce)


def peer_proof(key: TeamKey, peer_nonce: str, tracker_nonce: str) -> str:
    """What a board or a host answers to prove the key to a tracker."""
    return key.mac("peer", peer_nonce, tracker_nonce)


def proof_matches(expected: str, given: object) -> bool:
    return _same(expected, given)


def authenticate_to_tracker(key: TeamKey, call: Callable[[list], object]) -> None:
    """Run the mutual proof with a tracker over ``call`` (send one JSON message, return the answer; it
    raises OSError/ValueError when the connection breaks).

    Raises :class:`AuthRefused` saying why when the tracker does not prove the key or refuses ours, and
    TimeoutError (an OSError) when it does not answer in time (slow or gone, not a stranger).
    """
    mine = new_nonce()
    try:
        answer = call([TRACKER_AUTH, AUTH_HELLO, mine])
    except TimeoutError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise AuthRefused("it closed the connection when asked to prove the key (a tracker without edgetune's "
                          f"authentication, e.g. TVM's own: {err or 'closed'})") from None
    if not (isinstance(answer, list) and len(answer) == 3 and answer[0] == TRACKER_SUCCESS
            and is_nonce(answer[1]) and isinstance(answer[2], str)):
        raise AuthRefused(f"it answered the proof request with {str(answer)[:80]!r}")
    theirs = answer[1]
    if not proof_matches(tracker_proof(key, mine, theirs), answer[2]):
        raise AuthRefused("its proof of the key is wrong (a tracker of another team, or an impostor)")
    try:
        result = call([TRACKER_AUTH, AUTH_PROOF, peer_proof(key, mine, theirs)])
    except TimeoutError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise AuthRefused(f"it closed the connection after our proof ({err or 'closed'})") from None
    if result != TRACKER_SUCCESS:
        raise AuthRefused("it refused our proof of the key")


# --- RPC sessions ----------------------------------------------------------------------------------------
def session_proof(key: TeamKey, matchkey: str) -> str:
    """The ``-auth=`` value for a session on the board that offered ``matchkey`` through a tracker."""
    return key.mac("session", matchkey)


def direct_token(key: TeamKey, device_key: str, now: float | None = None, nonce: str | None = None) -> str:
    """The ``-auth=`` value for a session straight to a board of ``device_key`` (no tracker):
    ``UNIX_TIME.NONCE.HMAC``. Good once, within the board's skew window around ``now`` (default: the clock)."""
    unix = str(int(time.time() if now is None else now))
    nonce = new_nonce() if nonce is None else nonce
    return f"{unix}.{nonce}.{key.mac('direct', device_key, unix, nonce)}"


def handshake_key(matchkey: str, proof: str) -> str:
    """The key string a client passes to ``tvm.rpc.connect``: the match key and the proof option."""
    return f"{matchkey} {AUTH_OPTION.decode()}{proof}"


def auth_option(words: list[bytes]) -> str:
    """The value of the one ``-auth=`` option among a handshake's option words.

    Raises :class:`AuthRefused` when there is none, more than one, or it is not ASCII.
    """
    found = [w[len(AUTH_OPTION):] for w in words if w.startswith(AUTH_OPTION)]
    if not found:
        raise AuthRefused("no proof of the team key in the handshake (a client without the key, or a stock TVM "
                          "client: start the agent with --open to allow those)")
    if len(found) > 1:
        raise AuthRefused("more than one -auth option in the handshake")
    try:
        return found[0].decode("ascii")
    except UnicodeDecodeError:
        raise AuthRefused("an -auth option that is not ASCII") from None


class ReplayCache:
    """Nonces of direct-session tokens seen within the skew window, so each token is good once.

    Bounded: at most ``max_entries`` nonces (only tokens with a valid MAC get here, so only key holders
    can fill it); when it is full of unexpired nonces, new tokens are refused until some expire.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def admit(self, nonce: str, expires_at: float, now: float) -> None:
        """Remember ``nonce`` until ``expires_at`` (unix seconds). Raises :class:`AuthRefused` when it was
        seen before or the cache is full."""
        if len(self._expiry) >= self.max_entries:
            self._expiry = {n: t for n, t in self._expiry.items() if t > now}
        if nonce in self._expiry:
            raise AuthRefused("a replayed direct-session token (its nonce was used already)")
        if len(self._expiry) >= self.max_entries:
            raise AuthRefused(f"{self.max_entries} direct sessions within the token window: try again later")
        self._expiry[nonce] = expires_at


class SessionGate:
    """Checks the ``-auth=`` proof of an RPC handshake on a board."""

    def __init__(self, key: TeamKey, skew_sec: float, max_nonces: int) -> None:
        self.key = key
        self.skew_sec = skew_sec
        self.replays = ReplayCache(max_nonces)

    def check_tracker_session(self, matchkey: str, words: list[bytes]) -> None:
        """A session handed out by the tracker: the proof must be :func:`session_proof` of ``matchkey``.
        Raises :class:`AuthRefused`."""
        given = auth_option(words)
        if not _PROOF.fullmatch(given) or not _same(session_proof(self.key, matchkey), given):
            raise AuthRefused("a wrong proof of the team key (a host of another team, or a forged handshake)")

    def check_direct_session(self, device_key: str, words: list[bytes], now: float | None = None) -> None:
        """A session straight to the board: the proof must be a fresh, unused :func:`direct_token`.
        Raises :class:`AuthRefused`."""
        given = auth_option(words)
        match = _DIRECT_TOKEN.fullmatch(given)
        if match is None:
            raise AuthRefused("a direct-session proof that is not UNIX_TIME.NONCE.HMAC")
        unix, nonce, mac = match.groups()
        if not _same(self.key.mac("direct", device_key, unix, nonce), mac):
            raise AuthRefused("a wrong proof of the team key (a host of another team, or a forged handshake)")
        now = time.time() if now is None else now
        if abs(now - int(unix)) > self.skew_sec:
            raise AuthRefused(f"a direct-session token {now - int(unix):+.0f} s old, outside the "
                              f"{self.skew_sec:g} s window (replayed, or the clocks differ: set them with NTP)")
        self.replays.admit(nonce, int(unix) + self.skew_sec, now)
