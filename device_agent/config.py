"""Every timing constant of the board agent, in seconds, with the reason for its value.

Each can be overridden by an environment variable of the same name prefixed with ``EDGETUNE_``
(e.g. ``EDGETUNE_TRACKER_RETRY_SEC=0.5``), so tests and slow boards can tune them without code changes.
"""

from __future__ import annotations

import os


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get("EDGETUNE_" + name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"EDGETUNE_{name}={raw!r} is not a number of seconds") from None


# How often the agent pings the tracker while idle. TVM's own server uses 2 s; a restarted tracker
# learns about the board within one period.
TRACKER_PING_SEC = _seconds("TRACKER_PING_SEC", 2.0)
# Wait between attempts to reach a tracker that is down. Small enough that a restarted tracker sees
# the board again well within 15 s.
TRACKER_RETRY_SEC = _seconds("TRACKER_RETRY_SEC", 1.0)
# Socket deadline for one request/response with the tracker (it answers at once when alive).
TRACKER_IO_SEC = _seconds("TRACKER_IO_SEC", 10.0)
# A tracker hands out a board's match key to a client; if the client never connects, the key is
# regenerated after this long (TVM's server uses 4 s + one ping period).
UNMATCHED_KEY_SEC = _seconds("UNMATCHED_KEY_SEC", 6.0)
# How long a fresh connection may take to send its RPC handshake before it is dropped.
HANDSHAKE_SEC = _seconds("HANDSHAKE_SEC", 10.0)
# Upper bound of one RPC session when the client asked for none (a client always should).
MAX_SESSION_SEC = _seconds("MAX_SESSION_SEC", 600.0)
# How often "waiting for a tracker on mDNS" is repeated to the user while none is found.
MDNS_WAIT_REPORT_SEC = _seconds("MDNS_WAIT_REPORT_SEC", 10.0)
# Grace period for RPC session processes to exit on SIGTERM before they are killed.
CHILD_STOP_SEC = _seconds("CHILD_STOP_SEC", 3.0)
# Self-check of an installed package: load + run the reference input (emulated boards are slow).
SELF_CHECK_SEC = _seconds("SELF_CHECK_SEC", 300.0)
# Time budget of the latency part of the self-check (after one warm-up run, at most 10 timed runs,
# at least 3): enough for a stable p50 on small models without making installs of big ones slow.
SELF_CHECK_BENCH_SEC = _seconds("SELF_CHECK_BENCH_SEC", 2.0)


def mdns_interfaces() -> list[str] | None:
    """Interfaces (IP addresses) to use for mDNS, from ``EDGETUNE_MDNS_INTERFACES`` (comma separated).

    ``None`` means every interface. Tests set ``127.0.0.1`` (multicast works on loopback here).
    """
    raw = os.environ.get("EDGETUNE_MDNS_INTERFACES", "").strip()
    return [x.strip() for x in raw.split(",") if x.strip()] or None


def default_store() -> str:
    """The agent's artifact store: ``$EDGETUNE_STORE``, else /var/lib/edgetune as root, else
    ~/.local/share/edgetune."""
    env = os.environ.get("EDGETUNE_STORE")
    if env:
        return env
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/edgetune"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "edgetune")
