"""``edgetune android connect``: make an adb-attached phone a tunable board.

Steps, each an adb command through :mod:`.adb`:

1. reach the phone (``adb connect HOST:PORT`` for a Wi-Fi serial) and check adb may use it;
2. read its profile (``getprop``, ``/proc/cpuinfo``, ``/proc/meminfo``);
3. ``adb reverse`` the tracker's port, so the phone reaches the workstation's tracker at 127.0.0.1 over
   the cable (or the Wi-Fi debugging link), and ``adb forward`` the RPC port back, so the address the
   tracker hands out for the phone (127.0.0.1) reaches it from here;
4. with ``--rpc-binary``: push TVM's ``tvm_rpc`` (and the ``lib*.so`` beside it) to
   :data:`PHONE_DIR`, start it for the key, and wait until the tracker lists it;
5. record the profile (:mod:`.phones`) so ``tune``/``build --device KEY`` use the phone's target.

tvm_rpc on the phone listens on the phone's 127.0.0.1 only: it runs whatever code it is sent, and the
adb link is the only way in.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from device_agent.errors import AgentError
from device_agent.mdns import local_ipv4_addresses
from device_agent.schema import check_key

from .. import config
from ..errors import EdgetuneError, TrackerUnreachable
from ..logs.tuninglog import now_iso
from ..tracker.client import TrackerAddr, servers_of_key, tracker_summary
from .adb import Adb, AdbRunner, AndroidError, connect_network_phone, is_network_serial, run_adb
from .phone import Phone, read_phone
from .phones import RecordedPhone, record_phone

logger = logging.getLogger(__name__)

# Where tvm_rpc, its libraries, its log and its work folder go on the phone (the shell user may run
# programs from here; an app's own folder is not reachable through adb).
PHONE_DIR = "/data/local/tmp/edgetune"
RPC_NAME = "tvm_rpc"
# Printed by the start command once tvm_rpc is in the background (adb 29 may drop the exit status).
_STARTED = "edgetune-rpc-started"
# How often the tracker is asked whether the phone registered.
_POLL_SEC = 0.5


@dataclass
class ConnectResult:
    """What ``android connect`` did and found."""

    serial: str
    adb_serial: str
    key: str
    phone: dict[str, Any]  # getprop facts (PhoneInfo.as_dict)
    target: dict[str, Any]
    tracker: str
    rpc_port: int
    rpc_started: bool
    registered: bool
    record: str  # path of the recorded profile
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def attach(serial: str, runner: AdbRunner = run_adb) -> Adb:
    """The phone of ``serial`` (``adb connect`` first for ``HOST:PORT``), checked usable. Raises
    :class:`AndroidError` (``AdbMissing`` without adb)."""
    if is_network_serial(serial):
        connect_network_phone(serial, runner)
    adb = Adb(serial, runner)
    adb.require_device()
    return adb


def default_key(phone: Phone) -> str:
    """``android-<codename>`` (``android-husky`` for a Pixel 8 Pro): phones of one model share a key."""
    name = phone.info.device or phone.info.serial
    return "android-" + re.sub(r"[^A-Za-z0-9._-]", "-", name)


def check_local_tracker(tracker: TrackerAddr) -> None:
    """``adb reverse`` reaches ports of this workstation only. Raises :class:`AndroidError` for a tracker
    elsewhere."""
    host = tracker[0]
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    try:
        with socket.socket() as probe:
            probe.bind((host, 0))  # binds only to an address of this machine
    except OSError:
        raise AndroidError(f"the tracker {host}:{tracker[1]} is not on this workstation, and adb reverse reaches "
                           "only this one: run `edgetune tracker` here and pass --tracker 127.0.0.1:PORT") from None


def rpc_files(binary: str) -> list[Path]:
    """tvm_rpc and the shared libraries beside it (libtvm_runtime.so, libtvm_ffi.so, libc++_shared.so).
    Raises :class:`AndroidError` when the binary is missing."""
    path = Path(binary).expanduser()
    if not path.is_file():
        raise AndroidError(f"--rpc-binary {binary}: no such file: build TVM's apps/cpp_rpc with the NDK (see README: "
                           "Android phones) and pass the tvm_rpc it makes")
    return [path, *sorted(p for p in path.parent.glob("lib*.so") if p.is_file())]


def push_rpc_server(adb: Adb, files: list[Path]) -> None:
    """Copy tvm_rpc (first of ``files``) and its libraries to :data:`PHONE_DIR`."""
    adb.shell(f"mkdir -p {PHONE_DIR}/work")
    for index, local in enumerate(files):
        adb.push(str(local), f"{PHONE_DIR}/{RPC_NAME if index == 0 else local.name}")
    adb.shell(f"chmod 755 {PHONE_DIR}/{RPC_NAME}")


def _rpc_args(key: str, tracker_port: int, rpc_port: int) -> str:
    return shlex.join([
        f"./{RPC_NAME}", "server", "--host=127.0.0.1", f"--port={rpc_port}", f"--port-end={rpc_port + 1}",
        f"--tracker=127.0.0.1:{tracker_port}", f"--key={key}", "--custom-addr=127.0.0.1",
        f"--work-dir={PHONE_DIR}/work",
    ])


def rpc_start_command(key: str, tracker_port: int, rpc_port: int) -> str:
    """The phone shell command that (re)starts tvm_rpc in the background for ``key``.

    It stops the tvm_rpc an earlier connect started (its recorded PID, if that is still a tvm_rpc),
    listens on the phone's 127.0.0.1:``rpc_port`` only, registers at the tracker through the reversed
    port, and tells the tracker to hand out 127.0.0.1 (the forwarded port on the workstation).
    """
    args = _rpc_args(key, tracker_port, rpc_port)
    return (f"cd {PHONE_DIR} || exit 1; pid=$(cat {RPC_NAME}.pid 2>/dev/null); "
            f"if [ -n \"$pid\" ] && grep -q {RPC_NAME} /proc/$pid/cmdline 2>/dev/null; then kill $pid; fi; "
            f"LD_LIBRARY_PATH={PHONE_DIR} setsid nohup {args} </dev/null >{RPC_NAME}.log 2>&1 & "
            f"echo $! >{PHONE_DIR}/{RPC_NAME}.pid && echo {_STARTED}")


def start_rpc_server(adb: Adb, key: str, tracker_port: int, rpc_port: int) -> None:
    """Start tvm_rpc on the phone. Raises :class:`AndroidError` when the phone's shell did not."""
    out = adb.shell(rpc_start_command(key, tracker_port, rpc_port))
    if _STARTED not in out:
        raise AndroidError(f"tvm_rpc did not start on phone {adb.serial} ({' '.join(out.split())[-200:] or 'no answer'}): "
                           f"look at `adb -s {adb.serial} shell cat {PHONE_DIR}/{RPC_NAME}.log`")


def rpc_log_tail(adb: Adb) -> str:
    """The last line tvm_rpc wrote on the phone ("" when there is none)."""
    try:
        lines = [line for line in adb.shell(f"cat {PHONE_DIR}/{RPC_NAME}.log").splitlines() if line.strip()]
    except AndroidError:
        return ""
    return lines[-1].strip()[:200] if lines else ""


def wait_registered(tracker: TrackerAddr, key: str, rpc_port: int, timeout: float) -> bool:
    """True once the tracker lists a server of ``key`` on ``rpc_port``, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(s.get("addr", [None, None])[1] == rpc_port for s in servers_of_key(tracker_summary(tracker), key)):
                return True
        except TrackerUnreachable as err:
            logger.info("tracker not answering yet: %s", err)
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SEC)


def free_local_port() -> int:
    """A TCP port free on this workstation's loopback (for ``adb forward``), from the OS."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tracker_option(key: str) -> str:
    """The tracker option that lets the plain TVM RPC boards of ``key`` in (see the README)."""
    return f"edgetune tracker --allow-plain-key {key}"


def _manual_start(key: str, tracker: TrackerAddr, rpc_port: int) -> str:
    lan = next((a for a in local_ipv4_addresses() if not ipaddress.ip_address(a).is_loopback), "WORKSTATION-IP")
    return (f"no --rpc-binary: start TVM's RPC server on the phone yourself, either tvm_rpc as "
            f"`cd {PHONE_DIR} && LD_LIBRARY_PATH=. {_rpc_args(key, tracker[1], rpc_port)}` "
            f"(adb reverse carries it to the tracker), or TVM's Android RPC app (apps/android_rpc) over Wi-Fi with "
            f"Address {lan}, Port {tracker[1]}, Key {key}")


def connect_phone(serial: str, tracker: TrackerAddr, key: str | None = None, rpc_binary: str | None = None,
                  runner: AdbRunner = run_adb, on_progress: Callable[[str], None] | None = None,
                  register_timeout: float | None = None) -> ConnectResult:
    """Make the phone of adb serial ``serial`` a board of ``key`` at ``tracker`` (see the module's steps).

    Raises :class:`AndroidError` (adb missing, phone not usable, binary missing, tvm_rpc not registered)
    and :class:`EdgetuneError` for a bad key.
    """
    say = on_progress or (lambda message: None)
    files = rpc_files(rpc_binary) if rpc_binary else []
    adb = attach(serial, runner)
    say(f"reading the profile of {serial}")
    phone = read_phone(adb)
    key = key or default_key(phone)
    try:
        check_key(key)
    except AgentError as err:
        raise EdgetuneError(str(err)) from None
    check_local_tracker(tracker)
    rpc_port = free_local_port()
    say(f"adb reverse tcp:{tracker[1]} (tracker) and adb forward tcp:{rpc_port} (tvm_rpc)")
    adb.reverse(tracker[1], tracker[1])
    adb.forward(rpc_port, rpc_port)
    notes: list[str] = []
    registered = False
    if files:
        say(f"pushing {', '.join(p.name for p in files)} to {PHONE_DIR}")
        push_rpc_server(adb, files)
        say(f"starting tvm_rpc for key {key}")
        start_rpc_server(adb, key, tracker[1], rpc_port)
        timeout = config.ANDROID_REGISTER_SEC if register_timeout is None else register_timeout
        registered = wait_registered(tracker, key, rpc_port, timeout)
        if not registered:
            last = rpc_log_tail(adb)
            raise AndroidError(
                f"tvm_rpc on phone {serial} did not register with the tracker {tracker[0]}:{tracker[1]} within "
                f"{timeout:g} s ({'its log: ' + last if last else 'it wrote no log'}): if the tracker refuses plain "
                f"TVM RPC boards, run `{tracker_option(key)}`"
            )
    else:
        notes.append(_manual_start(key, tracker, rpc_port))
    path = record_phone(RecordedPhone(serial=phone.info.serial, adb_serial=serial, key=key, rpc_port=rpc_port,
                                      board=phone.board(), connected=now_iso()))
    notes.append(f"tvm_rpc cannot prove the team key the agents hold: the tracker must let key {key} in explicitly "
                 f"(`{tracker_option(key)}`)")
    notes.append(_ndk_note(phone.profile.target))
    return ConnectResult(serial=phone.info.serial, adb_serial=serial, key=key, phone=phone.info.as_dict(),
                         target=phone.profile.target, tracker=f"{tracker[0]}:{tracker[1]}", rpc_port=rpc_port,
                         rpc_started=bool(files), registered=registered, record=str(path), notes=notes)


def _ndk_note(target: dict[str, Any]) -> str:
    from ..toolchain import toolchain_for

    try:
        chain = toolchain_for(target)
    except EdgetuneError as err:
        return f"tune and build will need the NDK: {err}"
    return f"NDK: {chain.compiler} {' '.join(chain.options)}"
