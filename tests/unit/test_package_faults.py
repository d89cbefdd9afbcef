"""Hostile packages against the board's store: each is refused with a one-line error, in bounded memory
and time, writes nothing outside the store's staging/, and leaves ``current`` a working package.

The packages are built here, byte by byte where tarfile would not write them. Each batch is installed by
a child process (PROBE) that measures the memory peak of every install with tracemalloc, and runs under
an RLIMIT_FSIZE: a store that writes a file past it gets EFBIG ("File too large") instead of filling
the disk. The figures (time to refuse, memory peak) are printed (``pytest -s``). No network.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import random
import secrets
import subprocess
import sys
import tarfile
import time
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import click
import pytest
from click.testing import CliRunner

from device_agent import store as store_mod
from device_agent.errors import AgentError
from device_agent.install_cli import COMMANDS
from device_agent.manifest import MANIFEST_NAME, SIGNATURE_NAME
from tests.helpers_build import this_board_profile
from tests.helpers_package import (
    current,
    install_fails,
    members,
    repack,
    resign,
    sign_manifest,
    signed_members,
)

REPO = Path(__file__).resolve().parents[2]
# What one refused install may cost: tracemalloc's peak, and the growth of the child's resident set.
PEAK_LIMIT_MB = 64.0
# No file the store writes for these packages may grow past this (the good package's biggest file,
# model.so, is ~0.5 MB); a write past it fails with EFBIG.
FILE_SIZE_LIMIT = 16 << 20
# What the bombs claim: 200 MB of one byte compresses to ~200 KB.
BOMB_BYTES = 200 << 20
FUZZ_BUDGET_SEC = 60.0

_PROBE = r"""
import json, resource, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
from device_agent import store

def high_water_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

store_dir, profile = sys.argv[3], json.loads(sys.argv[4])
base = high_water_kb()
tracemalloc.start()
for pkg in sys.argv[5:]:
    before = store.status(store_dir).current
    tracemalloc.reset_peak()
    start = time.monotonic()
    try:
        answer = {"ok": True, "slot": store.install(pkg, store_dir, profile=profile).slot}
    except store.InstallError as err:
        answer = err.as_dict()
    except Exception as err:  # what the store let escape: the test fails on it, naming the package
        answer = {"ok": False, "crash": f"{type(err).__name__}: {err}"[:500]}
    answer.update(pkg=pkg, before=before, seconds=time.monotonic() - start,
                  peak_mb=tracemalloc.get_traced_memory()[1] / 2**20)
    print(json.dumps(answer), flush=True)
tracemalloc.stop()
print(json.dumps({"rss_growth_mb": (high_water_kb() - base) / 1024}), flush=True)
"""


@pytest.fixture()
def agent_cli() -> click.Group:
    group = click.Group("edgetune-agent")
    for command in COMMANDS:
        group.add_command(command)
    return group


# --- building hostile tars ----------------------------------------------------------------------------


def _header(name: bytes, size: int, typeflag: bytes = b"0", linkname: bytes = b"", gnu: bool = False) -> bytes:
    """One 512-byte tar header with a correct checksum, whatever it claims."""
    block = bytearray(512)
    block[0:len(name[:100])] = name[:100]
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1700000000
    block[156:157] = typeflag
    block[157:157 + len(linkname[:100])] = linkname[:100]
    block[257:265] = b"ustar  \0" if gnu else b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % 512)


def _entry(name: str, data: bytes = b"", typeflag: bytes = b"0", linkname: str = "") -> bytes:
    return _header(name.encode(), len(data), typeflag, linkname.encode()) + data + _pad(len(data))


def _pax(records: dict[str, str]) -> bytes:
    """A pax extended header ("x") holding ``records``."""
    body = b""
    for key, value in records.items():
        payload = f" {key}={value}\n".encode()
        length = len(payload) + 1
        while len(str(length)) + len(payload) != length:
            length = len(str(length)) + len(payload)
        body += str(length).encode() + payload
    return _header(b"././@PaxHeader", len(body), b"x") + body + _pad(len(body))


def _gnu_long_name(name: bytes) -> bytes:
    data = name + b"\0"
    return _header(b"././@LongLink", len(data), b"L", gnu=True) + data + _pad(len(data))


_END = b"\0" * 1024


def _head(files: list[tuple[str, bytes]]) -> bytes:
    """manifest.json and manifest.sig of ``files`` (from :func:`signed_members`) as tar entries."""
    return b"".join(_entry(name, data) for name, data in files[:2])


def _write_gz(dest: Path, parts: Iterable[bytes]) -> Path:
    """Compress ``parts`` into ``dest`` as one gzip stream, without holding them all in memory."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    with open(dest, "wb") as out:
        for part in parts:
            out.write(compressor.compress(part))
        out.write(compressor.flush())
    return dest


def _repeat(byte: bytes, total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    block = byte * chunk
    for start in range(0, total, chunk):
        yield block[: min(chunk, total - start)]


# --- running and checking ----------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (outside the store's staging/) with its content: files by sha256,
    links by target."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts[-1:] == ("staging",):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(rel_dir / name)
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def _probe(store: Path, pkgs: list[Path], timeout: float = 300, **env: str) -> list[dict[str, Any]]:
    """Install each of ``pkgs`` into ``store`` in one child process; its answers with their figures."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(REPO), str(FILE_SIZE_LIMIT), str(store),
         json.dumps(this_board_profile()), *map(str, pkgs)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **env},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    growth = answers.pop()["rss_growth_mb"]
    print(f"  resident set grew by {growth:.1f} MB over {len(answers)} installs")
    assert growth < PEAK_LIMIT_MB
    assert len(answers) == len(pkgs)
    return answers


def _assert_refused(answer: dict[str, Any], label: str, *expected: str) -> None:
    assert "crash" not in answer, (label, answer["crash"])
    assert answer["ok"] is False, (label, answer)
    # Python ignores SIGXFSZ: a write past RLIMIT_FSIZE fails with EFBIG, "File too large"
    assert "File too large" not in answer["error"], (label, f"wrote a file past {FILE_SIZE_LIMIT} bytes", answer)
    print(f"  {label}: refused at {answer['step']} in {answer['seconds'] * 1000:.1f} ms, "
          f"memory peak {answer['peak_mb']:.2f} MB: {answer['error']}")
    assert answer["error"] and "\n" not in answer["error"], (label, answer)
    assert answer["current"] == answer["before"], (label, answer)
    assert answer["peak_mb"] < PEAK_LIMIT_MB, (label, answer)
    for text in expected:
        assert text in answer["error"], (label, answer)


def _assert_intact(store: Path, tree_before: dict[str, str], root: Path) -> None:
    """Nothing under ``root`` changed outside staging/, staging/ is empty, ``current`` still passes its
    self-check."""
    assert _tree(root) == tree_before
    assert not list((store / "staging").iterdir())
    check = store_mod.run_selfcheck_process(store / "current")
    assert check.ok, check.error


def _run_refused(store: Path, root: Path, cases: dict[str, tuple[Path, tuple[str, ...]]], **env: str) -> None:
    """Install every case (label -> (package, texts its error holds)); each must be refused."""
    tree = _tree(root)
    answers = _probe(store, [pkg for pkg, _ in cases.values()], **env)
    for (label, (_, expected)), answer in zip(cases.items(), answers):
        _assert_refused(answer, label, *expected)
    _assert_intact(store, tree, root)


# --- bombs before the signature ----------------------------------------------------------------------


def test_gnu_long_name_and_pax_header_bombs(store: Path, good_pkg: Path, signing_key: Path, tmp_path: Path) -> None:
    head = _head(signed_members(good_pkg, signing_key))
    gnu = _write_gz(tmp_path / "longname.etpkg", [
        _header(b"././@LongLink", BOMB_BYTES, b"L", gnu=True), *_repeat(b"A", BOMB_BYTES), _pad(BOMB_BYTES),
        head, _END])
    pax = _write_gz(tmp_path / "pax.etpkg", [
        head, _header(b"././@PaxHeader", BOMB_BYTES, b"x"), *_repeat(b"A", BOMB_BYTES), _pad(BOMB_BYTES),
        _entry("model.so", b"x"), _END])
    # one pax header after another: tarfile recurses once per header
    chained = _write_gz(tmp_path / "chained.etpkg", [head, *(_pax({"comment": "x"}) for _ in range(5000)), _END])
    for pkg in (gnu, pax):
        assert pkg.stat().st_size < 300_000
    _run_refused(store, tmp_path, {
        "GNU long name of 200 MB": (gnu, ("long-name header", "bytes")),
        "pax header of 200 MB": (pax, ("pax header", "bytes")),
        "5,000 chained pax headers": (chained, ("extended header",)),
    })


def test_package_of_200k_entries(store: Path, good_pkg: Path, signing_key: Path, tmp_path: Path) -> None:
    head = _head(signed_members(good_pkg, signing_key))
    dirs = (_header(b"d%06d/" % i, 0, b"5") for i in range(200_000))
    pkg = _write_gz(tmp_path / "entries.etpkg", [head, *dirs, _END])
    print(f"  200,000 entries: {pkg.stat().st_size / 1e3:.0f} KB package")
    _run_refused(store, tmp_path, {"200,000 directory entries": (pkg, ("more than", "members"))})


def test_file_bigger_than_its_signed_size(store: Path, good_pkg: Path, signing_key: Path, tmp_path: Path) -> None:
    """The tar's model.so holds 200 MB more than the signed manifest states; nothing past the stated size
    is written (and, for a manifest without sizes, nothing past the unpacked cap)."""

    def huge_model(files: list[tuple[str, bytes]], dest: Path) -> Path:
        parts: list[Any] = [_head(files)]
        for name, data in files[2:]:
            if name == "model.so":
                size = len(data) + BOMB_BYTES
                parts += [_header(b"model.so", size), data, *_repeat(b"\0", BOMB_BYTES), _pad(size)]
            else:
                parts.append(_entry(name, data))
        return _write_gz(dest, [*parts, _END])

    signed = huge_model(signed_members(good_pkg, signing_key), tmp_path / "huge-signed.etpkg")
    # A package from before sizes were signed (edgetune package signs them now).
    unsized = huge_model(signed_members(good_pkg, signing_key, lambda raw: raw.pop("sizes", None), sizes=False),
                         tmp_path / "huge-unsized.etpkg")
    _run_refused(store, tmp_path, {
        "model.so 200 MB past its signed size": (signed, ("model.so", "signed manifest")),
        "model.so of 200 MB, no signed sizes": (unsized, ("more than",)),
    }, EDGETUNE_MAX_UNPACKED_BYTES=str(8 << 20))


@pytest.mark.parametrize("limit, value, signed_sizes, expected", [
    ("MAX_PACKAGE_BYTES", 1000, True, "more than the 1000 this board accepts"),
    ("MAX_UNPACKED_BYTES", 100_000, True, "add up to"),
    ("free disk", 1000, True, "MB free: free some space"),
    ("free disk", 1000, False, "MB free: free some space"),
], ids=["package-size", "signed-total", "disk-signed", "disk-unsigned"])
def test_sizes_are_refused_before_anything_is_written(store: Path, good_pkg: Path, signing_key: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, limit: str, value: int,
                                                     signed_sizes: bool, expected: str) -> None:
    pkg = resign(good_pkg, signing_key, tmp_path / "p.etpkg") if signed_sizes else good_pkg
    before = current(store)
    if limit == "free disk":
        monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda _path: SimpleNamespace(free=value))
    else:
        monkeypatch.setattr(store_mod.config, limit, value)
    written: list[Path] = []
    real_write = store_mod._write_file
    monkeypatch.setattr(store_mod, "_write_file", lambda chunks, dest: written.append(dest) or real_write(chunks, dest))
    err = install_fails(pkg, store)
    assert expected in str(err)
    assert not written
    assert current(store) == before and not list((store / "staging").iterdir())


# --- what a package may hold ------------------------------------------------------------------------


def test_path_traversal_and_links(store: Path, good_pkg: Path, signing_key: Path, tmp_path: Path) -> None:
    files = signed_members(good_pkg, signing_key)
    head, rest = _head(files), b"".join(_entry(n, d) for n, d in files[2:])
    outside = tmp_path / "outside"
    outside.mkdir()
    absolute = Path("/tmp") / f"edgetune-evil-{secrets.token_hex(4)}"
    hostile = {
        "../ path": [_entry("../evil", b"x")],
        "absolute path": [_entry(f"{absolute}/evil", b"x")],
        "log/../../ path": [_entry("log/../../evil", b"x")],
        "symlink to /etc/passwd": [_entry("model.so", typeflag=b"2", linkname="/etc/passwd")],
        "symlink dir, then a file through it": [_entry("log", typeflag=b"2", linkname=str(outside)),
                                                _entry("log/session.json", b"x")],
        "hardlink to /etc/passwd": [_entry("model.so", typeflag=b"1", linkname="/etc/passwd")],
        "hardlink to manifest.json": [_entry("model.so", typeflag=b"1", linkname=MANIFEST_NAME)],
        "pax path ../": [_pax({"path": "../evil"}), _entry("model.so", b"x")],
        "GNU long name ../": [_gnu_long_name(b"../" * 37 + b"evil"), _entry("model.so", b"x")],
        "name of 300 bytes": [_pax({"path": "log/" + "a" * 296}), _entry("model.so", b"x")],
        "FIFO": [_entry("model.so", typeflag=b"6")],
        "pax global header": [_header(b"pax_global_header", 0, b"g")],
        "GNU sparse file": [_header(b"model.so", 0, b"S")],
    }
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}
    for i, (label, entries) in enumerate(hostile.items()):
        pkg = _write_gz(tmp_path / f"path{i}.etpkg", [head, *entries, rest, _END])
        cases[label] = (pkg, ("refusing it",))
    _run_refused(store, tmp_path, cases)
    assert not absolute.exists()
    assert not list(outside.iterdir())


def test_hostile_json(store: Path, good_pkg: Path, signing_key: Path, tmp_path: Path) -> None:
    files = signed_members(good_pkg, signing_key)
    manifest = files[0][1]
    assert b'"board": null' in manifest

    def with_sig(sig: bytes, name: str) -> Path:
        return repack([files[0], (SIGNATURE_NAME, sig), *files[2:]], tmp_path / name)

    def signed(change: Any, name: str) -> Path:
        return resign(good_pkg, signing_key, tmp_path / name, change)

    def signed_text(text: bytes, name: str) -> Path:
        """A manifest json.dumps could not write (3,000 levels), signed as it is."""
        return repack([(MANIFEST_NAME, text), (SIGNATURE_NAME, sign_manifest(text, signing_key)), *files[2:]],
                      tmp_path / name)

    deep_dict: dict[str, Any] = {}
    for _ in range(500):
        deep_dict = {"x": deep_dict}
    _run_refused(store, tmp_path, {
        "manifest.sig of 100,000 '['": (with_sig(b"[" * 100_000, "sig-deep.etpkg"), ("manifest.sig", "bytes")),
        "manifest.sig of 3,000 '['": (with_sig(b"[" * 3000, "sig-3000.etpkg"), ("signature",)),
        "manifest.sig of a 3,000-digit number": (with_sig(b"9" * 3000, "sig-digits.etpkg"), ("signature",)),
        "manifest.sig not UTF-8": (with_sig(b"\xff\xfe{}", "sig-binary.etpkg"), ("signature",)),
        "signed manifest nested 3,000 deep": (signed_text(
            manifest.replace(b'"board": null', b'"board": ' + b"[" * 3000 + b"]" * 3000), "deep.etpkg"), ("manifest",)),
        "signed manifest with a target 500 deep": (
            signed(lambda raw: raw["target"].update(x=deep_dict), "deep-target.etpkg"), ("manifest",)),
        "signed manifest with reference [1]": (signed(lambda raw: raw.update(reference=[1]), "ref.etpkg"),
                                               ("manifest",)),
        "signed manifest with a 5,000-digit latency": (signed_text(
            manifest.replace(b'"latency_ms": 1.5', b'"latency_ms": ' + b"9" * 5000), "digits.etpkg"), ("manifest",)),
        "signed manifest of 1 MB": (signed(lambda raw: raw.update(board={"x": "y" * (1 << 20)}), "big.etpkg"),
                                    ("manifest",)),
        "signed sizes that are not numbers": (
            signed(lambda raw: raw["sizes"].update({"model.so": "huge"}), "sizes.etpkg"), ("manifest",)),
    })


def test_cli_answers_json_for_a_signature_bomb(store: Path, good_pkg: Path, tmp_path: Path) -> None:
    """`edgetune-agent install --json` prints its answer and exits 1: never a traceback (exit 2)."""
    files = members(good_pkg)
    pkg = repack([files[0], (SIGNATURE_NAME, b"[" * 100_000), *files[2:]], tmp_path / "sig.etpkg")
    before = current(store)
    proc = subprocess.run([sys.executable, "-m", "device_agent.cli", "install", str(pkg), "--store", str(store),
                           "--json"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] is False and answer["step"] == "extract" and "manifest.sig" in answer["error"]
    assert "\n" not in answer["error"]
    assert answer["current"] == before.split("/", 1)[1] == store_mod.status(store).current


def test_cli_answers_json_for_an_internal_error(agent_cli: click.Group, store: Path, good_pkg: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(store_mod, "install", broken)
    result = CliRunner().invoke(agent_cli, ["install", str(good_pkg), "--store", str(store), "--json"])
    assert result.exit_code == 2
    answer = json.loads(result.stdout)
    assert answer["ok"] is False and "internal error" in answer["error"] and "a bug" in answer["error"]
    assert answer["current"] == store_mod.status(store).current


# --- fuzz -------------------------------------------------------------------------------------------


def _header_offsets(tar: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return [member.offset for member in archive]


def _mutants(files: list[tuple[str, bytes]], base: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """A few hundred packages, each a small change of the valid signed package ``base``."""
    tar = gzip.decompress(base)
    headers = _header_offsets(tar)
    for _ in range(50):
        cut = rng.randrange(len(base))
        yield f"cut at {cut}", base[:cut]
    for _ in range(70):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        yield "compressed bytes flipped", bytes(data)
    for _ in range(70):
        data = bytearray(tar)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        yield "tar bytes flipped", gzip.compress(bytes(data))
    for _ in range(30):
        data = bytearray(tar)
        at = rng.choice(headers)
        field = rng.choice([(124, 12), (0, 100), (156, 1), (345, 155)])
        value = rng.choice([b"%011o\0" % rng.randrange(8 ** 11), bytes(rng.randrange(256) for _ in range(field[1]))])
        data[at + field[0]: at + field[0] + field[1]] = value[: field[1]].ljust(field[1], b"\0")
        data[at + 148: at + 156] = b" " * 8
        data[at + 148: at + 156] = b"%06o\0 " % sum(data[at: at + 512])
        yield "tar header field changed, checksum right", gzip.compress(bytes(data))
    names = ["log/extra.json", "model.so", MANIFEST_NAME, SIGNATURE_NAME, "reference", "../x", "/x", "log//a",
             "reference/input.npz/x", "a" * 300, "log/./x", "log\\x"]
    for _ in range(80):
        mutant = list(files)
        kind = rng.choice(["add", "rename", "remove", "duplicate", "swap"])
        i = rng.randrange(len(mutant))
        if kind == "add":
            mutant.insert(rng.randrange(len(mutant) + 1), (rng.choice(names), rng.randbytes(rng.randrange(64))))
        elif kind == "rename":
            mutant[i] = (rng.choice([n for n in names if n != mutant[i][0]]), mutant[i][1])
        elif kind == "remove":
            del mutant[i]
        elif kind == "duplicate":
            mutant.insert(rng.randrange(len(mutant) + 1), mutant[i])
        else:  # the order of the files after the signature does not matter: move the manifest or its signature
            i, j = rng.randrange(2), rng.randrange(2, len(mutant))
            mutant[i], mutant[j] = mutant[j], mutant[i]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in mutant:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        yield f"member {kind}", buffer.getvalue()


def test_fuzzed_packages(store: Path, good_pkg: Path, signing_key: Path, tmp_path: Path) -> None:
    files = signed_members(good_pkg, signing_key)
    base = repack(files, tmp_path / "base.etpkg").read_bytes()
    fuzz = tmp_path / "fuzz"
    fuzz.mkdir()
    labels, pkgs = [], []
    for i, (label, data) in enumerate(_mutants(files, base, random.Random(20240517))):
        pkg = fuzz / f"m{i:03d}.etpkg"
        pkg.write_bytes(data)
        labels.append(label)
        pkgs.append(pkg)
    tree = _tree(tmp_path)
    start = time.monotonic()
    answers = _probe(store, pkgs, timeout=2 * FUZZ_BUDGET_SEC)
    seconds = time.monotonic() - start
    installed = []
    for label, answer in zip(labels, answers):
        assert "crash" not in answer, (label, answer["crash"])
        if answer["ok"]:
            # a change the package does not depend on (gzip header time, say): the signed content installed
            slot = store / "slots" / answer["slot"]
            assert (slot / MANIFEST_NAME).read_bytes() == files[0][1], label
            installed.append(label)
            continue
        assert answer["error"] and "\n" not in answer["error"], (label, answer)
        assert answer["current"] == answer["before"], (label, answer)
        assert answer["peak_mb"] < PEAK_LIMIT_MB, (label, answer)
    refused = [a for a in answers if not a["ok"]]
    steps = sorted({a["step"] for a in refused})
    print(f"  fuzz: {len(answers)} mutants in {seconds:.1f} s: {len(refused)} refused (steps {', '.join(steps)}), "
          f"{len(installed)} installed unchanged content {installed}; slowest refusal "
          f"{max(a['seconds'] for a in refused) * 1000:.1f} ms, highest memory peak "
          f"{max(a['peak_mb'] for a in answers):.2f} MB")
    assert seconds < FUZZ_BUDGET_SEC
    assert len(refused) >= len(answers) - 5
    if not installed:
        _assert_intact(store, tree, tmp_path)
    else:
        assert not list((store / "staging").iterdir())
        assert store_mod.run_selfcheck_process(store / "current").ok


# --- current never dangles; downgrades -----------------------------------------------------------------


def _failing_switch(monkeypatch: pytest.MonkeyPatch, restore_fails: bool) -> None:
    """The switch renames ``current`` onto the new slot, then its fsync fails (EIO); the restore of the old
    link fails too (EROFS) when ``restore_fails``."""
    real = store_mod._set_link
    calls: list[str] = []

    def flaky(store: Path, name: str, slot: str) -> None:
        if name != store_mod.CURRENT:
            return real(store, name, slot)
        calls.append(slot)
        if len(calls) == 1:
            real(store, name, slot)
            raise OSError(errno.EIO, "Input/output error")
        if restore_fails:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(store, name, slot)

    monkeypatch.setattr(store_mod, "_set_link", flaky)


def _assert_current_complete(store: Path) -> str:
    slot = store_mod.status(store).current
    assert slot is not None and (store / "slots" / slot).is_dir(), os.readlink(store / "current")
    assert store_mod._verify_slot_files(store / "slots" / slot, store_mod._slot_manifest(store, slot)) is None
    return slot


@pytest.mark.parametrize("restore_fails", [False, True], ids=["restored", "restore-fails"])
def test_failed_switch_never_leaves_current_dangling(store: Path, good_pkg: Path, monkeypatch: pytest.MonkeyPatch,
                                                     restore_fails: bool) -> None:
    before = current(store).split("/", 1)[1]
    _failing_switch(monkeypatch, restore_fails)
    err = install_fails(good_pkg, store)
    assert err.step == "switch" and "Input/output error" in str(err)
    slot = _assert_current_complete(store)
    assert err.current == slot
    if restore_fails:
        assert slot != before  # the new, self-checked package stayed: the old link could not come back
    else:
        assert slot == before and err.rolled_back
        assert sorted(p.name for p in (store / "slots").iterdir()) == [before]
    assert store_mod.run_selfcheck_process(store / "current").ok


def test_failed_first_switch_leaves_a_complete_current(tmp_path: Path, signing_key: Path, good_pkg: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "fresh"
    store_mod.trust(signing_key.with_name(signing_key.name + ".pub"), store)
    _failing_switch(monkeypatch, restore_fails=True)
    err = install_fails(good_pkg, store)
    assert err.step == "switch" and not err.rolled_back
    assert _assert_current_complete(store) == err.current


def test_failed_rollback_keeps_current(store: Path, good_pkg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_mod.install(good_pkg, store, profile=this_board_profile())
    before = current(store)
    real = store_mod._set_link

    def failing(store_dir: Path, name: str, slot: str) -> None:
        if name == store_mod.CURRENT:
            raise OSError(errno.EROFS, "Read-only file system")
        real(store_dir, name, slot)

    previous = store_mod.status(store).previous
    monkeypatch.setattr(store_mod, "_set_link", failing)
    with pytest.raises(AgentError, match="Read-only file system") as info:
        store_mod.rollback(store)
    assert "\n" not in str(info.value)
    assert current(store) == before and store_mod.status(store).previous == previous
    _assert_current_complete(store)


def _created(days_ago: float) -> Any:
    stamp = (datetime.now(timezone.utc) - timedelta(days=days_ago)).isoformat(timespec="seconds")
    return lambda raw: raw.update(created=stamp)


def test_older_package_is_refused_unless_allowed(store: Path, good_pkg: Path, signing_key: Path,
                                                 tmp_path: Path, agent_cli: click.Group) -> None:
    """Policy: a signed package built before the installed one is refused (a captured old package cannot
    be replayed); `--allow-downgrade` installs it anyway, `rollback` returns to the previous slot."""
    before = current(store)
    old = resign(good_pkg, signing_key, tmp_path / "old.etpkg", _created(days_ago=30))
    err = install_fails(old, store)
    assert err.step == "compatibility" and "older than" in str(err) and "--allow-downgrade" in str(err)
    assert current(store) == before and not list((store / "staging").iterdir())
    result = CliRunner().invoke(agent_cli, ["install", str(old), "--store", str(store), "--json"])
    assert result.exit_code == 1 and "--allow-downgrade" in json.loads(result.stdout)["error"]
    result = CliRunner().invoke(agent_cli, ["install", str(old), "--store", str(store), "--json", "--allow-downgrade"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["ok"] and answer["previous"] == before.split("/", 1)[1]
    # a newer one needs no flag (the same one again neither: test_rollback_swaps_current_and_previous)
    newer = resign(good_pkg, signing_key, tmp_path / "new.etpkg", _created(days_ago=0))
    assert store_mod.install(newer, store, profile=this_board_profile()).ok
