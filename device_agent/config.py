"""Every timing constant of the board agent, in seconds, and every limit on what it reads, with the reason
for its value.

Each can be overridden by an environment variable of the same name prefixed with ``EDGETUNE_``
(e.g. ``EDGETUNE_TRACKER_RETRY_SEC=0.5``), so tests and slow boards can tune them without code changes.
"""

from __future__ import annotations

import math
import os


def _seconds(name: str, default: float) -> float:
    """``EDGETUNE_<name>``, else ``default``. Raises ValueError unless it is a finite number of seconds
    above 0: ``inf`` or ``nan`` would reach a socket or process wait and raise there, in the serve loop."""
    raw = os.environ.get("EDGETUNE_" + name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"EDGETUNE_{name}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"EDGETUNE_{name}={raw!r} must be a finite number of seconds above 0")
    return value


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
# How long a fresh connection may take to send its whole RPC handshake (one deadline from accept to
# the last byte, not one per read) before it is dropped. A genuine client sends the handshake at once
# (a few dozen bytes); 10 s covers a congested LAN, and a client trickling bytes holds a handshake
# slot no longer than this.
HANDSHAKE_SEC = _seconds("HANDSHAKE_SEC", 10.0)
# Upper bound of one RPC session, also when the client asked for none or for more (a longer or
# infinite ``-timeout`` is clamped to this).
MAX_SESSION_SEC = _seconds("MAX_SESSION_SEC", 600.0)
# Pause after accept() failed for lack of resources (file descriptors, memory), so the serve loop
# retries instead of spinning on a listen socket that stays readable.
ACCEPT_RETRY_SEC = _seconds("ACCEPT_RETRY_SEC", 0.5)
# How often "waiting for a tracker on mDNS" is repeated to the user while none is found.
MDNS_WAIT_REPORT_SEC = _seconds("MDNS_WAIT_REPORT_SEC", 10.0)
# Grace period for RPC session processes to exit on SIGTERM before they are killed.
CHILD_STOP_SEC = _seconds("CHILD_STOP_SEC", 3.0)
# A direct-session token (a host connecting to the board without a tracker) is good this long either
# side of the board's clock: boards without a real-time clock set theirs by NTP after boot, and a
# workstation's clock may be off by minutes. The board remembers every token's nonce for this long.
AUTH_SKEW_SEC = _seconds("AUTH_SKEW_SEC", 600.0)
# A tracker that did not prove the team key (a rogue `_tvm-tracker._tcp` advertisement, another team's
# tracker) is not tried again for this long; the agent keeps trying the others it knows meanwhile.
UNTRUSTED_TRACKER_RETRY_SEC = _seconds("UNTRUSTED_TRACKER_RETRY_SEC", 30.0)
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


def use_target_threads(cores: int) -> int:
    """Give TVM's runtime in this process (and the processes it starts) ``cores`` threads, the
    ``num-cores`` the kernels were compiled and tuned for; returns the count in force.

    Without ``TVM_NUM_THREADS`` TVM sizes its pool from the hardware threads, halved on x86-64 on the
    guess that half are hyper-threads. On a board without them (a 2-core VM, most small x86 boxes) that
    leaves half the cores idle: resnet18 tuned for 2 cores ran at 67 ms on one thread and 42 ms on two,
    while ONNX Runtime uses both. Unset, it also costs every parallel loop a read of
    /sys/devices/system/cpu/online (TVM asks for the hardware threads at each launch): 5.4 us a launch
    on this VM, against 0.6 us for the whole launch with the variable set. A ``TVM_NUM_THREADS`` the
    user set wins. It must be set before the first parallel kernel runs: TVM reads it when it makes its
    thread pool.
    """
    raw = os.environ.get("TVM_NUM_THREADS", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    cores = min(cores, os.cpu_count() or cores)  # TVM never runs more workers than CPUs
    if cores > 0:
        os.environ["TVM_NUM_THREADS"] = str(cores)
        return cores
    return 0


def default_store() -> str:
    """The agent's artifact store: ``$EDGETUNE_STORE``, else /var/lib/edgetune as root, else
    ~/.local/share/edgetune."""
    env = os.environ.get("EDGETUNE_STORE")
    if env:
        return env
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/edgetune"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "edgetune")


def rpc_state_dir(store: str | None = None) -> str:
    """Where ``serve`` (the RPC server) keeps its own state, the board id: ``$EDGETUNE_RPC_STATE_DIR``, else
    the directory beside the store with ``-rpc`` added (/var/lib/edgetune-rpc beside /var/lib/edgetune).

    Never inside the store: root installs packages there and runs them, while the RPC server runs whatever
    code a client uploads, so it must not be able to write the store. The systemd unit gives it
    ``StateDirectory=edgetune-rpc`` and a read-only view of the store.
    """
    env = os.environ.get("EDGETUNE_RPC_STATE_DIR")
    if env:
        return env
    return os.path.normpath(store if store is not None else default_store()) + "-rpc"


# --- limits on a package the store reads, checked before the bytes they bound are read or written -----
# A package is untrusted until its manifest's signature is verified, and that signature covers only the
# files the manifest lists: the tar around them must not cost the board memory, disk or minutes first.
# Each can be overridden by EDGETUNE_<NAME> (a whole number), e.g. for a board that installs huge models.


def _limit(name: str, default: int) -> int:
    raw = os.environ.get("EDGETUNE_" + name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"EDGETUNE_{name}={raw!r} is not a whole number") from None
    if value <= 0:
        raise ValueError(f"EDGETUNE_{name}={raw!r} must be positive")
    return value


# The .etpkg file as uploaded, in bytes. A tuned model with its weights is ~0.1 MB (the tiny CNN) to
# ~100 MB (ResNet-50 in fp32); 512 MiB leaves room for bigger ones and stops one upload filling an SD card.
MAX_PACKAGE_BYTES = _limit("MAX_PACKAGE_BYTES", 512 << 20)
# Everything the package unpacks to (tar headers, padding and files), in bytes. gzip expands up to ~1000x,
# so this, not the package size, bounds the disk and time an install spends; twice the package cap.
# When the signed manifest lists file sizes (``sizes``), no file gets a byte more than its size.
MAX_UNPACKED_BYTES = _limit("MAX_UNPACKED_BYTES", 1 << 30)
# Tar members, directories and pax/GNU extended headers included. `edgetune package` writes 9 at most
# (manifest, signature, model, 2 reference files, up to 4 log files); 64 leaves room for new files while a
# tar of 200,000 entries is refused at its 65th header instead of costing 87 MB and 7 s.
MAX_PACKAGE_MEMBERS = _limit("MAX_PACKAGE_MEMBERS", 64)
# A member's path in UTF-8 bytes. Package paths are short ("reference/output.npz"); 255 is NAME_MAX on
# Linux file systems.
MAX_MEMBER_NAME_BYTES = _limit("MAX_MEMBER_NAME_BYTES", 255)
# One pax or GNU long-name header. It carries at most a path and a few numbers (well under 1 KiB);
# unbounded, a 204 KB package claiming a 414 MB long name costs 414 MB of memory.
MAX_TAR_EXT_HEADER_BYTES = _limit("MAX_TAR_EXT_HEADER_BYTES", 4 << 10)
# manifest.json: ~3 KB in a real package (file list, target, board profile); 256 KiB is plenty.
MAX_MANIFEST_BYTES = _limit("MAX_MANIFEST_BYTES", 256 << 10)
# manifest.sig: ~150 bytes (algorithm, key fingerprint, 88 characters of base64).
MAX_SIGNATURE_BYTES = _limit("MAX_SIGNATURE_BYTES", 4 << 10)
# Nesting of any JSON the store parses (manifest, signature, install record). A manifest is 4 levels
# deep; Python's parser recurses per level and raises RecursionError near 1,000.
MAX_JSON_DEPTH = _limit("MAX_JSON_DEPTH", 32)


# --- limits on the RPC port ---------------------------------------------------------------------------
# How many connections may be mid-handshake at once; more are closed as soon as they are accepted.
# The tracker hands a board's key to one client at a time, so a few slots cover a genuine client next
# to stray or slow connections, while a flood of slow connections costs the board at most this many
# sockets, each for at most HANDSHAKE_SEC.
MAX_PENDING_HANDSHAKES = _limit("MAX_PENDING_HANDSHAKES", 8)
# The key words of one handshake, in bytes. A genuine client sends "client:" + match key + " -timeout=S",
# well under 100 bytes; 4095 (the bound the agent always had) caps what one connection makes it buffer.
MAX_HANDSHAKE_KEY_BYTES = _limit("MAX_HANDSHAKE_KEY_BYTES", 4095)
# Nonces of direct-session tokens remembered at once (each good once within AUTH_SKEW_SEC). Only tokens
# with a valid MAC are remembered, so only holders of the team key fill it: 4096 is hundreds of sessions
# a minute, a few hundred KiB at most.
MAX_DIRECT_NONCES = _limit("MAX_DIRECT_NONCES", 4096)
