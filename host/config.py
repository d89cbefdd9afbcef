"""Every deadline and timing constant of the workstation side, in seconds, with its reason.

Override any of them with an environment variable named ``EDGETUNE_<NAME>`` (seconds), e.g.
``EDGETUNE_NO_BOARD_DEADLINE_SEC=30``. All deadlines are measured with ``time.monotonic()``.
"""

from __future__ import annotations

from device_agent.config import _seconds

# Connecting to the tracker and getting one answer: a live tracker answers in milliseconds.
TRACKER_CONNECT_SEC = _seconds("TRACKER_CONNECT_SEC", 5.0)
# A connection to `edgetune tracker` that has not proven the team key by then is closed. Boards and hosts
# prove it in their first two round trips (milliseconds); this bounds what idle strangers cost the tracker.
TRACKER_AUTH_SEC = _seconds("TRACKER_AUTH_SEC", 10.0)
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
# TCP connect to a board's RPC port. A board on the LAN accepts in milliseconds; one that is off or
# unplugged sends no refusal, so without this deadline the connect waits for the kernel (minutes).
BOARD_CONNECT_SEC = _seconds("BOARD_CONNECT_SEC", 10.0)
# The RPC handshake with a board (its answer and the session's first round trip, served by the session
# process the board forks). A live agent on this workstation answers in milliseconds; a frozen board's
# kernel still accepts the connection, and then nothing ever answers. Raise it for very slow boards.
BOARD_HANDSHAKE_SEC = _seconds("BOARD_HANDSHAKE_SEC", 10.0)
# A board ends every session at its session timeout (MEASURE_SESSION_SEC, BENCH_SESSION_SEC) and says so
# at once. One that has not answered by the session timeout plus this grace (the board stopping its
# session process, the answer crossing the LAN) stopped answering without closing the connection
# (power cut, cable pulled, kernel hang): the session fails and the board is not waited for again.
BOARD_ANSWER_GRACE_SEC = _seconds("BOARD_ANSWER_GRACE_SEC", 10.0)
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
# After Ctrl-C during a flash, how long boards mid-step get to notice their closed SSH connection and
# report; then every board is reported anyway (pending ones were never started).
FLASH_CANCEL_SEC = _seconds("FLASH_CANCEL_SEC", 5.0)
# One benchmark session on a board (upload + load + timed runs).
BENCH_SESSION_SEC = _seconds("BENCH_SESSION_SEC", 300.0)
# Waiting for processes the demo started to register / exit.
PROCESS_START_SEC = _seconds("PROCESS_START_SEC", 120.0)
PROCESS_STOP_SEC = _seconds("PROCESS_STOP_SEC", 10.0)

# One adb command that talks to a phone (getprop, shell, reverse, forward, connect). A phone on USB
# answers in well under a second; starting the adb server first takes a few; a phone on Wi-Fi that
# dozed off may take several more. A phone that vanished makes adb wait with no end of its own.
ADB_COMMAND_SEC = _seconds("ADB_COMMAND_SEC", 20.0)
# `adb push` of a build or of the tvm_rpc binary and its libraries (tens of MB): USB 2 moves about
# 30 MB/s, Wi-Fi debugging much less.
ADB_PUSH_SEC = _seconds("ADB_PUSH_SEC", 300.0)
# After `edgetune android connect` starts tvm_rpc on the phone, how long it may take to appear at the
# tracker (it registers within a second or two of starting).
ANDROID_REGISTER_SEC = _seconds("ANDROID_REGISTER_SEC", 30.0)
