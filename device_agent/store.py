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
import subprocess
import sys
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out:
        for chunk in chunks:
            digest.update(chunk)
            out.write(chunk)
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
    while (store / SLOTS_DIR / name).exists():
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
    *,
    allow_downgrade: bool = False,
) -> InstallResult:
    """Install a package and make it current, or leave the store as it was.

    ``profile`` is the board profile (dict, or object with ``as_dict()``; default: probe this board).
    ``on_step(step)`` is called as each of :data:`STEPS` begins. Raises :class:`InstallError` (one line:
    what failed and what to do; nothing else for a hostile package) with ``rolled_back`` set when the
    package had reached the store and was taken out again, and ``current`` the slot in use afterwards.

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
    trusted = Path(trust_dir) if trust_dir is not None else store_dir / TRUSTED_DIR
    if pkg.name.endswith(_PART_SUFFIX):
        raise InstallError("extract", f"{pkg} is an unfinished upload (.part): flash the package again")
    if not pkg.is_file():
        raise InstallError("extract", f"package {pkg} not found: give the path of a .etpkg file made by `edgetune package`")
    try:
        _prepare(store_dir)
        with _locked(store_dir):
            try:
                _clear_leftovers(store_dir)
                result = _install_locked(pkg, store_dir, trusted, profile, step, allow_downgrade)
            except (AgentError, OSError) as err:
                raise _install_error(err, current_step[0], store_dir) from None
    except InstallError:
        raise
    except (AgentError, OSError) as err:  # the store cannot be made, or another install holds it
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


def _install_locked(pkg: Path, store_dir: Path, trusted: Path, profile: Mapping[str, Any] | Any | None,
                    step: Callable[[str], None], allow_downgrade: bool) -> InstallResult:
    old_current = _link_target(store_dir, CURRENT)
    old_previous = _link_target(store_dir, PREVIOUS)
    manifest, signer, slot = _stage(pkg, store_dir, trusted, profile, step, old_current, allow_downgrade)
    slot_dir = store_dir / SLOTS_DIR / slot
    try:
        # The check runs on the slot before it becomes current: a package that fails it is never used.
        step("self-check")
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
            shutil.rmtree(slot_dir, ignore_errors=True)
        raise

    step("prune")
    pruned = _prune(store_dir, slot, old_current)
    return InstallResult(
        store=str(store_dir), slot=slot, previous=old_current, model_name=manifest.model_name,
        model_sha256=manifest.model_sha256, key=manifest.key, package_sha256=package_sha256,
        signer=signer.fingerprint, installed_at=installed_at, self_check=check, pruned=pruned,
        warnings=_version_warnings(manifest),
    )


def _stage(pkg: Path, store_dir: Path, trusted: Path, profile: Mapping[str, Any] | Any | None,
           step: Callable[[str], None], old_current: str | None, allow_downgrade: bool) -> tuple[Manifest, TrustedKey, str]:
    """Unpack and verify the package in staging/, check it suits this board, move it into a new slot."""
    staging = store_dir / STAGING_DIR / secrets.token_hex(8)
    staging.mkdir()
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
        slot_dir = store_dir / SLOTS_DIR / slot
        os.rename(staging, slot_dir)
        try:
            fsync_dir(store_dir / SLOTS_DIR)
        except OSError:
            shutil.rmtree(slot_dir, ignore_errors=True)
            raise
        return manifest, signer, slot
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


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
    there is no previous package, its files are damaged, or the links cannot be switched (then
    ``current`` is left on a complete slot)."""
    store_dir = resolve_store(store)
    if not (store_dir / SLOTS_DIR).is_dir():
        raise AgentError(f"{store_dir} holds no installed package: flash one with `edgetune flash`")
    with _locked(store_dir):
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

