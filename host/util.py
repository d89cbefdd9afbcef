"""Small helpers shared by the workstation library (no click here)."""

from __future__ import annotations

from device_agent.schema import parse_hostport as _parse_hostport

from .errors import AgentError, EdgetuneError


def parse_hostport(value: str, what: str = "tracker") -> tuple[str, int]:
    """``HOST:PORT`` to a tuple; raises :class:`EdgetuneError` with what to type instead."""
    try:
        return _parse_hostport(value, what)
    except AgentError as err:
        raise EdgetuneError(str(err)) from None
