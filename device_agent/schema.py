"""Formats shared by the board and the workstation, defined once.

- the mDNS TXT record a board advertises under ``_edgetune._tcp`` (:class:`BoardRecord`);
- the service types both sides browse;
- the package manifest (:mod:`device_agent.manifest` builds on the constants here);
- the install answer `edgetune flash` reads back from a board (:mod:`device_agent.install_answer`).

A TXT value is at most 255 bytes (RFC 6763 §6.1); :meth:`BoardRecord.to_txt` refuses longer ones
instead of letting zeroconf truncate them silently.

Anyone on the LAN can advertise a TXT record, so :meth:`BoardRecord.from_txt` cleans every string it
reads with :func:`clean_text`: what the workstation prints, logs or writes to a file never carries a
terminal escape, a control character or a line break from the network.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AgentError

EDGETUNE_SERVICE = "_edgetune._tcp.local."
TRACKER_SERVICE = "_tvm-tracker._tcp.local."
TXT_VERSION = "1"
_MAX_TXT_VALUE = 255
# What the agent makes (uuid4 hex) and more: letters, digits, '.', '_' and '-'. A board id names a board
# in the workstation's known-boards file, one per line, so it holds no white space.
_BOARD_ID = re.compile(r"[0-9A-Za-z._-]{1,64}")

# Terminal escape sequences: CSI (ESC [ ... final byte), OSC/DCS/APC/PM/SOS strings up to BEL or ST,
# and two-byte ESC sequences; the 8-bit CSI (0x9b) too. Removed whole, so no parameter bytes remain.
_ESCAPE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x9d\x98\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -~]?"
)
# Unicode categories shown as '?': control (C0, DEL, C1), format (bidi overrides, zero-width),
# line/paragraph separators, surrogates.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def clean_text(value: str) -> str:
    """``value`` safe to print or log on one line: terminal escape sequences removed, every other
    control or format character (newlines, tabs, bidi overrides included) replaced by ``?``.

    The one sanitiser of strings that come from the network (mDNS TXT records, a board's answers).
    """
    value = _ESCAPE.sub("", value)
    return "".join("?" if unicodedata.category(c) in _UNPRINTABLE else c for c in value)


def is_clean_text(value: str) -> bool:
    """True when :func:`clean_text` would leave ``value`` unchanged."""
    return clean_text(value) == value


def check_key(key: str) -> str:
    """Return ``key`` if TVM's tracker can use it as a device key; raise :class:`AgentError` if not.

    The tracker splits ``server:KEY[:matchkey]`` on ':' so a key holding one can never be matched.
    """
    if not key:
        raise AgentError("the device key is empty: pass --key NAME (e.g. --key rpi4)")
    if ":" in key or any(c.isspace() for c in key):
        raise AgentError(
            f"device key {key!r} contains ':' or white space, which TVM's tracker cannot match: "
            "use letters, digits, '-', '_' or '.' (e.g. --key rpi4)"
        )
    return key


def parse_hostport(value: str, what: str = "tracker") -> tuple[str, int]:
    """``HOST:PORT`` to a tuple; raises :class:`AgentError` with what to type instead."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentError(f"{what} address {value!r} is not HOST:PORT (e.g. --{what} 192.168.1.10:9190)")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class BoardRecord:
    """What a board tells the LAN about itself (the ``_edgetune._tcp`` TXT record)."""

    board_id: str
    name: str
    key: str
    arch: str
    triple: str
    cpu: str
    cores: int
    features: tuple[str, ...] = ()
    mattr: tuple[str, ...] = ()
    os: str = "linux"
    model: str = ""
    tvm_version: str = ""
    agent_version: str = ""
    rpc_port: int = 0
    llc_kib: int = 0  # last-level cache of the target's cores, 0 when unknown (an older agent)
    extra: dict[str, str] = field(default_factory=dict)

    # TXT key <- attribute. Short keys keep the record inside one UDP packet.
    _FIELDS = (
        ("id", "board_id"),
        ("name", "name"),
        ("key", "key"),
        ("arch", "arch"),
        ("triple", "triple"),
        ("cpu", "cpu"),
        ("cores", "cores"),
        ("features", "features"),
        ("mattr", "mattr"),
        ("os", "os"),
        ("model", "model"),
        ("tvm", "tvm_version"),
        ("agent", "agent_version"),
        ("port", "rpc_port"),
        ("llc", "llc_kib"),
    )

    def target(self) -> dict[str, Any]:
        """The TVM target (JSON dict) the board proposed for itself."""
        target: dict[str, Any] = {"kind": "llvm", "mtriple": self.triple, "num-cores": self.cores}
        if self.cpu:
            target["mcpu"] = self.cpu
        if self.mattr:
            target["mattr"] = list(self.mattr)
        return target

    def to_txt(self) -> dict[str, str]:
        """The TXT properties, as strings. Raises :class:`AgentError` if a value exceeds 255 bytes."""
        txt = {"v": TXT_VERSION}
        for txt_key, attr in self._FIELDS:
            value = getattr(self, attr)
            if isinstance(value, tuple):
                value = ",".join(value)
            txt[txt_key] = str(value)
        txt.update(self.extra)
        for txt_key, value in txt.items():
            if len(txt_key.encode()) + 1 + len(value.encode()) > _MAX_TXT_VALUE:
                raise AgentError(
                    f"mDNS TXT entry {txt_key!r} is {len(value.encode())} bytes, over the 255-byte limit: "
                    "shorten --name or the key"
                )
        return txt

    @classmethod
    def from_txt(cls, props: dict[bytes | str, bytes | str | None]) -> "BoardRecord":
        """Parse a TXT record as zeroconf returns it. Raises :class:`AgentError` on a foreign or broken one."""
        txt = {
            clean_text(k.decode(errors="replace") if isinstance(k, bytes) else k): clean_text(
                (v.decode(errors="replace") if isinstance(v, bytes) else v) or ""
            )
            for k, v in props.items()
        }
        if txt.get("v") != TXT_VERSION:
            raise AgentError(f"unsupported edgetune TXT record version {txt.get('v')!r}: update edgetune")
        values: dict[str, Any] = {}
        for txt_key, attr in cls._FIELDS:
            values[attr] = txt.get(txt_key, "")
        try:
            values["cores"] = int(values["cores"] or 0)
            values["rpc_port"] = int(values["rpc_port"] or 0)
            values["llc_kib"] = int(values["llc_kib"] or 0)
        except ValueError as err:
            raise AgentError(f"broken edgetune TXT record ({err}): restart the board's agent") from None
        for attr in ("features", "mattr"):
            values[attr] = tuple(x for x in values[attr].split(",") if x)
        if not _BOARD_ID.fullmatch(values["board_id"]):
            raise AgentError(f"broken edgetune TXT record (board id {values['board_id'][:70]!r} is not 1-64 letters, "
                             "digits, '.', '_' or '-'): restart the board's agent")
        known = {k for k, _ in cls._FIELDS} | {"v"}
        values["extra"] = {k: v for k, v in txt.items() if k not in known}
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["features"] = list(self.features)
        data["mattr"] = list(self.mattr)
        data["target"] = self.target()
        return data


def target_to_json(target: dict[str, Any]) -> str:
    """Canonical JSON of a target dict (sorted keys): the form compared and hashed everywhere."""
    return json.dumps(target, sort_keys=True, separators=(",", ":"))
