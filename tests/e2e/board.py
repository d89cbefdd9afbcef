"""The emulated Raspberry Pi 4: a Debian bookworm arm64 root file system run under qemu-user.

The board gets the aarch64 TVM wheels and this repository's ``edgetune-agent``, runs in its own
network namespace behind a veth link to the host (10.77.N.2 on the board, 10.77.N.1 on the host),
and runs its own sshd, so discovery (mDNS), TVM RPC and SSH cross a real link as with a real Pi.

Build once, cache outside the checkout (``$EDGETUNE_BOARD_CACHE``, default
``/var/cache/edgetune/board``)::

    qemu10/                  trixie's qemu-user, registered with binfmt_misc (install-board-deps.sh)
    base-<hash>/rootfs       debootstrap output (the slow step)
    wheels-<hash>/           aarch64 wheels downloaded on the host
    image-<hash>/rootfs      base + /opt/tvmenv (venv with the wheels) + board configuration
    runs/<run id>/           one started board: state.json, overlay upper dir, keys, logs

Every stage is built in ``<name>.partial`` and renamed into place when complete, so an interrupted
build resumes at the stage it was in and a half-built tree is never taken for a complete one.
A started board mounts an overlay on the image: what the board writes (agent install, store, keys)
lands in its run directory and the cached image stays as built.

Everything here needs root (chroot, mounts, network namespaces, binfmt_misc).
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_DEPS_SCRIPT = REPO_ROOT / "scripts" / "install-board-deps.sh"

# ----------------------------------------------------------------------------------------------
# Timing constants, in seconds.
# ----------------------------------------------------------------------------------------------
# debootstrap of the arm64 base took ~4 min here (second stage runs under qemu); slow mirrors more.
DEBOOTSTRAP_TIMEOUT_S = 40 * 60
# pip download of ~120 MB of wheels took seconds here; allow a slow link.
WHEEL_DOWNLOAD_TIMEOUT_S = 15 * 60
# Creating the venv and installing the wheels runs pip under emulation.
VENV_INSTALL_TIMEOUT_S = 20 * 60
# install-board-deps.sh: apt-get install and the trixie qemu download on a cold machine.
SYSTEM_DEPS_TIMEOUT_S = 20 * 60
# pip wheel of the working tree on the host.
AGENT_WHEEL_TIMEOUT_S = 5 * 60
# pip install --no-deps of the agent wheel inside the board (pip under qemu).
AGENT_INSTALL_TIMEOUT_S = 5 * 60
# sshd under qemu needs a few seconds before it listens.
SSHD_READY_TIMEOUT_S = 60.0
# Short commands on the host (ip, mount, ssh-keygen) and quick checks in the board.
QUICK_CMD_TIMEOUT_S = 60.0
# Grace between SIGTERM and SIGKILL when stopping board processes.
STOP_GRACE_S = 5.0
# Poll period while waiting for a port or a process.
POLL_S = 0.2

# ----------------------------------------------------------------------------------------------
# What the board is.
# ----------------------------------------------------------------------------------------------
SUITE = "bookworm"
DEBOOTSTRAP_INCLUDE = ("python3", "python3-venv", "python3-pip", "ca-certificates", "iproute2", "procps",
                       "openssh-server")
# The board agent's base install (setup.cfg install_requires is added to this at build time).
BOARD_REQUIREMENTS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy", "ml_dtypes",
                      "typing_extensions", "tornado", "psutil", "cloudpickle", "zeroconf", "ifaddr", "click",
                      "cryptography", "cffi", "pycparser")
# pip does not widen --platform to older manylinux tags by itself: list them. Bookworm has glibc 2.36.
WHEEL_PLATFORMS = ("manylinux_2_36_aarch64", "manylinux_2_35_aarch64", "manylinux_2_34_aarch64",
                   "manylinux_2_31_aarch64", "manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                   "manylinux_2_26_aarch64", "manylinux_2_24_aarch64", "manylinux_2_17_aarch64",
                   "manylinux2014_aarch64")
BOARD_PYTHON_VERSION = "3.11"
# Raspberry Pi 4: Cortex-A72. qemu's default CPU ("max") accepts SVE code a Pi cannot run.
QEMU_CPU = "cortex-a72"
CORTEX_A72_PART = "0xd08"
# What a Pi 4's device tree says (/sys/firmware/devicetree/base/model, NUL-terminated).
PI4_MODEL = "Raspberry Pi 4 Model B Rev 1.4"
VENV = "/opt/tvmenv"
BOARD_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_STORE = "/var/lib/edgetune"
SSH_USER = "root"
SSH_PORT = 22
SSH_CONF_DIR = "/etc/edgetune-ssh"
# Bump when the image configuration below changes, so old caches are not reused.
IMAGE_LAYOUT_VERSION = 1

SUBNET_PREFIX = "10.77"
BINFMT_NAME = "edgetune-aarch64"
RUN_NAME_PREFIX = "etb"  # netns "etb<N>", veths "etb<N>h" (host) and "etb<N>b" (board)


class BoardError(RuntimeError):
    """The emulated board could not be built, started or stopped; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Small helpers.
# ----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The board cache: ``$EDGETUNE_BOARD_CACHE`` or /var/cache/edgetune/board."""
    return Path(os.environ.get("EDGETUNE_BOARD_CACHE", "/var/cache/edgetune/board"))


def _run(argv: Sequence[str], *, timeout: float = QUICK_CMD_TIMEOUT_S, what: str | None = None,
         hint: str = "", env: dict[str, str] | None = None, cwd: Path | None = None,
         log_path: Path | None = None) -> subprocess.CompletedProcess:
    """Run a host command; raise BoardError naming ``what`` failed and ``hint`` on failure."""
    argv = [str(a) for a in argv]
    log.debug("run: %s", " ".join(argv))
    try:
        if log_path is not None:
            with open(log_path, "ab") as out:
                out.write(f"\n$ {' '.join(argv)}\n".encode())
                out.flush()
                proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env,
                                      cwd=cwd, stdin=subprocess.DEVNULL)
        else:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                                  stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BoardError(f"{what or argv[0]} took more than {timeout:.0f} s. {hint}".strip()) from None
    except FileNotFoundError:
        raise BoardError(f"{argv[0]} not found: run scripts/install-board-deps.sh (as root)") from None
    if proc.returncode != 0:
        detail = ""
        if log_path is not None:
            detail = f" (log: {log_path})"
        elif proc.stderr:
            detail = ": " + proc.stderr.strip().splitlines()[-1]
        raise BoardError(f"{what or ' '.join(argv)} failed with exit code {proc.returncode}{detail}. {hint}".strip())
    return proc


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes using the same cache (builds, network allocation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            target = line.split()[4].encode().decode("unicode_escape")
            if target == root or target.startswith(root.rstrip("/") + "/"):
                found.append(target)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def _unmount_all(path: Path) -> None:
    for _ in range(3):
        points = _mounts_under(path)
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
    if _mounts_under(path):
        raise BoardError(f"cannot unmount {', '.join(_mounts_under(path))}: stop what uses them and retry")


def _remove_tree(path: Path) -> None:
    """rm -rf that never descends into a mount (a bind of /dev inside a chroot, say)."""
    if not path.exists() and not path.is_symlink():
        return
    _unmount_all(path)
    _run(["rm", "-rf", "--one-file-system", str(path)], timeout=600, what=f"removing {path}")


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): with the pid, a process identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, start: int | None) -> bool:
    now = _proc_start_time(pid)
    return now is not None and (start is None or now == start)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    """All descendants of ``pid``, deepest first."""
    children = _children_map()
    order: list[int] = []
    stack = [(pid, 0)]
    depth: dict[int, int] = {}
    while stack:
        cur, d = stack.pop()
        for child in children.get(cur, []):
            if child not in depth:
                depth[child] = d + 1
                order.append(child)
                stack.append((child, d + 1))
    return sorted(order, key=lambda p: -depth[p])


def _pids_rooted_at(root: Path) -> list[int]:
    """Processes whose root directory is ``root``: everything running inside that board."""
    want = os.path.realpath(root)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/root") == want:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _build_leftovers(path: Path) -> list[int]:
    """Processes of an interrupted build of ``path``: chrooted below it, or naming it on their command line
    (debootstrap). Only called with the build lock held, so no live build owns them."""
    want = os.path.realpath(path).rstrip("/")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            root = os.readlink(f"/proc/{entry}/root")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if root == want or root.startswith(want + "/") or want in cmdline:
            found.append(int(entry))
    return found


def _kill(pids: Sequence[int], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the given processes (in order), then SIGKILL what is left after ``grace`` seconds."""
    starts = {pid: _proc_start_time(pid) for pid in pids}
    live = [pid for pid in pids if starts[pid] is not None]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p, starts[p]) for p in live):
        _reap(live)
        time.sleep(POLL_S)
    for pid in live:
        if _alive(pid, starts[pid]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p, starts[p]) for p in live):
        _reap(live)
        time.sleep(POLL_S / 4)


def _kill_tree(pid: int, start: int | None, grace: float = STOP_GRACE_S) -> None:
    """Stop ``pid`` and its descendants, children first (a TVM server's popen worker holds its port)."""
    if not _alive(pid, start):
        return
    _kill(_descendants(pid) + [pid], grace)


def _reap(pids: Sequence[int]) -> None:
    """Collect those of ``pids`` that are exited children of this process (zombies look alive).

    Only these pids: waiting for any child would steal exit codes from other code's subprocesses.
    """
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None,
               what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise BoardError(f"{what or 'process'} exited with code {proc.returncode} before listening on "
                             f"{host}:{port}")
        if time.monotonic() > deadline:
            raise BoardError(f"{what or 'nothing'} listening on {host}:{port} after {timeout:.0f} s")
        time.sleep(POLL_S)


# ----------------------------------------------------------------------------------------------
# Host preparation: packages, qemu 10, binfmt_misc.
# ----------------------------------------------------------------------------------------------
def _require_root() -> None:
    if os.geteuid() != 0:
        raise BoardError("the emulated board needs root (chroot, mounts, network namespaces): run as root")


def ensure_host_ready(progress: Callable[[str], None] = print) -> Path:
    """Install the host packages, qemu 10 and its binfmt_misc entry when missing (idempotent, ~0.1 s
    when all is there). Returns the qemu 10 binary. Raises BoardError."""
    _require_root()
    t0 = time.monotonic()
    proc = subprocess.run(["sh", str(INSTALL_DEPS_SCRIPT)], capture_output=True, text=True,
                          timeout=SYSTEM_DEPS_TIMEOUT_S, env={**os.environ, "EDGETUNE_BOARD_CACHE": str(cache_dir())})
    for line in proc.stderr.splitlines():
        progress(line)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        raise BoardError(f"{INSTALL_DEPS_SCRIPT.name} failed: {last}")
    if time.monotonic() - t0 > 2:
        progress(f"host dependencies ready in {time.monotonic() - t0:.0f} s")
    qemu = cache_dir() / "qemu10" / "root" / "usr" / "bin" / "qemu-aarch64"
    entry = Path("/proc/sys/fs/binfmt_misc") / BINFMT_NAME
    if not qemu.exists() or not entry.exists():
        raise BoardError(f"qemu 10 is not registered with binfmt_misc ({entry}): run scripts/install-board-deps.sh")
    return qemu


def debian_mirror() -> str:
    """The Debian mirror this host uses (``$EDGETUNE_DEBIAN_MIRROR`` overrides), from /etc/apt."""
    env = os.environ.get("EDGETUNE_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(d.glob("*.list")) + sorted(d.glob("*.sources"))
    uris: list[str] = []
    for f in files:
        with contextlib.suppress(OSError):
            for line in f.read_text().splitlines():
                line = line.strip()
                m = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line) or re.match(r"URIs:\s*(\S+)", line)
                if m:
                    uris.append(m.group(1))
    for uri in uris:
        if re.match(r"https?://\S+/debian/?$", uri):
            return uri.rstrip("/")
    raise BoardError("no Debian mirror found in /etc/apt/sources.list(.d): set EDGETUNE_DEBIAN_MIRROR=URL")


# ----------------------------------------------------------------------------------------------
# The image.
# ----------------------------------------------------------------------------------------------
def board_requirements(repo_root: Path = REPO_ROOT) -> list[str]:
    """What goes into /opt/tvmenv: the agent's install_requires (setup.cfg) plus BOARD_REQUIREMENTS."""
    reqs = {r.lower(): r for r in BOARD_REQUIREMENTS}
    cfg = configparser.ConfigParser()
    cfg.read(repo_root / "setup.cfg")
    raw = cfg.get("options", "install_requires", fallback="")
    for line in raw.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower()
        for known in list(reqs):
            if re.split(r"[\s<>=!~;\[]", known, maxsplit=1)[0] == name:
                del reqs[known]
        reqs[line.lower()] = line
    return sorted(reqs.values(), key=str.lower)


def _base_recipe() -> dict:
    return {"suite": SUITE, "arch": "arm64", "variant": "minbase", "include": sorted(DEBOOTSTRAP_INCLUDE)}


def _wheels_recipe(reqs: list[str]) -> dict:
    return {"requirements": reqs, "platforms": list(WHEEL_PLATFORMS), "python": BOARD_PYTHON_VERSION}


@contextlib.contextmanager
def _chroot_mounts(root: Path, netns: str | None = None) -> Iterator[None]:
    """proc, sysfs, /dev, /dev/pts and a tmpfs /dev/shm in ``root``, unmounted on exit."""
    mount_board_fs(root, netns)
    try:
        yield
    finally:
        _unmount_all(root / "proc")
        _unmount_all(root / "sys")
        _unmount_all(root / "dev")


def mount_board_fs(root: Path, netns: str | None = None) -> None:
    """Mount what a chroot needs. Mounts are made private so nothing propagates back to the host's /dev.

    With ``netns``, sysfs is mounted from inside that namespace so /sys/class/net shows the board's links.
    """
    for sub in ("proc", "sys", "dev", "dev/pts", "dev/shm"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "proc", "proc", root / "proc"])
    if netns:
        _run(["nsenter", f"--net=/run/netns/{netns}", "mount", "-t", "sysfs", "sysfs", root / "sys"])
    else:
        _run(["mount", "-t", "sysfs", "sysfs", root / "sys"])
    _run(["mount", "--bind", "/dev", root / "dev"])
    _run(["mount", "--make-private", root / "dev"])
    _run(["mount", "--bind", "/dev/pts", root / "dev/pts"])
    _run(["mount", "--make-private", root / "dev/pts"])
    _run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", root / "dev/shm"])


def _board_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": BOARD_PATH, "HOME": "/root", "LANG": "C.UTF-8", "QEMU_CPU": QEMU_CPU, "TERM": "dumb"}
    if extra:
        env.update(extra)
    return env


def _chroot_run(root: Path, argv: Sequence[str], *, timeout: float, what: str, hint: str = "",
                log_path: Path | None = None) -> subprocess.CompletedProcess:
    return _run(["chroot", root, *argv], timeout=timeout, what=what, hint=hint, env=_board_env(),
                log_path=log_path)


def _stage_base(cache: Path, progress: Callable[[str], None]) -> Path:
    final = cache / f"base-{_digest(_base_recipe())}"
    if (final / ".complete").exists():
        return final
    partial = final.with_name(final.name + ".partial")
    # debootstrap cannot resume half-way: start this stage over.
    _kill(_build_leftovers(partial))
    _remove_tree(partial)
    partial.mkdir(parents=True)
    mirror = debian_mirror()
    progress(f"debootstrap {SUITE} arm64 from {mirror} (~4-5 min)")
    t0 = time.monotonic()
    _run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(DEBOOTSTRAP_INCLUDE)}",
          SUITE, partial / "rootfs", mirror],
         timeout=DEBOOTSTRAP_TIMEOUT_S, what="debootstrap", log_path=partial / "debootstrap.log",
         hint=f"Check the mirror ({mirror}; override with EDGETUNE_DEBIAN_MIRROR) and the network, "
              f"then rerun: the stage restarts.")
    _unmount_all(partial)
    _write(partial / ".complete", json.dumps({**_base_recipe(), "mirror": mirror,
                                              "seconds": round(time.monotonic() - t0)}) + "\n")
    partial.rename(final)
    progress(f"debootstrap done in {time.monotonic() - t0:.0f} s")
    return final


def _stage_wheels(cache: Path, reqs: list[str], progress: Callable[[str], None]) -> Path:
    final = cache / f"wheels-{_digest(_wheels_recipe(reqs))}"
    if (final / ".complete").exists():
        return final
    partial = final.with_name(final.name + ".partial")
    _kill(_build_leftovers(partial))
    _remove_tree(partial)
    partial.mkdir(parents=True)
    progress(f"pip download aarch64 wheels: {' '.join(reqs)}")
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    # With dependencies: pip resolves them for the aarch64 cp311 target given by these flags.
    _run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", *platforms,
          "--python-version", BOARD_PYTHON_VERSION, "--implementation", "cp", "-d", partial, *reqs],
         timeout=WHEEL_DOWNLOAD_TIMEOUT_S, what="pip download of the aarch64 wheels",
         log_path=partial / "download.log", hint="Check the network and that every requirement has an "
                                                 "aarch64 (manylinux) or pure-Python wheel.")
    _write(partial / ".complete", json.dumps(_wheels_recipe(reqs)) + "\n")
    partial.rename(final)
    return final


def _configure_image(root: Path) -> None:
    """Board-side configuration that does not change per start."""
    # Host keys made by openssh-server's postinst are shared by every cached image: drop them;
    # each start generates its own.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "run/sshd").mkdir(parents=True, exist_ok=True)
    (root / DEFAULT_STORE.lstrip("/")).mkdir(parents=True, exist_ok=True)
    _write(root / "etc/hostname", "emu-pi4\n")
    # Login shells (ssh sessions) get the venv first on PATH even if sshd's SetEnv is bypassed.
    _write(root / "etc/profile.d/edgetune.sh", f'export PATH="{VENV}/bin:$PATH"\nexport QEMU_CPU={QEMU_CPU}\n')


def _stage_image(cache: Path, base: Path, wheels: Path, reqs: list[str], progress: Callable[[str], None]) -> Path:
    recipe = {"base": base.name, "wheels": wheels.name, "layout": IMAGE_LAYOUT_VERSION}
    final = cache / f"image-{_digest(recipe)}"
    if (final / "image.json").exists():
        return final
    partial = final.with_name(final.name + ".partial")
    root = partial / "rootfs"
    _kill(_build_leftovers(partial))
    _unmount_all(partial)
    if not (partial / ".copied").exists():
        _remove_tree(partial)
        partial.mkdir(parents=True)
        progress("copying the base root file system")
        _run(["cp", "-a", "--reflink=auto", base / "rootfs", root], timeout=600, what="copying the base rootfs")
        _write(partial / ".copied", "")
    if not (partial / ".venv").exists():
        progress(f"creating {VENV} and installing the wheels under emulation (~2-4 min)")
        t0 = time.monotonic()
        wheel_dir = root / "tmp/edgetune-wheels"
        _remove_tree(wheel_dir)
        shutil.copytree(wheels, wheel_dir)
        with _chroot_mounts(root):
            _chroot_run(root, ["rm", "-rf", VENV], timeout=QUICK_CMD_TIMEOUT_S, what="removing an old venv")
            _chroot_run(root, ["/usr/bin/python3", "-m", "venv", VENV], timeout=VENV_INSTALL_TIMEOUT_S,
                        what=f"python3 -m venv {VENV} in the board", log_path=partial / "venv.log")
            _chroot_run(root, [f"{VENV}/bin/pip", "install", "--no-index", "--find-links", "/tmp/edgetune-wheels",
                               "--no-cache-dir", "--disable-pip-version-check", *reqs],
                        timeout=VENV_INSTALL_TIMEOUT_S, what="pip install of the wheels in the board",
                        log_path=partial / "venv.log", hint="A wheel is missing for aarch64: see the log.")
            _chroot_run(root, [f"{VENV}/bin/python", "-c", "import tvm, zeroconf, cryptography, numpy, tornado"],
                        timeout=VENV_INSTALL_TIMEOUT_S, what="importing tvm in the board",
                        log_path=partial / "venv.log")
        _remove_tree(wheel_dir)
        _write(partial / ".venv", "")
        progress(f"venv ready in {time.monotonic() - t0:.0f} s")
    if not (partial / ".configured").exists():
        _configure_image(root)
        _write(partial / ".configured", "")
    _write(partial / "image.json", json.dumps({**recipe, "requirements": reqs, "qemu_cpu": QEMU_CPU}) + "\n")
    partial.rename(final)
    return final


def ensure_board_image(progress: Callable[[str], None] = print, *, repo_root: Path = REPO_ROOT,
                       prune: bool = True) -> Path:
    """Build the board image, or reuse the cached one; returns its root file system (read-only use).

    Also makes sure the host is ready (packages, qemu 10, binfmt_misc): see ensure_host_ready.
    A cold build takes ~6-9 min on 2 cores; a cache hit well under a second.
    ``prune`` removes cached stages of other recipes that no running board uses.
    Raises BoardError with what to do.
    """
    _require_root()
    ensure_host_ready(progress)
    cache = cache_dir()
    reqs = board_requirements(repo_root)
    with _locked(cache / ".build.lock"):
        t0 = time.monotonic()
        base = _stage_base(cache, progress)
        wheels = _stage_wheels(cache, reqs, progress)
        image = _stage_image(cache, base, wheels, reqs, progress)
        if time.monotonic() - t0 > 5:
            progress(f"board image ready in {time.monotonic() - t0:.0f} s: {image}")
        if prune:
            _prune(cache, keep={base.name, wheels.name, image.name})
    return image / "rootfs"


def _prune(cache: Path, keep: set[str]) -> None:
    in_use = {Path(s.get("image_rootfs", "")).parent.name for s in _all_states(cache)}
    for path in cache.iterdir():
        if path.name in keep or path.name in in_use:
            continue
        if re.match(r"(base|wheels|image)-[0-9a-f]{12}$", path.name):
            log.info("pruning old board cache stage %s", path)
            _remove_tree(path)


# ----------------------------------------------------------------------------------------------
# A running board.
# ----------------------------------------------------------------------------------------------
@dataclass
class BoardHandle:
    """A started emulated board. Paths on the host unless said otherwise."""

    rootfs: Path  # the board's root (an overlay on the cached image)
    netns: str
    host_ip: str  # host end of the veth link
    board_ip: str  # board end of the veth link
    ssh_port: int
    ssh_user: str
    ssh_key: Path  # private key for ssh_user@board_ip (ed25519, made for this start)
    known_hosts: Path  # one line pinning the board's host key
    agent_pid: int | None  # host pid of the agent (emulated process), None if no agent was started
    store: str  # the agent's store directory, a path inside the board
    run_dir: Path = field(default_factory=Path)
    sshd_pid: int | None = None
    tracker: str | None = None
    key: str = ""
    name: str = ""
    agent_log: Path | None = None
    run_id: str = ""
    uts_ns: Path | None = None  # the board's UTS namespace (its own host name)
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def known_hosts_line(self) -> str:
        return self.known_hosts.read_text().strip()

    def board_argv(self, argv: Sequence[str]) -> list[str]:
        """The host command line that runs ``argv`` inside the board (netns + chroot; qemu via binfmt)."""
        uts = [f"--uts={self.uts_ns}"] if self.uts_ns else []
        return ["nsenter", f"--net=/run/netns/{self.netns}", *uts, "chroot", str(self.rootfs), *map(str, argv)]

    def board_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of board processes (QEMU_CPU, PATH with the venv first)."""
        return _board_env(extra)

    def run(self, *argv: str, timeout: float, env: dict[str, str] | None = None, input: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
        """Run a command inside the board and wait at most ``timeout`` seconds; text output is captured.

        Raises subprocess.TimeoutExpired on timeout, CalledProcessError with ``check`` on a non-zero exit.
        """
        return subprocess.run(self.board_argv(argv), env=self.board_env(env), capture_output=True, text=True,
                              timeout=timeout, input=input, check=check,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, argv: Sequence[str], *, log_name: str | None = None, env: dict[str, str] | None = None,
              **kw) -> subprocess.Popen:
        """Start a background process inside the board; stop_board stops it (and its children).

        Output goes to ``run_dir/<log_name>.log`` when ``log_name`` is given, else to pipes/``kw``.
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        with contextlib.ExitStack() as stack:
            if log_name is not None:
                kw.setdefault("stdout", stack.enter_context(open(self.run_dir / f"{log_name}.log", "ab")))
                kw.setdefault("stderr", subprocess.STDOUT)
            proc = subprocess.Popen(self.board_argv(argv), env=self.board_env(env), start_new_session=True, **kw)
        self._procs.append(proc)
        _update_state(self.run_dir, lambda s: s["pids"].append([proc.pid, _proc_start_time(proc.pid)]))
        return proc

    def host_popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a host process (nothing special); stop_board stops it too."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen([str(a) for a in argv], start_new_session=True, **kw)
        self._procs.append(proc)
        _update_state(self.run_dir, lambda s: s["host_pids"].append([proc.pid, _proc_start_time(proc.pid)]))
        return proc

    def ssh_argv(self, *remote: str) -> list[str]:
        """An OpenSSH client command line that runs ``remote`` on the board with the pinned host key."""
        return ["ssh", "-i", str(self.ssh_key), "-p", str(self.ssh_port),
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=30",
                "-o", "LogLevel=ERROR", f"{self.ssh_user}@{self.board_ip}", *remote]


def _state_path(run_dir: Path) -> Path:
    return run_dir / "state.json"


def _read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads(_state_path(run_dir).read_text())
    except (OSError, ValueError):
        return None


def _write_state(run_dir: Path, state: dict) -> None:
    tmp = _state_path(run_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(_state_path(run_dir))


def _update_state(run_dir: Path, change: Callable[[dict], None]) -> None:
    with _locked(run_dir / ".state.lock"):
        state = _read_state(run_dir) or {}
        state.setdefault("pids", [])
        state.setdefault("host_pids", [])
        change(state)
        _write_state(run_dir, state)


def _all_states(cache: Path) -> list[dict]:
    runs = cache / "runs"
    out = []
    if runs.is_dir():
        for d in sorted(runs.iterdir()):
            s = _read_state(d)
            if s is not None and not s.get("stopped"):
                s["run_dir"] = str(d)
                out.append(s)
    return out


def _is_stale(state: dict) -> bool:
    if state.get("detached"):
        return False
    return not _alive(state.get("owner_pid", 0), state.get("owner_start"))


def _used_subnets() -> set[int]:
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    used = {int(m) for m in re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", out)}
    netns = _run(["ip", "netns", "list"]).stdout
    used |= {int(m) for m in re.findall(rf"^{RUN_NAME_PREFIX}(\d+)\b", netns, flags=re.M)}
    links = _run(["ip", "-o", "link", "show"]).stdout
    used |= {int(m) for m in re.findall(rf"\d+: {RUN_NAME_PREFIX}(\d+)[hb]\b", links)}
    return used


def _allocate_run(cache: Path, detached: bool) -> tuple[Path, dict]:
    """Pick a free subnet and names, record them in a new run directory's state file."""
    runs = cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".runs.lock"):
        used = _used_subnets() | {s["n"] for s in _all_states(cache)}
        n = next((i for i in range(1, 255) if i not in used), None)
        if n is None:
            raise BoardError(f"no free {SUBNET_PREFIX}.N.0/24 subnet: stop old boards "
                             f"(python scripts/emulated_board.py stop --all)")
        run_id = f"{RUN_NAME_PREFIX}{n}-{secrets.token_hex(3)}"
        run_dir = runs / run_id
        run_dir.mkdir()
        me = os.getpid()
        state = {
            "run_id": run_id, "n": n, "netns": f"{RUN_NAME_PREFIX}{n}",
            "veth_host": f"{RUN_NAME_PREFIX}{n}h", "veth_board": f"{RUN_NAME_PREFIX}{n}b",
            "host_ip": f"{SUBNET_PREFIX}.{n}.1", "board_ip": f"{SUBNET_PREFIX}.{n}.2",
            "root": str(run_dir / "root"), "owner_pid": me, "owner_start": _proc_start_time(me),
            "detached": detached, "pids": [], "host_pids": [], "netns_created": False,
            "started": time.time(),
        }
        _write_state(run_dir, state)
    return run_dir, state


def _setup_network(state: dict) -> None:
    ns, vh, vb = state["netns"], state["veth_host"], state["veth_board"]
    _run(["ip", "netns", "add", ns], what=f"ip netns add {ns}")
    state["netns_created"] = True
    _update_state(Path(state["run_dir"]), lambda s: s.update(netns_created=True))
    _run(["ip", "link", "add", vh, "type", "veth", "peer", "name", vb])
    _run(["ip", "link", "set", vb, "netns", ns])
    _run(["ip", "addr", "add", f"{state['host_ip']}/24", "dev", vh])
    _run(["ip", "link", "set", vh, "multicast", "on", "up"])
    inns = ["ip", "netns", "exec", ns]
    _run([*inns, "ip", "link", "set", "lo", "up"])
    _run([*inns, "ip", "addr", "add", f"{state['board_ip']}/24", "dev", vb])
    _run([*inns, "ip", "link", "set", vb, "multicast", "on", "up"])
    # mDNS (224.0.0.251) leaves through the link to the host when no interface is named.
    _run([*inns, "ip", "route", "add", "224.0.0.0/4", "dev", vb])


def _teardown(state: dict) -> None:
    """Stop everything of one run (by pid and by chroot), unmount, delete the namespace. Idempotent."""
    root = Path(state["root"])
    for pid, start in reversed(state.get("pids", [])):
        _kill_tree(pid, start)
    for pid, start in reversed(state.get("host_pids", [])):
        _kill_tree(pid, start)
    if root.exists():
        # Anything still running inside the board (daemons that re-parented) is identified by its root.
        for _ in range(3):
            pids = _pids_rooted_at(root)
            if not pids:
                break
            _kill(pids)
    _unmount_all(root)
    _unmount_all(Path(state["run_dir"]))  # the UTS namespace file
    if state.get("netns_created"):
        if state["netns"] in _run(["ip", "netns", "list"]).stdout.split():
            subprocess.run(["ip", "netns", "del", state["netns"]], capture_output=True)
        # Deleting the namespace deletes the veth pair; make sure of the host end.
        if subprocess.run(["ip", "link", "show", state["veth_host"]], capture_output=True).returncode == 0:
            subprocess.run(["ip", "link", "del", state["veth_host"]], capture_output=True)
    run_dir = Path(state["run_dir"])
    for sub in ("upper", "work", "root"):
        _remove_tree(run_dir / sub)
    _update_state(run_dir, lambda s: s.update(stopped=True, stopped_at=time.time()))


def cleanup_stale(*, include_detached: bool = False) -> list[str]:
    """Tear down runs of this cache whose starting process is gone (a crashed test session).

    With ``include_detached``, also boards started by ``emulated_board.py start``. Returns run ids.
    """
    cache = cache_dir()
    done = []
    with _locked(cache / ".runs.lock"):
        states = [s for s in _all_states(cache) if _is_stale(s) or (include_detached and s.get("detached"))]
    for state in states:
        log.info("cleaning up board run %s", state["run_id"])
        _teardown(state)
        done.append(state["run_id"])
    _prune_runs(cache)
    return done


def _prune_runs(cache: Path, keep: int = 10) -> None:
    """Keep the logs of the last ``keep`` stopped runs."""
    runs = cache / "runs"
    if not runs.is_dir():
        return
    stopped = []
    for d in runs.iterdir():
        s = _read_state(d)
        if s is None or s.get("stopped"):
            if s is None and time.time() - d.stat().st_mtime < 3600:
                continue  # being created right now
            stopped.append((d.stat().st_mtime, d))
    for _, d in sorted(stopped)[:-keep] if len(stopped) > keep else []:
        _remove_tree(d)


def list_boards() -> list[dict]:
    """Started (not stopped) boards of this cache, as their state records plus ``alive``/``stale``."""
    out = []
    for s in _all_states(cache_dir()):
        s["alive"] = any(_alive(p, st) for p, st in s.get("pids", []))
        s["stale"] = _is_stale(s)
        out.append(s)
    return out


def build_agent_wheel(repo_root: Path, out_dir: Path) -> Path:
    """``pip wheel`` of the working tree (no deps), built from a copy so the checkout stays clean."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgetune-src-") as tmp:
        src = Path(tmp) / "src"
        ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                        ".pytest_cache", "tests", "bench")
        shutil.copytree(repo_root, src, ignore=ignore, symlinks=True)
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "--disable-pip-version-check", "-q", "-w", out_dir, src],
             timeout=AGENT_WHEEL_TIMEOUT_S, what=f"pip wheel of {repo_root}",
             hint="Check that setup.cfg/pyproject.toml build (setuptools and wheel in the host venv).")
    wheels = sorted(out_dir.glob("edgetune-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise BoardError(f"pip wheel of {repo_root} made no edgetune-*.whl in {out_dir}")
    return wheels[-1]


def _make_ssh(handle_dir: Path, root: Path, board_ip: str) -> tuple[Path, Path]:
    """Throwaway host and client keys (ed25519) and an sshd config inside the board."""
    ssh_dir = handle_dir / "ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    client_key = ssh_dir / "id_ed25519"
    host_key = ssh_dir / "ssh_host_ed25519_key"
    for key, comment in ((client_key, "edgetune-board-client"), (host_key, "edgetune-board-host")):
        for p in (key, key.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key], what="ssh-keygen")
    conf = root / SSH_CONF_DIR.lstrip("/")
    conf.mkdir(mode=0o755, parents=True, exist_ok=True)
    shutil.copy(host_key, conf / "ssh_host_ed25519_key")
    os.chmod(conf / "ssh_host_ed25519_key", 0o600)
    shutil.copy(host_key.with_suffix(".pub"), conf / "ssh_host_ed25519_key.pub")
    _write(conf / "authorized_keys", client_key.with_suffix(".pub").read_text(), 0o600)
    _write(conf / "sshd_config", "\n".join([
        f"ListenAddress {board_ip}",
        f"Port {SSH_PORT}",
        f"HostKey {SSH_CONF_DIR}/ssh_host_ed25519_key",
        f"AuthorizedKeysFile {SSH_CONF_DIR}/authorized_keys",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        # PAM under emulation adds nothing a test needs and only slows logins down.
        "UsePAM no",
        "UseDNS no",
        "PrintMotd no",
        "PidFile /run/edgetune-sshd.pid",
        "Subsystem sftp internal-sftp",
        # sshd gives sessions a fresh environment: keep qemu on the Pi's CPU and the agent on PATH.
        f"SetEnv PATH={BOARD_PATH} QEMU_CPU={QEMU_CPU} LANG=C.UTF-8",
        "",
    ]))
    known_hosts = ssh_dir / "known_hosts"
    host = board_ip if SSH_PORT == 22 else f"[{board_ip}]:{SSH_PORT}"
    pub = host_key.with_suffix(".pub").read_text().split()
    known_hosts.write_text(f"{host} {pub[0]} {pub[1]}\n")
    return client_key, known_hosts


def install_team_key(root: Path) -> None:
    """Give the board the workstation's team key (``$EDGETUNE_TEAM_KEY_FILE``, else
    ~/.config/edgetune/team.key, created when missing as `edgetune tracker` does) at /etc/edgetune/team.key,
    as ``deploy/install-agent.sh --team-key`` does: the board's agent then serves this host's commands."""
    from device_agent.auth import BOARD_TEAM_KEY, load_or_create_team_key, workstation_key_path

    key, _created = load_or_create_team_key(workstation_key_path())
    _write(root / BOARD_TEAM_KEY.relative_to("/"), key.secret.hex() + "\n", 0o600)


def _resolve_tracker(tracker: str | Callable[[str], str] | None, handle: BoardHandle) -> str | None:
    if tracker is None:
        return None
    if callable(tracker):
        return tracker(handle.host_ip)
    if tracker == "stock":
        proc, addr = start_stock_tracker(handle.host_ip, log_path=handle.run_dir / "tracker.log")
        handle._procs.append(proc)
        _update_state(handle.run_dir, lambda s: s["host_pids"].append([proc.pid, _proc_start_time(proc.pid)]))
        return addr
    return tracker.format(host_ip=handle.host_ip)


def start_board(*, tracker: str | Callable[[str], str] | None, key: str = "rpi4-emu", name: str = "emu-pi4",
                advertise: bool = True, repo_root: Path = REPO_ROOT, agent_argv: Sequence[str] | None = None,
                store: str = DEFAULT_STORE, agent_env: dict[str, str] | None = None, install_agent: bool = True,
                detached: bool = False, board_model: str | None = PI4_MODEL,
                progress: Callable[[str], None] = lambda msg: log.info("%s", msg)) -> BoardHandle:
    """Start an emulated Pi 4: network namespace, mounts, sshd and the agent. Stop it with stop_board.

    ``tracker``: "HOST:PORT", or a format string using ``{host_ip}`` (the host end of the veth link),
    or a callable taking host_ip and returning "HOST:PORT" (called once the link is up, e.g. to start a
    tracker bound to that address), or "stock" (TVM's tracker on host_ip, stopped with the board),
    or None (the agent looks for one on mDNS).
    ``agent_argv``: None runs ``edgetune-agent serve --key K --name N --host BOARD_IP --store S
    [--tracker T] [--no-advertise]``; a list runs that instead, after ``str.format`` with board_ip,
    host_ip, tracker, key, name, store (e.g. the stock ``python -m tvm.exec.rpc_server``); an empty
    list starts no agent. The agent is not waited for (TVM's import takes ~10 s under emulation).
    ``install_agent``: build a wheel of ``repo_root`` and install it in the board's /opt/tvmenv.
    ``detached``: the board outlives this process (CLI); otherwise a later start cleans it up once this
    process is gone. ``board_model``: the device-tree model the board shows (None: none, like a PC).
    Builds the image first when the cache has none (ensure_board_image). Raises BoardError.
    """
    _require_root()
    cache = cache_dir()
    image_rootfs = ensure_board_image(progress=progress, repo_root=repo_root, prune=False)
    cleanup_stale()
    run_dir, state = _allocate_run(cache, detached)
    state["run_dir"] = str(run_dir)
    state["image_rootfs"] = str(image_rootfs)
    root = Path(state["root"])
    handle = BoardHandle(
        rootfs=root, netns=state["netns"], host_ip=state["host_ip"], board_ip=state["board_ip"],
        ssh_port=SSH_PORT, ssh_user=SSH_USER, ssh_key=run_dir / "ssh/id_ed25519",
        known_hosts=run_dir / "ssh/known_hosts", agent_pid=None, store=store, run_dir=run_dir,
        key=key, name=name, run_id=state["run_id"],
    )
    try:
        t0 = time.monotonic()
        # The overlay: the cached image stays as built, this board writes into run_dir/upper.
        for sub in ("upper", "work", "root"):
            (run_dir / sub).mkdir()
        _write_state(run_dir, {k: v for k, v in state.items() if k != "run_dir"})
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={image_rootfs},upperdir={run_dir / 'upper'},workdir={run_dir / 'work'}", root],
             what="mounting the board overlay", hint="The kernel needs overlayfs (modprobe overlay).")
        _run(["mount", "--make-private", root])
        _setup_network(state)
        # Its own host name, like a real board (the agent's default --name is the host name).
        uts = run_dir / "uts"
        uts.touch()
        _run(["unshare", f"--uts={uts}", "hostname", name], what="creating the board's UTS namespace")
        handle.uts_ns = uts
        _update_state(run_dir, lambda s: s.update(uts=str(uts)))
        mount_board_fs(root, state["netns"])
        if board_model:
            fw = root / "sys/firmware"
            _run(["mount", "-t", "tmpfs", "-o", "mode=755,size=64k", "tmpfs", fw])
            (fw / "devicetree/base").mkdir(parents=True)
            (fw / "devicetree/base/model").write_bytes(board_model.encode() + b"\0")
        _write(root / "etc/hosts", f"127.0.0.1 localhost\n{state['board_ip']} {name}\n{state['host_ip']} host\n")
        _write(root / "etc/hostname", f"{name}\n")

        # CPU check: qemu 10 (ours) shows the Pi's CPU part; bookworm's qemu 7.2 would show the host's.
        cpuinfo = handle.run("cat", "/proc/cpuinfo", timeout=QUICK_CMD_TIMEOUT_S)
        if f"CPU part\t: {CORTEX_A72_PART}" not in cpuinfo.stdout:
            raise BoardError("the board does not run under qemu 10 with a Cortex-A72 (no CPU part "
                             f"{CORTEX_A72_PART} in /proc/cpuinfo): run scripts/install-board-deps.sh")

        if install_agent:
            wheel = build_agent_wheel(repo_root, run_dir / "wheel")
            dest = root / "tmp/edgetune-agent"
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(wheel, dest / wheel.name)
            proc = handle.run(f"{VENV}/bin/pip", "install", "--no-deps", "--force-reinstall", "--no-index",
                              "--no-cache-dir", "--disable-pip-version-check", "-q",
                              f"/tmp/edgetune-agent/{wheel.name}", timeout=AGENT_INSTALL_TIMEOUT_S)
            if proc.returncode != 0:
                raise BoardError(f"installing {wheel.name} in the board failed: "
                                 f"{(proc.stderr or proc.stdout).strip()[-500:]}")
            progress(f"agent installed from {repo_root} ({wheel.name})")

        handle.ssh_key, handle.known_hosts = _make_ssh(run_dir, root, handle.board_ip)
        sshd = handle.popen(["/usr/sbin/sshd", "-D", "-e", "-f", f"{SSH_CONF_DIR}/sshd_config"], log_name="sshd")
        handle.sshd_pid = sshd.pid

        tracker_addr = _resolve_tracker(tracker, handle)
        handle.tracker = tracker_addr
        fmt = {"board_ip": handle.board_ip, "host_ip": handle.host_ip, "tracker": tracker_addr or "",
               "key": key, "name": name, "store": store}
        if agent_argv is None:
            install_team_key(root)
            argv = ["edgetune-agent", "serve", "--key", key, "--name", name, "--host", handle.board_ip,
                    "--store", store]
            if tracker_addr:
                argv += ["--tracker", tracker_addr]
            if not advertise:
                argv.append("--no-advertise")
        else:
            argv = [str(a).format(**fmt) for a in agent_argv]
        if argv:
            agent = handle.popen(argv, log_name="agent", env=agent_env)
            handle.agent_pid = agent.pid
            handle.agent_log = run_dir / "agent.log"

        _wait_port(handle.board_ip, SSH_PORT, SSHD_READY_TIMEOUT_S, sshd, what="sshd in the board")
        progress(f"board {state['run_id']} up at {handle.board_ip} in {time.monotonic() - t0:.1f} s")
        _update_state(run_dir, lambda s: s.update(
            image_rootfs=str(image_rootfs), sshd_pid=handle.sshd_pid, agent_pid=handle.agent_pid,
            tracker=tracker_addr, key=key, name=name, store=store, ssh_key=str(handle.ssh_key),
            known_hosts=str(handle.known_hosts)))
        return handle
    except BaseException:
        stop_board(handle)
        raise


def stop_board(handle: BoardHandle | str) -> None:
    """Stop a board: its processes (by pid, children first, then anything chrooted in it), its mounts,
    its network namespace and veth link. Accepts a handle or a run id. Idempotent; raises BoardError
    only when a mount cannot be removed."""
    run_id = handle if isinstance(handle, str) else handle.run_id
    run_dir = cache_dir() / "runs" / run_id
    if not isinstance(handle, str):
        for proc in handle._procs:
            with contextlib.suppress(Exception):
                _kill_tree(proc.pid, _proc_start_time(proc.pid))
                proc.wait(timeout=STOP_GRACE_S)
    state = _read_state(run_dir)
    if state is None or state.get("stopped"):
        return
    state["run_dir"] = str(run_dir)
    _teardown(state)


def wait_for_tracker_key(tracker: str, key: str, timeout: float) -> float:
    """Wait until ``key`` has a free server on the tracker "HOST:PORT"; returns the seconds waited.

    Raises BoardError after ``timeout`` seconds.
    """
    from tvm import rpc  # host side only: TVM's import is slow

    host, port = tracker.rsplit(":", 1)
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            summary = rpc.connect_tracker(host, int(port)).summary()
            last = summary.get("queue_info", {})
            if last.get(key, {}).get("free", 0) > 0:
                return time.monotonic() - t0
        except Exception as err:  # the tracker may still be starting
            last = repr(err)
        time.sleep(1.0)
    raise BoardError(f"no free server with key {key!r} on tracker {tracker} after {timeout:.0f} s (last: {last})")


def start_stock_tracker(host: str, *, python: str = sys.executable, log_path: Path | None = None,
                        timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start TVM's own tracker (``python -m tvm.exec.rpc_tracker``) on ``host``, port from the OS.

    Returns the process (the caller stops it, e.g. with stop_process) and "HOST:PORT". Raises BoardError.
    """
    for _ in range(5):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with open(log_path or os.devnull, "ab") as out:
            proc = subprocess.Popen([python, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                                     "--port-end", str(port + 1)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            _wait_port(host, port, timeout, proc, what="TVM tracker")
            return proc, f"{host}:{port}"
        except BoardError:
            stop_process(proc)
            if proc.returncode not in (None, 0) and _port_taken(host, port):
                continue  # lost the port to someone else between bind and listen: try another
            raise
    raise BoardError(f"could not start a TVM tracker on {host}")


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return False
        except OSError:
            return True


def stop_process(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Stop a host process started by these helpers and its children (by pid)."""
    _kill_tree(proc.pid, _proc_start_time(proc.pid), grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def handle_from_state(run_id: str) -> BoardHandle:
    """A handle for a board started by another process (the CLI's ``start``). Raises BoardError."""
    run_dir = cache_dir() / "runs" / run_id
    s = _read_state(run_dir)
    if s is None or s.get("stopped"):
        raise BoardError(f"no running board {run_id!r}: see python scripts/emulated_board.py status")
    return BoardHandle(
        rootfs=Path(s["root"]), netns=s["netns"], host_ip=s["host_ip"], board_ip=s["board_ip"], ssh_port=SSH_PORT,
        ssh_user=SSH_USER, ssh_key=Path(s.get("ssh_key", run_dir / "ssh/id_ed25519")),
        known_hosts=Path(s.get("known_hosts", run_dir / "ssh/known_hosts")), agent_pid=s.get("agent_pid"),
        store=s.get("store", DEFAULT_STORE), run_dir=run_dir, sshd_pid=s.get("sshd_pid"), tracker=s.get("tracker"),
        key=s.get("key", ""), name=s.get("name", ""), agent_log=run_dir / "agent.log", run_id=run_id,
        uts_ns=Path(s["uts"]) if s.get("uts") else None,
    )


def handle_as_dict(handle: BoardHandle) -> dict:
    """The public fields of a handle as JSON-ready data."""
    d = {f.name: getattr(handle, f.name) for f in fields(handle) if not f.name.startswith("_")}
    d["known_hosts_line"] = handle.known_hosts_line if handle.known_hosts.exists() else None
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
