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
``current`` is either the old package or the new, fully checked one; never a half-installed one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import config
from .errors import AgentError
from .fsutil import fsync_dir, write_atomic
from .manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    TrustedKey,
    check_member_name,
    compatibility_problem,
    fingerprint,
    load_public_key,
    load_trusted_keys,
    sha256_file,
    verify_manifest,
)
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
# manifest.json and manifest.sig are small; anything bigger is not an edgetune package.
_MAX_META_BYTES = 4 << 20
_PART_SUFFIX = ".part"

# Install steps, in order; on_step(step) is called as each begins.
STEPS = ("extract", "signature", "files", "compatibility", "slot", "self-check", "switch", "prune")


class InstallError(AgentError):
    """An install that failed at ``step``. ``rolled_back``: the package had reached the store and was
    removed again; ``current`` is the slot in use afterwards (unchanged by the failed install)."""

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
    """The slot a store link points to, or ``None`` when the link is missing or points elsewhere."""
    try:
        target = os.readlink(store / name)
    except (FileNotFoundError, OSError):
        return None
    prefix = SLOTS_DIR + "/"
    if not target.startswith(prefix) or "/" in target[len(prefix):]:
        logger.warning("%s/%s points outside the store (%s): ignored", store, name, target)
        return None
    slot = target[len(prefix):]
    return slot if (store / SLOTS_DIR / slot).is_dir() else None


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


def _prepare(store: Path) -> None:
    try:
        for sub in (store, store / SLOTS_DIR, store / STAGING_DIR, store / TRUSTED_DIR):
            sub.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as err:
        raise AgentError(
            f"cannot create the store {store} ({err.strerror}): run as root, or pass --store DIR "
            "(or set EDGETUNE_STORE) to a writable directory"
        ) from None
    if not os.access(store, os.W_OK):
        raise AgentError(
            f"the store {store} is not writable: run as root, or pass --store DIR (or set EDGETUNE_STORE)"
        )


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    fd = os.open(store / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentError(
                f"another install or rollback is running on {store}: wait for it to finish and try again"
            ) from None
        yield
    finally:
        os.close(fd)


def _clear_leftovers(store: Path) -> None:
    """Remove what an interrupted install left behind: staging dirs and temporary links."""
    for entry in (store / STAGING_DIR).iterdir():
        logger.info("removing leftover %s", entry)
        shutil.rmtree(entry, ignore_errors=True)
    for entry in store.iterdir():
        if entry.name.startswith((f".{CURRENT}.", f".{PREVIOUS}.")) and entry.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _slot_manifest(store: Path, slot: str) -> Manifest:
    return Manifest.from_json((store / SLOTS_DIR / slot / MANIFEST_NAME).read_bytes())


def _slot_record(store: Path, slot: str) -> dict[str, Any]:
    try:
        return json.loads((store / SLOTS_DIR / slot / INSTALL_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


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


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > _MAX_META_BYTES:
        raise InstallError("extract", f"{member.name} in the package is {member.size} bytes: not an edgetune package")
    src = tar.extractfile(member)
    if src is None:
        raise InstallError("extract", f"{member.name} in the package cannot be read: rebuild the package")
    return src.read()


def _unpack(pkg: Path, staging: Path, trust_dir: Path, on_step: Callable[[str], None]) -> tuple[Manifest, bytes, TrustedKey]:
    """Unpack ``pkg`` into ``staging``, verifying as it goes: the signature over manifest.json before any
    other file is written, then each file's sha256, no unlisted and no missing files.

    manifest.json and manifest.sig must be the first members (``edgetune package`` writes them so), which
    means nothing unsigned is ever written to disk.
    """
    manifest: Manifest | None = None
    manifest_bytes: bytes | None = None
    sig_bytes: bytes | None = None
    signer: TrustedKey | None = None
    written: set[str] = set()
    try:
        with tarfile.open(pkg, mode="r:*") as tar:
            for member in tar:
                name = member.name
                try:
                    check_member_name(name)
                except AgentError as err:
                    raise InstallError("extract", str(err)) from None
                if member.isdir():
                    continue
                if not member.isreg():
                    kind = "link" if (member.issym() or member.islnk()) else "special file"
                    raise InstallError("extract", f"the package holds a {kind} {name!r}: refusing it; rebuild it with `edgetune package`")
                if name in (MANIFEST_NAME, SIGNATURE_NAME):
                    if (manifest_bytes if name == MANIFEST_NAME else sig_bytes) is not None or manifest is not None:
                        raise InstallError("extract", f"the package holds {name} twice: refusing it; rebuild it with `edgetune package`")
                    data = _read_small(tar, member)
                    if name == MANIFEST_NAME:
                        manifest_bytes = data
                    else:
                        sig_bytes = data
                    if manifest_bytes is not None and sig_bytes is not None:
                        on_step("signature")
                        try:
                            signer = verify_manifest(manifest_bytes, sig_bytes, load_trusted_keys(trust_dir), str(trust_dir))
                        except AgentError as err:
                            raise InstallError("signature", str(err)) from None
                        try:
                            manifest = Manifest.from_json(manifest_bytes)
                        except AgentError as err:
                            raise InstallError("extract", str(err)) from None
                    continue
                if manifest is None:
                    if manifest_bytes is not None and sig_bytes is None:
                        raise InstallError("signature", "the package is not signed (no manifest.sig): sign it with `edgetune package` (create a key first with `edgetune keys init`)")
                    raise InstallError("extract", "the package does not start with manifest.json and manifest.sig: it was not made by `edgetune package`; rebuild it")
                if name not in manifest.files:
                    raise InstallError("files", f"the package holds {name}, which its manifest does not list: refusing it; rebuild it with `edgetune package`")
                if name in written:
                    raise InstallError("files", f"the package holds {name} twice: refusing it; rebuild it with `edgetune package`")
                digest = _extract_file(tar, member, staging / name)
                written.add(name)
                if digest != manifest.files[name]:
                    raise InstallError("files", f"{name} does not match its sha256 in the signed manifest: the package was altered or damaged; build and flash it again")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise InstallError("extract", f"the package is damaged or incomplete ({err}): copy or flash it again") from None
    if manifest is None or manifest_bytes is None or signer is None:
        if manifest_bytes is not None:
            raise InstallError("signature", "the package is not signed (no manifest.sig): sign it with `edgetune package` (create a key first with `edgetune keys init`)")
        raise InstallError("extract", "the package has no manifest.json (empty, cut off, or not an edgetune package): flash it again")
    on_step("files")
    missing = sorted(set(manifest.files) - written)
    if missing:
        raise InstallError("files", f"the package is incomplete, missing {', '.join(missing)} (cut-off upload or damaged file): flash it again")
    write_atomic(staging / MANIFEST_NAME, manifest_bytes)
    write_atomic(staging / SIGNATURE_NAME, sig_bytes or b"")
    for sub in sorted({(staging / n).parent for n in written}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(sub)
    return manifest, manifest_bytes, signer


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> str:
    src = tar.extractfile(member)
    if src is None:
        raise InstallError("extract", f"{member.name} in the package cannot be read: rebuild the package")
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out:
        while block := src.read(1 << 20):
            digest.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _verify_slot_files(slot_dir: Path, manifest: Manifest) -> str | None:
    for name, digest in manifest.files.items():
        path = slot_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its sha256"
    return None


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
            except (json.JSONDecodeError, TypeError, ValueError):
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
    while (store / SLOTS_DIR / name).exists():
        name, n = f"{base}-{n}", n + 1
    return name


def _describe(store: Path, slot: str | None) -> str:
    if slot is None:
        return "no model is installed"
    try:
        return f"{_slot_manifest(store, slot).model_name} ({slot}) is still current"
    except (OSError, AgentError):
        return f"{slot} is still current"


def _prune(store: Path, current: str, previous: str | None) -> list[str]:
    """Remove slots beyond KEEP_SLOTS: keep current, previous and the newest older ones. Slots newer than
    current that are not previous were never made current (an interrupted install) and go too."""
    keep = {current} | ({previous} if previous else set())
    others = sorted((p.name for p in (store / SLOTS_DIR).iterdir() if p.is_dir() and p.name not in keep), reverse=True)
    history = [s for s in others if s < current][: max(0, KEEP_SLOTS - len(keep))]
    removed = []
    for slot in others:
        if slot in history:
            continue
        try:
            shutil.rmtree(store / SLOTS_DIR / slot)
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
) -> InstallResult:
    """Install a package and make it current, or leave the store as it was.

    ``profile`` is the board profile (dict, or object with ``as_dict()``; default: probe this board).
    ``on_step(step)`` is called as each of :data:`STEPS` begins. Raises :class:`InstallError` (one line:
    what failed and what to do) with ``rolled_back`` set when the package had reached the store and was
    taken out again; ``current`` is then unchanged.
    """
    step = on_step or (lambda _step: None)
    pkg = Path(pkg_path)
    store_dir = resolve_store(store)
    trusted = Path(trust_dir) if trust_dir is not None else store_dir / TRUSTED_DIR
    if pkg.name.endswith(_PART_SUFFIX):
        raise InstallError("extract", f"{pkg} is an unfinished upload (.part): flash the package again")
    if not pkg.is_file():
        raise InstallError("extract", f"package {pkg} not found: give the path of a .etpkg file made by `edgetune package`")
    _prepare(store_dir)
    with _locked(store_dir):
        _clear_leftovers(store_dir)
        old_current = _link_target(store_dir, CURRENT)
        try:
            result = _install_locked(pkg, store_dir, trusted, profile, step, old_current)
        except InstallError as err:
            err.current = old_current
            raise
    logger.info("installed %s into %s", result.model_name, result.slot)
    return result


def _install_locked(pkg: Path, store_dir: Path, trusted: Path, profile: Mapping[str, Any] | Any | None,
                    step: Callable[[str], None], old_current: str | None) -> InstallResult:
    staging = store_dir / STAGING_DIR / secrets.token_hex(8)
    staging.mkdir()
    try:
        step("extract")
        try:
            manifest, manifest_bytes, signer = _unpack(pkg, staging, trusted, step)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise InstallError("extract", f"no space left in {store_dir}: free some space and flash again") from None
            raise InstallError("extract", f"cannot unpack into {store_dir} ({err.strerror}): check the store's permissions") from None

        step("compatibility")
        board = board_profile(profile)
        problem = compatibility_problem(manifest.target, board)
        if problem:
            raise InstallError("compatibility", problem)
        warnings = _version_warnings(manifest)

        step("slot")
        slot = _slot_name(store_dir, manifest_bytes)
        slot_dir = store_dir / SLOTS_DIR / slot
        os.rename(staging, slot_dir)
        fsync_dir(store_dir / SLOTS_DIR)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    # The check runs on the slot before it becomes current: a package that fails it is never used.
    step("self-check")
    check = run_selfcheck_process(slot_dir)
    if not check.ok:
        shutil.rmtree(slot_dir, ignore_errors=True)
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
    try:
        # previous first: a crash in between leaves current untouched.
        if old_current is not None:
            _set_link(store_dir, PREVIOUS, old_current)
        _set_link(store_dir, CURRENT, slot)
    except OSError as err:
        if old_current is not None:
            with contextlib.suppress(OSError):
                _set_link(store_dir, CURRENT, old_current)
        shutil.rmtree(slot_dir, ignore_errors=True)
        raise InstallError(
            "switch", f"switching to the new package failed ({err.strerror}); install rolled back, "
            f"{_describe(store_dir, old_current)}: check the store's disk and permissions",
            rolled_back=True, self_check=check,
        ) from None

    step("prune")
    pruned = _prune(store_dir, slot, old_current)
    return InstallResult(
        store=str(store_dir), slot=slot, previous=old_current, model_name=manifest.model_name,
        model_sha256=manifest.model_sha256, key=manifest.key, package_sha256=package_sha256,
        signer=signer.fingerprint, installed_at=installed_at, self_check=check, pruned=pruned, warnings=warnings,
    )



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
    there is no previous package or its files are damaged."""
    store_dir = resolve_store(store)
    if not (store_dir / SLOTS_DIR).is_dir():
        raise AgentError(f"{store_dir} holds no installed package: flash one with `edgetune flash`")
    with _locked(store_dir):
        current = _link_target(store_dir, CURRENT)
        previous = _link_target(store_dir, PREVIOUS)
        if previous is None or previous == current:
            raise AgentError(f"nothing to roll back to: {store_dir} has no previous package")
        manifest = _slot_manifest(store_dir, previous)
        problem = _verify_slot_files(store_dir / SLOTS_DIR / previous, manifest)
        if problem:
            raise AgentError(f"the previous package ({previous}) is damaged: {problem}; flash a package instead")
        # previous first: a crash in between leaves current untouched.
        if current is not None:
            _set_link(store_dir, PREVIOUS, current)
        _set_link(store_dir, CURRENT, previous)
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
    """Add a public key (OpenSSH ``ssh-ed25519`` line) to the trust directory. Raises :class:`AgentError`."""
    src = Path(pubkey_path)
    try:
        text = src.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AgentError(f"cannot read {src} ({err}): give the .pub file `edgetune keys init` wrote") from None
    key = load_public_key(text, str(src))
    fp = fingerprint(key)
    directory = Path(trust_dir) if trust_dir is not None else resolve_store(store) / TRUSTED_DIR
    for known in load_trusted_keys(directory):
        if known.fingerprint == fp:
            return TrustResult(path=known.source, fingerprint=fp, added=False)
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        safe = "".join(c for c in fp.split(":", 1)[1] if c.isalnum())[:16]
        dest = directory / f"ed25519-{safe}.pub"
        write_atomic(dest, (text.strip().splitlines()[0] + "\n").encode())
    except OSError as err:
        raise AgentError(
            f"cannot write to the trust directory {directory} ({err.strerror}): run as root or pass --store/--trust-dir"
        ) from None
    return TrustResult(path=str(dest), fingerprint=fp, added=True)

