"""Packages and stores for the board store's tests: made as `edgetune package` makes them, repacked member
by member, or signed again after their manifest was changed (hostile tars are built in the tests).

    pkg = make_pkg(work, "good", signing_key, log_dir)
    bad = repack([(n, d) for n, d in members(pkg) if n != "manifest.sig"], tmp_path / "unsigned.etpkg")
    old = resign(pkg, signing_key, tmp_path / "old.etpkg", lambda raw: raw.update(created="2020-01-01T00:00:00+00:00"))
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable

import pytest

from device_agent import store as store_mod
from device_agent.manifest import MANIFEST_NAME, SIGNATURE_NAME, encode_signature
from host.package import load_signing_key, package
from tests.helpers_build import make_build_dir, this_board_profile


def make_pkg(work: Path, name: str, key: Path, log: Path, **build_kwargs: Any) -> Path:
    """``work/<name>.etpkg``, made by `edgetune package` from a fresh build of the tiny CNN."""
    out = make_build_dir(work / f"out-{name}", **build_kwargs)
    return Path(package(out, log, work / f"{name}.etpkg", key_path=key).path)


def installed_store(store: Path, key: Path, pkg: Path) -> Path:
    """``store`` trusting ``key`` (its .pub beside it) with ``pkg`` installed and current."""
    store_mod.trust(key.with_name(key.name + ".pub"), store)
    store_mod.install(pkg, store, profile=this_board_profile())
    return store


def members(pkg: Path) -> list[tuple[str, bytes]]:
    """The files of a package, in order: ``[(name, data), ...]``."""
    with tarfile.open(pkg, "r:gz") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]


def repack(files: list[tuple[str, bytes]], dest: Path) -> Path:
    """Write ``files`` (``[(name, data), ...]``) as a gzip-compressed tar, in that order."""
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def signed_members(pkg: Path, key: Path, change: Callable[[dict[str, Any]], None] | None = None,
                   sizes: bool = True) -> list[tuple[str, bytes]]:
    """The files of ``pkg`` with its manifest changed by ``change(raw)`` (and listing each file's size in
    ``sizes`` unless ``sizes`` is false), signed again with ``key``."""
    files = members(pkg)
    raw = json.loads(dict(files)[MANIFEST_NAME])
    if sizes:
        raw["sizes"] = {name: len(data) for name, data in files if name in raw["files"]}
    if change is not None:
        change(raw)
    manifest = (json.dumps(raw, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()
    rest = [(n, d) for n, d in files if n not in (MANIFEST_NAME, SIGNATURE_NAME)]
    return [(MANIFEST_NAME, manifest), (SIGNATURE_NAME, sign_manifest(manifest, key)), *rest]


def sign_manifest(manifest: bytes, key: Path) -> bytes:
    """The manifest.sig of the bytes ``manifest``, signed with the private key at ``key``."""
    private_key, _ = load_signing_key(key)
    return encode_signature(private_key.sign(manifest), private_key.public_key())


def resign(pkg: Path, key: Path, dest: Path, change: Callable[[dict[str, Any]], None] | None = None,
           sizes: bool = True) -> Path:
    """:func:`signed_members` written to ``dest``."""
    return repack(signed_members(pkg, key, change, sizes), dest)


def current(store: Path) -> str:
    """Where ``store/current`` points (``slots/<slot>``)."""
    return os.readlink(store / "current")


def assert_unchanged(store: Path, before: str, run: bool = False) -> None:
    """``current`` still points at ``before``, the only slot, and nothing is left in staging; ``run``: its
    model still passes its self-check."""
    assert current(store) == before
    assert not list((store / "staging").iterdir())
    assert sorted(p.name for p in (store / "slots").iterdir()) == [before.split("/", 1)[1]]
    if run:
        check = store_mod.run_selfcheck_process(store / "current")
        assert check.ok, check.error


def install_fails(pkg: Path, store: Path, profile: dict | None = None, **kwargs: Any) -> store_mod.InstallError:
    """The one-line :class:`InstallError` installing ``pkg`` into ``store`` raises."""
    with pytest.raises(store_mod.InstallError) as info:
        store_mod.install(pkg, store, profile=profile or this_board_profile(), **kwargs)
    assert "\n" not in str(info.value)
    return info.value
