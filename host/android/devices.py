"""Phones for ``edgetune devices``: by mDNS (``_adb-tls-connect._tcp``, what Android's Wireless
debugging advertises) and by ``adb devices -l`` (USB, and phones adb reached over Wi-Fi).

A phone is one row however it is seen. Its identity is the hardware serial: Android names the mDNS
service ``adb-<serial>-<6 random characters>``; adb lists a USB phone by that serial, a Wi-Fi phone by
``HOST:PORT`` (matched to the mDNS service at that address and port) or by the mDNS service name.
A phone connected with ``edgetune android connect`` also carries its key and target, and the row of
its tvm_rpc at the tracker is folded into it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from zeroconf import IPVersion, Zeroconf

from device_agent.schema import BoardRecord

from .. import config
from ..discovery.browse import NOT_REGISTERED, UNKNOWN, Board, resolve_services
from ..errors import EdgetuneError
from .adb import AdbRunner, AndroidError, run_adb
from .phones import RecordedPhone, recorded_phones

logger = logging.getLogger(__name__)

ADB_TLS_SERVICE = "_adb-tls-connect._tcp.local."
# Status of a phone no `edgetune android connect` has set up (no key, no tvm_rpc).
NOT_CONNECTED = "not connected"
USB, WIFI = "usb", "wifi"

# "adb-49281FDAQ0011J-AbCdEf", and " (2)" appended by mDNS conflict resolution. Serials are letters and
# digits: a name with anything else is not Android's, and never reaches a terminal.
_INSTANCE = re.compile(r"^adb-(?P<serial>[A-Za-z0-9._-]+)-[A-Za-z0-9]{6}(?: \(\d+\))?$")
_HOSTPORT = re.compile(r"^(?P<host>[^\s:]+):(?P<port>\d{1,5})$")


def serial_from_instance(name: str) -> str | None:
    """The phone serial in a ``_adb-tls-connect._tcp`` instance name (with or without the service type),
    or None when the name is not Android's."""
    instance = name.split("._adb-tls-connect.", 1)[0]
    match = _INSTANCE.match(instance)
    return match.group("serial") if match else None


@dataclass(frozen=True)
class AdbDevice:
    """One line of ``adb devices -l``."""

    serial: str  # as adb -s takes it
    state: str  # device | unauthorized | offline | ...
    usb: str = ""  # "1-1" for a phone on USB
    product: str = ""
    model: str = ""  # "Pixel 9" (adb prints Pixel_9)
    device: str = ""
    transport_id: str = ""

    @property
    def transport(self) -> str:
        return USB if self.usb else WIFI


def _printable(text: str) -> str:
    """Letters, digits and a little punctuation only: what a USB device reports is not trusted."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "", text)[:64]


def parse_adb_devices(text: str) -> list[AdbDevice]:
    """Parse ``adb devices -l`` (the header, daemon start messages and blank lines are skipped)."""
    devices = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("List of devices", "*", "adb server")):
            continue
        parts = line.split()
        if len(parts) < 2:
            continue
        if not re.fullmatch(r"[\x21-\x7e]+", parts[0]):
            continue  # not a serial adb could take from the command line
        fields = {k: _printable(v) for k, _, v in (p.partition(":") for p in parts[2:] if ":" in p)}
        devices.append(AdbDevice(serial=parts[0], state=_printable(parts[1]), usb=fields.get("usb", ""),
                                 product=fields.get("product", ""), model=fields.get("model", "").replace("_", " "),
                                 device=fields.get("device", ""), transport_id=fields.get("transport_id", "")))
    return devices


def list_adb_devices(runner: AdbRunner = run_adb, leave_as_found: bool = False) -> list[AdbDevice]:
    """The phones adb sees. adb starts its server when none runs; with ``leave_as_found`` a server this
    call started is stopped again (a listing leaves no daemon behind; ``android connect`` needs it kept,
    as its port tunnels live in it). Raises :class:`AdbMissing` without adb, :class:`AndroidError` when
    adb fails."""
    result = runner(["devices", "-l"], config.ADB_COMMAND_SEC)
    if result.returncode != 0:
        raise AndroidError(f"`adb devices -l` failed: {result.first_line() or result.returncode}: "
                           "restart the adb server (adb kill-server) and run again")
    if leave_as_found and "daemon started successfully" in result.stderr:
        runner(["kill-server"], config.ADB_COMMAND_SEC)
    return parse_adb_devices(result.stdout)


@dataclass(frozen=True)
class WirelessPhone:
    """A ``_adb-tls-connect._tcp`` service: a phone with Wireless debugging on."""

    serial: str
    instance: str
    addresses: tuple[str, ...]
    port: int


def browse_phones(timeout: float, zc: Zeroconf | None = None) -> list[WirelessPhone]:
    """Listen ``timeout`` seconds for phones with Wireless debugging on. Raises :class:`EdgetuneError`
    when mDNS cannot run here."""
    found: list[WirelessPhone] = []
    for name, info in resolve_services(ADB_TLS_SERVICE, timeout, zc,
                                       wanted=lambda n: serial_from_instance(n) is not None):
        found.append(WirelessPhone(str(serial_from_instance(name)), name.split("._adb-tls-connect.", 1)[0],
                                   tuple(info.parsed_addresses(IPVersion.V4Only)), int(info.port or 0)))
    return found


@dataclass
class AndroidBoard(Board):
    """A phone in ``edgetune devices``: a plain TVM RPC board (no agent) reached through adb."""

    serial: str = ""
    model: str = ""
    transports: list[str] = field(default_factory=list)  # usb and/or wifi
    adb_serials: list[str] = field(default_factory=list)  # what `adb -s` takes for it
    adb_state: str = ""  # device | unauthorized | offline ("" when adb does not list it)
    adb_port: int = 0  # the Wireless debugging port on mDNS

    def as_dict(self) -> dict[str, Any]:
        data = super().as_dict()
        data.update(android=True, os="android", serial=self.serial, transports=list(self.transports),
                    adb_serials=list(self.adb_serials), adb_state=self.adb_state, adb_port=self.adb_port)
        if not data.get("model"):
            data["model"] = self.model
        return data


def _record_of(phone: RecordedPhone) -> BoardRecord:
    board, target = phone.board, phone.target
    return BoardRecord(
        board_id=phone.serial, name=board.get("board_model") or phone.serial, key=phone.key,
        arch=str(board.get("arch", "")), triple=str(target.get("mtriple", "")), cpu=str(target.get("mcpu", "")),
        cores=int(target.get("num-cores", 0)), features=tuple(board.get("features", ())),
        mattr=tuple(target.get("mattr", ())), os="android", model=str(board.get("board_model", "")),
        rpc_port=phone.rpc_port,
    )


def _serves(board: Board, phone: RecordedPhone) -> bool:
    """Whether ``board`` is the tracker's row of the recorded phone's tvm_rpc (its key and port)."""
    return not board.agent and board.key == phone.key and board.rpc_port == phone.rpc_port


def merge_phones(wireless: list[WirelessPhone], usb: list[AdbDevice], recorded: list[RecordedPhone],
                 boards: list[Board], tracker_seen: bool = True) -> list[Board]:
    """``boards`` (agents and tracker-only servers) with one :class:`AndroidBoard` per phone.

    A tracker-only server of a recorded phone's key and port becomes that phone's status; without a
    tracker (``tracker_seen`` False) a recorded phone's status is unknown.
    """
    phones: dict[str, AndroidBoard] = {}

    def phone(serial: str) -> AndroidBoard:
        if serial not in phones:
            phones[serial] = AndroidBoard(name=serial, key="", addresses=[], rpc_port=0, board_id=serial, agent=False,
                                          status=NOT_CONNECTED, serial=serial)
        return phones[serial]

    for seen in wireless:
        row = phone(seen.serial)
        row.addresses += [a for a in seen.addresses if a not in row.addresses]
        row.adb_port = row.adb_port or seen.port
        row.transports += [WIFI] if WIFI not in row.transports else []
    for dev in usb:
        serial = serial_from_instance(dev.serial)
        hostport = _HOSTPORT.match(dev.serial)
        if serial is None and hostport:
            host, port = hostport.group("host"), int(hostport.group("port"))
            serial = next((w.serial for w in wireless if host in w.addresses and w.port == port), None)
            serial = serial or next((r.serial for r in recorded if r.adb_serial == dev.serial), dev.serial)
        row = phone(serial or dev.serial)
        row.adb_serials.append(dev.serial)
        row.adb_state = row.adb_state if row.adb_state == "device" else dev.state
        row.model = row.model or dev.model
        row.transports += [dev.transport] if dev.transport not in row.transports else []
        if hostport and hostport.group("host") not in row.addresses:
            row.addresses.append(hostport.group("host"))
    rest = list(boards)
    for rec in recorded:  # a connected phone whose tvm_rpc the tracker lists, seen neither way just now
        if rec.serial not in phones and any(_serves(b, rec) for b in rest):
            phone(rec.serial)
    by_serial = {r.serial: r for r in recorded}
    for serial, row in phones.items():
        rec = by_serial.get(serial)
        if rec is not None:
            row.key, row.rpc_port, row.record = rec.key, rec.rpc_port, _record_of(rec)
            row.model = row.model or str(rec.board.get("board_model", ""))
            row.status = NOT_REGISTERED if tracker_seen else UNKNOWN
            served = next((b for b in rest if _serves(b, rec)), None)
            if served is not None:
                row.status = served.status
                rest.remove(served)
        row.name = f"{row.model or serial} (android)"
    return rest + sorted(phones.values(), key=lambda p: (p.key, p.name))


class PhoneSearch:
    """Looks for phones (mDNS and adb, each in a thread) beside ``edgetune devices``' own board search."""

    def __init__(self, timeout: float | None = None, runner: AdbRunner = run_adb) -> None:
        self.timeout = config.DISCOVERY_SEC if timeout is None else timeout
        self.runner = runner
        self.wireless: list[WirelessPhone] = []
        self.usb: list[AdbDevice] = []
        self._threads = [threading.Thread(target=work, name=f"edgetune-phones-{name}", daemon=True)
                         for name, work in (("mdns", self._browse), ("adb", self._list))]
        for thread in self._threads:
            thread.start()

    def _browse(self) -> None:
        try:
            self.wireless = browse_phones(self.timeout)
        except EdgetuneError as err:
            logger.info("no mDNS search for phones: %s", err)

    def _list(self) -> None:
        try:
            self.usb = list_adb_devices(self.runner, leave_as_found=True)
        except AndroidError as err:  # adb missing or failing: no adb phones; boards are still listed
            logger.info("no adb listing: %s", err)

    def merge(self, boards: list[Board], tracker: Any = None) -> list[Board]:
        """``boards`` with the phones found; ``tracker`` is the tracker the boards' status came from (None:
        no tracker, so status unknown). Waits for the search, at most its deadlines."""
        deadline = time.monotonic() + max(self.timeout, config.ADB_COMMAND_SEC) + 5.0
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        return merge_phones(self.wireless, self.usb, recorded_phones(), boards, tracker is not None)
