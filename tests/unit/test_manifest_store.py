"""Package manifest, signing and the board's store: install, refusals, rollback, crash safety.

No network: packages are made from a natively compiled tiny CNN and installed into temporary stores
with this machine as the board (its profile is given explicitly).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from device_agent import store as store_mod
from device_agent.errors import AgentError
from device_agent.install_cli import COMMANDS
from device_agent.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    compatibility_problem,
    required_features,
)
from host.errors import EdgetuneError
from host.package import init_keys, load_signing_key, package, read_package_manifest
from tests.helpers_build import make_build_dir, this_board_profile
from tests.helpers_package import (
    assert_unchanged,
    current,
    install_fails,
    make_pkg,
    members,
    repack,
)

REPO = Path(__file__).resolve().parents[2]
A72 = {"arch": "aarch64", "cpu": "Cortex-A72", "features": ["fp", "asimd", "neon", "crc32", "cpuid"], "os": "linux"}
A72_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}


# --- manifest ---------------------------------------------------------------------------------------


def test_manifest_round_trip_is_canonical(good_pkg: Path) -> None:
    manifest = read_package_manifest(good_pkg)
    data = manifest.to_json()
    assert Manifest.from_json(data) == manifest
    raw = json.loads(data)
    assert list(raw) == sorted(raw)
    assert raw["format"] == 1 and raw["reference"]["rtol"] == 1e-4 and raw["latency_ms"] == 1.5
    assert set(raw["files"]) == {"model.so", "reference/input.npz", "reference/output.npz",
                                 "log/database_workload.json", "log/database_tuning_record.json", "log/session.json"}


def test_manifest_refuses_unknown_format_and_garbage(good_pkg: Path) -> None:
    raw = json.loads(read_package_manifest(good_pkg).to_json())
    with pytest.raises(AgentError, match="format 2.*update edgetune-agent"):
        Manifest.from_json(json.dumps({**raw, "format": 2}).encode())
    with pytest.raises(AgentError, match="not valid JSON"):
        Manifest.from_json(b"{nope")
    broken = dict(raw)
    del broken["target"]
    with pytest.raises(AgentError, match="lacks 'target'"):
        Manifest.from_json(json.dumps(broken).encode())
    with pytest.raises(AgentError, match="unsafe path"):
        Manifest.from_json(json.dumps({**raw, "files": {**raw["files"], "log/../../x": "0" * 64}}).encode())
    with pytest.raises(AgentError, match="unexpected file"):
        Manifest.from_json(json.dumps({**raw, "files": {**raw["files"], "run.sh": "0" * 64}}).encode())


def test_compatibility_rules() -> None:
    sve = {**A72_TARGET, "mattr": ["+neon", "+sve"]}
    assert required_features(sve) == ["neon", "sve"]
    assert compatibility_problem(A72_TARGET, A72) is None
    assert compatibility_problem(sve, A72) == (
        "package needs sve, this board (Cortex-A72) lacks it: rebuild for this board's target")
    assert "built for aarch64" in (compatibility_problem(A72_TARGET, this_board_profile()) or "")
    # a CPU name implies features: Cortex-A76 code may use dot product instructions
    assert "needs dotprod" in (compatibility_problem({**A72_TARGET, "mcpu": "cortex-a76"}, A72) or "")
    no_avx512 = {"arch": "x86_64", "cpu": "old x86", "features": ["sse4_2", "avx2"]}
    assert "needs avx512f" in (compatibility_problem(
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2}, no_avx512) or "")
    assert compatibility_problem({"mtriple": "armv7l-linux-gnueabihf", "mattr": ["+neon", "+v7"]},
                                 {"arch": "armv7l", "features": ["neon", "vfpv4"]}) is None
    assert "android" in (compatibility_problem({"mtriple": "aarch64-linux-android"}, A72) or "")


# --- keys and packaging -----------------------------------------------------------------------------


def test_keys_init_refuses_overwrite_and_is_private(tmp_path: Path) -> None:
    info = init_keys(tmp_path / "k" / "signing_key")
    assert stat.S_IMODE(os.stat(info.path).st_mode) == 0o600
    assert info.public_key.startswith("ssh-ed25519 ")
    assert Path(info.public_path).read_text().strip() == info.public_key
    with pytest.raises(EdgetuneError, match="already exists.*--force"):
        init_keys(info.path)
    again = init_keys(info.path, force=True)
    assert again.public_key != info.public_key
    with pytest.raises(EdgetuneError, match="run `edgetune keys init`"):
        load_signing_key(tmp_path / "missing")


def test_package_errors_say_what_to_do(tmp_path: Path, signing_key: Path, log_dir: Path) -> None:
    with pytest.raises(EdgetuneError, match="no build.json: run `edgetune build"):
        package(tmp_path, log_dir, tmp_path / "x.etpkg", key_path=signing_key)
    out = make_build_dir(tmp_path / "out")
    with pytest.raises(EdgetuneError, match="tuning log .* not found"):
        package(out, tmp_path / "nolog", tmp_path / "x.etpkg", key_path=signing_key)
    with pytest.raises(EdgetuneError, match="run `edgetune keys init`"):
        package(out, log_dir, tmp_path / "x.etpkg", key_path=tmp_path / "nokey")
    assert not (tmp_path / "x.etpkg").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_package_layout(good_pkg: Path) -> None:
    names = [name for name, _ in members(good_pkg)]
    assert names[:2] == [MANIFEST_NAME, SIGNATURE_NAME]
    assert set(names[2:]) == set(read_package_manifest(good_pkg).files)


# --- install ----------------------------------------------------------------------------------------


def test_install_good_package(base_store: Path) -> None:
    status = store_mod.status(base_store)
    assert status.current and status.model_name == "tiny_cnn" and status.key == "test-board"
    assert status.self_check_ok is True and status.p50_ms and status.p50_ms > 0
    assert status.max_abs_err is not None and status.max_abs_err <= 1e-4
    check = store_mod.run_selfcheck_process(base_store / "current")
    assert check.ok, check.error


def test_tampered_model_is_refused(store: Path, good_pkg: Path, tmp_path: Path) -> None:
    before = current(store)
    files = [(n, d[:-1] + bytes([d[-1] ^ 1]) if n == "model.so" else d) for n, d in members(good_pkg)]
    err = install_fails(repack(files, tmp_path / "t.etpkg"), store)
    assert err.step == "files" and "model.so does not match its sha256" in str(err)
    assert_unchanged(store, before, run=True)


def test_tampered_manifest_is_refused(store: Path, good_pkg: Path, tmp_path: Path) -> None:
    before = current(store)
    files = [(n, d.replace(b"test-board", b"evil-board") if n == MANIFEST_NAME else d) for n, d in members(good_pkg)]
    err = install_fails(repack(files, tmp_path / "t.etpkg"), store)
    assert err.step == "signature" and "altered after it was signed" in str(err)
    assert_unchanged(store, before)


def test_flipped_byte_in_package_file_is_refused(store: Path, good_pkg: Path, tmp_path: Path) -> None:
    before = current(store)
    data = bytearray(good_pkg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flip.etpkg"
    bad.write_bytes(bytes(data))
    err = install_fails(bad, store)
    assert "damaged" in str(err) or "sha256" in str(err)
    assert_unchanged(store, before)


def test_unsigned_package_is_refused(store: Path, good_pkg: Path, tmp_path: Path) -> None:
    before = current(store)
    files = [(n, d) for n, d in members(good_pkg) if n != SIGNATURE_NAME]
    err = install_fails(repack(files, tmp_path / "u.etpkg"), store)
    assert err.step == "signature" and "not signed" in str(err)
    assert_unchanged(store, before)


def test_package_signed_by_untrusted_key_is_refused(store: Path, work: Path, log_dir: Path, tmp_path: Path) -> None:
    before = current(store)
    other = Path(init_keys(tmp_path / "other_key").path)
    pkg = make_pkg(tmp_path, "wrongkey", other, log_dir)
    err = install_fails(pkg, store)
    assert err.step == "signature" and "not in" in str(err) and "edgetune-agent trust" in str(err)
    assert_unchanged(store, before)


def test_empty_trust_dir_is_explained(tmp_path: Path, good_pkg: Path) -> None:
    err = install_fails(good_pkg, tmp_path / "fresh")
    assert "no trusted keys" in str(err) and "edgetune-agent trust" in str(err)


def test_other_architecture_is_refused(store: Path, signing_key: Path, log_dir: Path, tmp_path: Path) -> None:
    before = current(store)
    pkg = make_pkg(tmp_path, "arm", signing_key, log_dir, declared_target=A72_TARGET)
    err = install_fails(pkg, store)
    assert err.step == "compatibility" and "built for aarch64" in str(err) and "rebuild" in str(err)
    assert_unchanged(store, before)


def test_sve_package_on_a72_board_is_refused(store: Path, signing_key: Path, log_dir: Path, tmp_path: Path) -> None:
    before = current(store)
    sve = {**A72_TARGET, "mattr": ["+neon", "+sve"]}
    pkg = make_pkg(tmp_path, "sve", signing_key, log_dir, declared_target=sve)
    err = install_fails(pkg, store, profile=A72)
    assert str(err) == "package needs sve, this board (Cortex-A72) lacks it: rebuild for this board's target"
    assert_unchanged(store, before)


def test_truncated_package_is_refused(store: Path, good_pkg: Path, tmp_path: Path) -> None:
    before = current(store)
    data = good_pkg.read_bytes()
    for i, cut in enumerate((len(data) // 2, len(data) - 100, 400)):
        partial = tmp_path / f"cut{i}.etpkg"
        partial.write_bytes(data[:cut])
        err = install_fails(partial, store)
        assert "incomplete" in str(err) or "damaged" in str(err) or "cut off" in str(err)
    part = tmp_path / "upload.etpkg.part"
    part.write_bytes(data)
    assert "unfinished upload" in str(install_fails(part, store))
    assert_unchanged(store, before)


def test_unsafe_members_are_refused(store: Path, good_pkg: Path, tmp_path: Path) -> None:
    before = current(store)
    files = members(good_pkg)
    err = install_fails(repack(files[:2] + [("../evil", b"x")] + files[2:], tmp_path / "a.etpkg"), store)
    assert "unsafe path" in str(err)
    err = install_fails(repack(files[:2] + [("log/extra.txt", b"x")] + files[2:], tmp_path / "b.etpkg"), store)
    assert "does not list" in str(err)
    link = tmp_path / "c.etpkg"
    with tarfile.open(link, "w:gz") as tar:
        for name, data in files[:2]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("model.so")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    assert "link" in str(install_fails(link, store))
    assert not (tmp_path / "evil").exists() and not (store / "evil").exists()
    assert_unchanged(store, before)


def test_failed_self_check_rolls_back(store: Path, signing_key: Path, log_dir: Path, tmp_path: Path) -> None:
    before = current(store)
    pkg = make_pkg(tmp_path, "wrong-output", signing_key, log_dir, alter_expected=True)
    err = install_fails(pkg, store)
    assert err.step == "self-check" and err.rolled_back
    assert "differs from the reference" in str(err) and "rolled back" in str(err)
    assert err.current == before.split("/", 1)[1]
    assert err.self_check is not None and err.self_check.max_abs_err is not None and err.self_check.max_abs_err > 0.5
    assert_unchanged(store, before, run=True)


def test_rollback_swaps_current_and_previous(store: Path, good_pkg: Path) -> None:
    first = current(store).split("/", 1)[1]
    second = store_mod.install(good_pkg, store, profile=this_board_profile())
    assert second.previous == first
    back = store_mod.rollback(store)
    assert (back.current, back.previous) == (first, second.slot)
    assert store_mod.status(store).current == first
    forth = store_mod.rollback(store)
    assert (forth.current, forth.previous) == (second.slot, first)


def test_rollback_without_previous(store: Path) -> None:
    with pytest.raises(AgentError, match="nothing to roll back to"):
        store_mod.rollback(store)


def test_old_slots_are_pruned(store: Path, good_pkg: Path) -> None:
    slots = [current(store).split("/", 1)[1]]
    for _ in range(3):
        slots.append(store_mod.install(good_pkg, store, profile=this_board_profile()).slot)
    left = sorted(p.name for p in (store / "slots").iterdir())
    assert left == sorted(slots[-3:])
    assert store_mod.status(store).previous == slots[-2]


def test_trust_adds_key_once(tmp_path: Path, signing_key: Path) -> None:
    pub = signing_key.with_name(signing_key.name + ".pub")
    first = store_mod.trust(pub, tmp_path / "s")
    assert first.added and Path(first.path).parent == tmp_path / "s" / "trusted"
    assert not store_mod.trust(pub, tmp_path / "s").added
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    with pytest.raises(AgentError, match="not an ed25519 public key"):
        store_mod.trust(junk, tmp_path / "s")


# --- crash safety -----------------------------------------------------------------------------------

_CRASHING_INSTALL = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
from device_agent import store
crash_at = sys.argv[1]
def on_step(step):
    if step == crash_at:
        os.kill(os.getpid(), signal.SIGKILL)
store.install(sys.argv[2], sys.argv[3], profile=json.loads(sys.argv[4]), on_step=on_step)
"""


@pytest.mark.parametrize("crash_at", store_mod.STEPS)
def test_power_loss_at_any_step_leaves_a_working_current(store: Path, good_pkg: Path, crash_at: str) -> None:
    before = current(store)
    script = _CRASHING_INSTALL.format(repo=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script, crash_at, str(good_pkg), str(store),
                           json.dumps(this_board_profile())], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    after = current(store)
    if store_mod.STEPS.index(crash_at) <= store_mod.STEPS.index("switch"):
        assert after == before
    else:
        assert after != before
    assert store_mod.run_selfcheck_process(store / "current").ok
    # The next install cleans up what the crash left and succeeds.
    result = store_mod.install(good_pkg, store, profile=this_board_profile())
    assert not list((store / "staging").iterdir())
    assert current(store) == f"slots/{result.slot}"
    assert len(list((store / "slots").iterdir())) <= store_mod.KEEP_SLOTS


# --- command line -----------------------------------------------------------------------------------


@pytest.fixture()
def agent_cli() -> click.Group:
    group = click.Group("edgetune-agent")
    for command in COMMANDS:
        group.add_command(command)
    return group


def test_cli_install_json_and_status(agent_cli: click.Group, store: Path, signing_key: Path, log_dir: Path,
                                     tmp_path: Path) -> None:
    runner = CliRunner()
    pkg = make_pkg(tmp_path, "arm", signing_key, log_dir, declared_target=A72_TARGET)
    result = runner.invoke(agent_cli, ["install", str(pkg), "--store", str(store), "--json"])
    assert result.exit_code == 1
    answer = json.loads(result.stdout)
    assert answer["ok"] is False and answer["step"] == "compatibility" and answer["current"]
    result = runner.invoke(agent_cli, ["status", "--store", str(store), "--json"])
    assert result.exit_code == 0
    status = json.loads(result.stdout)
    assert status["current"] == answer["current"] and status["model_name"] == "tiny_cnn"
    result = runner.invoke(agent_cli, ["status", "--store", str(store)])
    assert "tiny_cnn" in result.stdout and "self-check passed" in result.stdout
    for command in COMMANDS:
        assert "Example" in (command.help or "")
