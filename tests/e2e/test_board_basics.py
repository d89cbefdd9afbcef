"""The emulated Raspberry Pi 4 itself: TVM in the board, the Pi's CPU, TVM RPC through a tracker on the
host, SSH with throwaway keys, and mDNS across the veth link. Uses stock TVM peers, not the agent."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

try:
    from . import board
except ImportError:  # tests/e2e is not a package: pytest put this directory on sys.path
    import board

pytestmark = pytest.mark.e2e

# TVM's import takes ~10 s under emulation; the stock server registers 20-33 s after start.
REGISTER_TIMEOUT_S = 180.0
# One RPC session: upload, load and run a tiny kernel under emulation.
SESSION_TIMEOUT_S = 120.0
BOARD_CMD_TIMEOUT_S = 120.0
SSH_TIMEOUT_S = 120.0
MDNS_TIMEOUT_S = 120.0
KEY = "rpi4-emu-stock"

PI4_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"],
              "num-cores": 4}


@pytest.fixture(scope="module")
def stock_board(start_emulated_board_module, stock_tracker_module) -> board.BoardHandle:
    """A board running TVM's stock rpc_server, registered with a stock tracker on the host's link end."""
    return start_emulated_board_module(
        tracker=stock_tracker_module, key=KEY,
        agent_argv=["python", "-m", "tvm.exec.rpc_server", "--tracker", "{tracker}", "--key", "{key}",
                    "--host", "{board_ip}", "--port", "9090", "--port-end", "9199"])


def test_board_imports_tvm_on_a_cortex_a72(stock_board: board.BoardHandle) -> None:
    proc = stock_board.run("/opt/tvmenv/bin/python", "-c",
                           "import platform, tvm; print(platform.machine(), tvm.__version__)",
                           timeout=BOARD_CMD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    machine, version = proc.stdout.split()
    assert machine == "aarch64"
    assert version.startswith("0.27")

    cpuinfo = stock_board.run("cat", "/proc/cpuinfo", timeout=BOARD_CMD_TIMEOUT_S).stdout
    assert "CPU part\t: 0xd08" in cpuinfo  # Cortex-A72, the Pi 4's core
    model = stock_board.run("cat", "/sys/firmware/devicetree/base/model", timeout=BOARD_CMD_TIMEOUT_S).stdout
    assert model.rstrip("\0") == board.PI4_MODEL
    assert stock_board.run("hostname", timeout=BOARD_CMD_TIMEOUT_S).stdout.strip() == "emu-pi4"


def _export_pi4_kernel(path: Path) -> None:
    """B = 2 * A + 1 over 64 floats, compiled for the Pi 4 and linked with the aarch64 cross compiler."""
    import tvm
    from tvm import te

    a = te.placeholder((64,), name="A", dtype="float32")
    b = te.compute((64,), lambda i: a[i] * 2.0 + 1.0, name="B")
    func = te.create_prim_func([a, b]).with_attr("global_symbol", "axpb")
    lib = tvm.compile(tvm.IRModule({"axpb": func}), target=tvm.target.Target(PI4_TARGET))
    lib.export_library(str(path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))


def test_stock_rpc_server_runs_cross_compiled_kernel(stock_board: board.BoardHandle, tmp_path: Path) -> None:
    import tvm
    from tvm import rpc

    board.wait_for_tracker_key(stock_board.tracker, KEY, REGISTER_TIMEOUT_S)
    lib_path = tmp_path / "axpb.so"
    _export_pi4_kernel(lib_path)

    host, port = stock_board.tracker.rsplit(":", 1)
    remote = rpc.connect_tracker(host, int(port)).request(KEY, session_timeout=SESSION_TIMEOUT_S)
    remote.upload(str(lib_path))
    func = remote.load_module("axpb.so")["axpb"]
    dev = remote.cpu()
    x = np.arange(64, dtype="float32")
    a = tvm.runtime.tensor(x, dev)
    b = tvm.runtime.empty((64,), "float32", dev)
    func(a, b)
    np.testing.assert_allclose(b.numpy(), 2 * x + 1)


def test_ssh_with_throwaway_key_runs_board_commands(stock_board: board.BoardHandle) -> None:
    # StrictHostKeyChecking=yes with the pinned known_hosts: a wrong host key fails the login.
    proc = subprocess.run(
        stock_board.ssh_argv("uname -m; command -v edgetune-agent; echo QEMU_CPU=$QEMU_CPU; edgetune-agent --version"),
        capture_output=True, text=True, timeout=SSH_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "aarch64"
    assert lines[1] == "/opt/tvmenv/bin/edgetune-agent"
    assert lines[2] == "QEMU_CPU=cortex-a72"
    assert "edgetune-agent" in lines[3]
    assert stock_board.known_hosts_line.startswith(f"{stock_board.board_ip} ssh-ed25519 ")


BOARD_ADVERTISER = """
import socket, sys, time
from zeroconf import ServiceInfo, Zeroconf
ip = sys.argv[1]
zc = Zeroconf(interfaces=[ip])
info = ServiceInfo("_edgetune-e2e._tcp.local.", "emu-pi4._edgetune-e2e._tcp.local.",
                   addresses=[socket.inet_aton(ip)], port=9090, properties={"arch": "aarch64"})
zc.register_service(info)
print("registered", flush=True)
time.sleep(float(sys.argv[2]))
zc.unregister_service(info)
zc.close()
"""


def test_zeroconf_in_board_is_seen_on_host(stock_board: board.BoardHandle) -> None:
    from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

    script = stock_board.rootfs / "tmp/advertise.py"
    script.write_text(BOARD_ADVERTISER)
    advertiser = stock_board.popen(["/opt/tvmenv/bin/python", "/tmp/advertise.py", stock_board.board_ip,
                                    str(MDNS_TIMEOUT_S)], log_name="advertiser")
    found: dict[str, object] = {}

    class Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            found[name] = zc.get_service_info(type_, name, timeout=3000)

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            self.add_service(zc, type_, name)

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            pass

    zc = Zeroconf(interfaces=[stock_board.host_ip])
    try:
        browser = ServiceBrowser(zc, "_edgetune-e2e._tcp.local.", Listener())
        deadline = time.monotonic() + MDNS_TIMEOUT_S
        while not any(found.values()) and time.monotonic() < deadline:
            assert advertiser.poll() is None, (stock_board.run_dir / "advertiser.log").read_text()
            time.sleep(0.5)
        browser.cancel()
    finally:
        zc.close()
        board.stop_process(advertiser)
    infos = [i for i in found.values() if i]
    assert infos, f"no mDNS answer from the board: {(stock_board.run_dir / 'advertiser.log').read_text()}"
    info = infos[0]
    assert info.name == "emu-pi4._edgetune-e2e._tcp.local."
    assert socket.inet_ntoa(info.addresses[0]) == stock_board.board_ip
    assert info.properties[b"arch"] == b"aarch64"


def test_stop_board_leaves_nothing_behind(start_emulated_board) -> None:
    handle = start_emulated_board(agent_argv=[], install_agent=False)
    sleeper = handle.popen(["sleep", "600"])
    root = handle.rootfs
    board.stop_board(handle)
    assert sleeper.poll() is not None
    assert board._mounts_under(root) == []
    assert handle.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", f"{handle.netns}h"], capture_output=True).returncode != 0
    assert board._pids_rooted_at(root) == []
    board.stop_board(handle)  # idempotent
