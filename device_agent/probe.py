"""What board this is, and the TVM target proposed for it.

Everything is read from text the kernel (and on Android, ``getprop``) prints: ``/proc/cpuinfo``,
``/proc/meminfo`` and the device-tree model. :func:`profile_from_texts` works on captured text, so the
host can profile a board from what ``adb shell`` or SSH returned; :func:`read_profile` reads the
running system.

The proposed target is a TVM 0.27 JSON dict. It names the CPU (``mcpu``) because LLVM's ``native`` is
refused, and states in ``mattr`` the vector features the board really has: ``+feature`` where both
the board and the named CPU have it, ``-feature`` where the named CPU would imply one the board's
kernel does not expose (a phone with SVE disabled, say), so generated code never traps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AgentError

log = logging.getLogger(__name__)

# `getprop` answers within milliseconds; the bound only guards against a wedged property service.
GETPROP_SEC = 5.0

_V8_0 = frozenset({"neon"})
_V8_2 = _V8_0 | {"dotprod", "fullfp16"}
_V9_0 = _V8_2 | {"i8mm", "sve", "sve2"}
_LITTLE_RANK = 10  # cores ranked below this are the in-order efficiency designs


@dataclass(frozen=True)
class _Core:
    name: str
    llvm_cpu: str  # "" when LLVM has no model of this core
    rank: int  # design order: a higher rank is a faster core; below _LITTLE_RANK = little core
    llvm_features: frozenset[str]  # which of _A64_MATTR the LLVM CPU implies
    aarch32: bool = True  # LLVM also knows the name for 32-bit ARM triples


# (implementer, part) from /proc/cpuinfo. 0x41 Arm, 0x51 Qualcomm (a Kryo core gets the LLVM name of
# the Arm core it is built on), 0x4e NVIDIA. Checked against LLVM 22 by tests/unit/test_probe.py.
_ARM_CORES: dict[tuple[int, int], _Core] = {
    (0x41, 0xC07): _Core("Cortex-A7", "cortex-a7", 1, _V8_0),
    (0x41, 0xC0F): _Core("Cortex-A15", "cortex-a15", 12, _V8_0),
    (0x41, 0xD04): _Core("Cortex-A35", "cortex-a35", 1, _V8_0),
    (0x41, 0xD03): _Core("Cortex-A53", "cortex-a53", 2, _V8_0),
    (0x41, 0xD05): _Core("Cortex-A55", "cortex-a55", 3, _V8_2),
    (0x41, 0xD46): _Core("Cortex-A510", "cortex-a510", 4, _V9_0),
    (0x41, 0xD80): _Core("Cortex-A520", "cortex-a520", 5, _V9_0, aarch32=False),
    (0x41, 0xD07): _Core("Cortex-A57", "cortex-a57", 15, _V8_0),
    (0x41, 0xD08): _Core("Cortex-A72", "cortex-a72", 20, _V8_0),
    (0x41, 0xD09): _Core("Cortex-A73", "cortex-a73", 25, _V8_0),
    (0x41, 0xD0A): _Core("Cortex-A75", "cortex-a75", 30, _V8_2),
    (0x41, 0xD0B): _Core("Cortex-A76", "cortex-a76", 40, _V8_2),
    (0x41, 0xD0C): _Core("Neoverse-N1", "neoverse-n1", 40, _V8_2),
    (0x41, 0xD0D): _Core("Cortex-A77", "cortex-a77", 45, _V8_2),
    (0x41, 0xD41): _Core("Cortex-A78", "cortex-a78", 50, _V8_2),
    (0x41, 0xD4B): _Core("Cortex-A78C", "cortex-a78c", 50, _V8_2),
    (0x41, 0xD44): _Core("Cortex-X1", "cortex-x1", 55, _V8_2),
    (0x41, 0xD4C): _Core("Cortex-X1C", "cortex-x1c", 55, _V8_2),
    (0x41, 0xD40): _Core("Neoverse-V1", "neoverse-v1", 55, _V8_2 | {"i8mm", "sve"}),
    (0x41, 0xD47): _Core("Cortex-A710", "cortex-a710", 60, _V9_0),
    (0x41, 0xD49): _Core("Neoverse-N2", "neoverse-n2", 60, _V9_0),
    (0x41, 0xD48): _Core("Cortex-X2", "cortex-x2", 65, _V9_0, aarch32=False),
    (0x41, 0xD4D): _Core("Cortex-A715", "cortex-a715", 70, _V9_0, aarch32=False),
    (0x41, 0xD4E): _Core("Cortex-X3", "cortex-x3", 75, _V9_0, aarch32=False),
    (0x41, 0xD4F): _Core("Neoverse-V2", "neoverse-v2", 75, _V9_0, aarch32=False),
    (0x41, 0xD81): _Core("Cortex-A720", "cortex-a720", 80, _V9_0, aarch32=False),
    (0x41, 0xD82): _Core("Cortex-X4", "cortex-x4", 85, _V9_0, aarch32=False),
    (0x41, 0xD87): _Core("Cortex-A725", "cortex-a725", 90, _V9_0, aarch32=False),
    (0x41, 0xD85): _Core("Cortex-X925", "cortex-x925", 95, _V9_0, aarch32=False),
    (0x51, 0x801): _Core("Kryo 2xx Silver", "cortex-a53", 2, _V8_0),
    (0x51, 0x800): _Core("Kryo 2xx Gold", "cortex-a73", 25, _V8_0),
    (0x51, 0x803): _Core("Kryo 3xx Silver", "cortex-a55", 3, _V8_2),
    (0x51, 0x802): _Core("Kryo 3xx Gold", "cortex-a75", 30, _V8_2),
    (0x51, 0x805): _Core("Kryo 4xx/5xx Silver", "cortex-a55", 3, _V8_2),
    (0x51, 0x804): _Core("Kryo 4xx Gold", "cortex-a76", 40, _V8_2),
    (0x51, 0x001): _Core("Oryon", "oryon-1", 90, _V8_2 | {"i8mm"}, aarch32=False),
    (0x4E, 0x000): _Core("Denver", "", 15, _V8_0),
    (0x4E, 0x003): _Core("Denver 2", "", 15, _V8_0),
    (0x4E, 0x004): _Core("Carmel", "carmel", 35, _V8_0 | {"fullfp16"}, aarch32=False),
}

# aarch64 hwcap (cpuinfo "Features") -> LLVM attribute, in the order mattr lists them.
_A64_MATTR = {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fullfp16", "i8mm": "i8mm", "sve": "sve",
              "sve2": "sve2"}
# hwcap -> the names the profile reports (short: they travel in a 255-byte mDNS TXT value).
_A64_FEATURES = {
    "asimd": ("asimd", "neon"), "asimddp": ("dotprod",), "asimdhp": ("fp16",), "asimdfhm": ("fp16fml",),
    "i8mm": ("i8mm",), "bf16": ("bf16",), "sve": ("sve",), "sve2": ("sve2",), "sme": ("sme",), "sme2": ("sme2",),
}
_A32_FEATURES = frozenset({"neon", "vfp", "vfpv3", "vfpv4", "vfpd32"})
_X86_FEATURES = frozenset({
    "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
    "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_int8", "amx_bf16",
})
# x86-64 micro-architecture levels, as cpuinfo flag names.
_X86_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_X86_V3 = _X86_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# Flags a Zen CPU name makes LLVM use. A hypervisor may hide some (AVX-512 on Zen 4 guests): the name
# is then not proposed, and the level the flags do reach is.
_ZNVER1 = _X86_V3 | {"adx", "aes", "pclmulqdq", "sha_ni", "sse4a"}
_ZNVER3 = _ZNVER1 | {"vaes", "vpclmulqdq"}
_ZNVER4 = _ZNVER3 | _X86_V4 | {
    "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "avx512_vnni",
    "avx512_bf16", "gfni",
}
_ZNVER5 = _ZNVER4 | {"avx_vnni", "avx512_vp2intersect", "movdiri", "movdir64b"}
# Extras LLVM's level names leave out but int8/bf16 kernels use; mattr names them.
_X86_EXTRAS = {"avx512_vnni": "+avx512vnni", "avx_vnni": "+avxvnni", "avx512_bf16": "+avx512bf16",
               "avx512_fp16": "+avx512fp16"}
_MACHINES = {"aarch64": "aarch64", "arm64": "aarch64", "armv7l": "armv7l", "armv8l": "armv7l",
             "armv7": "armv7l", "x86_64": "x86_64", "amd64": "x86_64"}
_TRIPLES = {("aarch64", "linux"): "aarch64-linux-gnu", ("aarch64", "android"): "aarch64-linux-android",
            ("armv7l", "linux"): "armv7l-linux-gnueabihf", ("armv7l", "android"): "armv7a-linux-androideabi",
            ("x86_64", "linux"): "x86_64-linux-gnu", ("x86_64", "android"): "x86_64-linux-android"}


@dataclass(frozen=True)
class CpuCluster:
    """CPUs of one core type."""

    part: str  # "0xd08" on ARM, "" on x86
    name: str  # "Cortex-A72", or the x86 model name
    llvm_cpu: str  # LLVM -mcpu name, "" when LLVM has none for this core
    cpus: tuple[int, ...]  # logical CPU numbers


@dataclass(frozen=True)
class BoardProfile:
    """What a board is, and the TVM target proposed for it (a JSON dict for ``tvm.target.Target``)."""

    arch: str
    os: str
    cpu_model: str
    board_model: str
    cores: int  # online logical CPUs
    clusters: tuple[CpuCluster, ...]
    big_cores: tuple[int, ...]  # the CPUs the target is for
    features: tuple[str, ...]
    memory_mb: int  # MiB, 0 when unknown
    triple: str
    target: dict[str, Any] = field(hash=False)
    llc_kib: int = 0  # last-level cache of the target's cores in KiB (sysfs cacheinfo), 0 when unknown

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able copy (lists, not tuples)."""
        return json.loads(json.dumps(asdict(self)))


_Clusters = list[tuple[CpuCluster, _Core | None]]


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Split ``/proc/cpuinfo`` text into ``{"processors": [...], "global": {...}}``.

    Each processor is a dict of its fields (``"processor"`` holds its number as an int). Fields printed
    outside any processor block (Hardware, Revision, Model; on old ARM kernels also Features and the
    CPU part for all cores) go to ``"global"`` and fill in what a processor block lacks.
    Raises :class:`AgentError` when a processor number is not a number.
    """
    processors: list[dict[str, Any]] = []
    shared: dict[str, str] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        if not line.strip():
            current = None  # a blank line ends a processor block
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            continue
        if key == "processor":
            try:
                current = {"processor": int(value)}
            except ValueError:
                raise AgentError(f"unreadable /proc/cpuinfo: processor number {value!r}; "
                                 "pass the board's unmodified /proc/cpuinfo") from None
            processors.append(current)
        elif current is not None:
            current[key] = value
        else:
            shared[key] = value
    for proc in processors:
        for key, value in shared.items():
            proc.setdefault(key, value)
    return {"processors": processors, "global": shared}


def parse_getprop(text: str) -> dict[str, str]:
    """Android ``getprop`` output (``[key]: [value]`` lines; a value may span lines) as a dict."""
    return {m.group(1): m.group(2)
            for m in re.finditer(r"^\[([^\]\n]+)\]: \[(.*?)\]$", text, re.MULTILINE | re.DOTALL)}


def _hwcaps(proc: dict[str, Any]) -> set[str]:
    return set(str(proc.get("Features", proc.get("flags", ""))).split())


def _number(value: Any, base: int = 10) -> int | None:
    try:
        return int(str(value), base)
    except ValueError:
        return None


def _arch(info: dict[str, Any], machine: str) -> str:
    procs = info["processors"]
    x86 = any("vendor_id" in p or "flags" in p for p in procs)
    caps = set().union(*(_hwcaps(p) for p in procs))
    cpuinfo_arch = ("x86_64" if x86 else "aarch64" if "asimd" in caps
                    else "armv7l" if caps & {"neon", "vfp", "thumb", "half"}
                    else {"8": "aarch64", "7": "armv7l"}.get(procs[0].get("CPU architecture", "")))
    if machine:
        arch = _MACHINES.get(machine.lower())
        if arch is None:
            raise AgentError(f"unsupported board architecture {machine!r}: edgetune supports aarch64, "
                             "armv7l (32-bit ARM, hard-float) and x86_64 boards")
        if cpuinfo_arch and (cpuinfo_arch == "x86_64") != (arch == "x86_64"):
            raise AgentError(f"/proc/cpuinfo is from a {cpuinfo_arch} CPU but the machine is {machine}: "
                             "pass the cpuinfo and machine of the same board")
        return arch
    if cpuinfo_arch is None:
        raise AgentError("cannot tell the CPU architecture from /proc/cpuinfo: pass machine= (uname -m)")
    return cpuinfo_arch


def _arm_clusters(procs: list[dict[str, Any]]) -> _Clusters:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for proc in procs:
        groups.setdefault((proc.get("CPU implementer", ""), proc.get("CPU part", "")), []).append(proc)
    clusters = []
    for (implementer, part), members in groups.items():
        impl_n, part_n = _number(implementer, 16), _number(part, 16)
        core = _ARM_CORES.get((impl_n, part_n)) if impl_n is not None and part_n is not None else None
        if core is not None:
            name, llvm_cpu = core.name, core.llvm_cpu
        elif part:
            name, llvm_cpu = f"unknown core (implementer {implementer}, part {part})", ""
        else:
            name, llvm_cpu = members[0].get("model name", members[0].get("Processor", "ARM")), ""
        cpus = tuple(sorted(p["processor"] for p in members))
        clusters.append((CpuCluster(part.lower(), name, llvm_cpu, cpus), core))
    return sorted(clusters, key=lambda c: c[0].cpus)


def _choose_big(clusters: _Clusters) -> _Clusters:
    """The clusters the target is for.

    With one core type, all of them. Otherwise every cluster except the in-order efficiency cores
    (A53/A55/A510/A520 and their Kryo Silver relatives); unknown cores count as big. So RK3588 gets its
    4x Cortex-A76, and with three core types (Pixel 8 Pro: 4x A510, 4x A715, 1x X3) the target is for
    the five A715 + X3 cores: TVM splits a parallel loop evenly over ``num-cores`` threads, and five
    A715-speed shares finish sooner than four, or than one X3 alone. If every cluster is little
    (Pi 3: 4x A53), all cores are used.
    """
    big = [c for c in clusters if c[1] is None or c[1].rank >= _LITTLE_RANK]
    return big or clusters


def _arm_target_cpu(big: _Clusters, arch: str) -> _Core | None:
    """The big core of lowest rank whose LLVM features every big core has (None: name no CPU)."""
    cores = [core for _, core in big]
    if any(core is None for core in cores):
        return None
    usable = [c for c in cores if c and c.llvm_cpu and (arch == "aarch64" or c.aarch32)]
    for core in sorted(usable, key=lambda c: c.rank):
        if all(core.llvm_features <= other.llvm_features for other in cores if other):
            return core
    return None


def _arm_mattr(arch: str, caps: set[str], core: _Core | None) -> list[str]:
    if arch == "armv7l":
        mattr = ["+neon" if "neon" in caps else "-neon"]  # LLVM's armv7 default has NEON
        d16 = "" if "vfpd32" in caps else "d16"
        if "vfpv4" in caps:
            mattr.append(f"+vfp4{d16}")
        elif "vfpv3" in caps:
            mattr.append(f"+vfp3{d16}")
        return mattr
    # Only vector features: the crypto extensions LLVM's names imply (absent on Pi 3/4) never appear
    # in tensor code.
    implied = core.llvm_features if core else _V8_0  # LLVM's generic aarch64 has NEON only
    mattr = []
    for hwcap, attr in _A64_MATTR.items():
        if hwcap in caps and (attr in implied or core is None):
            mattr.append("+" + attr)
        elif hwcap not in caps and attr in implied:
            mattr.append("-" + attr)
    return mattr


def _x86_cpu(proc: dict[str, Any], flags: set[str]) -> str:
    """An LLVM CPU name for an x86-64 CPU: a Zen generation when recognised, else the x86-64 level."""
    family, model = _number(proc.get("cpu family")), _number(proc.get("model"))
    if proc.get("vendor_id") == "AuthenticAMD" and family is not None and model is not None:
        zen = None
        if family == 0x17:
            zen = ("znver2", _ZNVER1) if model >> 4 in (3, 6, 7, 9, 0xA) else ("znver1", _ZNVER1)
        elif family == 0x19:
            zen = ("znver4", _ZNVER4) if model >> 4 in (1, 6, 7, 0xA) else ("znver3", _ZNVER3)
        elif family == 0x1A:
            zen = ("znver5", _ZNVER5)
        if zen and zen[1] <= flags:
            return zen[0]
        if zen:
            log.info("CPU flags lack %s for %s (virtual machine?): using an x86-64 level",
                     sorted(zen[1] - flags), zen[0])
    for name, needs in (("x86-64-v4", _X86_V4), ("x86-64-v3", _X86_V3), ("x86-64-v2", _X86_V2)):
        if needs <= flags:
            return name
    return "x86-64"


def _android_board(props: dict[str, str]) -> str:
    """"Google Pixel 8 Pro" from ro.product.* (market name preferred, maker not repeated)."""
    def prop(name: str) -> str:
        return props.get(f"ro.product.{name}") or props.get(f"ro.product.vendor.{name}") or ""
    maker, brand = prop("manufacturer"), prop("brand")
    name = prop("marketname") or prop("model")
    if any(w and name.lower().startswith(w.lower()) for w in (maker, brand)):
        return name
    return f"{maker} {name}".strip()


def _memory_mb(meminfo: str) -> int:
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.MULTILINE)
    return int(match.group(1)) // 1024 if match else 0


def _cache_kib(size: str) -> int:
    """A sysfs cache size ("32768K", "1M", "512K"; bare numbers are bytes) in KiB, 0 when unreadable."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", size or "")
    if not match:
        return 0
    number, unit = int(match.group(1)), match.group(2)
    return {"": number // 1024, "K": number, "M": number * 1024, "G": number * 1024 * 1024}[unit]


def read_llc_kib(root: str, cpu: int) -> int:
    """The largest data (or unified) cache of CPU ``cpu`` in KiB, from sysfs cacheinfo under ``root``;
    0 when the kernel does not describe its caches (many ARM boards without cache nodes in the device tree)."""
    base = os.path.join(root, f"sys/devices/system/cpu/cpu{cpu}/cache")
    best = (0, 0)  # (level, KiB)
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return 0
    for entry in entries:
        index = os.path.join(base, entry)
        if not entry.startswith("index") or _sysfs_text(index, "type") == "Instruction":
            continue
        level = _sysfs_text(index, "level")
        if level.isdigit():
            best = max(best, (int(level), _cache_kib(_sysfs_text(index, "size"))))
    return best[1]


def _sysfs_text(folder: str, name: str) -> str:
    return _read(os.path.join(folder, name)).decode("ascii", errors="replace").strip()


def _x86_cpus(procs: list[dict[str, Any]], target: dict[str, Any]) -> tuple[_Clusters, set[int], set[str], str]:
    flags = _hwcaps(procs[0])
    mcpu = _x86_cpu(procs[0], flags)
    name = procs[0].get("model name", "x86-64 CPU")
    cpus = tuple(p["processor"] for p in procs)
    target["mcpu"] = mcpu
    if mcpu.startswith("x86-64"):
        target["mattr"] = [attr for flag, attr in _X86_EXTRAS.items() if flag in flags]
    # One thread per physical core: compute kernels gain nothing from a core's second hardware thread.
    physical = {(p.get("physical id"), p.get("core id")) for p in procs if "core id" in p}
    target["num-cores"] = len(physical) or len(procs)
    return [(CpuCluster("", name, mcpu, cpus), None)], set(cpus), flags & _X86_FEATURES, name


def _arm_cpus(procs: list[dict[str, Any]], arch: str,
              target: dict[str, Any]) -> tuple[_Clusters, set[int], set[str], str]:
    clusters = _arm_clusters(procs)
    big = _choose_big(clusters)
    big_cpus = {cpu for c, _ in big for cpu in c.cpus}
    caps = set.intersection(*(_hwcaps(p) for p in procs if p["processor"] in big_cpus))
    if arch == "armv7l" and "asimd" in caps:
        # A 32-bit user land on a 64-bit kernel sees AArch64 hwcaps; every ARMv8 core has these in AArch32.
        caps |= _A32_FEATURES
    if arch == "aarch64":
        features = {name for cap in caps & _A64_FEATURES.keys() for name in _A64_FEATURES[cap]}
    else:
        features = caps & _A32_FEATURES
    core = _arm_target_cpu(big, arch)
    if core is not None:
        target["mcpu"] = core.llvm_cpu
    target["mattr"] = _arm_mattr(arch, caps, core)
    target["num-cores"] = len(big_cpus)
    by_speed = sorted(clusters, key=lambda c: -(c[1].rank if c[1] else _LITTLE_RANK))
    return clusters, big_cpus, features, " + ".join(dict.fromkeys(c.name for c, _ in by_speed))


def profile_from_texts(*, cpuinfo: str, meminfo: str = "", device_tree_model: str | bytes = "",
                       getprop: str = "", machine: str = "") -> BoardProfile:
    """Profile a board from the text of its ``/proc/cpuinfo`` and, when known, its ``/proc/meminfo``,
    device-tree model, ``getprop`` output (Android) and ``uname -m`` (else inferred from cpuinfo).

    Raises :class:`AgentError` when cpuinfo lists no processor or the architecture is not supported.
    """
    info = parse_cpuinfo(cpuinfo)
    procs = info["processors"]
    if not procs:
        raise AgentError("/proc/cpuinfo text lists no processor: pass the board's /proc/cpuinfo "
                         "(on Android: adb shell cat /proc/cpuinfo)")
    props = parse_getprop(getprop) if getprop else {}
    os_name = "android" if "ro.build.version.sdk" in props else "linux"
    arch = _arch(info, machine)
    triple = _TRIPLES[(arch, os_name)]
    target: dict[str, Any] = {"kind": "llvm", "mtriple": triple}
    if arch == "x86_64":
        clusters, big_cpus, features, cpu_model = _x86_cpus(procs, target)
    else:
        clusters, big_cpus, features, cpu_model = _arm_cpus(procs, arch, target)
    if not target.get("mattr"):
        target.pop("mattr", None)
    if isinstance(device_tree_model, bytes):
        device_tree_model = device_tree_model.decode("utf-8", errors="replace")
    board_model = device_tree_model.rstrip("\x00").strip() or info["global"].get("Model", "")
    if os_name == "android":
        board_model = _android_board(props) or board_model
        soc = props.get("ro.soc.model", "")
        cpu_model = f"{soc} ({cpu_model})" if soc else cpu_model
    return BoardProfile(
        arch=arch, os=os_name, cpu_model=cpu_model, board_model=board_model, cores=len(procs),
        clusters=tuple(c for c, _ in clusters), big_cores=tuple(sorted(big_cpus)),
        features=tuple(sorted(features)), memory_mb=_memory_mb(meminfo), triple=triple, target=target,
    )


def _read(path: str, required: bool = False) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        if required:
            raise AgentError(f"cannot read {path} ({err.strerror}): run the agent on the board itself, "
                             "or pass the root of a copy of its /proc") from None
        return b""


def _getprop() -> str:
    exe = shutil.which("getprop")
    if exe is None:
        return ""
    try:
        done = subprocess.run([exe], capture_output=True, text=True, timeout=GETPROP_SEC, check=False)
    except subprocess.TimeoutExpired:
        raise AgentError(f"getprop did not answer within {GETPROP_SEC:g} s: restart the phone's "
                         "property service (reboot) and probe again") from None
    except OSError as err:
        raise AgentError(f"cannot run {exe} ({err.strerror}): check that it is Android's getprop") from None
    if done.returncode != 0:
        raise AgentError(f"getprop failed with status {done.returncode}: {done.stderr.strip()[:200]}")
    return done.stdout


def read_profile(root: str = "/") -> BoardProfile:
    """Profile the board whose file system is at ``root`` ("/" is this machine; it also runs
    ``getprop`` when present, i.e. on Android, and takes the machine from ``platform.machine()``).

    Raises :class:`AgentError` when ``root/proc/cpuinfo`` cannot be read or says nothing usable.
    """
    def at(path: str) -> str:
        return os.path.join(root, path)

    cpuinfo = _read(at("proc/cpuinfo"), required=True).decode("utf-8", errors="replace")
    meminfo = _read(at("proc/meminfo")).decode("utf-8", errors="replace")
    dt_model = _read(at("proc/device-tree/model")) or _read(at("sys/firmware/devicetree/base/model"))
    machine = getprop = ""
    if os.path.abspath(root) == "/":
        getprop = _getprop()
        machine = platform.machine()
        # A 32-bit user land (armhf Python, so an armhf TVM runtime) on a 64-bit kernel.
        if _MACHINES.get(machine.lower()) == "aarch64" and struct.calcsize("P") == 4:
            machine = "armv7l"
    profile = profile_from_texts(cpuinfo=cpuinfo, meminfo=meminfo, device_tree_model=dt_model,
                                 getprop=getprop, machine=machine)
    big = profile.big_cores[0] if profile.big_cores else 0
    return dataclasses.replace(profile, llc_kib=read_llc_kib(root, big))


def _cpu_ranges(cpus: tuple[int, ...]) -> str:
    """(0, 3, 4, 5) -> "0,3-5"."""
    parts: list[str] = []
    for cpu in cpus:
        if parts and parts[-1].split("-")[-1] == str(cpu - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def describe(profile: BoardProfile) -> str:
    """Several lines of text for people: what the board is and the target proposed for it."""
    big = set(profile.big_cores)
    lines = [
        f"board:    {profile.board_model or '(unknown)'}",
        f"system:   {profile.os} {profile.arch} ({profile.triple})",
        f"cpu:      {profile.cpu_model}, {profile.cores} cores online",
    ]
    for c in profile.clusters:
        detail = ", ".join(x for x in (f"part {c.part}" if c.part else "", f"llvm {c.llvm_cpu or '-'}") if x)
        mark = "  <- target" if set(c.cpus) <= big else ""
        lines.append(f"cluster:  cpu {_cpu_ranges(c.cpus)}: {len(c.cpus)}x {c.name} ({detail}){mark}")
    lines += [
        f"features: {' '.join(profile.features) or '-'}",
        f"memory:   {f'{profile.memory_mb} MB' if profile.memory_mb else 'unknown'}",
        f"cache:    {f'{profile.llc_kib} KiB last level' if profile.llc_kib else 'unknown'}",
        f"target:   {json.dumps(profile.target)}",
    ]
    return "\n".join(lines)
