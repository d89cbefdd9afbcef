"""``edgetune flash PKG --adb SERIAL --dest DIR``: put an Android build on a phone.

A phone has no agent to verify a package, so the workstation does what it can before and after the
copy:

1. open the package: its files must match the sha256 its manifest lists, and it must be built for
   Android, for an API level the phone runs and for a CPU the phone has (its profile read over adb);
2. push ``model.so``, ``manifest.json`` and ``manifest.sig`` into a staging folder inside DIR;
3. check their sha256 on the phone (toybox ``sha256sum``) against the workstation's;
4. only then switch: each current file is kept as ``<name>.prev`` and the staged one is moved over it
   with ``mv -f`` (a rename within one file system: an app reading ``DIR/model.so`` sees the old
   build or the new one, never a partial file). A failed check leaves DIR as it was.
"""

from __future__ import annotations

import hashlib
import secrets
import shlex
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from device_agent.manifest import MANIFEST_NAME, MODEL_NAME, SIGNATURE_NAME, Manifest, compatibility_problem

from ..errors import EdgetuneError
from .adb import Adb, AdbRunner, AndroidError, run_adb
from .connect import attach
from .phone import read_phone

# What goes to the phone, in the order the switch replaces them: the model last, so the manifest beside
# a new model.so is already its own.
PHONE_FILES = (MANIFEST_NAME, SIGNATURE_NAME, MODEL_NAME)
PREVIOUS_SUFFIX = ".prev"
_SWITCHED = "edgetune-switched"


@dataclass
class AdbFlashResult:
    """What ``flash --adb`` did on one phone."""

    serial: str
    dest: str
    model: str
    files: dict[str, str]  # name -> sha256, as checked on the phone
    previous_kept: bool  # the build that was in DEST is now the .prev files
    ok: bool = True
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpack_for_phone(pkg: str | Path, into: Path) -> tuple[Manifest, dict[str, Path]]:
    """The manifest and the files that go to a phone, extracted into ``into`` and checked against the
    manifest's sha256. Raises :class:`EdgetuneError` for a damaged package or one not built for Android."""
    pkg = Path(pkg)
    wanted = set(PHONE_FILES)
    paths: dict[str, Path] = {}
    try:
        with tarfile.open(pkg, mode="r:*") as tar:
            for member in tar:
                if member.name in wanted and member.isfile() and member.name not in paths:
                    src = tar.extractfile(member)
                    if src is None:
                        continue
                    paths[member.name] = into / member.name
                    with open(paths[member.name], "wb") as out:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            out.write(chunk)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise EdgetuneError(f"{pkg} is not a readable package ({err}): make it again with `edgetune package`") from None
    missing = wanted - paths.keys()
    if missing:
        raise EdgetuneError(f"{pkg} lacks {', '.join(sorted(missing))}: make it again with `edgetune package`")
    try:
        manifest = Manifest.from_json(paths[MANIFEST_NAME].read_bytes())
    except Exception as err:  # noqa: BLE001 - AgentError and friends: the manifest is broken
        raise EdgetuneError(f"{pkg}: {err}") from None
    if _sha256(paths[MODEL_NAME]) != manifest.files.get(MODEL_NAME):
        raise EdgetuneError(f"{pkg}: model.so does not match the sha256 in its manifest (damaged or altered): "
                            "make the package again with `edgetune package`")
    triple = str(manifest.target.get("mtriple", ""))
    if "android" not in triple:
        raise EdgetuneError(f"{pkg} is built for {triple or 'no triple'}, not Android: build it for the phone's key "
                            "(`edgetune build MODEL --device KEY` after `edgetune android connect`)")
    return manifest, paths


def check_suits_phone(manifest: Manifest, board: dict[str, Any], serial: str) -> None:
    """Raise :class:`EdgetuneError` when the package's target or API level does not suit the phone."""
    problem = compatibility_problem(manifest.target, board)
    if problem:
        raise EdgetuneError(f"the package does not suit phone {serial}: {problem}")
    built_for = int((manifest.board or {}).get("android_api") or 0)
    runs = int(board.get("android_api") or 0)
    if built_for and runs and built_for > runs:
        raise EdgetuneError(f"the package was built for Android API {built_for} and phone {serial} runs API {runs}: "
                            f"build it again after `edgetune android connect {serial}` (set EDGETUNE_ANDROID_API)")


def parse_sha256sum(text: str) -> dict[str, str]:
    """``sha256sum`` output (``<hex>  <path>`` lines) as path -> digest."""
    found = {}
    for line in text.splitlines():
        digest, _, path = line.strip().partition(" ")
        if len(digest) == 64 and path.strip():
            found[path.strip().lstrip("*")] = digest.lower()
    return found


def switch_command(dest: str, stage: str) -> str:
    """The phone shell command that keeps the current build as ``.prev`` and moves the staged one in.

    ``cp`` keeps the previous file (an app may hold the current one open); ``mv -f`` within DEST is an
    atomic rename. The marker line says every step ran (adb 29 may not pass the exit status on).
    """
    q = shlex.quote
    steps = [f"cd {q(dest)}"]
    for name in PHONE_FILES:
        steps.append(f"{{ [ ! -f {q(name)} ] || cp -f {q(name)} {q(name + PREVIOUS_SUFFIX)}; }}")
    for name in PHONE_FILES:
        steps.append(f"mv -f {q(stage + '/' + name)} {q(name)}")
    steps += [f"rmdir {q(stage)}", f"echo {_SWITCHED}"]
    return " && ".join(steps)


def flash_phone(pkg: str | Path, serial: str, dest: str, runner: AdbRunner = run_adb,
                on_progress: Callable[[str], None] | None = None) -> AdbFlashResult:
    """Push an Android package's build to ``dest`` on the phone, check it there, then switch to it.

    Raises :class:`EdgetuneError` (the package) or :class:`AndroidError` (adb, the phone, a sha256
    mismatch); on any failure before the switch, ``dest`` is left as it was.
    """
    say = on_progress or (lambda message: None)
    if not dest.startswith("/"):
        raise EdgetuneError(f"--dest {dest!r} is not an absolute path on the phone: e.g. --dest /data/local/tmp/model")
    with tempfile.TemporaryDirectory(prefix="edgetune-adb-") as tmp:
        manifest, paths = unpack_for_phone(pkg, Path(tmp))
        adb = attach(serial, runner)
        phone = read_phone(adb)
        check_suits_phone(manifest, phone.board(), serial)
        local = {name: _sha256(path) for name, path in paths.items()}
        stage = f".edgetune-incoming-{secrets.token_hex(4)}"
        say(f"pushing {manifest.model_name} to {serial}:{dest}")
        _stage(adb, dest, stage, paths)
        say("checking sha256 on the phone")
        _verify(adb, dest, stage, local)
        had_previous = _exists(adb, f"{dest}/{MODEL_NAME}")
        out = adb.shell(switch_command(dest, stage))
        if _SWITCHED not in out:
            answer = " ".join(out.split())[-200:] or "no answer"
            raise AndroidError(f"switching to the new build in {serial}:{dest} failed ({answer}): the staged files are "
                               f"in {dest}/{stage}; check the folder's space and permissions")
    notes = [f"previous build kept as {dest}/{MODEL_NAME}{PREVIOUS_SUFFIX}"] if had_previous else []
    return AdbFlashResult(serial=phone.info.serial, dest=dest, model=manifest.model_name, files=local,
                          previous_kept=had_previous, notes=notes)


def _stage(adb: Adb, dest: str, stage: str, paths: dict[str, Path]) -> None:
    q = shlex.quote
    adb.shell(f"mkdir -p {q(dest + '/' + stage)}")
    for name in PHONE_FILES:
        adb.push(str(paths[name]), f"{dest}/{stage}/{name}")


def _verify(adb: Adb, dest: str, stage: str, local: dict[str, str]) -> None:
    q = shlex.quote
    staged = {name: f"{dest}/{stage}/{name}" for name in PHONE_FILES}
    out = adb.shell("sha256sum " + " ".join(q(p) for p in staged.values()))
    remote = parse_sha256sum(out)
    bad = [name for name, path in staged.items() if remote.get(path) != local[name]]
    if bad:
        adb.run("shell", f"rm -rf {q(dest + '/' + stage)}", check=False)
        raise AndroidError(f"the copy on phone {adb.serial} differs from the package ({', '.join(bad)}: "
                           f"sha256 {'missing' if not remote else 'mismatch'}); the build in {dest} is unchanged: "
                           "check the phone's free space (adb shell df) and flash again")


def _exists(adb: Adb, path: str) -> bool:
    return "yes" in adb.shell(f"[ -f {shlex.quote(path)} ] && echo yes || echo no")
