"""Advertise a tracker as ``_tvm-tracker._tcp`` so agents join without being told where it is."""

from __future__ import annotations

import logging
import socket

from zeroconf import ServiceInfo, Zeroconf

from device_agent.mdns import advertised_addresses, open_zeroconf
from device_agent.schema import TRACKER_SERVICE

from ..errors import AgentError, EdgetuneError

logger = logging.getLogger(__name__)


class TrackerAdvertiser:
    def __init__(self, bind_host: str, port: int) -> None:
        try:
            self._zc: Zeroconf = open_zeroconf()
        except AgentError as err:
            raise EdgetuneError(str(err).replace("--no-advertise and --tracker HOST:PORT", "--no-advertise")) from None
        host = socket.gethostname().split(".")[0] or "workstation"
        addresses = advertised_addresses(bind_host)
        self.info = ServiceInfo(
            TRACKER_SERVICE,
            f"edgetune tracker on {host} port {port}.{TRACKER_SERVICE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=port,
            properties={"v": "1", "by": "edgetune"},
            # A host name of its own: two trackers on one machine (or a tracker and an agent) must not
            # share an mDNS host record, or resolvers mix their addresses.
            server=f"{host}-tracker-{port}.local.",
        )
        try:
            self._zc.register_service(self.info, allow_name_change=True)
        except OSError as err:
            self._zc.close()
            raise EdgetuneError(
                f"mDNS advertisement failed ({err}): enable multicast on the LAN interface, or pass "
                "--no-advertise and give boards --tracker HOST:PORT"
            ) from None
        self.addresses = addresses

    def close(self) -> None:
        try:
            self._zc.unregister_service(self.info)
        finally:
            self._zc.close()
