"""mDNS on the board side: advertise the board (``_edgetune._tcp``) and find the tracker
(``_tvm-tracker._tcp``). Thin wrappers over python-zeroconf with a deadline on every wait."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from typing import Callable

import ifaddr
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from . import config
from .errors import AgentError
from .schema import EDGETUNE_SERVICE, TRACKER_SERVICE, BoardRecord

logger = logging.getLogger(__name__)


def open_zeroconf() -> Zeroconf:
    """A Zeroconf instance on the configured interfaces (``EDGETUNE_MDNS_INTERFACES``, default all).

    Raises :class:`AgentError` when no interface can do multicast.
    """
    interfaces = config.mdns_interfaces()
    try:
        if interfaces:
            return Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        return Zeroconf(ip_version=IPVersion.V4Only)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise AgentError(
                f"mDNS cannot start ({err}): UDP port 5353 is held by another mDNS stack that shares it with "
                "no one (avahi-daemon with disallow-other-stacks=yes?): allow other stacks, or pass "
                "--no-advertise and --tracker HOST:PORT"
            ) from None
        raise AgentError(
            f"mDNS cannot start ({err}): no network interface with multicast is up. "
            "Connect the board to the LAN, or pass --no-advertise and --tracker HOST:PORT"
        ) from None


def local_ipv4_addresses() -> list[str]:
    """IPv4 addresses of this machine's interfaces, non-loopback first (loopback kept last)."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in found:
                found.append(ip.ip)
    return sorted(found, key=lambda a: ipaddress.ip_address(a).is_loopback)


def advertised_addresses(bind_host: str) -> list[str]:
    """The addresses to put in the board's mDNS record for an RPC server bound to ``bind_host``."""
    if bind_host not in ("", "0.0.0.0"):
        return [bind_host]
    wanted = config.mdns_interfaces()
    addresses = local_ipv4_addresses()
    if wanted:
        return [a for a in addresses if a in wanted] or wanted
    non_loopback = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
    return non_loopback or addresses


def prefer_reachable(addresses: list[str]) -> str:
    """Of a service's addresses, the one most likely reachable from here: one of this machine's own,
    else one on the same /24 as an interface (mDNS caches can mix in another host's addresses)."""
    if len(addresses) == 1:
        return addresses[0]
    wanted = config.mdns_interfaces() or []
    local = local_ipv4_addresses()
    for address in addresses:
        if address in wanted or address in local:
            return address
    nets = {ipaddress.ip_network(f"{a}/24", strict=False) for a in (wanted or local)}
    for address in addresses:
        if any(ipaddress.ip_address(address) in net for net in nets):
            return address
    return addresses[0]


class Advertiser:
    """Keeps the board's ``_edgetune._tcp`` record registered until :meth:`close`."""

    def __init__(self, record: BoardRecord, addresses: list[str], zc: Zeroconf | None = None) -> None:
        self.record = record
        self._zc = zc or open_zeroconf()
        self._own_zc = zc is None
        instance = f"{record.name}.{EDGETUNE_SERVICE}"
        host = socket.gethostname().split(".")[0] or "board"
        self.info = ServiceInfo(
            EDGETUNE_SERVICE,
            instance,
            addresses=[socket.inet_aton(a) for a in addresses],
            port=record.rpc_port,
            properties=record.to_txt(),
            server=f"{host}-{record.board_id[:8]}.local.",
        )
        try:
            self._zc.register_service(self.info, allow_name_change=True)
        except OSError as err:
            self.close()
            raise AgentError(
                f"mDNS advertisement failed ({err}): enable multicast on the LAN interface, "
                "or pass --no-advertise (the board then only shows through the tracker)"
            ) from None
        logger.info("advertising %s at %s port %d", self.info.name, addresses, record.rpc_port)

    def close(self) -> None:
        try:
            self._zc.unregister_service(self.info)
        except Exception as err:  # noqa: BLE001 - best effort on the way out
            logger.debug("unregister failed: %s", err)
        if self._own_zc:
            self._zc.close()


class TrackerLocator:
    """Follows ``_tvm-tracker._tcp`` announcements; :meth:`candidates` returns every tracker seen, newest
    first, :meth:`current` the newest.

    Keeps browsing, so an agent whose tracker restarts on a new address or port finds it again. Anyone on
    the LAN can advertise a tracker: the agent tries them in turn and registers only with one that proves
    the team key (:mod:`device_agent.server`), so a rogue advertisement cannot capture the board.
    """

    def __init__(self, zc: Zeroconf | None = None) -> None:
        self._zc = zc or open_zeroconf()
        self._own_zc = zc is None
        self._lock = threading.Lock()
        self._found: dict[str, tuple[str, int]] = {}
        self._latest: str | None = None
        self._changed = threading.Event()
        self._browser = ServiceBrowser(self._zc, TRACKER_SERVICE, handlers=[self._on_change])

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                self._found.pop(name, None)
                if self._latest == name:
                    self._latest = next(reversed(self._found), None)
            return
        info = zeroconf.get_service_info(service_type, name, timeout=int(config.TRACKER_IO_SEC * 1000))
        if info is None or not info.port:
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses:
            return
        with self._lock:
            self._found.pop(name, None)  # re-inserted last: the dict's order is the order last seen
            self._found[name] = (prefer_reachable(addresses), int(info.port))
            self._latest = name
        self._changed.set()

    def current(self) -> tuple[str, int] | None:
        with self._lock:
            return self._found.get(self._latest) if self._latest else None

    def candidates(self) -> list[tuple[str, int]]:
        """Every tracker advertised now, the one seen last first (duplicates of one address dropped)."""
        with self._lock:
            found = list(reversed(self._found.values()))
        return list(dict.fromkeys(found))

    def wait(self, timeout: float | None, on_wait: Callable[[float], None] | None = None) -> tuple[str, int] | None:
        """Wait until a tracker is known; ``None`` after ``timeout`` seconds (``None`` = forever).

        ``on_wait(elapsed_s)`` is called every ``MDNS_WAIT_REPORT_SEC`` while waiting.
        """
        start = time.monotonic()
        next_report = start + config.MDNS_WAIT_REPORT_SEC
        while True:
            found = self.current()
            if found:
                return found
            now = time.monotonic()
            if timeout is not None and now - start >= timeout:
                return None
            step = 0.2 if timeout is None else min(0.2, timeout - (now - start))
            self._changed.wait(max(step, 0.01))
            self._changed.clear()
            if on_wait and time.monotonic() >= next_report:
                on_wait(time.monotonic() - start)
                next_report += config.MDNS_WAIT_REPORT_SEC

    def close(self) -> None:
        self._browser.cancel()
        if self._own_zc:
            self._zc.close()
