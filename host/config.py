"""Every deadline and timing constant of the workstation side, in seconds, with its reason.

Override any of them with an environment variable named ``EDGETUNE_<NAME>`` (seconds), e.g.
``EDGETUNE_NO_BOARD_DEADLINE_SEC=30``. All deadlines are measured with ``time.monotonic()``.
"""

from __future__ import annotations

from device_agent.config import _seconds

# Connecting to the tracker and getting one answer: a live tracker answers in milliseconds.
TRACKER_CONNECT_SEC = _seconds("TRACKER_CONNECT_SEC", 5.0)
# How long `edgetune devices` listens for mDNS answers by default. python-zeroconf responders hold
# multicast answers back to aggregate them (~1.1 s seen on loopback), so less than 2 s finds nothing.
DISCOVERY_SEC = _seconds("DISCOVERY_SEC", 3.0)
# How long a host command waits for a tracker to appear on mDNS when --tracker is absent.
TRACKER_DISCOVERY_SEC = _seconds("TRACKER_DISCOVERY_SEC", 5.0)
# With no free board of the key (all gone, or the tracker gone), a tuning session waits this long
# for one to come back, then stops cleanly with the log intact.
NO_BOARD_DEADLINE_SEC = _seconds("NO_BOARD_DEADLINE_SEC", 120.0)
# Upper bound on one measurement session on a board (connect, upload, load, time, clean up). This is
# also the board's kill timer for that session, so a candidate that hangs the board is cut off.
MEASURE_SESSION_SEC = _seconds("MEASURE_SESSION_SEC", 60.0)
# Building one candidate in a warm worker takes 0.1-6 s; the first build of a fresh worker imports
# TVM's tensor intrinsics (~25 s on 2 cores), which happens once per worker at pool start.
BUILD_CANDIDATE_SEC = _seconds("BUILD_CANDIDATE_SEC", 120.0)
# Warm-up of the long-lived build workers (import of TVM and its tensor intrinsics).
BUILDER_WARMUP_SEC = _seconds("BUILDER_WARMUP_SEC", 180.0)
# SSH: TCP connect + handshake + authentication with a board.
SSH_CONNECT_SEC = _seconds("SSH_CONNECT_SEC", 15.0)
# Running `edgetune-agent install` on a board (verify, self-check, latency check). Emulated boards
# are slow to import TVM, so this is generous.
SSH_INSTALL_SEC = _seconds("SSH_INSTALL_SEC", 600.0)
# One benchmark session on a board (upload + load + timed runs).
BENCH_SESSION_SEC = _seconds("BENCH_SESSION_SEC", 300.0)
# Waiting for processes the demo started to register / exit.
PROCESS_START_SEC = _seconds("PROCESS_START_SEC", 120.0)
PROCESS_STOP_SEC = _seconds("PROCESS_STOP_SEC", 10.0)

