"""Fixtures of the board store's tests (manifest, package faults, store ownership): one signing key, one
good package and a store with it installed per test module; each test that changes a store gets a copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from host.package import init_keys
from tests.helpers_build import make_log_dir
from tests.helpers_package import installed_store, make_pkg


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def signing_key(work: Path) -> Path:
    return Path(init_keys(work / "keys" / "signing_key").path)


@pytest.fixture(scope="module")
def log_dir(work: Path) -> Path:
    return make_log_dir(work / "log")


@pytest.fixture(scope="module")
def good_pkg(work: Path, signing_key: Path, log_dir: Path) -> Path:
    return make_pkg(work, "good", signing_key, log_dir)


@pytest.fixture(scope="module")
def base_store(work: Path, signing_key: Path, good_pkg: Path) -> Path:
    """A store with the good package installed: copied for each test that needs a current model."""
    return installed_store(work / "base-store", signing_key, good_pkg)


@pytest.fixture()
def store(base_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(base_store, copy, symlinks=True)
    return copy
