"""Phones recorded by ``edgetune android connect``: one JSON file per phone.

A plain TVM RPC server advertises no target, so ``connect`` records the phone's profile under its
device key; ``tune``, ``build`` and ``tasks --device KEY`` take the target from here when no agent of
the key is on mDNS, and the NDK link takes the phone's API level from here.

Folder: ``$EDGETUNE_ANDROID_DIR``, else ``~/.config/edgetune/android``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from device_agent.schema import target_to_json

from .adb import AndroidError

logger = logging.getLogger(__name__)

DIR_ENV = "EDGETUNE_ANDROID_DIR"


def phones_dir() -> Path:
    """Where recorded phones live (``$EDGETUNE_ANDROID_DIR``, else ``~/.config/edgetune/android``)."""
    return Path(os.environ.get(DIR_ENV) or "~/.config/edgetune/android").expanduser()


@dataclass(frozen=True)
class RecordedPhone:
    """A phone ``android connect`` set up: how to reach it, its key and its board profile."""

    serial: str  # hardware serial
    adb_serial: str  # what `adb -s` takes: the serial on USB, HOST:PORT or an mDNS name on Wi-Fi
    key: str
    rpc_port: int  # the tvm_rpc port, the same on the phone and (through adb forward) on the workstation
    board: dict[str, Any]  # profile + Android facts (see host.android.phone.Phone.board)
    connected: str  # ISO time of the last connect

    @property
    def target(self) -> dict[str, Any]:
        return dict(self.board["target"])

    @property
    def api_level(self) -> int:
        return int(self.board.get("android_api") or 0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _file_name(serial: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", serial) + ".json"


def record_phone(phone: RecordedPhone) -> Path:
    """Write (or replace) a phone's record atomically. Raises :class:`AndroidError` when the folder
    cannot be written."""
    folder = phones_dir()
    path = folder / _file_name(phone.serial)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".tmp-", suffix=".json", delete=False) as out:
            json.dump(phone.as_dict(), out, indent=1, sort_keys=True)
        os.replace(out.name, path)
    except OSError as err:
        raise AndroidError(f"cannot record the phone in {folder} ({err.strerror}): make it writable or set "
                           f"{DIR_ENV} to a writable folder") from None
    return path


def recorded_phones() -> list[RecordedPhone]:
    """Every recorded phone, most recently connected first. Unreadable records are skipped (logged)."""
    phones = []
    for path in sorted(phones_dir().glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            phone = RecordedPhone(serial=str(raw["serial"]), adb_serial=str(raw["adb_serial"]), key=str(raw["key"]),
                                  rpc_port=int(raw["rpc_port"]), board=dict(raw["board"]),
                                  connected=str(raw["connected"]))
            if not isinstance(phone.board.get("target"), dict):
                raise TypeError("no target")
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("skipping the phone record %s (%s): run `edgetune android connect` again", path, err)
            continue
        phones.append(phone)
    return sorted(phones, key=lambda p: p.connected, reverse=True)


def recorded_target(key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The target and board profile of the phone of ``key`` connected last, or None."""
    phones = [p for p in recorded_phones() if p.key == key]
    if not phones:
        return None
    if len({target_to_json(p.target) for p in phones}) > 1:
        logger.warning("phones of key %r have different targets; using %s's (connected last)", key, phones[0].serial)
    return phones[0].target, dict(phones[0].board)


def android_api_for(target: dict[str, Any]) -> int | None:
    """The API level to link ``target`` for: the lowest of the recorded phones with this target (a
    library linked for API N loads on N and later), or None when no recorded phone has it."""
    wanted = target_to_json(target)
    levels = [p.api_level for p in recorded_phones() if target_to_json(p.target) == wanted and p.api_level]
    return min(levels) if levels else None
