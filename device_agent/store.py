"""The board's artifact store: install signed packages into versioned slots, switch atomically,
self-check, roll back.

Layout of a store (``--store DIR``; default :func:`device_agent.config.default_store`)::

    trusted/                     public keys packages may be signed with (one OpenSSH line per file)
    slots/<UTC time>-<sha8>/     one installed package each (sha8: of its manifest.json), never
                                 changed after the move, plus install.json (when, signer, self-check)
    staging/<random>/            a package being unpacked; cleared by the next install
    current -> slots/...         relative symlink: the model in use
    previous -> slots/...        the one before, for `rollback`
    .lock                        held by install and rollback (one at a time)

Crash safety: a package is unpacked and verified in ``staging/``, moved into ``slots/`` with one
rename, self-checked there, and only then made ``current`` by replacing the symlink (a new link +
``os.replace``). Files and directories are fsynced before each of those steps, so after a power loss
``current`` is either the old package or the new, fully checked one; never a half-installed one. A
failed install or rollback leaves ``current`` on a complete slot (or absent if none was ever installed).

Hostile packages: a package is untrusted until its signature is verified, so it is read in one bounded
pass (:mod:`device_agent.package_tar`) within the limits of :mod:`device_agent.config` (package size,
unpacked bytes, members, header sizes, JSON size and depth), and no file is written past its signed size.
A package built before the current one is refused unless ``allow_downgrade`` (see :func:`install`).

Who may write the store: only the user who installs (root on a board). Root installs here and runs what it
installs (the self-check), while the RPC server runs whatever code a client uploads, as another user: it gets
its own state directory (:func:`device_agent.config.rpc_state_dir`) and at most a read-only view of the
store, as Mender and balena keep their update store out of the application's reach. ``install``,
``rollback`` and ``trust`` refuse, as OpenSSH's StrictModes does, a store whose directories (the store,
``slots/``, ``staging/``, ``trusted/``) are symlinks, are owned by another user or are writable by group or
others, or that sits under a directory another user can write; they open those directories once, without
following symlinks, and rename, list and delete through the open descriptors. A new slot is hashed again
from the bytes the self-check loads, after the rename that made it a slot.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import config
from .errors import AgentError
from .fsutil import ancestor_problem, dir_problem, fsync_dir, open_beneath, open_dir, user_name, write_atomic
from .manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    TrustedKey,
    compatibility_problem,
    fingerprint,
    load_public_key,
    load_trusted_keys,
    parse_json,
    sha256_file,
    verify_manifest,
)
from .package_tar import Limits, Member, PackageTar
from .selfcheck import SelfCheckResult

logger = logging.getLogger(__name__)

TRUSTED_DIR = "trusted"
SLOTS_DIR = "slots"
STAGING_DIR = "staging"
CURRENT = "current"
PREVIOUS = "previous"
LOCK_NAME = ".lock"
INSTALL_RECORD = "install.json"
# Slots kept: current, previous and one older one; the rest are removed after each install.
KEEP_SLOTS = 3
_PART_SUFFIX = ".part"

# Install steps, in order; on_step(step) is called as each begins.
STEPS = ("extract", "signature", "files", "compatibility", "slot", "self-check", "switch", "prune")


class InstallError(AgentError):
    """An install that failed at ``step``. ``rolled_back``: the package had reached the store and was
    removed again; ``current`` is the slot in use afterwards (unchanged by the failed install, unless its
    switch failed half-way and the new, self-checked slot had to stay)."""

    def __init__(self, step: str, message: str, *, rolled_back: bool = False, current: str | None = None,
                 self_check: SelfCheckResult | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.rolled_back = rolled_back
        self.current = current
        self.self_check = self_check

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": False,
            "error": str(self),
            "step": self.step,
            "rolled_back": self.rolled_back,
            "current": self.current,
            "self_check": self.self_check.as_dict() if self.self_check else None,
        }


@dataclass
class InstallResult:
    """A package installed and made current. Times are ISO 8601 UTC; latencies in ms."""

    store: str
    slot: str
    previous: str | None
    model_name: str
    model_sha256: str
    key: str
    package_sha256: str
    signer: str
    installed_at: str
    self_check: SelfCheckResult
    pruned: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ok: bool = True

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["self_check"] = self.self_check.as_dict()
        return data


@dataclass
class RollbackResult:
    store: str
    current: str
    previous: str | None
    model_name: str


@dataclass
class StoreStatus:
    """What is installed. ``self_check_ok``/``p50_ms``/``max_abs_err`` come from the install-time self-check
    of the current slot; ``tuned_latency_ms`` is what tuning estimated on the workstation."""

    store: str
    current: str | None
    previous: str | None
    model_name: str | None = None
    model_sha256: str | None = None
    key: str | None = None
    target: dict[str, Any] | None = None
    installed_at: str | None = None
    self_check_ok: bool | None = None
    p50_ms: float | None = None
    max_abs_err: float | None = None
    tuned_latency_ms: float | None = None
    previous_model: str | None = None
    slots: list[str] = field(default_factory=list)
    staging_leftovers: int = 0


@dataclass
class TrustResult:
    path: str
    fingerprint: str
    added: bool


# --- helpers --------------------------------------------------------------------------------------


def resolve_store(store: str | os.PathLike[str] | None) -> Path:
    """The store directory: ``store``, else ``$EDGETUNE_STORE``, else the per-user / system default."""
    return Path(store if store is not None else config.default_store()).expanduser()


def _link_target(store: Path, name: str) -> str | None:
    """The slot a store link points to, or ``None`` when the link is missing or points elsewhere (outside
    ``slots/``, or at anything but a real directory there)."""
    try:
        target = os.readlink(store / name)
    except (FileNotFoundError, OSError):
        return None
    prefix = SLOTS_DIR + "/"
    if not target.startswith(prefix) or "/" in target[len(prefix):]:
        logger.warning("%s/%s points outside the store (%s): ignored", store, name, target)
        return None
    slot = target[len(prefix):]
    try:
        is_dir = stat.S_ISDIR(os.lstat(store / SLOTS_DIR / slot).st_mode)
    except OSError:
        return None
    return slot if is_dir else None


def _set_link(store: Path, name: str, slot: str) -> None:
    """Atomically point ``store/name`` at ``slots/<slot>`` (new symlink + rename over the old one)."""
    tmp = store / f".{name}.{secrets.token_hex(4)}.tmp"
    os.symlink(f"{SLOTS_DIR}/{slot}", tmp)
    try:
        os.replace(tmp, store / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(store)


# --- who may write the store --------------------------------------------------------------------------
# See the module's docstring. Each check opens the directory without following a symlink and judges what
# it opened (fstat), so what is checked is what is then used.

_STORE_SUBDIRS = (SLOTS_DIR, STAGING_DIR, TRUSTED_DIR)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass
class _StoreDirs:
    """The store and its directories, open (never through a symlink) and checked by :func:`_checked_store`."""

    path: Path  # the store, with every symlink above it resolved
    fd: int
    slots: int
    staging: int


def _who(owner: int) -> str:
    return "root" if owner == 0 else f"the user {user_name(owner)}"


def _unsafe(top: Path, path: Path, problem: str, owner: int) -> AgentError:
    """The one-line refusal of ``top`` (a store or trust directory) because ``path`` in it is ``problem``."""
    if problem == "a symbolic link":
        fix = f"remove the link (`rm {path}`) and run this again"
    elif problem == "not a directory":
        fix = f"move {path} away and run this again"
    else:
        fix = f"run `chown -R {user_name(owner)}: {top} && chmod -R go-w {top}`"
        if owner == 0:  # a board set up by an older install-agent.sh, whose unit gives the store away on start
            fix = f"run deploy/install-agent.sh again (it does this and moves the service out of the store), or {fix[4:]}"
    who = _who(owner)
    return AgentError(f"refusing {top}: {path} is {problem}, and what {who} installs must be writable by {who} "
                      f"alone; {fix}")


def _open_checked(top: Path, path: Path, owner: int, dir_fd: int | None = None) -> int:
    """Open the directory ``path`` (its last component relative to ``dir_fd`` when given) without following a
    symlink, and return its descriptor if :func:`~device_agent.fsutil.dir_problem` finds nothing.
    Raises :class:`AgentError`."""
    try:
        fd = open_dir(path.name if dir_fd is not None else path, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            link = os.path.islink(path)
            raise _unsafe(top, path, "a symbolic link" if link else "not a directory", owner) from None
        raise AgentError(f"cannot open {path} ({err.strerror}): run as root, or pass --store DIR "
                         "(or set EDGETUNE_STORE) to a directory of yours") from None
    problem = dir_problem(os.fstat(fd), owner)
    if problem:
        os.close(fd)
        raise _unsafe(top, path, problem, owner)
    return fd


def _check_above(top: Path, owner: int) -> None:
    """Refuse ``top`` when a directory above it could be changed by another user (who could then swap
    ``top`` itself). ``top`` has no symlink in its path."""
    for parent in top.parents:
        try:
            problem = ancestor_problem(os.stat(parent), owner)
        except OSError as err:
            raise AgentError(f"cannot check {parent} above {top} ({err.strerror}): choose another --store") from None
        if problem:
            raise AgentError(
                f"refusing {top}: {parent}, above it, is {problem}, so another user could replace it; "
                f"run `chmod go-w {parent}` (or `chown root: {parent}`), or choose a store under directories "
                f"only {_who(owner)} can change (--store DIR)"
            )


def check_trust_dir(trust_dir: Path) -> Path:
    """The trust directory ``trust_dir`` with symlinks resolved, after the same checks as the store's own
    directories (owned by this user, not writable by others, nor anything above it). Raises :class:`AgentError`."""
    owner = os.geteuid()
    real = Path(os.path.realpath(trust_dir))
    os.close(_open_checked(real, real, owner))
    _check_above(real, owner)
    return real


@contextlib.contextmanager
def _checked_store(store: Path) -> Iterator[_StoreDirs]:
    """Create the store's directories where missing, open them and refuse the store unless it is safe for
    this user to install from: the store, slots/, staging/ and trusted/ are real directories owned by this
    user (root on a board) that nobody else can write, and no directory above the store can be changed by
    another user. Raises :class:`AgentError` (one line: which path, and what to run)."""
    owner = os.geteuid()
    try:
        store.mkdir(mode=0o755, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a dangling symlink or a file: named by the check below
    except OSError as err:
        raise AgentError(
            f"cannot create the store {store} ({err.strerror}): run as root, or pass --store DIR "
            "(or set EDGETUNE_STORE) to a writable directory"
        ) from None
    real = Path(os.path.realpath(store))
    fds: dict[str, int] = {}
    try:
        fds[""] = root = _open_checked(real, real, owner)
        _check_above(real, owner)
        for name in _STORE_SUBDIRS:
            try:
                os.mkdir(name, 0o755, dir_fd=root)
            except FileExistsError:
                pass
            except OSError as err:
                raise AgentError(f"cannot create {real / name} ({err.strerror}): run as root, or pass "
                                 "--store DIR (or set EDGETUNE_STORE) to a writable directory") from None
            fds[name] = _open_checked(real, real / name, owner, dir_fd=root)
        if not os.access(real, os.W_OK):
            raise AgentError(
                f"the store {real} is not writable: run as root, or pass --store DIR (or set EDGETUNE_STORE)"
            )
        yield _StoreDirs(path=real, fd=root, slots=fds[SLOTS_DIR], staging=fds[STAGING_DIR])
    finally:
        for fd in fds.values():
            os.close(fd)


@contextlib.contextmanager
def _locked(dirs: _StoreDirs) -> Iterator[None]:
    try:
        fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _CLOEXEC, 0o644, dir_fd=dirs.fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _unsafe(dirs.path, dirs.path / LOCK_NAME, "a symbolic link", os.geteuid()) from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentError(
                f"another install or rollback is running on {dirs.path}: wait for it to finish and try again"
            ) from None
        yield
    finally:
        os.close(fd)


def _remove(dir_fd: int, name: str) -> None:
    """Remove the entry ``name`` of the directory ``dir_fd``: a directory tree through descriptors (a symlink
    inside is removed, never followed), anything else (a symlink too) unlinked. Raises OSError."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _clear_leftovers(dirs: _StoreDirs) -> None:
    """Remove what an interrupted install left behind: staging dirs and temporary links."""
    for name in os.listdir(dirs.staging):
        logger.info("removing leftover %s", dirs.path / STAGING_DIR / name)
        with contextlib.suppress(OSError):
            _remove(dirs.staging, name)
    for name in os.listdir(dirs.fd):
        if name.startswith((f".{CURRENT}.", f".{PREVIOUS}.")) and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dirs.fd)


def _slot_manifest(store: Path, slot: str) -> Manifest:
    return Manifest.from_json((store / SLOTS_DIR / slot / MANIFEST_NAME).read_bytes())


def _slot_record(store: Path, slot: str) -> dict[str, Any]:
    try:
        record = parse_json((store / SLOTS_DIR / slot / INSTALL_RECORD).read_bytes(), INSTALL_RECORD,
                            config.MAX_MANIFEST_BYTES, "install the package again")
    except (OSError, AgentError):
        return {}
    return record if isinstance(record, dict) else {}


# --- the board profile ----------------------------------------------------------------------------

# CPU part numbers (/proc/cpuinfo "CPU part", ARM Ltd.) of common board CPUs, for messages.
_ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd40": "Neoverse-V1",
    "0xd49": "Neoverse-N2", "0xc07": "Cortex-A7", "0xc0f": "Cortex-A15",
}


def minimal_profile(cpuinfo: str | None = None) -> dict[str, Any]:
    """A small board profile (arch, cpu, features, os) read from ``/proc/cpuinfo``; used when the
    full probe (:mod:`device_agent.probe`) is not available."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    features: set[str] = set()
    cpu = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            features.update(value.split())
        elif key == "model name" and not cpu:
            cpu = value.strip()
        elif key == "cpu part" and not cpu:
            cpu = _ARM_PARTS.get(value.strip().lower(), f"CPU part {value.strip()}")
    if "asimd" in features:
        features.add("neon")
    if "asimddp" in features:
        features.add("dotprod")
    arch = platform.machine().lower()
    return {
        "arch": arch,
        "cpu": cpu or arch,
        "features": sorted(features),
        "os": "android" if "ANDROID_ROOT" in os.environ else "linux",
    }


def board_profile(profile: Mapping[str, Any] | Any | None = None) -> dict[str, Any]:
    """The board profile as a dict: ``profile`` itself (a dict or an object with ``as_dict()``), else
    what :func:`device_agent.probe.read_profile` reports, else :func:`minimal_profile`."""
    if profile is None:
        if importlib.util.find_spec(__package__ + ".probe") is None:
            return minimal_profile()
        from .probe import read_profile

        profile = read_profile()
    if isinstance(profile, Mapping):
        return dict(profile)
    return dict(profile.as_dict())


# --- unpack and verify ----------------------------------------------------------------------------


_NOT_SIGNED = ("the package is not signed (no manifest.sig): sign it with `edgetune package` "
               "(create a key first with `edgetune keys init`)")
_REBUILD = "rebuild it with `edgetune package`"


@contextlib.contextmanager
def _step_errors(step: str) -> Iterator[None]:
    """An :class:`AgentError` raised inside becomes an :class:`InstallError` of ``step`` (one passes through)."""
    try:
        yield
    except InstallError:
        raise
    except AgentError as err:
        raise InstallError(step, str(err)) from None


def _unpack(pkg: Path, staging: Path, trust_dir: Path, on_step: Callable[[str], None]) -> tuple[Manifest, bytes, TrustedKey]:
    """Unpack ``pkg`` into ``staging``, verifying as it goes: the signature over manifest.json before any
    other file is written, then each file's size and sha256 as it is written, no unlisted and no missing files.

    manifest.json and manifest.sig must be the first members (``edgetune package`` writes them so), which
    means nothing unsigned is ever written to disk. Every size is bounded before it is read
    (:mod:`device_agent.package_tar`, the limits in :mod:`device_agent.config`).
    """
    size = pkg.stat().st_size
    if size > config.MAX_PACKAGE_BYTES:
        raise InstallError("extract", f"the package is {size} bytes, more than the {config.MAX_PACKAGE_BYTES} this board "
                                      f"accepts (EDGETUNE_MAX_PACKAGE_BYTES): refusing it; {_REBUILD} or raise the limit")
    limits = Limits(max_unpacked=config.MAX_UNPACKED_BYTES, max_members=config.MAX_PACKAGE_MEMBERS,
                    max_ext_header=config.MAX_TAR_EXT_HEADER_BYTES)
    with open(pkg, "rb") as raw:
        tar = PackageTar(raw, limits)
        members = iter(tar)
        with _step_errors("extract"):
            manifest_bytes, sig_bytes = _read_signed_head(tar, members)
        on_step("signature")
        with _step_errors("signature"):
            signer = verify_manifest(manifest_bytes, sig_bytes, load_trusted_keys(trust_dir), str(trust_dir))
        with _step_errors("extract"):
            manifest = Manifest.from_json(manifest_bytes)
        on_step("files")
        _check_signed_sizes(manifest, staging)
        with _step_errors("files"):
            written = _extract_files(tar, members, manifest, staging)
            tar.finish()
    missing = sorted(set(manifest.files) - written)
    if missing:
        raise InstallError("files", f"the package is incomplete, missing {', '.join(missing)} (cut-off upload or damaged file): flash it again")
    write_atomic(staging / MANIFEST_NAME, manifest_bytes)
    write_atomic(staging / SIGNATURE_NAME, sig_bytes)
    for sub in sorted({(staging / n).parent for n in written}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(sub)
    return manifest, manifest_bytes, signer


def _read_signed_head(tar: PackageTar, members: Iterator[Member]) -> tuple[bytes, bytes]:
    """manifest.json and manifest.sig, the first two files of the package (each bounded before it is read)."""
    head: dict[str, bytes] = {}
    for member in members:
        if member.is_dir:
            continue
        if member.name not in (MANIFEST_NAME, SIGNATURE_NAME):
            if MANIFEST_NAME in head:
                raise InstallError("signature", _NOT_SIGNED)
            raise InstallError("extract", "the package does not start with manifest.json and manifest.sig: "
                                          "it was not made by `edgetune package`; rebuild it")
        if member.name in head:
            raise InstallError("extract", f"the package holds {member.name} twice: refusing it; {_REBUILD}")
        cap = config.MAX_MANIFEST_BYTES if member.name == MANIFEST_NAME else config.MAX_SIGNATURE_BYTES
        if member.size > cap:
            raise InstallError("extract", f"{member.name} in the package is {member.size} bytes (at most {cap}): "
                                          f"refusing it; {_REBUILD}")
        head[member.name] = b"".join(tar.chunks())
        if len(head) == 2:
            return head[MANIFEST_NAME], head[SIGNATURE_NAME]
    if MANIFEST_NAME in head:
        raise InstallError("signature", _NOT_SIGNED)
    raise InstallError("extract", "the package has no manifest.json (empty, cut off, or not an edgetune package): flash it again")


def _check_signed_sizes(manifest: Manifest, staging: Path) -> None:
    """Refuse, before writing any, files the signed manifest says are too big for this board or its disk."""
    if manifest.sizes is None:
        return  # a package made before sizes were signed: checked file by file as it unpacks
    need = sum(manifest.sizes.values())
    if need > config.MAX_UNPACKED_BYTES:
        raise InstallError("files", f"the package's files add up to {need} bytes, more than the {config.MAX_UNPACKED_BYTES} "
                                    f"this board accepts (EDGETUNE_MAX_UNPACKED_BYTES): refusing it; {_REBUILD} or raise the limit")
    _check_space(need, staging)


def _check_space(need: int, staging: Path) -> None:
    free = shutil.disk_usage(staging).free
    if need > free:
        raise InstallError("files", f"the package needs {need / 1e6:.1f} MB more, {staging.parent.parent} has "
                                    f"{free / 1e6:.1f} MB free: free some space and flash again")


def _extract_files(tar: PackageTar, members: Iterator[Member], manifest: Manifest, staging: Path) -> set[str]:
    """Write the rest of the package into ``staging``: only files the signed manifest lists, each once, each
    exactly its signed size (when the manifest has sizes) and sha256. Returns the names written."""
    written: set[str] = set()
    for member in members:
        if member.is_dir:
            continue
        name = member.name
        if name in written or name in (MANIFEST_NAME, SIGNATURE_NAME):
            raise InstallError("files", f"the package holds {name} twice: refusing it; {_REBUILD}")
        if name not in manifest.files:
            raise InstallError("files", f"the package holds {name}, which its manifest does not list: refusing it; {_REBUILD}")
        # Refused before a byte is written (the tar yields exactly member.size bytes): a file bigger than
        # its signed size, or, with no signed sizes, bigger than the disk has room for.
        if manifest.sizes is None:
            _check_space(member.size, staging)
        elif member.size != manifest.sizes[name]:
            raise InstallError("files", f"{name} is {member.size} bytes in the package, {manifest.sizes[name]} in its "
                                        "signed manifest: the package was altered or damaged; build and flash it again")
        digest = _write_file(tar.chunks(), staging / name)
        written.add(name)
        if digest != manifest.files[name]:
            raise InstallError("files", f"{name} does not match its sha256 in the signed manifest: the package was altered or damaged; build and flash it again")
    return written


def _write_file(chunks: Iterator[bytes], dest: Path) -> str:
    """Write ``chunks`` to the new file ``dest`` (fsynced), hashing them on the way; their sha256."""
    digest = hashlib.sha256()
    _make_dirs(dest.parent)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as out:
        for chunk in chunks:
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _make_dirs(path: Path) -> None:
    """``path`` and its missing parents, each 0755 whatever the umask: a group-writable directory in a slot
    would fail the slot's check."""
    if path.is_dir():
        return
    _make_dirs(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o755)


def _verify_slot_files(slot_dir: Path, manifest: Manifest, exact: Mapping[str, bytes] | None = None) -> str | None:
    """Why the slot ``slot_dir`` is not what ``manifest`` signed, or ``None``: every listed file is opened
    without following a symlink, through directories only this user can write, and hashed from the bytes
    read (what the self-check then loads); ``exact`` maps more names to their expected bytes (the verified
    manifest.json)."""
    owner = os.geteuid()
    try:
        slot_fd = open_dir(slot_dir)
    except OSError as err:
        return f"the slot {slot_dir.name} cannot be opened ({_os_reason(err)})"
    try:
        problem = dir_problem(os.fstat(slot_fd), owner)
        if problem:
            return f"the slot {slot_dir.name} is {problem}"
        expected: dict[str, str | bytes] = {**manifest.files, **(exact or {})}
        for name, want in expected.items():
            try:
                fd = open_beneath(slot_fd, name, owner)
            except FileNotFoundError:
                return f"{name} is missing"
            except OSError as err:
                return f"{name} cannot be opened safely ({_os_reason(err)})"
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_uid != owner or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    return f"{name} can be written by someone other than {_who(owner)}"
                if isinstance(want, bytes):
                    if f.read(len(want) + 1) != want:
                        return f"{name} differs from the verified one"
                elif _sha256_of(f) != want:
                    return f"{name} does not match its sha256"
    finally:
        os.close(slot_fd)
    return None


def _sha256_of(f: Any, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def _os_reason(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "a symbolic link"
    return err.strerror or str(err)


# --- self-check ------------------------------------------------------------------------------------


def run_selfcheck_process(slot_dir: Path, timeout: float | None = None) -> SelfCheckResult:
    """Run ``python -m device_agent.selfcheck SLOT --json`` in a child process with a deadline
    (``SELF_CHECK_SEC``). A crash, a hang or garbage output is a failed check, never an exception."""
    timeout = config.SELF_CHECK_SEC if timeout is None else timeout
    env = dict(os.environ)
    # The child must import this very package even when it is not installed (run from a checkout).
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-P", "-m", f"{__package__}.selfcheck", str(slot_dir), "--json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(slot_dir.parent), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return SelfCheckResult(ok=False, error=(
            f"the self-check did not finish within {timeout:g} s: the model hangs or this board is too slow "
            "(raise EDGETUNE_SELF_CHECK_SEC on slow boards)"))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                data = json.loads(line)
                return SelfCheckResult(**{k: data.get(k) for k in ("ok", "max_abs_err", "p50_ms", "load_ms", "error")},
                                       runs=int(data.get("runs") or 0))
            except (TypeError, ValueError, RecursionError):
                break
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        hint = (": the model uses instructions this CPU lacks; rebuild for this board's target"
                if sig in ("SIGILL", "SIGBUS") else ": rebuild the package for this board's target")
        return SelfCheckResult(ok=False, error=f"the model crashed the self-check ({sig}){hint}")
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return SelfCheckResult(ok=False, error=f"the self-check failed (exit {proc.returncode}): {tail}")


# --- install / rollback / status / trust -------------------------------------------------------------


def _slot_name(store: Path, manifest_bytes: bytes) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{stamp}-{hashlib.sha256(manifest_bytes).hexdigest()[:8]}"
    name, n = base, 1
    while os.path.lexists(store / SLOTS_DIR / name):
        name, n = f"{base}-{n}", n + 1
    return name


def _describe(store: Path, slot: str | None, still: bool = True) -> str:
    """``"<model> (<slot>) is still current"`` (without "still" when it just became so)."""
    is_current = "is still current" if still else "is current"
    if slot is None:
        return "no model is installed"
    try:
        return f"{_slot_manifest(store, slot).model_name} ({slot}) {is_current}"
    except (OSError, AgentError):
        return f"{slot} {is_current}"


def _make_current(store: Path, slot: str, current: str | None, previous: str | None) -> None:
    """Point ``current`` at ``slot`` and ``previous`` at the old ``current`` (previous first: a crash in
    between leaves current untouched). On an OSError both are put back as far as they can be, then it is
    raised: a link that cannot be put back stays on the complete slot it was switched to."""
    try:
        if current is not None:
            _set_link(store, PREVIOUS, current)
        _set_link(store, CURRENT, slot)
    except OSError:
        if current is not None and _link_target(store, CURRENT) != current:
            with contextlib.suppress(OSError):
                _set_link(store, CURRENT, current)
        if previous is not None and _link_target(store, CURRENT) == current and _link_target(store, PREVIOUS) != previous:
            with contextlib.suppress(OSError):
                _set_link(store, PREVIOUS, previous)
        raise


def _built_at(manifest: Manifest) -> datetime | None:
    try:
        stamp = datetime.fromisoformat(manifest.created)
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _downgrade_problem(store: Path, current: str | None, manifest: Manifest) -> str | None:
    """Why ``manifest`` would be a downgrade from the current slot (built before it); ``None`` if it is not."""
    if current is None:
        return None
    try:
        installed = _slot_manifest(store, current)
    except (OSError, AgentError):
        return None  # nothing readable to compare with
    new, old = _built_at(manifest), _built_at(installed)
    if old is None or (new is not None and new >= old):
        return None
    return (f"the package was built {manifest.created[:40]}, older than the installed {installed.model_name} "
            f"(built {installed.created[:40]}): refusing a downgrade; install it with --allow-downgrade, or return to "
            "the previous package with `edgetune-agent rollback`")


def _prune(dirs: _StoreDirs, current: str, previous: str | None) -> list[str]:
    """Remove slots beyond KEEP_SLOTS: keep current, previous and the newest older ones. Slots newer than
    current that are not previous were never made current (an interrupted install) and go too."""
    keep = {current} | ({previous} if previous else set())
    others = sorted((name for name in os.listdir(dirs.slots) if name not in keep
                     and stat.S_ISDIR(os.stat(name, dir_fd=dirs.slots, follow_symlinks=False).st_mode)), reverse=True)
    history = [s for s in others if s < current][: max(0, KEEP_SLOTS - len(keep))]
    removed = []
    for slot in others:
        if slot in history:
            continue
        try:
            _remove(dirs.slots, slot)
            removed.append(slot)
        except OSError as err:
            logger.warning("could not remove old slot %s: %s", slot, err)
    return removed


def install(
    pkg_path: str | os.PathLike[str],
    store: str | os.PathLike[str] | None = None,
    trust_dir: str | os.PathLike[str] | None = None,
    profile: Mapping[str, Any] | Any | None = None,
    on_step: Callable[[str], None] | None = None,
    *,
    allow_downgrade: bool = False,
) -> InstallResult:
    """Install a package and make it current, or leave the store as it was.

    ``profile`` is the board profile (dict, or object with ``as_dict()``; default: probe this board).
    ``on_step(step)`` is called as each of :data:`STEPS` begins. Raises :class:`InstallError` (one line:
    what failed and what to do; nothing else for a hostile package) with ``rolled_back`` set when the
    package had reached the store and was taken out again, and ``current`` the slot in use afterwards.
    A store (or ``trust_dir``) another user could change is refused at the step "extract", before anything
    is written (see the module's docstring).

    Versions: a package built (its signed ``created``) before the current one is refused unless
    ``allow_downgrade``. A signed package never expires, so without this anyone holding an old one could
    put it back on the board; going back on purpose is ``rollback`` (to the previous slot), this flag, or
    packaging the old build again (which signs it anew).
    """
    current_step = ["extract"]

    def step(name: str) -> None:
        current_step[0] = name
        if on_step is not None:
            on_step(name)

    pkg = Path(pkg_path)
    store_dir = resolve_store(store)
    if pkg.name.endswith(_PART_SUFFIX):
        raise InstallError("extract", f"{pkg} is an unfinished upload (.part): flash the package again")
    if not pkg.is_file():
        raise InstallError("extract", f"package {pkg} not found: give the path of a .etpkg file made by `edgetune package`")
    try:
        with _checked_store(store_dir) as dirs, _locked(dirs):
            store_dir = dirs.path
            trusted = dirs.path / TRUSTED_DIR
            if trust_dir is not None and os.path.lexists(trust_dir):
                trusted = check_trust_dir(Path(trust_dir))
            elif trust_dir is not None:
                trusted = Path(trust_dir)
            try:
                _clear_leftovers(dirs)
                result = _install_locked(pkg, dirs, trusted, profile, step, allow_downgrade)
            except (AgentError, OSError) as err:
                raise _install_error(err, current_step[0], store_dir) from None
    except InstallError:
        raise
    except (AgentError, OSError) as err:  # the store cannot be made, is unsafe, or another install holds it
        raise _install_error(err, "extract", store_dir) from None
    logger.info("installed %s into %s", result.model_name, result.slot)
    return result


def _install_error(err: AgentError | OSError, step: str, store_dir: Path) -> InstallError:
    """``err`` as the :class:`InstallError` of ``step``, naming the slot that is current now."""
    if not isinstance(err, InstallError):
        if isinstance(err, AgentError):
            message = str(err)
        elif err.errno == errno.ENOSPC:
            message = f"no space left in {store_dir}: free some space and flash again"
        else:
            message = f"{err.strerror or err} ({err.filename or store_dir}): check the store's disk and permissions"
        err = InstallError(step, message)
    err.current = _link_target(store_dir, CURRENT)
    return err


def _install_locked(pkg: Path, dirs: _StoreDirs, trusted: Path, profile: Mapping[str, Any] | Any | None,
                    step: Callable[[str], None], allow_downgrade: bool) -> InstallResult:
    store_dir = dirs.path
    old_current = _link_target(store_dir, CURRENT)
    old_previous = _link_target(store_dir, PREVIOUS)
    manifest, manifest_bytes, signer, slot = _stage(pkg, dirs, trusted, profile, step, old_current, allow_downgrade)
    slot_dir = store_dir / SLOTS_DIR / slot
    try:
        # The check runs on the slot before it becomes current: a package that fails it is never used.
        step("self-check")
        _check_slot_unchanged(store_dir, slot_dir, manifest, manifest_bytes, old_current)
        check = run_selfcheck_process(slot_dir)
        if not check.ok:
            raise InstallError(
                "self-check",
                f"self-check failed: {check.error}; install rolled back, {_describe(store_dir, old_current)}",
                rolled_back=True, self_check=check,
            )
        installed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        package_sha256 = sha256_file(pkg)
        record = {
            "installed_at": installed_at,
            "package_sha256": package_sha256,
            "signer": signer.fingerprint,
            "self_check": check.as_dict(),
        }
        write_atomic(slot_dir / INSTALL_RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        step("switch")
        _switch(store_dir, slot, old_current, old_previous, check)
    except BaseException:
        # Never a slot nobody uses, and never the removal of the one current points at.
        if _link_target(store_dir, CURRENT) != slot:
            with contextlib.suppress(OSError):
                _remove(dirs.slots, slot)
        raise

    step("prune")
    pruned = _prune(dirs, slot, old_current)
    return InstallResult(
        store=str(store_dir), slot=slot, previous=old_current, model_name=manifest.model_name,
        model_sha256=manifest.model_sha256, key=manifest.key, package_sha256=package_sha256,
        signer=signer.fingerprint, installed_at=installed_at, self_check=check, pruned=pruned,
        warnings=_version_warnings(manifest),
    )


def _check_slot_unchanged(store_dir: Path, slot_dir: Path, manifest: Manifest, manifest_bytes: bytes,
                          old_current: str | None) -> None:
    """Hash the new slot again, after the rename that made it a slot and before the self-check loads it: what
    is loaded, checked and made current is what the signature covers. Raises :class:`InstallError`."""
    problem = _verify_slot_files(slot_dir, manifest, {MANIFEST_NAME: manifest_bytes})
    if problem:
        raise InstallError(
            "self-check",
            f"the new slot changed after it was verified ({problem}); install rolled back, "
            f"{_describe(store_dir, old_current)}: something else writes {store_dir}, make it writable by "
            f"{_who(os.geteuid())} alone",
            rolled_back=True,
        )


def _stage(pkg: Path, dirs: _StoreDirs, trusted: Path, profile: Mapping[str, Any] | Any | None,
           step: Callable[[str], None], old_current: str | None,
           allow_downgrade: bool) -> tuple[Manifest, bytes, TrustedKey, str]:
    """Unpack and verify the package in staging/, check it suits this board, move it into a new slot.
    Returns the manifest, its verified bytes, the key that signed it and the slot's name."""
    store_dir = dirs.path
    name = secrets.token_hex(8)
    os.mkdir(name, 0o755, dir_fd=dirs.staging)
    staging = store_dir / STAGING_DIR / name
    try:
        step("extract")
        manifest, manifest_bytes, signer = _unpack(pkg, staging, trusted, step)

        step("compatibility")
        problem = compatibility_problem(manifest.target, board_profile(profile))
        if problem is None and not allow_downgrade:
            problem = _downgrade_problem(store_dir, old_current, manifest)
        if problem:
            raise InstallError("compatibility", problem)

        step("slot")
        slot = _slot_name(store_dir, manifest_bytes)
        os.rename(name, slot, src_dir_fd=dirs.staging, dst_dir_fd=dirs.slots)
        try:
            os.fsync(dirs.slots)
        except OSError:
            with contextlib.suppress(OSError):
                _remove(dirs.slots, slot)
            raise
        return manifest, manifest_bytes, signer, slot
    finally:
        with contextlib.suppress(OSError):
            _remove(dirs.staging, name)


def _switch(store_dir: Path, slot: str, old_current: str | None, old_previous: str | None,
            check: SelfCheckResult) -> None:
    """Make ``slot`` current (and the old current previous). On failure the links are put back; if ``current``
    cannot be put back it stays on ``slot`` (complete and self-checked), never on a removed slot."""
    try:
        _make_current(store_dir, slot, old_current, old_previous)
    except OSError as err:
        if _link_target(store_dir, CURRENT) == slot:
            raise InstallError(
                "switch", f"switching to the new package failed ({err.strerror}) and the old one could not be made "
                f"current again: {_describe(store_dir, slot, still=False)}; check the store's disk",
                self_check=check,
            ) from None
        raise InstallError(
            "switch", f"switching to the new package failed ({err.strerror}); install rolled back, "
            f"{_describe(store_dir, old_current)}: check the store's disk and permissions",
            rolled_back=True, self_check=check,
        ) from None


def _version_warnings(manifest: Manifest) -> list[str]:
    from importlib import metadata

    try:
        board_tvm = metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        return []
    if manifest.tvm_version and manifest.tvm_version != board_tvm:
        return [f"package built with TVM {manifest.tvm_version}, this board runs TVM {board_tvm}"]
    return []


def rollback(store: str | os.PathLike[str] | None = None) -> RollbackResult:
    """Make ``previous`` current again (and the current one previous). Raises :class:`AgentError` when
    the store is not safe for this user (see the module's docstring), there is no previous package, its
    files are damaged (each is hashed again, opened without following symlinks), or the links cannot be
    switched (then ``current`` is left on a complete slot)."""
    store_dir = resolve_store(store)
    if not (store_dir / SLOTS_DIR).is_dir():
        raise AgentError(f"{store_dir} holds no installed package: flash one with `edgetune flash`")
    with _checked_store(store_dir) as dirs, _locked(dirs):
        store_dir = dirs.path
        current = _link_target(store_dir, CURRENT)
        previous = _link_target(store_dir, PREVIOUS)
        if previous is None or previous == current:
            raise AgentError(f"nothing to roll back to: {store_dir} has no previous package")
        try:
            manifest = _slot_manifest(store_dir, previous)
            problem = _verify_slot_files(store_dir / SLOTS_DIR / previous, manifest)
        except (OSError, AgentError) as err:
            problem = str(err)
        if problem:
            raise AgentError(f"the previous package ({previous}) is damaged: {problem}; flash a package instead")
        try:
            _make_current(store_dir, previous, current, previous)
        except OSError as err:
            now = _link_target(store_dir, CURRENT)
            raise AgentError(f"rolling back failed ({err.strerror}): {_describe(store_dir, now, still=now == current)}; "
                             "check the store's disk and permissions") from None
    return RollbackResult(store=str(store_dir), current=previous, previous=current, model_name=manifest.model_name)


def status(store: str | os.PathLike[str] | None = None) -> StoreStatus:
    """What the store holds. Never raises for an empty or missing store."""
    store_dir = resolve_store(store)
    current = _link_target(store_dir, CURRENT)
    previous = _link_target(store_dir, PREVIOUS)
    slots_dir = store_dir / SLOTS_DIR
    slots = sorted(p.name for p in slots_dir.iterdir() if p.is_dir()) if slots_dir.is_dir() else []
    staging_dir = store_dir / STAGING_DIR
    leftovers = sum(1 for _ in staging_dir.iterdir()) if staging_dir.is_dir() else 0
    result = StoreStatus(store=str(store_dir), current=current, previous=previous, slots=slots,
                         staging_leftovers=leftovers)
    if current is not None:
        try:
            manifest = _slot_manifest(store_dir, current)
        except (OSError, AgentError) as err:
            logger.warning("current slot %s is unreadable: %s", current, err)
        else:
            record = _slot_record(store_dir, current)
            check = record.get("self_check") or {}
            result.model_name = manifest.model_name
            result.model_sha256 = manifest.model_sha256
            result.key = manifest.key
            result.target = manifest.target
            result.tuned_latency_ms = manifest.latency_ms
            result.installed_at = record.get("installed_at")
            result.self_check_ok = check.get("ok")
            result.p50_ms = check.get("p50_ms")
            result.max_abs_err = check.get("max_abs_err")
    if previous is not None:
        with contextlib.suppress(OSError, AgentError):
            result.previous_model = _slot_manifest(store_dir, previous).model_name
    return result


def trust(pubkey_path: str | os.PathLike[str], store: str | os.PathLike[str] | None = None,
          trust_dir: str | os.PathLike[str] | None = None) -> TrustResult:
    """Add a public key (OpenSSH ``ssh-ed25519`` line) to the trust directory (``trust_dir``, else the store's
    ``trusted/``). Raises :class:`AgentError`, also when that directory or the store is not safe for this
    user (see the module's docstring)."""
    src = Path(pubkey_path)
    try:
        text = src.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AgentError(f"cannot read {src} ({err}): give the .pub file `edgetune keys init` wrote") from None
    key = load_public_key(text, str(src))
    fp = fingerprint(key)
    if trust_dir is None:
        with _checked_store(resolve_store(store)) as dirs:
            return _add_key(dirs.path / TRUSTED_DIR, text, fp)
    directory = Path(trust_dir)
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as err:
        raise AgentError(
            f"cannot create the trust directory {directory} ({err.strerror}): run as root or pass --store/--trust-dir"
        ) from None
    return _add_key(check_trust_dir(directory), text, fp)


def _add_key(directory: Path, text: str, fp: str) -> TrustResult:
    """Write the key ``text`` (fingerprint ``fp``) into the checked trust directory, unless it is there."""
    for known in load_trusted_keys(directory):
        if known.fingerprint == fp:
            return TrustResult(path=known.source, fingerprint=fp, added=False)
    try:
        safe = "".join(c for c in fp.split(":", 1)[1] if c.isalnum())[:16]
        dest = directory / f"ed25519-{safe}.pub"
        write_atomic(dest, (text.strip().splitlines()[0] + "\n").encode())
    except OSError as err:
        raise AgentError(
            f"cannot write to the trust directory {directory} ({err.strerror}): run as root or pass --store/--trust-dir"
        ) from None
    return TrustResult(path=str(dest), fingerprint=fp, added=True)
