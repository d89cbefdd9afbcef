"""A phone's profile from what adb reads: ``getprop`` and ``/proc/cpuinfo`` (and ``/proc/meminfo``).

The profile is the agent's own :class:`device_agent.probe.BoardProfile`, made by the same
:func:`device_agent.probe.profile_from_texts`, so a phone gets the target a board's agent would
propose: ``aarch64-linux-android``, ``mcpu`` from the CPU part numbers of its big cores, and the vector
features its kernel reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from device_agent.errors import AgentError
from device_agent.probe import BoardProfile, _android_board, parse_getprop, profile_from_texts

from .adb import Adb, AndroidError

# ro.product.cpu.abi -> the machine name the probe takes (uname -m). 32-bit x86 phones are not supported.
_ABI_MACHINES = {"arm64-v8a": "aarch64", "armeabi-v7a": "armv7l", "armeabi": "armv7l", "x86_64": "x86_64"}


@dataclass(frozen=True)
class PhoneInfo:
    """What ``getprop`` says about a phone."""

    serial: str  # the hardware serial (ro.serialno), else the adb serial it was reached by
    model: str  # "Google Pixel 8 Pro", "POCO F6"
    device: str  # the codename: "husky", "peridot"
    soc: str  # "Tensor G3", "SM8635" (ro.soc.model, else ro.board.platform)
    abi: str  # "arm64-v8a"
    api_level: int  # ro.build.version.sdk: 35 for Android 15
    release: str  # "15"

    def as_dict(self) -> dict[str, Any]:
        return {"serial": self.serial, "model": self.model, "device": self.device, "soc": self.soc, "abi": self.abi,
                "api_level": self.api_level, "release": self.release}


@dataclass(frozen=True)
class Phone:
    """A phone's ``getprop`` facts and its board profile (target included)."""

    info: PhoneInfo
    profile: BoardProfile

    def board(self) -> dict[str, Any]:
        """The board profile as ``tune``/``build`` record it (session.json, build.json, the package
        manifest): the probe's fields plus the Android ones (``android_api`` is the API level)."""
        return {**self.profile.as_dict(), "serial": self.info.serial, "soc": self.info.soc, "abi": self.info.abi,
                "android_api": self.info.api_level, "android_release": self.info.release}


def phone_info(getprop: str, adb_serial: str = "") -> PhoneInfo:
    """The facts of a phone from its ``getprop`` output. Raises :class:`AndroidError` when the text is
    not ``getprop`` output of an Android phone."""
    props = parse_getprop(getprop)
    sdk = props.get("ro.build.version.sdk", "")
    if not sdk.isdigit():
        raise AndroidError("the phone's getprop output has no ro.build.version.sdk: check that the serial is an "
                           "Android phone (`adb -s SERIAL shell getprop ro.build.version.sdk`)")
    return PhoneInfo(
        serial=props.get("ro.serialno") or props.get("ro.boot.serialno") or adb_serial,
        model=_android_board(props),
        device=props.get("ro.product.device") or props.get("ro.product.vendor.device", ""),
        soc=props.get("ro.soc.model") or props.get("ro.board.platform", ""),
        abi=props.get("ro.product.cpu.abi", ""),
        api_level=int(sdk),
        release=props.get("ro.build.version.release", ""),
    )


def phone_from_texts(getprop: str, cpuinfo: str, meminfo: str = "", adb_serial: str = "") -> Phone:
    """A phone's facts and profile from the text of ``getprop``, ``/proc/cpuinfo`` and ``/proc/meminfo``.

    Raises :class:`AndroidError` for an ABI edgetune has no target for or a cpuinfo listing no CPU.
    """
    info = phone_info(getprop, adb_serial)
    machine = _ABI_MACHINES.get(info.abi)
    if machine is None:
        raise AndroidError(f"phone {info.serial} runs ABI {info.abi or '(none)'}: edgetune builds for arm64-v8a, "
                           "armeabi-v7a and x86_64 phones")
    try:
        profile = profile_from_texts(cpuinfo=cpuinfo, meminfo=meminfo, getprop=getprop, machine=machine)
    except AgentError as err:
        raise AndroidError(f"phone {info.serial}: {err}") from None
    return Phone(info, profile)


def read_phone(adb: Adb) -> Phone:
    """Read a phone's profile over adb (three ``adb shell`` commands). Raises :class:`AndroidError`."""
    getprop = adb.shell("getprop")
    cpuinfo = adb.shell("cat /proc/cpuinfo")
    meminfo = adb.shell("cat /proc/meminfo")
    return phone_from_texts(getprop, cpuinfo, meminfo, adb.serial)
