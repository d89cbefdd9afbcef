"""Targets and the compilers that link code for them.

A board's target comes from its agent's probe (the mDNS TXT record) or from ``--target JSON`` for
boards without an agent. Candidates and models are linked into a shared library on the workstation
with the board's toolchain, because a board has no compiler.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
from dataclasses import dataclass
from typing import Any

from device_agent.schema import target_to_json

from .errors import EdgetuneError


@dataclass(frozen=True)
class Toolchain:
    """How to link a module for a board: the compiler command and extra options."""

    compiler: str
    options: tuple[str, ...] = ()

    def fcompile(self):
        """A fresh TVM ``fcompile`` (TVM's cross compiler keeps state across calls: never reuse one)."""
        from tvm.support import cc

        if self.options:
            return cc.cross_compiler(self.compiler, options=list(self.options))
        return cc.cross_compiler(self.compiler)


def parse_target(value: str | dict[str, Any]) -> dict[str, Any]:
    """A TVM target JSON dict from ``--target``; checked by TVM itself. Raises :class:`EdgetuneError`."""
    if isinstance(value, str):
        try:
            target = json.loads(value)
        except json.JSONDecodeError:
            raise EdgetuneError(
                f"--target {value!r} is not JSON: give a dict, e.g. "
                '\'{"kind":"llvm","mtriple":"aarch64-linux-gnu","mcpu":"cortex-a72","mattr":["+neon"],"num-cores":4}\''
            ) from None
    else:
        target = dict(value)
    if not isinstance(target, dict) or target.get("kind") != "llvm" or "mtriple" not in target:
        raise EdgetuneError('--target must be an llvm target with an "mtriple", e.g. {"kind":"llvm","mtriple":"aarch64-linux-gnu",...}')
    if target.get("mcpu") == "native":
        raise EdgetuneError('--target: "mcpu": "native" is refused by TVM: name the board\'s CPU (e.g. "cortex-a72")')
    target.setdefault("num-cores", 1)
    check_target(target)
    return target


def check_target(target: dict[str, Any]) -> None:
    """Raise :class:`EdgetuneError` if TVM refuses ``target`` or LLVM does not know its CPU (TVM only
    warns, then silently generates generic code: a mistyped CPU would cost every tuned kernel)."""
    import tvm
    from tvm.target import codegen

    cpu, triple = target.get("mcpu"), str(target.get("mtriple", ""))
    if cpu and triple and not codegen.llvm_is_valid_cpu(str(cpu), triple):
        raise EdgetuneError(f"LLVM does not know CPU {cpu!r} for {triple}: use the board's CPU name as "
                            "`edgetune-agent probe` reports it (e.g. cortex-a72, cortex-a76, znver4)")

    try:
        tvm.target.Target(target)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EdgetuneError(f"TVM refuses the target {target_to_json(target)}: {first[:200]}") from None


def _host_triple_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


# Android: link with the NDK's clang for the phone's API level (--target=aarch64-linux-android35).
ANDROID_API_ENV = "EDGETUNE_ANDROID_API"
# The NDK's folder for a triple's libraries (armv7a code links against the "arm" sysroot).
_NDK_LIB_TRIPLES = {"aarch64": "aarch64-linux-android", "armv7a": "arm-linux-androideabi",
                    "x86_64": "x86_64-linux-android"}
_NDK_WRAPPER = re.compile(r"-linux-android(eabi)?(\d+)-clang\+\+$")


def _ndk_compiler() -> str:
    """The NDK's clang++ (``TVM_NDK_CC``, else under ``ANDROID_NDK_HOME``). Raises :class:`EdgetuneError`."""
    explicit = os.environ.get("TVM_NDK_CC")
    if explicit:
        if not shutil.which(explicit) and not os.path.isfile(explicit):
            raise EdgetuneError(f"TVM_NDK_CC={explicit!r} does not exist: point it at the NDK's clang++")
        return shutil.which(explicit) or explicit
    ndk = os.environ.get("ANDROID_NDK_HOME")
    if not ndk:
        raise EdgetuneError(
            "Android target needs the NDK's clang: set ANDROID_NDK_HOME to the NDK folder "
            "(or TVM_NDK_CC to its clang++)"
        )
    found = sorted(glob.glob(os.path.join(ndk, "toolchains", "llvm", "prebuilt", "*", "bin", "clang++")))
    if not found:
        raise EdgetuneError(f"no toolchains/llvm/prebuilt/*/bin/clang++ under ANDROID_NDK_HOME={ndk}: "
                            "point it at an NDK (r23 or later) folder")
    return found[0]


def _ndk_api_levels(compiler: str, arch: str) -> list[int]:
    """The API levels the NDK beside ``compiler`` has libraries for ([] when it is not an NDK layout)."""
    lib_triple = _NDK_LIB_TRIPLES.get("armv7a" if arch.startswith("arm") else arch, "")
    root = os.path.dirname(os.path.dirname(os.path.realpath(compiler)))
    folder = os.path.join(root, "sysroot", "usr", "lib", lib_triple)
    try:
        return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if lib_triple else []
    except OSError:
        return []


def android_api_level(target: dict[str, Any]) -> int | None:
    """The phone API level to link ``target`` for: ``$EDGETUNE_ANDROID_API``, else the lowest of the
    phones recorded by ``edgetune android connect`` with this target, else None."""
    raw = os.environ.get(ANDROID_API_ENV)
    if raw:
        if not raw.isdigit():
            raise EdgetuneError(f"{ANDROID_API_ENV}={raw!r} is not an API level: use a number such as 29 "
                                "(`adb shell getprop ro.build.version.sdk` prints the phone's)")
        return int(raw)
    from .android.phones import android_api_for

    return android_api_for(target)


def _android_toolchain(target: dict[str, Any]) -> Toolchain:
    """NDK clang linking for ``--target=<triple><API>``: the phone's API level, lowered to the newest the
    NDK has (a library linked for API N loads on N and later), else the oldest the NDK has."""
    triple = str(target["mtriple"])
    compiler = _ndk_compiler()
    options = ["-static-libstdc++"]
    if _NDK_WRAPPER.search(os.path.basename(compiler)):
        return Toolchain(compiler, tuple(options))  # the NDK's per-API wrapper already names its target
    api = android_api_level(target)
    levels = _ndk_api_levels(compiler, triple.split("-")[0])
    if levels and api is not None and api < levels[0]:
        raise EdgetuneError(f"the phone runs Android API {api} but the NDK of {compiler} links for API "
                            f"{levels[0]}-{levels[-1]}: use an older NDK (r25 supports API 19 and later)")
    if levels:
        api = levels[0] if api is None else min(api, levels[-1])
    if api is None:
        raise EdgetuneError(f"cannot tell which Android API level to link for with {compiler}: run `edgetune "
                            f"android connect SERIAL` for the phone, or set {ANDROID_API_ENV} (e.g. 29)")
    base = re.sub(r"\d+$", "", triple)
    return Toolchain(compiler, (f"--target={base}{api}", *options))


def toolchain_for(target: dict[str, Any]) -> Toolchain:
    """The compiler that links modules for ``target``'s triple. Raises :class:`EdgetuneError` naming the
    package to install when it is missing."""
    triple = str(target.get("mtriple", ""))
    arch = triple.split("-")[0]
    if "android" in triple:
        return _android_toolchain(target)
    if arch == _host_triple_arch():
        compiler, package = "g++", "g++"
    elif arch == "aarch64":
        compiler, package = "aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"
    elif arch.startswith("arm") and triple.endswith("gnueabihf"):
        compiler, package = "arm-linux-gnueabihf-g++", "g++-arm-linux-gnueabihf"
    elif arch == "x86_64":
        compiler, package = "x86_64-linux-gnu-g++", "g++-x86-64-linux-gnu"
    else:
        raise EdgetuneError(f"no known toolchain for target triple {triple!r}: use aarch64, armv7 (gnueabihf), "
                            "x86_64 or Android")
    if shutil.which(compiler) is None:
        raise EdgetuneError(f"cross compiler {compiler} not found: install it (apt-get install {package})")
    return Toolchain(compiler)
