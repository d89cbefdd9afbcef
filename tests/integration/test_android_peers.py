"""Android phones with real peers, and no phone: Debian's real adb (its own server on a port from the OS),
phones' Wireless debugging services advertised with python-zeroconf on loopback, a real tracker, and a
plain TVM RPC server (`python -m tvm.exec.rpc_server`, what a phone runs) on this machine's CPU standing
in for a phone. No phone and no Android emulator ran any of this.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
from zeroconf import ServiceInfo

from device_agent.mdns import open_zeroconf
from device_agent.probe import read_profile
from host.android.devices import ADB_TLS_SERVICE
from host.android.phone import phone_from_texts
from host.android.phones import RecordedPhone, record_phone
from tests.helpers_android import PIXEL8_CPUINFO, PIXEL8_GETPROP, PIXEL8_SERIAL, android_package
from tests.peers import EDGETUNE, free_port, peer_env, run_cli, wait_registered


@pytest.fixture
def adb_env(tmp_path, monkeypatch):
    """Environment for the real adb: a server of its own on a port from the OS (stopped at the end with
    `adb kill-server` on that port), its keys in a temporary HOME; phones recorded in tmp_path/phones.
    Set in this process too, for the library calls."""
    exe = shutil.which("adb")
    assert exe, "adb is not installed: `make test` installs it (scripts/install-system-deps.sh)"
    home = tmp_path / "home"
    home.mkdir()
    extra = {"ANDROID_ADB_SERVER_PORT": str(free_port()), "HOME": str(home),
             "EDGETUNE_ANDROID_DIR": str(tmp_path / "phones")}
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    for name in ("ANDROID_NDK_HOME", "TVM_NDK_CC", "EDGETUNE_ANDROID_API", "ANDROID_SERIAL"):
        monkeypatch.delenv(name, raising=False)
    env = peer_env(**extra)
    try:
        yield env
    finally:
        subprocess.run([exe, "kill-server"], env=env, capture_output=True, timeout=30, check=False)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_real_adb_starts_its_server_and_lists_no_phone(adb_env):
    from host.android.devices import list_adb_devices

    assert list_adb_devices() == []  # starts the server on its own port
    with socket.create_connection(("127.0.0.1", int(adb_env["ANDROID_ADB_SERVER_PORT"])), timeout=5):
        pass
    assert list_adb_devices() == []  # and asks the running one


def test_android_connect_to_a_closed_port_is_refused_in_one_line(adb_env):
    closed = free_port()
    out = run_cli([EDGETUNE, "android", "connect", f"127.0.0.1:{closed}", "--tracker", "127.0.0.1:9190"],
                  env=adb_env, timeout=120)
    line = _one_line_error(out)
    assert f"adb could not connect to 127.0.0.1:{closed}" in line and "refused" in line.lower()
    assert "Wireless debugging" in line


def test_missing_adb_binary_and_phone_are_one_line_errors(adb_env, tmp_path):
    out = run_cli([EDGETUNE, "android", "connect", "49281FDAQ0011J", "--tracker", "127.0.0.1:9190"],
                  env=dict(adb_env, PATH="/nonexistent"), timeout=60)
    assert "adb not found on PATH" in _one_line_error(out) and "apt-get install adb" in out.stderr
    out = run_cli([EDGETUNE, "android", "connect", "49281FDAQ0011J", "--tracker", "127.0.0.1:9190"],
                  env=adb_env, timeout=120)
    assert "no phone 49281FDAQ0011J is attached to adb" in _one_line_error(out)
    out = run_cli([EDGETUNE, "android", "connect", "49281FDAQ0011J", "--tracker", "127.0.0.1:9190",
                   "--rpc-binary", str(tmp_path / "tvm_rpc")], env=adb_env, timeout=60)
    assert "--rpc-binary" in _one_line_error(out) and "no such file" in out.stderr
    phone = phone_from_texts(PIXEL8_GETPROP, PIXEL8_CPUINFO)
    pkg = android_package(tmp_path / "m.etpkg", b"x", phone.profile.target, phone.board())
    out = run_cli([EDGETUNE, "flash", str(pkg), "--adb", "49281FDAQ0011J", "--dest", "/data/local/tmp/m"],
                  env=adb_env, timeout=120)
    assert "no phone 49281FDAQ0011J is attached to adb" in _one_line_error(out)


@pytest.fixture
def advertised_phones():
    """Wireless debugging services on loopback, as phones advertise them; unregistered at the end."""
    zc = open_zeroconf()
    infos: list[ServiceInfo] = []

    def advertise(instance: str, port: int) -> None:
        info = ServiceInfo(ADB_TLS_SERVICE, f"{instance}.{ADB_TLS_SERVICE}", port=port,
                           addresses=[socket.inet_aton("127.0.0.1")], server=f"{instance}.local.")
        zc.register_service(info)
        infos.append(info)

    try:
        yield advertise
    finally:
        for info in infos:
            zc.unregister_service(info)
        zc.close()


def test_wireless_debugging_phones_are_listed_as_android_boards(peers, adb_env, advertised_phones):
    tracker = peers.tracker(advertise=False, args=("--allow-plain-key", "android-husky"))
    stock = peers.stock_server("android-husky", f"127.0.0.1:{tracker.port}")
    wait_registered(tracker.port, "android-husky", timeout=60)
    phone = phone_from_texts(PIXEL8_GETPROP, PIXEL8_CPUINFO, adb_serial=PIXEL8_SERIAL)
    record_phone(RecordedPhone(PIXEL8_SERIAL, PIXEL8_SERIAL, "android-husky", stock.port, phone.board(),
                               "2026-12-03T03:00:00+00:00"))
    advertised_phones("adb-49281FDAQ0011J-AbCdEf", 37651)  # the Pixel 9's serial, never connected
    advertised_phones(f"adb-{PIXEL8_SERIAL}-Qw3rTy", 41234)
    advertised_phones("living-room-tv", 5555)  # not a name Android gives: not a phone

    out = run_cli([EDGETUNE, "devices", "--json", "--tracker", f"127.0.0.1:{tracker.port}", "--timeout", "3"],
                  env=adb_env, timeout=120)
    assert out.returncode == 0, out.stderr
    boards = json.loads(out.stdout)["boards"]
    phones = {b["serial"]: b for b in boards if b.get("android")}
    assert set(phones) == {"49281FDAQ0011J", PIXEL8_SERIAL}, boards
    pixel9 = phones["49281FDAQ0011J"]
    assert (pixel9["os"], pixel9["agent"], pixel9["status"], pixel9["key"]) == ("android", False, "not connected", "")
    assert (pixel9["transports"], pixel9["addresses"], pixel9["adb_port"]) == (["wifi"], ["127.0.0.1"], 37651)
    husky = phones[PIXEL8_SERIAL]
    assert (husky["key"], husky["status"], husky["rpc_port"]) == ("android-husky", "free", stock.port)
    assert (husky["cpu"], husky["cores"], husky["triple"]) == ("cortex-a715", 5, "aarch64-linux-android")
    # Its tvm_rpc at the tracker is the phone's row, not a row of its own.
    assert not [b for b in boards if not b.get("android") and b["key"] == "android-husky"], boards

    text = run_cli([EDGETUNE, "devices", "--tracker", f"127.0.0.1:{tracker.port}", "--timeout", "3"],
                   env=adb_env, timeout=120)
    assert "Google Pixel 8 Pro (android)" in text.stdout and "49281FDAQ0011J (android)" in text.stdout


def test_tasks_and_build_take_the_android_target_connect_recorded(adb_env, tmp_path):
    phone = phone_from_texts(PIXEL8_GETPROP, PIXEL8_CPUINFO, adb_serial=PIXEL8_SERIAL)
    record_phone(RecordedPhone(PIXEL8_SERIAL, PIXEL8_SERIAL, "android-husky", 40111, phone.board(),
                               "2026-12-03T03:00:00+00:00"))
    out = run_cli([EDGETUNE, "tasks", "tiny_cnn", "--device", "android-husky", "--json"], env=adb_env, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["target"] == phone.profile.target and len(data["tasks"]) == 8
    # No NDK on this machine: the Android build stops at the link step with what to do.
    out = run_cli([EDGETUNE, "build", "tiny_cnn", "--device", "android-husky", "-o", str(tmp_path / "out")],
                  env=adb_env, timeout=300)
    assert "Android target needs the NDK's clang: set ANDROID_NDK_HOME" in _one_line_error(out)


def test_plain_rpc_server_under_an_android_key_is_tunable(peers, adb_env, tmp_path):
    """This machine's CPU stands in for the phone: a stock TVM RPC server registered under the key, and
    a record as `android connect` writes it, whose profile is this machine's own."""
    tracker = peers.tracker(advertise=False, args=("--allow-plain-key", "android-standin"))
    stock = peers.stock_server("android-standin", f"127.0.0.1:{tracker.port}")
    wait_registered(tracker.port, "android-standin", timeout=60)
    board = {**read_profile().as_dict(), "serial": "host-standin", "android_api": 0}
    record_phone(RecordedPhone("host-standin", "host-standin", "android-standin", stock.port, board,
                               "2026-12-03T03:00:00+00:00"))
    log_dir = tmp_path / "log"
    out = run_cli([EDGETUNE, "tune", "tiny_cnn", "--device", "android-standin", "--trials", "8", "--log", str(log_dir),
                   "--tracker", f"127.0.0.1:{tracker.port}", "--strategy", "random", "--seed", "1", "--json"],
                  env=adb_env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    end = json.loads(out.stdout.strip().splitlines()[-1])
    assert end["event"] == "end" and end["trials_done"] == 8
    assert sum(t["best_us"] is not None for t in end["tasks"]) >= 1
    session = json.loads((log_dir / "session.json").read_text())
    assert session["target"] == board["target"] and session["board"]["serial"] == "host-standin"


def test_connect_starts_tvm_rpc_that_registers_and_is_the_phones_row(peers, adb_env, tmp_path):
    """`android connect --rpc-binary` end to end, with adb's part answered as the Pixel 8 Pro answered
    (its captured getprop and cpuinfo) and the phone's `tvm_rpc server ...` command carried out by a stock
    TVM RPC server on this machine, with the same port, key, tracker and custom address."""
    from host.android.connect import connect_phone
    from host.android.adb import AdbResult
    from tests.peers import spawn

    tracker = peers.tracker(advertise=False, args=("--allow-plain-key", "android-husky"))
    started = []

    def phone(args, timeout):
        args = list(args)
        ok = AdbResult(tuple(args), 0, "", "")
        assert args[:2] == ["-s", PIXEL8_SERIAL] and timeout > 0
        command = args[2:]
        if command == ["get-state"]:
            return AdbResult(tuple(args), 0, "device\n", "")
        if command[:1] == ["shell"] and command[1] in ("getprop", "cat /proc/cpuinfo"):
            return AdbResult(tuple(args), 0, PIXEL8_GETPROP if command[1] == "getprop" else PIXEL8_CPUINFO, "")
        if command[:1] == ["shell"] and "./tvm_rpc server" in command[1]:
            opts = dict(part.split("=", 1) for part in command[1].split() if part.startswith("--") and "=" in part)
            server = spawn("phone-tvm-rpc", [
                sys.executable, "-m", "tvm.exec.rpc_server", "--host", opts["--host"], "--port", opts["--port"],
                "--port-end", opts["--port-end"], "--tracker", opts["--tracker"], "--key", opts["--key"],
                "--custom-addr", opts["--custom-addr"]], tmp_path / "peers", adb_env)
            started.append(server)
            return AdbResult(tuple(args), 0, "edgetune-rpc-started\n", "")
        return ok  # mkdir, push, chmod, meminfo (not captured), reverse, forward

    binary = tmp_path / "tvm_rpc"
    binary.write_bytes(b"\x7fELF")
    try:
        result = connect_phone(PIXEL8_SERIAL, ("127.0.0.1", tracker.port), rpc_binary=str(binary), runner=phone)
        assert result.registered and result.rpc_started and result.key == "android-husky"
        out = run_cli([EDGETUNE, "devices", "--json", "--tracker", f"127.0.0.1:{tracker.port}", "--timeout", "2"],
                      env=adb_env, timeout=120)
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)["boards"]
        (row,) = [b for b in rows if b["key"] == "android-husky"]
        assert row["android"] and row["serial"] == PIXEL8_SERIAL and row["status"] == "free"
        # Seen neither on mDNS nor by adb here (adb was answered in this process): no address, no transport.
        assert (row["rpc_port"], row["addresses"], row["transports"]) == (result.rpc_port, [], [])
    finally:
        for server in started:
            server.stop()
