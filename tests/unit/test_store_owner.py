"""Who may write the board's store: attacks by a user who can change its directories, each refused or
caught before root uses what it reads there, and nothing is deleted through a symlink.

The store is made by a real install of a real package (the tiny CNN compiled for this machine); the
attacks are real files, links, modes and owners. Root plays both sides here (the tests run as root, as the
board's install does): what another user could do to a store it can write is done to the store directly,
and tests/unit/test_deploy.py shows with a real unprivileged user that the board's layout leaves it no
such way. No network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from device_agent import store as store_mod
from device_agent.errors import AgentError
from tests.helpers_build import this_board_profile
from tests.helpers_package import current, install_fails

# A uid no file of these tests belongs to: "nobody" on Debian.
FOREIGN_UID = 65534


@pytest.fixture()
def pub(signing_key: Path) -> Path:
    return signing_key.with_name(signing_key.name + ".pub")


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content: files by sha256, links by target, directories by mode."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = f"dir {path.stat().st_mode:o}"
    return found


def _victim(path: Path) -> dict[str, str]:
    """A directory that is not the store's (a user's data, /etc): what a link in the store may lead to."""
    (path / "nested").mkdir(parents=True)
    (path / "precious.txt").write_text("keep me\n")
    (path / "nested" / "more.txt").write_text("and me\n")
    return _tree(path)


def _real(path: Path) -> str:
    return os.path.realpath(path)


# --- (a) a store directory replaced by a symlink ------------------------------------------------------


@pytest.mark.parametrize("name", ["staging", "slots", "trusted"])
def test_store_dir_replaced_by_a_symlink_is_refused(store: Path, good_pkg: Path, pub: Path, tmp_path: Path,
                                                    name: str) -> None:
    """The reproduced attack: staging/ made a link to another directory, whose entries the old clean-up of
    leftovers deleted as root. slots/ and trusted/ through a link would let the link's owner swap a slot or
    add a key. The real directory moves to where the link leads, so the store would otherwise still work."""
    before = current(store)
    victim = tmp_path / "victim"
    os.rename(store / name, victim)
    _victim(victim)
    # An entry shaped like an interrupted install's leftover, which the clean-up would remove.
    (victim / "0123456789abcdef").mkdir()
    (victim / "0123456789abcdef" / "data.bin").write_bytes(b"\x00" * 64)
    expected = _tree(victim)
    os.symlink(victim, store / name)
    link = Path(_real(store)) / name

    err = install_fails(good_pkg, store)
    assert err.step == "extract" and not err.rolled_back
    assert f"{link} is a symbolic link" in str(err) and f"`rm {link}`" in str(err)
    assert err.current == before.split("/", 1)[1]
    with pytest.raises(AgentError, match="is a symbolic link") as info:
        store_mod.trust(pub, store)
    assert "\n" not in str(info.value)
    with pytest.raises(AgentError, match="is a symbolic link"):
        store_mod.rollback(store)

    assert _tree(victim) == expected
    assert os.readlink(store / name) == str(victim) and current(store) == before


def test_lock_file_replaced_by_a_symlink_is_refused(store: Path, good_pkg: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("root opens this read-write if it follows the link\n")
    (store / ".lock").unlink()
    os.symlink(victim, store / ".lock")
    before = current(store)
    err = install_fails(good_pkg, store)
    assert err.step == "extract" and f"{Path(_real(store)) / '.lock'} is a symbolic link" in str(err)
    assert victim.read_text() == "root opens this read-write if it follows the link\n"
    assert current(store) == before


def test_leftover_links_in_staging_are_removed_not_followed(store: Path, good_pkg: Path, tmp_path: Path) -> None:
    """A link inside staging/ (or inside a leftover there) is removed itself: the directory it leads to stays."""
    victim = tmp_path / "victim"
    expected = _victim(victim)
    os.symlink(victim, store / "staging" / "leftover-link")
    (store / "staging" / "leftover-dir").mkdir()
    os.symlink(victim, store / "staging" / "leftover-dir" / "inner-link")
    result = store_mod.install(good_pkg, store, profile=this_board_profile())
    assert result.ok and current(store) == f"slots/{result.slot}"
    assert not list((store / "staging").iterdir())
    assert _tree(victim) == expected


# --- (b) a store directory another user owns or can write ---------------------------------------------


@pytest.mark.parametrize(("name", "change", "problem", "fix"), [
    ("", "chmod 0775", "is writable by its group or others (mode 0775)", "chmod -R go-w"),
    ("staging", "chmod 0757", "is writable by its group or others (mode 0757)", "chmod -R go-w"),
    ("slots", "chmod 0777", "is writable by its group or others (mode 0777)", "chmod -R go-w"),
    ("trusted", "chown", "is owned by nobody, not root", "chown -R root: "),
    ("", "chown", "is owned by nobody, not root", "chown -R root: "),
], ids=["store-group-writable", "staging-other-writable", "slots-world-writable", "trusted-foreign", "store-foreign"])
def test_store_dir_others_can_write_is_refused(store: Path, good_pkg: Path, pub: Path, name: str, change: str,
                                               problem: str, fix: str) -> None:
    assert os.geteuid() == 0, "these tests play root, as the board's install runs: run them as root"
    path = Path(_real(store)) / name if name else Path(_real(store))
    if change == "chown":
        os.chown(path, FOREIGN_UID, -1)
    else:
        path.chmod(int(change.split()[1], 8))
    before = current(store)
    slots = sorted(os.listdir(store / "slots"))

    err = install_fails(good_pkg, store)
    message = str(err)
    assert err.step == "extract" and f"{path} {problem}" in message, message
    assert fix in message and str(Path(_real(store))) in message and "install-agent.sh" in message
    assert err.current == before.split("/", 1)[1]
    with pytest.raises(AgentError, match="refusing"):
        store_mod.trust(pub, store)
    assert current(store) == before and sorted(os.listdir(store / "slots")) == slots
    assert not list((store / "staging").iterdir())


def test_store_under_a_directory_others_can_write_is_refused(base_store: Path, good_pkg: Path, pub: Path,
                                                             tmp_path: Path) -> None:
    """Whoever can write a directory above the store can rename the store away and put their own there."""
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    store = open_dir / "store"
    shutil.copytree(base_store, store, symlinks=True)
    open_dir.chmod(0o777)
    err = install_fails(good_pkg, store)
    assert f"{open_dir}, above it, is writable by its group or others (mode 0777)" in str(err)
    assert f"chmod go-w {open_dir}" in str(err)
    # With the sticky bit (as /tmp), nobody may rename another's entry: the store is safe there.
    open_dir.chmod(0o1777)
    assert store_mod.trust(pub, store).added is False
    assert store_mod.install(good_pkg, store, profile=this_board_profile()).ok


def test_explicit_trust_dir_others_can_write_is_refused(store: Path, good_pkg: Path, pub: Path,
                                                        tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert store_mod.trust(pub, trust_dir=keys).added
    keys.chmod(0o777)
    before = current(store)
    with pytest.raises(store_mod.InstallError, match=r"is writable by its group or others \(mode 0777\)") as info:
        store_mod.install(good_pkg, store, trust_dir=keys, profile=this_board_profile())
    assert info.value.step == "extract" and str(keys) in str(info.value)
    with pytest.raises(AgentError, match="refusing"):
        store_mod.trust(pub, trust_dir=keys)
    assert current(store) == before


# --- (c) a slot changed between its rename and the self-check -------------------------------------------


@pytest.mark.parametrize("attack", ["model-altered", "manifest-altered", "slot-swapped-for-a-link"])
def test_slot_changed_after_its_rename_is_caught(store: Path, good_pkg: Path, tmp_path: Path, attack: str) -> None:
    """Whatever changes the new slot after it was verified and moved into slots/ (a writer of the store
    racing the install) is caught before the self-check loads it: the install is rolled back and the board
    keeps running its previous model."""
    before = current(store)
    slots_before = set(os.listdir(store / "slots"))
    moved = tmp_path / "swapped-slot"
    seen: list[str] = []

    def tamper(step: str) -> None:
        if step != "self-check":
            return
        (new,) = set(os.listdir(store / "slots")) - slots_before
        seen.append(new)
        slot = store / "slots" / new
        if attack == "model-altered":
            with open(slot / "model.so", "ab") as f:
                f.write(b"\x90")
        elif attack == "manifest-altered":
            raw = json.loads((slot / "manifest.json").read_bytes())
            raw["reference"]["atol"] = 1e9  # would make any output pass the self-check
            (slot / "manifest.json").write_text(json.dumps(raw))
        else:
            shutil.copytree(slot, moved, symlinks=True)
            shutil.rmtree(slot)
            os.symlink(moved, slot)

    with pytest.raises(store_mod.InstallError) as info:
        store_mod.install(good_pkg, store, profile=this_board_profile(), on_step=tamper)
    err = info.value
    assert seen, "the install never reached its self-check"
    assert err.step == "self-check" and err.rolled_back and "\n" not in str(err)
    assert "the new slot changed after it was verified" in str(err), str(err)
    assert err.self_check is None  # nothing was loaded
    assert err.current == before.split("/", 1)[1] and current(store) == before
    assert set(os.listdir(store / "slots")) == slots_before
    if attack == "slot-swapped-for-a-link":
        assert (moved / "model.so").is_file()  # the link went, not what it led to
    assert store_mod.run_selfcheck_process(store / "current").ok


def test_rollback_hashes_the_previous_slot_again(store: Path, good_pkg: Path) -> None:
    first = current(store).split("/", 1)[1]
    second = store_mod.install(good_pkg, store, profile=this_board_profile())
    with open(store / "slots" / first / "model.so", "ab") as f:
        f.write(b"\x90")
    with pytest.raises(AgentError, match=r"previous package .* is damaged: model.so does not match its sha256"):
        store_mod.rollback(store)
    assert current(store) == f"slots/{second.slot}"
