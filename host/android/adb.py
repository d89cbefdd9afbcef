"""Every adb command edgetune runs goes through :func:`run_adb`: one subprocess with a deadline.

:class:`Adb` builds the commands for one phone (``adb -s SERIAL ...``) and hands them to a runner, so
the commands can be checked against what a phone answers (its captured ``getprop`` and
``/proc/cpuinfo``) by passing another runner with the same signature.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Sequence

from .. import config
from ..errors import EdgetuneError

logger = logging.getLogger(__name__)

INSTALL_HINT = "install the Android platform tools (Debian/Ubuntu: apt-get install adb)"


class AndroidError(EdgetuneError):
    """adb or a phone failed; the message says what to do."""


class AdbMissing(AndroidError):
    """The adb client is not installed."""


@dataclass(frozen=True)
class AdbResult:
    """What one adb command answered. ``args`` is what followed ``adb`` on the command line."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def first_line(self) -> str:
        """The first non-empty line of stderr, else of stdout ("" when both are empty)."""
        for text in (self.stderr, self.stdout):
            for line in text.splitlines():
                if line.strip() and not line.startswith("* daemon"):
                    return line.strip()
        return ""


# (adb arguments, deadline in seconds) -> result. run_adb is the only one that runs adb.
AdbRunner = Callable[[Sequence[str], float], AdbResult]


def adb_executable() -> str:
    """The adb client on PATH. Raises :class:`AdbMissing` saying how to install it."""
    exe = shutil.which("adb")
    if exe is None:
        raise AdbMissing(f"adb not found on PATH: {INSTALL_HINT}, then run again")
    return exe


def run_adb(args: Sequence[str], timeout: float) -> AdbResult:
    """Run ``adb ARGS``, waiting at most ``timeout`` seconds.

    A non-zero exit status is returned, not raised (callers turn adb's messages into sentences).
    Raises :class:`AdbMissing` without adb, :class:`AndroidError` past the deadline.
    """
    exe = adb_executable()
    logger.debug("adb %s", shlex.join(args))
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise AndroidError(f"`adb {shlex.join(args)}` did not answer within {timeout:g} s: check that the phone is "
                           "awake and listed by `adb devices -l`, then run again") from None
    except OSError as err:
        raise AndroidError(f"cannot run {exe} ({err.strerror}): reinstall adb ({INSTALL_HINT})") from None
    return AdbResult(tuple(args), done.returncode, done.stdout, done.stderr)


def explain(result: AdbResult, serial: str) -> str:
    """adb's complaint about a phone as one sentence saying what to do."""
    line = result.first_line()
    low = line.lower()
    if "unauthorized" in low:
        return (f"phone {serial} has not allowed this workstation: unlock it, accept the \"Allow USB debugging?\" "
                "prompt and run again")
    if "offline" in low:
        return f"phone {serial} is offline to adb: reconnect it (cable, or Wireless debugging off and on) and run again"
    if "not found" in low or "no devices" in low:
        return (f"no phone {serial} is attached to adb: plug it in with USB debugging on, or for Wireless debugging "
                f"run `adb pair` and `adb connect HOST:PORT`; `adb devices -l` lists the serials")
    what = shlex.join(result.args[2:] if result.args[:1] == ("-s",) else result.args)
    return f"`adb {what}` failed on phone {serial}: {line or f'exit status {result.returncode}'}"


_HOSTPORT = re.compile(r"^[^\s:/]+:\d{1,5}$")


def is_network_serial(serial: str) -> bool:
    """True for ``HOST:PORT`` serials (a phone reached over Wi-Fi with ``adb connect``)."""
    return bool(_HOSTPORT.match(serial))


def connect_network_phone(address: str, runner: AdbRunner = run_adb) -> None:
    """``adb connect HOST:PORT`` (Wireless debugging). Raises :class:`AndroidError` when adb cannot
    connect (adb 29 exits 0 even then, so its answer is read)."""
    result = runner(["connect", address], config.ADB_COMMAND_SEC)
    # adb answers on stdout; its own "* daemon ..." start-up lines (stderr) say nothing about the phone.
    lines = [line.strip() for line in (result.stdout + "\n" + result.stderr).splitlines()
             if line.strip() and not line.startswith("*")]
    if result.returncode == 0 and any(re.match(r"(already )?connected to ", line) for line in lines):
        return
    reason = lines[0] if lines else f"exit status {result.returncode}"
    # adb 29: "failed to connect to '127.0.0.1:5555': Connection refused"; older: "unable to connect to
    # 127.0.0.1:5555: Connection refused".
    match = re.search(r"(?:failed|unable) to connect to '?[^' ]+?'?:\s*(\D.*)$", reason)
    cause = match.group(1).strip() if match else reason
    raise AndroidError(f"adb could not connect to {address} ({cause}): on the phone, turn on Developer options > "
                       "Wireless debugging, pair once with `adb pair HOST:PAIRPORT`, and use the IP address and "
                       "port that screen shows (or plug the phone in by USB)")


class Adb:
    """adb commands for one phone, each run through ``runner`` with a deadline from :mod:`host.config`."""

    def __init__(self, serial: str, runner: AdbRunner = run_adb) -> None:
        self.serial = serial
        self.runner = runner

    def run(self, *args: str, timeout: float | None = None, check: bool = True) -> AdbResult:
        """``adb -s SERIAL ARGS``. Raises :class:`AndroidError` on a non-zero status when ``check``."""
        result = self.runner(["-s", self.serial, *args], config.ADB_COMMAND_SEC if timeout is None else timeout)
        if check and result.returncode != 0:
            raise AndroidError(explain(result, self.serial))
        return result

    def shell(self, command: str, timeout: float | None = None) -> str:
        """Run ``command`` in the phone's shell (its stdout). adb passes the one string to ``sh -c``."""
        return self.run("shell", command, timeout=timeout).stdout

    def require_device(self) -> None:
        """Raise :class:`AndroidError` unless adb sees the phone, authorized and online."""
        result = self.run("get-state", check=False)
        state = result.stdout.strip()
        if result.returncode != 0 or state != "device":
            raise AndroidError(explain(result, self.serial) if result.returncode != 0 else
                               explain(AdbResult(result.args, 1, "", state), self.serial))

    def push(self, local: str, remote: str) -> None:
        """Copy a workstation file to the phone (deadline: ``ADB_PUSH_SEC``)."""
        self.run("push", local, remote, timeout=config.ADB_PUSH_SEC)

    def reverse(self, phone_port: int, workstation_port: int) -> None:
        """Connections to the phone's ``127.0.0.1:phone_port`` reach the workstation's ``workstation_port``."""
        self.run("reverse", f"tcp:{phone_port}", f"tcp:{workstation_port}")

    def forward(self, workstation_port: int, phone_port: int) -> None:
        """Connections to the workstation's ``127.0.0.1:workstation_port`` reach the phone's ``phone_port``."""
        self.run("forward", f"tcp:{workstation_port}", f"tcp:{phone_port}")
