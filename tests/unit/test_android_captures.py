"""Android phones, without a phone: the real captured outputs of phones in tests/fixtures/boards/ (Pixel 8 Pro
getprop and /proc/cpuinfo, POCO F6 getprop, `adb devices -l` with a Pixel 9 and a Xiaomi Mi 8) are fed to
the parsers, and to the adb commands through a runner that answers as those phones answered.

No phone ran any of this. Where a test needs the phone's shell to act on files (flash --adb), this
machine's /bin/sh and coreutils stand in for the phone's toybox (the same commands: mkdir -p, sha256sum,
cp -f, mv -f, rmdir); the files land in a temporary folder, not on a phone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import pytest

from device_agent.probe import parse_getprop
from host.android import connect as connect_mod
from host.android.adb import Adb, AdbResult, AndroidError, explain
from host.android.devices import (AdbDevice, WirelessPhone, merge_phones, parse_adb_devices,
                                  serial_from_instance)
from host.android.flash import PREVIOUS_SUFFIX, flash_phone, switch_command
from host.android.phone import phone_from_texts, phone_info
from host.android.phones import RecordedPhone, android_api_for, record_phone, recorded_phones, recorded_target
from host.discovery.browse import Board
from host.errors import EdgetuneError

from tests.helpers_android import (MI8_ADB, PIXEL8_CPUINFO, PIXEL8_GETPROP, PIXEL8_SERIAL, PIXEL9_ADB, POCO_GETPROP,
                                   android_package)


@pytest.fixture(autouse=True)
def phones_dir(tmp_path, monkeypatch):
    """Recorded phones go to a fresh folder; no NDK and no API override from the environment."""
    folder = tmp_path / "phones"
    monkeypatch.setenv("EDGETUNE_ANDROID_DIR", str(folder))
    for name in ("ANDROID_NDK_HOME", "TVM_NDK_CC", "EDGETUNE_ANDROID_API"):
        monkeypatch.delenv(name, raising=False)
    return folder


class CapturedPhone:
    """An adb runner that answers as the captured phone did. Records every command it is given.

    With ``shell``, ``adb push`` copies to the path given (tests give folders inside tmp_path) and any
    other ``adb shell`` command runs under this machine's /bin/sh.
    """

    def __init__(self, serial: str, getprop: str, cpuinfo: str, shell: bool = False,
                 answers: dict[tuple[str, ...], AdbResult] | None = None) -> None:
        self.serial = serial
        self.getprop, self.cpuinfo, self.shell = getprop, cpuinfo, shell
        self.answers = answers or {}
        self.calls: list[list[str]] = []
        self.corrupt: str | None = None  # a pushed file name whose copy gets one byte flipped

    def __call__(self, args: Sequence[str], timeout: float) -> AdbResult:
        args = list(args)
        self.calls.append(args)
        assert timeout > 0
        ok = lambda out="": AdbResult(tuple(args), 0, out, "")  # noqa: E731
        if tuple(args) in self.answers:
            return self.answers[tuple(args)]
        if args[:2] != ["-s", self.serial]:
            return AdbResult(tuple(args), 1, "", f"error: device '{args[1] if len(args) > 1 else ''}' not found\n")
        cmd = args[2:]
        if cmd == ["get-state"]:
            return ok("device\n")
        if cmd == ["shell", "getprop"]:
            return ok(self.getprop)
        if cmd == ["shell", "cat /proc/cpuinfo"]:
            return ok(self.cpuinfo)
        if cmd == ["shell", "cat /proc/meminfo"]:
            return ok("")  # not captured for these phones: memory is reported as unknown
        if cmd[0] in ("reverse", "forward"):
            return ok()
        if cmd[0] == "push":
            if self.shell:
                shutil.copyfile(cmd[1], cmd[2])
                if self.corrupt and cmd[2].endswith("/" + self.corrupt):
                    data = bytearray(Path(cmd[2]).read_bytes())
                    data[0] ^= 0xFF
                    Path(cmd[2]).write_bytes(bytes(data))
            return ok(f"{cmd[1]}: 1 file pushed.\n")
        if cmd[0] == "shell" and self.shell:
            done = subprocess.run(["sh", "-c", cmd[1]], capture_output=True, text=True, timeout=timeout)
            return AdbResult(tuple(args), done.returncode, done.stdout, done.stderr)
        return ok()


# --- profiles from the captures --------------------------------------------------------------------

def test_pixel_8_pro_profile_from_its_getprop_and_cpuinfo():
    phone = phone_from_texts(PIXEL8_GETPROP, PIXEL8_CPUINFO, adb_serial=PIXEL8_SERIAL)
    info, profile = phone.info, phone.profile
    assert (info.model, info.device, info.soc, info.abi) == ("Google Pixel 8 Pro", "husky", "Tensor G3", "arm64-v8a")
    assert (info.api_level, info.release) == (36, "16")
    assert info.serial == PIXEL8_SERIAL  # this capture has no ro.serialno: the adb serial is kept
    assert (profile.os, profile.arch, profile.triple, profile.cores) == ("android", "aarch64", "aarch64-linux-android", 9)
    assert [(c.part, c.llvm_cpu, len(c.cpus)) for c in profile.clusters] == [
        ("0xd46", "cortex-a510", 4), ("0xd4d", "cortex-a715", 4), ("0xd4e", "cortex-x3", 1)]
    # The target is for the 4x A715 + 1x X3 (the A510s are the little cores), named by the A715.
    assert profile.target == {"kind": "llvm", "mtriple": "aarch64-linux-android", "mcpu": "cortex-a715",
                              "mattr": ["+neon", "+dotprod", "+fullfp16", "+i8mm", "+sve", "+sve2"], "num-cores": 5}
    assert profile.big_cores == (4, 5, 6, 7, 8)
    assert profile.cpu_model == "Tensor G3 (Cortex-X3 + Cortex-A715 + Cortex-A510)"
    assert profile.board_model == "Google Pixel 8 Pro"
    assert {"neon", "dotprod", "i8mm", "sve", "sve2"} <= set(profile.features)
    assert profile.memory_mb == 0
    board = phone.board()
    assert board["android_api"] == 36 and board["os"] == "android" and board["target"] == profile.target


def test_the_pixel_target_is_one_tvm_and_llvm_accept():
    from host.toolchain import check_target

    check_target(phone_from_texts(PIXEL8_GETPROP, PIXEL8_CPUINFO).profile.target)


def test_poco_f6_getprop_facts_and_a_profile_needs_its_cpuinfo():
    info = phone_info(POCO_GETPROP, "f89a5ec6")
    assert (info.model, info.device, info.soc, info.abi) == ("POCO F6", "peridot", "SM8635", "arm64-v8a")
    assert (info.serial, info.api_level, info.release) == ("f89a5ec6", 35, "15")
    # A value spanning lines (the boot reason history) is one property; the next line is parsed normally.
    props = parse_getprop(POCO_GETPROP)
    assert props["persist.sys.boot.reason.history"].splitlines()[1] == "shutdown,userrequested,1745815614"
    assert props["ro.board.platform"] == "pineapple"
    with pytest.raises(AndroidError, match=r"lists no processor.*adb shell cat /proc/cpuinfo"):
        phone_from_texts(POCO_GETPROP, "")


def test_text_that_is_not_getprop_is_refused():
    with pytest.raises(AndroidError, match="no ro.build.version.sdk"):
        phone_info(PIXEL8_CPUINFO)


# --- adb devices -l and mDNS names ---------------------------------------------------------------------

def test_adb_devices_captures_parse():
    (pixel,) = parse_adb_devices(PIXEL9_ADB)
    assert pixel == AdbDevice(serial="49281FDAQ0011J", state="device", usb="1-1", product="tokay", model="Pixel 9",
                              device="tokay", transport_id="1")
    assert pixel.transport == "usb"
    (mi8,) = parse_adb_devices(MI8_ADB)
    assert (mi8.serial, mi8.model, mi8.device, mi8.transport_id) == ("a0737173", "MI 8", "dipper", "2")
    assert parse_adb_devices("* daemon not running; starting now at tcp:5037\n* daemon started successfully\n"
                             "List of devices attached\n\n") == []


@pytest.mark.parametrize("name, serial", [
    ("adb-49281FDAQ0011J-AbCdEf._adb-tls-connect._tcp.local.", "49281FDAQ0011J"),
    ("adb-f6cae4c7-1xygO9._adb-tls-connect._tcp", "f6cae4c7"),
    ("adb-c62dac4f-4meRBj (2)._adb-tls-connect._tcp.local.", "c62dac4f"),
    ("adb-R5CX826Q9VB-IjsOKx", "R5CX826Q9VB"),
    ("living-room-tv._adb-tls-connect._tcp.local.", None),
    ("adb-\x1b[31mred-AbCdEf._adb-tls-connect._tcp.local.", None),
])
def test_serial_from_the_wireless_debugging_service_name(name, serial):
    assert serial_from_instance(name) == serial


def test_a_phone_seen_on_mdns_and_on_usb_is_one_row():
    wireless = [WirelessPhone("49281FDAQ0011J", "adb-49281FDAQ0011J-AbCdEf", ("192.168.1.23",), 37651)]
    usb = parse_adb_devices(PIXEL9_ADB) + parse_adb_devices(MI8_ADB)
    usb.append(AdbDevice(serial="192.168.1.23:37651", state="device"))  # the same Pixel after `adb connect`
    rows = merge_phones(wireless, usb, [], [])
    assert len(rows) == 2
    pixel = next(r for r in rows if r.serial == "49281FDAQ0011J").as_dict()
    assert pixel["android"] is True and pixel["os"] == "android" and pixel["agent"] is False
    assert sorted(pixel["transports"]) == ["usb", "wifi"]
    assert pixel["adb_serials"] == ["49281FDAQ0011J", "192.168.1.23:37651"]
    assert (pixel["addresses"], pixel["adb_port"], pixel["model"]) == (["192.168.1.23"], 37651, "Pixel 9")
    assert pixel["status"] == "not connected" and pixel["key"] == ""
    mi8 = next(r for r in rows if r.serial == "a0737173").as_dict()
    assert mi8["transports"] == ["usb"] and mi8["addresses"] == []


def test_a_connected_phone_takes_its_tvm_rpc_row_from_the_tracker():
    phone = phone_from_texts(PIXEL8_GETPROP, PIXEL8_CPUINFO, adb_serial=PIXEL8_SERIAL)
    rec = RecordedPhone(serial=PIXEL8_SERIAL, adb_serial=PIXEL8_SERIAL, key="android-husky", rpc_port=40111,
                        board=phone.board(), connected="2026-12-03T03:00:00+00:00")
    served = Board(name="127.0.0.1:40111", key="android-husky", addresses=["127.0.0.1"], rpc_port=40111,
                   status="free", agent=False)
    other = Board(name="127.0.0.1:40999", key="android-husky", addresses=["127.0.0.1"], rpc_port=40999,
                  status="busy", agent=False)
    usb = [AdbDevice(serial=PIXEL8_SERIAL, state="device", usb="1-1", model="Pixel 8 Pro")]
    rows = [r.as_dict() for r in merge_phones([], usb, [rec], [served, other])]
    assert [r["name"] for r in rows] == ["127.0.0.1:40999", "Pixel 8 Pro (android)"]
    pixel = rows[1]
    assert (pixel["key"], pixel["status"], pixel["rpc_port"]) == ("android-husky", "free", 40111)
    assert (pixel["cpu"], pixel["cores"], pixel["triple"]) == ("cortex-a715", 5, "aarch64-linux-android")
    assert pixel["target"] == phone.profile.target
    assert merge_phones([], usb, [rec], [], tracker_seen=False)[0].status == "unknown"
    # Out of adb's and mDNS's sight, its tvm_rpc at the tracker still makes it the phone's row.
    (alone,) = merge_phones([], [], [rec], [served])
    assert (alone.serial, alone.status, alone.name, alone.transports) == (
        PIXEL8_SERIAL, "free", "Google Pixel 8 Pro (android)", [])


# --- adb errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stderr, expected", [
    ("error: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\n", "has not allowed this workstation"),
    ("error: device offline\n", "is offline to adb"),
    ("error: device 'XYZ' not found\n", "no phone XYZ is attached to adb"),
])
def test_adb_complaints_become_one_sentence(stderr, expected):
    message = explain(AdbResult(("-s", "XYZ", "get-state"), 1, "", stderr), "XYZ")
    assert expected in message and "\n" not in message


# --- android connect: the commands built -----------------------------------------------------------

def test_connect_reads_the_profile_tunnels_the_tracker_and_records_the_phone(phones_dir):
    runner = CapturedPhone(PIXEL8_SERIAL, PIXEL8_GETPROP, PIXEL8_CPUINFO)
    result = connect_mod.connect_phone(PIXEL8_SERIAL, ("127.0.0.1", 9190), runner=runner)
    port = result.rpc_port
    assert runner.calls == [
        ["-s", PIXEL8_SERIAL, "get-state"],
        ["-s", PIXEL8_SERIAL, "shell", "getprop"],
        ["-s", PIXEL8_SERIAL, "shell", "cat /proc/cpuinfo"],
        ["-s", PIXEL8_SERIAL, "shell", "cat /proc/meminfo"],
        ["-s", PIXEL8_SERIAL, "reverse", "tcp:9190", "tcp:9190"],
        ["-s", PIXEL8_SERIAL, "forward", f"tcp:{port}", f"tcp:{port}"],
    ]
    assert result.key == "android-husky" and not result.rpc_started and not result.registered
    assert any("--allow-plain-key android-husky" in n for n in result.notes)
    assert any("tune and build will need the NDK" in n and "ANDROID_NDK_HOME" in n for n in result.notes)
    assert any("no --rpc-binary" in n and "--key=android-husky" in n for n in result.notes)
    (recorded,) = recorded_phones()
    assert (recorded.key, recorded.rpc_port, recorded.api_level) == ("android-husky", port, 36)
    assert Path(result.record).parent == phones_dir
    target, board = recorded_target("android-husky")
    assert target["mtriple"] == "aarch64-linux-android" and target["mcpu"] == "cortex-a715"
    assert board["serial"] == PIXEL8_SERIAL and board["soc"] == "Tensor G3"
    assert android_api_for(target) == 36
    assert recorded_target("some-other-key") is None


def test_connect_over_wifi_runs_adb_connect_first():
    serial = "192.168.1.23:37651"
    runner = CapturedPhone(serial, PIXEL8_GETPROP, PIXEL8_CPUINFO, answers={
        ("connect", serial): AdbResult(("connect", serial), 0, f"connected to {serial}\n", "")})
    connect_mod.connect_phone(serial, ("127.0.0.1", 9190), key="pixel-wifi", runner=runner)
    assert runner.calls[0] == ["connect", serial]
    assert runner.calls[1] == ["-s", serial, "get-state"]


def test_connect_refusals_are_one_line():
    serial = "192.168.1.23:5555"
    runner = CapturedPhone(serial, PIXEL8_GETPROP, PIXEL8_CPUINFO, answers={
        # What adb 29 answered here for a closed port, exit status 0 included, after starting its server.
        ("connect", serial): AdbResult(("connect", serial), 0, f"failed to connect to '{serial}': Connection refused\n",
                                       "* daemon not running; starting now at tcp:5037\n* daemon started successfully\n")})
    with pytest.raises(AndroidError, match=r"adb could not connect to 192.168.1.23:5555 \(Connection refused\)"):
        connect_mod.connect_phone(serial, ("127.0.0.1", 9190), runner=runner)
    with pytest.raises(AndroidError, match="no phone NOPE is attached"):
        connect_mod.connect_phone("NOPE", ("127.0.0.1", 9190), runner=CapturedPhone("X", PIXEL8_GETPROP, ""))
    with pytest.raises(AndroidError, match="--rpc-binary /nonexistent/tvm_rpc: no such file"):
        connect_mod.connect_phone("X", ("127.0.0.1", 9190), rpc_binary="/nonexistent/tvm_rpc",
                                  runner=CapturedPhone("X", PIXEL8_GETPROP, PIXEL8_CPUINFO))
    with pytest.raises(AndroidError, match="not on this workstation"):
        connect_mod.connect_phone("X", ("192.0.2.1", 9190), runner=CapturedPhone("X", PIXEL8_GETPROP, PIXEL8_CPUINFO))


def test_tvm_rpc_push_and_start_commands(tmp_path):
    binary = tmp_path / "build-android" / "tvm_rpc"
    binary.parent.mkdir()
    for path in (binary, binary.parent / "libtvm_runtime.so", binary.parent / "libc++_shared.so"):
        path.write_bytes(b"\x7fELF")
    runner = CapturedPhone("S1", PIXEL8_GETPROP, PIXEL8_CPUINFO)
    adb = Adb("S1", runner)
    connect_mod.push_rpc_server(adb, connect_mod.rpc_files(str(binary)))
    where = connect_mod.PHONE_DIR
    assert runner.calls == [
        ["-s", "S1", "shell", f"mkdir -p {where}/work"],
        ["-s", "S1", "push", str(binary), f"{where}/tvm_rpc"],
        ["-s", "S1", "push", str(binary.parent / "libc++_shared.so"), f"{where}/libc++_shared.so"],
        ["-s", "S1", "push", str(binary.parent / "libtvm_runtime.so"), f"{where}/libtvm_runtime.so"],
        ["-s", "S1", "shell", f"chmod 755 {where}/tvm_rpc"],
    ]
    command = connect_mod.rpc_start_command("android-husky", 9190, 40111)
    for part in ("./tvm_rpc server", "--host=127.0.0.1", "--port=40111", "--port-end=40112",
                 "--tracker=127.0.0.1:9190", "--key=android-husky", "--custom-addr=127.0.0.1",
                 f"LD_LIBRARY_PATH={where}", "setsid nohup", f"echo $! >{where}/tvm_rpc.pid"):
        assert part in command
    # The phone's shell parses it (sh -n: syntax only, nothing runs here).
    assert subprocess.run(["sh", "-n", "-c", command]).returncode == 0
    runner.answers[("-s", "S1", "shell", command)] = AdbResult((), 0, "edgetune-rpc-started\n", "")
    connect_mod.start_rpc_server(adb, "android-husky", 9190, 40111)
    with pytest.raises(AndroidError, match="tvm_rpc did not start"):
        connect_mod.start_rpc_server(adb, "android-husky", 9190, 40113)


# --- the NDK link -----------------------------------------------------------------------------------

def _fake_ndk(root: Path, levels: Sequence[int]) -> Path:
    """An NDK folder layout (empty files: nothing is compiled) to check which link options are chosen."""
    prebuilt = root / "toolchains" / "llvm" / "prebuilt" / "linux-x86_64"
    (prebuilt / "bin").mkdir(parents=True)
    (prebuilt / "bin" / "clang++").write_text("")
    for level in levels:
        (prebuilt / "sysroot" / "usr" / "lib" / "aarch64-linux-android" / str(level)).mkdir(parents=True)
    return prebuilt / "bin" / "clang++"


def test_ndk_links_for_the_recorded_phones_api_level(tmp_path, monkeypatch):
    from host.toolchain import toolchain_for

    target = phone_from_texts(PIXEL8_GETPROP, PIXEL8_CPUINFO).profile.target
    clang = _fake_ndk(tmp_path / "ndk", range(21, 36))
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path / "ndk"))
    # No phone recorded: the oldest level this NDK has (the library loads on every newer phone).
    assert toolchain_for(target).options == ("--target=aarch64-linux-android21", "-static-libstdc++")
    assert toolchain_for(target).compiler == str(clang)
    older = PIXEL8_GETPROP.replace("[ro.build.version.sdk]: [36]", "[ro.build.version.sdk]: [29]")
    phone = phone_from_texts(older, PIXEL8_CPUINFO)  # the same phone on Android 10
    record_phone(RecordedPhone("p1", "p1", "k", 40000, phone.board(), "2026-12-03T03:00:00+00:00"))
    assert toolchain_for(target).options[0] == "--target=aarch64-linux-android29"
    # The Pixel 8 Pro runs API 36, newer than this NDK's 35: linked for 35, which runs on 36.
    monkeypatch.setenv("EDGETUNE_ANDROID_API", "36")
    assert toolchain_for(target).options[0] == "--target=aarch64-linux-android35"
    monkeypatch.setenv("EDGETUNE_ANDROID_API", "19")
    with pytest.raises(EdgetuneError, match="runs Android API 19 but the NDK .* links for API 21-35"):
        toolchain_for(target)
    monkeypatch.setenv("EDGETUNE_ANDROID_API", "thirty")
    with pytest.raises(EdgetuneError, match="is not an API level"):
        toolchain_for(target)


def test_ndk_per_api_wrapper_is_used_as_is(tmp_path, monkeypatch):
    from host.toolchain import toolchain_for

    wrapper = tmp_path / "aarch64-linux-android28-clang++"
    wrapper.write_text("")
    monkeypatch.setenv("TVM_NDK_CC", str(wrapper))
    chain = toolchain_for({"kind": "llvm", "mtriple": "aarch64-linux-android", "num-cores": 4})
    assert (chain.compiler, chain.options) == (str(wrapper), ("-static-libstdc++",))
    plain = tmp_path / "clang++"
    plain.write_text("")
    monkeypatch.setenv("TVM_NDK_CC", str(plain))
    with pytest.raises(EdgetuneError, match="cannot tell which Android API level.*EDGETUNE_ANDROID_API"):
        toolchain_for({"kind": "llvm", "mtriple": "aarch64-linux-android", "num-cores": 4})
    monkeypatch.setenv("EDGETUNE_ANDROID_API", "30")
    assert toolchain_for({"kind": "llvm", "mtriple": "aarch64-linux-android", "num-cores": 4}).options == (
        "--target=aarch64-linux-android30", "-static-libstdc++")


# --- flash --adb ------------------------------------------------------------------------------------

@pytest.fixture
def pixel():
    return phone_from_texts(PIXEL8_GETPROP, PIXEL8_CPUINFO, adb_serial="S1")


def test_flash_pushes_checks_on_the_phone_then_switches_keeping_the_previous(tmp_path, pixel):
    dest = tmp_path / "phone" / "data" / "local" / "tmp" / "model"
    first = android_package(tmp_path / "a.etpkg", b"first build", pixel.profile.target, pixel.board())
    second = android_package(tmp_path / "b.etpkg", b"second build", pixel.profile.target, pixel.board())
    runner = CapturedPhone("S1", PIXEL8_GETPROP, PIXEL8_CPUINFO, shell=True)

    result = flash_phone(first, "S1", str(dest), runner=runner)
    assert (dest / "model.so").read_bytes() == b"first build" and not result.previous_kept
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "manifest.sig", "model.so"]
    assert result.files["model.so"] == hashlib.sha256(b"first build").hexdigest()

    runner.calls.clear()
    result = flash_phone(second, "S1", str(dest), runner=runner)
    assert (dest / "model.so").read_bytes() == b"second build"
    assert (dest / ("model.so" + PREVIOUS_SUFFIX)).read_bytes() == b"first build"
    assert result.previous_kept and json.loads((dest / "manifest.json").read_text())["files"]["model.so"] == \
        hashlib.sha256(b"second build").hexdigest()
    assert not [p for p in dest.iterdir() if p.name.startswith(".edgetune-incoming")]
    verbs = [c[2] if c[2] != "shell" else c[3].split()[0] for c in runner.calls]
    # profile, stage, push x3, sha256sum on the phone, then (and only then) the switch.
    assert verbs == ["get-state", "getprop", "cat", "cat", "mkdir", "push", "push", "push", "sha256sum", "[", "cd"]


def test_flash_with_a_damaged_copy_leaves_the_phone_as_it_was(tmp_path, pixel):
    dest = tmp_path / "phone" / "model"
    first = android_package(tmp_path / "a.etpkg", b"first build", pixel.profile.target, pixel.board())
    second = android_package(tmp_path / "b.etpkg", b"second build", pixel.profile.target, pixel.board())
    runner = CapturedPhone("S1", PIXEL8_GETPROP, PIXEL8_CPUINFO, shell=True)
    flash_phone(first, "S1", str(dest), runner=runner)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    runner.corrupt = "model.so"
    with pytest.raises(AndroidError, match=r"differs from the package \(model.so: sha256 mismatch\).*unchanged") as err:
        flash_phone(second, "S1", str(dest), runner=runner)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before  # staging removed, nothing switched


def test_flash_refuses_packages_that_do_not_suit_the_phone(tmp_path, pixel):
    runner = CapturedPhone("S1", PIXEL8_GETPROP, PIXEL8_CPUINFO, shell=True)
    linux = dict(pixel.profile.target, mtriple="aarch64-linux-gnu")
    pkg = android_package(tmp_path / "linux.etpkg", b"x", linux, pixel.board())
    with pytest.raises(EdgetuneError, match="built for aarch64-linux-gnu, not Android"):
        flash_phone(pkg, "S1", str(tmp_path / "d"), runner=runner)
    newer = android_package(tmp_path / "newer.etpkg", b"x", pixel.profile.target, dict(pixel.board(), android_api=99))
    with pytest.raises(EdgetuneError, match="built for Android API 99 and phone S1 runs API 36"):
        flash_phone(newer, "S1", str(tmp_path / "d"), runner=runner)
    armv7 = {"kind": "llvm", "mtriple": "armv7a-linux-androideabi", "mattr": ["+neon"], "num-cores": 4}
    pkg = android_package(tmp_path / "arm.etpkg", b"x", armv7, pixel.board())
    with pytest.raises(EdgetuneError, match="does not suit phone S1: package is built for armv7l"):
        flash_phone(pkg, "S1", str(tmp_path / "d"), runner=runner)
    with pytest.raises(EdgetuneError, match="not an absolute path"):
        flash_phone(pkg, "S1", "relative/dir", runner=runner)
    assert not (tmp_path / "d").exists()


def test_switch_command_is_valid_shell():
    command = switch_command("/data/local/tmp/my model", ".edgetune-incoming-1234abcd")
    assert "'/data/local/tmp/my model'" in command
    assert subprocess.run(["sh", "-n", "-c", command]).returncode == 0


def test_flash_adb_options_go_together(tmp_path, pixel):
    from click.testing import CliRunner

    from host.cli import cli

    pkg = str(android_package(tmp_path / "a.etpkg", b"x", pixel.profile.target, pixel.board()))
    for args, expected in [(["--dest", "/data/local/tmp/m"], "--dest goes with --adb SERIAL"),
                           (["--adb", "S1"], "--adb needs --dest DIR"),
                           (["--adb", "S1", "--dest", "/data/local/tmp/m", "--key", "k"], "drop --host, --device")]:
        result = CliRunner().invoke(cli, ["flash", pkg, *args])
        assert isinstance(result.exception, EdgetuneError) and expected in str(result.exception), result.output
    help_text = CliRunner().invoke(cli, ["flash", "--help"]).output
    assert "--adb SERIAL" in help_text and "--dest DIR" in help_text and "--known-hosts" in help_text


def test_a_listing_stops_the_adb_server_it_started():
    from host.android.devices import list_adb_devices

    calls: list[list[str]] = []

    def runner(args: Sequence[str], timeout: float) -> AdbResult:
        calls.append(list(args))
        if args[0] == "devices":  # what adb prints when it had to start its server
            return AdbResult(tuple(args), 0, PIXEL9_ADB, "* daemon not running; starting now at tcp:5037\n"
                                                         "* daemon started successfully\n")
        return AdbResult(tuple(args), 0, "", "")

    assert [d.serial for d in list_adb_devices(runner, leave_as_found=True)] == ["49281FDAQ0011J"]
    assert calls == [["devices", "-l"], ["kill-server"]]
    calls.clear()
    list_adb_devices(runner)  # android connect keeps the server: its adb reverse/forward live there
    assert calls == [["devices", "-l"]]
