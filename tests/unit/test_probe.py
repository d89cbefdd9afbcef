"""Board profiles from real captures (tests/fixtures/boards/SOURCES.md says where each came from), and
the proposed targets checked against the LLVM inside the installed TVM."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import te
from tvm.target import codegen

from device_agent import probe
from device_agent.errors import AgentError
from device_agent.schema import BoardRecord

BOARDS = Path(__file__).resolve().parent.parent / "fixtures" / "boards"


def text(name: str) -> str:
    return (BOARDS / name).read_text()


def profile_of(board: str, **kwargs) -> probe.BoardProfile:
    return probe.profile_from_texts(cpuinfo=text(f"{board}/cpuinfo"), **kwargs)


def pixel() -> probe.BoardProfile:
    return profile_of("pixel8pro-tensor-g3", getprop=text("pixel8pro-tensor-g3/getprop.txt"))


ARM_BOARDS = ["rpi3bplus-32", "rpi3bplus-64", "rpi3bplus-64-bookworm", "rpi4-64", "rpi4-64-rev1.5", "rpi5",
              "rock5b-rk3588", "jetson-tx2", "pixel8pro-tensor-g3"]


def arm_profile(board: str) -> probe.BoardProfile:
    return pixel() if board == "pixel8pro-tensor-g3" else profile_of(board)


def vector_add():
    n = te.var("n")
    a = te.placeholder((n,), name="A")
    b = te.placeholder((n,), name="B")
    c = te.compute((n,), lambda i: a[i] + b[i], name="C")
    return te.create_prim_func([a, b, c])


# ---- parsing -------------------------------------------------------------------------------------

def test_parse_cpuinfo_splits_processors_from_board_fields():
    info = probe.parse_cpuinfo(text("rpi3bplus-32/cpuinfo"))
    assert [p["processor"] for p in info["processors"]] == [0, 1, 2, 3]
    assert info["processors"][2]["CPU part"] == "0xd03"
    assert info["processors"][0]["model name"] == "ARMv7 Processor rev 4 (v7l)"
    assert info["global"]["Hardware"] == "BCM2835"
    assert info["global"]["Model"] == "Raspberry Pi 3 Model B Plus Rev 1.3"


def test_parse_cpuinfo_keeps_the_numbers_of_listed_cpus_only():
    info = probe.parse_cpuinfo(text("jetson-tx2/cpuinfo"))
    assert [p["processor"] for p in info["processors"]] == [0, 3, 4, 5]


def test_parse_cpuinfo_refuses_a_broken_processor_number():
    with pytest.raises(AgentError, match="processor number"):
        probe.parse_cpuinfo("processor\t: zero\n")


@pytest.mark.parametrize("board", ["pixel8pro-tensor-g3", "poco-f6-sm8635"])
def test_parse_getprop_reads_every_property(board):
    raw = text(f"{board}/getprop.txt")
    props = probe.parse_getprop(raw)
    assert len(props) == len(re.findall(r"^\[[^\]\n]+\]: \[", raw, re.MULTILINE))
    assert props["ro.product.cpu.abi"] == "arm64-v8a"


def test_parse_getprop_pixel_8_pro():
    props = probe.parse_getprop(text("pixel8pro-tensor-g3/getprop.txt"))
    assert props["ro.soc.model"] == "Tensor G3"
    assert props["ro.product.manufacturer"] == "Google"
    assert props["ro.product.model"] == "Pixel 8 Pro"
    assert props["ro.build.version.sdk"] == "36"


def test_parse_getprop_poco_f6_with_a_value_over_several_lines():
    props = probe.parse_getprop(text("poco-f6-sm8635/getprop.txt"))
    assert props["ro.soc.model"] == "SM8635"
    assert props["ro.product.marketname"] == "POCO F6"
    assert props["ro.build.version.sdk"] == "35"
    assert props["persist.sys.boot.reason.history"].splitlines() == [
        "reboot,,1745935181", "shutdown,userrequested,1745815614", "reboot,,1745768086", "reboot,,1745686927"]
    assert probe._android_board(props) == "POCO F6"  # the brand starts the market name: not repeated


def test_getprop_without_cpuinfo_says_what_to_pass():
    with pytest.raises(AgentError, match="cpuinfo"):
        probe.profile_from_texts(cpuinfo="", getprop=text("poco-f6-sm8635/getprop.txt"))


# ---- Raspberry Pi --------------------------------------------------------------------------------

def test_pi3bplus_32bit():
    p = profile_of("rpi3bplus-32")
    assert (p.arch, p.os, p.triple) == ("armv7l", "linux", "armv7l-linux-gnueabihf")
    assert p.cpu_model == "Cortex-A53"
    assert p.board_model == "Raspberry Pi 3 Model B Plus Rev 1.3"  # from cpuinfo's Model line
    assert p.clusters == (probe.CpuCluster("0xd03", "Cortex-A53", "cortex-a53", (0, 1, 2, 3)),)
    assert (p.cores, p.big_cores) == (4, (0, 1, 2, 3))
    assert p.features == ("neon", "vfp", "vfpd32", "vfpv3", "vfpv4")
    assert p.target == {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "mcpu": "cortex-a53",
                        "mattr": ["+neon", "+vfp4"], "num-cores": 4}


@pytest.mark.parametrize("board", ["rpi3bplus-64", "rpi3bplus-64-bookworm"])
def test_pi3bplus_64bit(board):
    p = profile_of(board)
    assert (p.arch, p.os, p.triple) == ("aarch64", "linux", "aarch64-linux-gnu")
    assert p.clusters == (probe.CpuCluster("0xd03", "Cortex-A53", "cortex-a53", (0, 1, 2, 3)),)
    assert p.features == ("asimd", "neon")
    assert p.board_model == "Raspberry Pi 3 Model B Plus Rev 1.3"
    assert p.target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53",
                        "mattr": ["+neon"], "num-cores": 4}


@pytest.mark.parametrize("board, model", [("rpi4-64", "Raspberry Pi 4 Model B Rev 1.1"),
                                          ("rpi4-64-rev1.5", "Raspberry Pi 4 Model B Rev 1.5")])
def test_pi4(board, model):
    p = profile_of(board)
    assert (p.arch, p.triple, p.board_model, p.cpu_model) == ("aarch64", "aarch64-linux-gnu", model, "Cortex-A72")
    assert p.clusters == (probe.CpuCluster("0xd08", "Cortex-A72", "cortex-a72", (0, 1, 2, 3)),)
    assert p.features == ("asimd", "neon")
    assert p.target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                        "mattr": ["+neon"], "num-cores": 4}


def test_pi5_has_dotprod_and_fp16():
    p = profile_of("rpi5")
    assert (p.board_model, p.cpu_model, p.cores) == ("Raspberry Pi 5 Model B Rev 1.0", "Cortex-A76", 4)
    assert p.clusters[0].part == "0xd0b"
    assert p.features == ("asimd", "dotprod", "fp16", "neon")
    assert p.target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                        "mattr": ["+neon", "+dotprod", "+fullfp16"], "num-cores": 4}


# ---- device-tree model (the real file ends in a NUL byte) ----------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("rpi3bplus-64/device-tree-model", "Raspberry Pi 3 Model B Plus Rev 1.3"),
    ("rpi4-devicetree/model-rev1.2", "Raspberry Pi 4 Model B Rev 1.2"),
    ("rpi4-devicetree/model-rev1.5", "Raspberry Pi 4 Model B Rev 1.5"),
    ("rpi3-devicetree/model", "Raspberry Pi 3 Model B Rev 1.2"),
    ("rpizero2w-devicetree/model", "Raspberry Pi Zero 2 W Rev 1.0"),
])
@pytest.mark.parametrize("as_bytes", [True, False])
def test_device_tree_model_loses_its_nul_and_wins_over_cpuinfo(name, expected, as_bytes):
    model = (BOARDS / name).read_bytes() + b"\x00"
    # Any capture without a device tree of its own will do: this checks the model string only.
    p = profile_of("rpi3bplus-64-bookworm", device_tree_model=model if as_bytes else model.decode())
    assert p.board_model == expected


def _board_root(root: Path, cpuinfo: str, model_path: str, model: bytes) -> Path:
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(cpuinfo)
    (root / "proc/meminfo").write_text(text("x86-epyc-zen4/meminfo"))
    (root / model_path).parent.mkdir(parents=True, exist_ok=True)
    (root / model_path).write_bytes(model)
    return root


@pytest.mark.parametrize("model_path", ["proc/device-tree/model", "sys/firmware/devicetree/base/model"])
def test_read_profile_from_a_board_root(tmp_path, model_path):
    model = (BOARDS / "rpi3bplus-64/device-tree-model").read_bytes() + b"\x00"
    root = _board_root(tmp_path, text("rpi3bplus-64/cpuinfo"), model_path, model)
    p = probe.read_profile(str(root))
    assert (p.board_model, p.arch, p.cores, p.memory_mb) == ("Raspberry Pi 3 Model B Plus Rev 1.3", "aarch64",
                                                            4, 24682416 // 1024)


def test_read_profile_without_cpuinfo_says_what_to_do(tmp_path):
    with pytest.raises(AgentError, match="cannot read .*cpuinfo.*run the agent on the board"):
        probe.read_profile(str(tmp_path))


# ---- big.LITTLE and friends ----------------------------------------------------------------------

def test_rk3588_targets_the_four_a76():
    p = profile_of("rock5b-rk3588")
    assert p.clusters == (probe.CpuCluster("0xd05", "Cortex-A55", "cortex-a55", (0, 1, 2, 3)),
                          probe.CpuCluster("0xd0b", "Cortex-A76", "cortex-a76", (4, 5, 6, 7)))
    assert (p.cores, p.big_cores) == (8, (4, 5, 6, 7))
    assert (p.cpu_model, p.board_model) == ("Cortex-A76 + Cortex-A55", "")
    assert p.target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                        "mattr": ["+neon", "+dotprod", "+fullfp16"], "num-cores": 4}


def test_pixel_8_pro_three_core_types():
    p = pixel()
    assert (p.arch, p.os, p.triple) == ("aarch64", "android", "aarch64-linux-android")
    assert p.board_model == "Google Pixel 8 Pro"
    assert p.cpu_model == "Tensor G3 (Cortex-X3 + Cortex-A715 + Cortex-A510)"
    assert p.clusters == (probe.CpuCluster("0xd46", "Cortex-A510", "cortex-a510", (0, 1, 2, 3)),
                          probe.CpuCluster("0xd4d", "Cortex-A715", "cortex-a715", (4, 5, 6, 7)),
                          probe.CpuCluster("0xd4e", "Cortex-X3", "cortex-x3", (8,)))
    assert (p.cores, p.big_cores) == (9, (4, 5, 6, 7, 8))
    assert p.features == ("asimd", "dotprod", "fp16", "fp16fml", "i8mm", "neon", "sve", "sve2")
    assert p.target == {"kind": "llvm", "mtriple": "aarch64-linux-android", "mcpu": "cortex-a715",
                        "mattr": ["+neon", "+dotprod", "+fullfp16", "+i8mm", "+sve", "+sve2"], "num-cores": 5}


def test_pixel_cpuinfo_without_getprop_is_plain_linux():
    p = profile_of("pixel8pro-tensor-g3")
    assert (p.os, p.triple, p.board_model, p.cpu_model) == (
        "linux", "aarch64-linux-gnu", "", "Cortex-X3 + Cortex-A715 + Cortex-A510")


def test_features_the_kernel_hides_are_switched_off():
    # Derived from the Pixel capture: the same cores with SVE disabled, as some phone firmware does.
    cpuinfo = re.sub(r" sve\S*", "", text("pixel8pro-tensor-g3/cpuinfo"))
    p = probe.profile_from_texts(cpuinfo=cpuinfo)
    assert "sve" not in p.features
    assert p.target["mcpu"] == "cortex-a715"
    assert p.target["mattr"] == ["+neon", "+dotprod", "+fullfp16", "+i8mm", "-sve", "-sve2"]


def test_jetson_tx2_counts_the_listed_cpus():
    p = profile_of("jetson-tx2")
    assert p.clusters == (probe.CpuCluster("0xd07", "Cortex-A57", "cortex-a57", (0, 3, 4, 5)),)
    assert (p.cores, p.big_cores, p.cpu_model) == (4, (0, 3, 4, 5), "Cortex-A57")
    assert p.target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a57",
                        "mattr": ["+neon"], "num-cores": 4}


# ---- x86 -----------------------------------------------------------------------------------------

def test_x86_epyc_zen4():
    p = profile_of("x86-epyc-zen4", meminfo=text("x86-epyc-zen4/meminfo"))
    assert (p.arch, p.os, p.triple, p.board_model) == ("x86_64", "linux", "x86_64-linux-gnu", "")
    assert p.cpu_model == "AMD EPYC"
    assert p.clusters == (probe.CpuCluster("", "AMD EPYC", "znver4", (0, 1)),)
    assert (p.cores, p.big_cores, p.memory_mb) == (2, (0, 1), 24103)
    assert {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(p.features)
    assert list(p.features) == sorted(p.features)
    assert p.target == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2}


def test_x86_epyc_zen5_in_a_vm_gets_a_level_and_the_extensions_it_shows():
    # This VM shows AVX-512 but not every Zen 5 flag (no rdseed, movdiri): a level, plus the int8/bf16
    # extensions by name. A package built for that target installs on this very board.
    from device_agent.manifest import compatibility_problem

    p = profile_of("x86-epyc-zen5")
    assert p.target == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4",
                        "mattr": ["+avx512vnni", "+avxvnni", "+avx512bf16"], "num-cores": 2}
    assert {"avx512_vnni", "avx_vnni", "avx512_bf16"} <= set(p.features)
    assert compatibility_problem(p.target, p.as_dict()) is None
    for flag, feature in (("avx512_vnni", "avx512vnni"), ("avx_vnni", "avxvnni"), ("avx512_bf16", "avx512bf16")):
        lacking = {**p.as_dict(), "features": [f for f in p.features if f != flag]}
        assert f"needs {feature}," in (compatibility_problem(p.target, lacking) or "")


def test_x86_with_avx512_hidden_falls_back_to_a_level():
    # Derived from the EPYC capture: a hypervisor that hides AVX-512 must not get znver4 code.
    cpuinfo = re.sub(r" avx512\S*", "", text("x86-epyc-zen4/cpuinfo"))
    p = probe.profile_from_texts(cpuinfo=cpuinfo)
    assert p.target == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3", "num-cores": 2}


def test_machine_must_match_cpuinfo_and_be_supported():
    with pytest.raises(AgentError, match="same board"):
        profile_of("x86-epyc-zen4", machine="aarch64")
    with pytest.raises(AgentError, match="supports aarch64, armv7l"):
        profile_of("rpi4-64", machine="riscv64")


def test_32bit_user_land_on_a_64bit_kernel_gets_an_armv7_target():
    # What a 32-bit Python reads on the 64-bit Pi 3B+ kernel: AArch64 hwcaps, but an armhf runtime.
    p = profile_of("rpi3bplus-64", machine="armv8l")
    assert (p.arch, p.triple, p.features) == ("armv7l", "armv7l-linux-gnueabihf",
                                              ("neon", "vfp", "vfpd32", "vfpv3", "vfpv4"))
    assert p.target == {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "mcpu": "cortex-a53",
                        "mattr": ["+neon", "+vfp4"], "num-cores": 4}


# ---- the targets, as TVM sees them ---------------------------------------------------------------

def test_this_machines_target_compiles_and_runs_here():
    p = probe.read_profile()
    target = tvm.target.Target(p.target)
    assert codegen.llvm_is_valid_cpu(p.target["mcpu"], p.triple)
    lib = tvm.compile(vector_add(), target=target)
    dev = tvm.cpu()
    a = np.arange(1000, dtype="float32")
    b = np.full(1000, 0.5, dtype="float32")
    out = tvm.runtime.tensor(np.zeros(1000, dtype="float32"), dev)
    lib(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev), out)
    np.testing.assert_allclose(out.numpy(), a + b)


@pytest.mark.parametrize("board", ARM_BOARDS)
def test_arm_targets_are_accepted_by_tvm(board):
    p = arm_profile(board)
    target = tvm.target.Target(p.target)
    assert codegen.llvm_is_valid_cpu(p.target["mcpu"], p.triple)
    llvm_features = codegen.llvm_get_cpu_features(target)
    for attr in p.target["mattr"]:
        assert (attr[1:] in llvm_features) == attr.startswith("+"), attr
    tvm.compile(vector_add(), target=target)  # LLVM code generation for the board (no linking)


def test_tvm_sees_the_pixel_features():
    attrs = tvm.target.Target(pixel().target).attrs
    assert attrs["feature.has_dotprod"] and attrs["feature.has_matmul_i8"] and attrs["feature.has_sve"]
    attrs = tvm.target.Target(profile_of("rpi4-64").target).attrs
    assert attrs["feature.has_asimd"] and not attrs["feature.has_dotprod"]


@pytest.mark.parametrize("key", sorted(probe._ARM_CORES), ids=lambda k: f"{k[0]:#x}:{k[1]:#05x}")
def test_core_table_matches_llvm(key):
    core = probe._ARM_CORES[key]
    if not core.llvm_cpu:
        return
    assert core.aarch32 == codegen.llvm_is_valid_cpu(core.llvm_cpu, "armv7l-linux-gnueabihf")
    if core.llvm_cpu in ("cortex-a7", "cortex-a15"):  # 32-bit only cores
        return
    assert codegen.llvm_is_valid_cpu(core.llvm_cpu, "aarch64-linux-gnu")
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": core.llvm_cpu})
    implied = codegen.llvm_get_cpu_features(target) & set(probe._A64_MATTR.values())
    assert implied == core.llvm_features


# ---- output --------------------------------------------------------------------------------------

@pytest.mark.parametrize("board", ARM_BOARDS + ["x86-epyc-zen4"])
def test_profile_fits_the_board_record(board):
    p = arm_profile(board) if board != "x86-epyc-zen4" else profile_of(board)
    data = json.loads(json.dumps(p.as_dict()))
    assert data == p.as_dict()
    assert isinstance(data["clusters"][0]["cpus"], list) and isinstance(data["features"], list)
    record = BoardRecord(board_id="0" * 32, name="board", key="key", arch=p.arch, triple=p.triple,
                         cpu=p.target.get("mcpu", ""), cores=p.target["num-cores"], features=p.features,
                         mattr=tuple(p.target.get("mattr", ())), os=p.os, model=p.board_model)
    assert record.target() == p.target
    assert BoardRecord.from_txt(record.to_txt()).target() == p.target  # fits the 255-byte TXT values


def test_describe():
    lines = probe.describe(pixel()).splitlines()
    assert lines[0] == "board:    Google Pixel 8 Pro"
    assert "cpu 0-3: 4x Cortex-A510 (part 0xd46, llvm cortex-a510)" in lines[3]
    assert lines[4].endswith("<- target") and lines[5].endswith("<- target")
    assert lines[-1].startswith('target:   {"kind": "llvm"')
    assert "cpu 0,3-5: 4x Cortex-A57" in probe.describe(profile_of("jetson-tx2"))


def test_advertised_arm_target_round_trips_through_the_txt_record_and_host_resolution():
    """An ARM board's target (with its mattr list) survives the TXT record and the host's grouping of
    boards by target (a list in the target once broke that grouping)."""
    from device_agent.schema import target_to_json

    profile = profile_of("rpi4-64")
    record = BoardRecord(board_id="b" * 32, name="pi", key="rpi4", arch=profile.arch, triple=profile.triple,
                         cpu=profile.target["mcpu"], cores=profile.target["num-cores"],
                         mattr=tuple(profile.target.get("mattr", ())))
    again = BoardRecord.from_txt({k.encode(): v.encode() for k, v in record.to_txt().items()})
    assert again.target() == profile.target
    assert len({target_to_json(r.target()) for r in (record, again)}) == 1


# ---- caches --------------------------------------------------------------------------------------

def _cache_tree(root, cpu: int, entries: list[tuple[int, str, str]]) -> None:
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"sys/devices/system/cpu/cpu{cpu}/cache/index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")


def test_last_level_cache_from_sysfs(tmp_path):
    # Zen 3 (this machine's shape): L1d/L1i 32K, L2 512K, L3 32768K shared.
    _cache_tree(tmp_path, 0, [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "512K"),
                              (3, "Unified", "32768K")])
    # A Pi 4's A72 cluster: L2 1M is the last level; a larger instruction cache never counts.
    _cache_tree(tmp_path, 2, [(1, "Data", "32K"), (1, "Instruction", "48K"), (2, "Unified", "1M")])
    _cache_tree(tmp_path, 3, [(1, "Instruction", "4096K")])
    assert probe.read_llc_kib(str(tmp_path), 0) == 32768
    assert probe.read_llc_kib(str(tmp_path), 2) == 1024
    assert probe.read_llc_kib(str(tmp_path), 3) == 0
    assert probe.read_llc_kib(str(tmp_path), 1) == 0  # the kernel does not describe its caches


def test_read_profile_reports_the_target_cores_cache(tmp_path):
    root = _board_root(tmp_path, text("rpi3bplus-64/cpuinfo"), "proc/device-tree/model", b"Pi\x00")
    assert probe.read_profile(str(root)).llc_kib == 0
    _cache_tree(root, 0, [(1, "Data", "32K"), (2, "Unified", "512K")])
    p = probe.read_profile(str(root))
    assert p.llc_kib == 512 and "cache:    512 KiB last level" in probe.describe(p)


def test_the_cache_size_survives_the_txt_record():
    record = BoardRecord(board_id="0" * 32, name="board", key="key", arch="aarch64", triple="aarch64-linux-gnu",
                         cpu="cortex-a72", cores=4, llc_kib=1024)
    assert BoardRecord.from_txt(record.to_txt()).llc_kib == 1024
    older = {k: v for k, v in record.to_txt().items() if k != "llc"}  # an agent from before it said so
    assert BoardRecord.from_txt(older).llc_kib == 0
