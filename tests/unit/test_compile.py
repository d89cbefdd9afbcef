"""What the compiled model does at each run: its kernels and nothing the build could have done once."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import HOST_TARGET
from tests.unit.test_layout import relu6_net_onnx


@pytest.fixture(scope="module")
def relu6_net(tmp_path_factory) -> Path:
    return relu6_net_onnx(tmp_path_factory.mktemp("relu6") / "relu6_net.onnx")


@pytest.fixture(scope="module")
def relu6_built(relu6_net) -> SimpleNamespace:
    """The net with default schedules, as the build ships it (``shipped``: its program compiled) and as
    bytecode (``bytecode``: the same program, which ``as_text`` shows)."""
    import tvm

    from host.build.build import fallback_database
    from host.models.onnx_import import load_onnx
    from host.tuning.intrinsics import cpu_intrinsics_only
    from host.tuning.tasks import compile_tuned, extract_tasks

    cpu_intrinsics_only()
    model = load_onnx(str(relu6_net))
    target = tvm.target.Target(HOST_TARGET)
    tasks = extract_tasks(model.mod, HOST_TARGET, True, "NHWC")
    return SimpleNamespace(
        model=model, tasks=tasks,
        shipped=compile_tuned(fallback_database(tasks, target), model.mod, target),
        bytecode=compile_tuned(fallback_database(tasks, target), model.mod, target, exec_mode="bytecode"))


def test_each_kernel_gets_its_repacked_weights_as_constants_with_no_tuples_at_run_time(relu6_built):
    # The program as bytecode, to read its calls; the build ships the same program compiled (below).
    tasks = relu6_built.tasks
    text = relu6_built.bytecode.as_text()
    main = text.split("@main:", 1)[1].split("\n\n", 1)[0]
    calls = re.findall(r"call\s+(\S+)\s+in:([^\n]*?)dst:", main)
    prepacked = [(name, args) for name, args in calls if name.endswith("_prepacked")]
    # The three convolutions and the dense layer have their weights repacked at build time ...
    assert len(prepacked) == 4, [name for name, _ in calls]
    # ... and each takes them straight from the constants (its 2nd and 3rd arguments) ...
    for name, args in prepacked:
        assert all(arg.strip().startswith("c[") for arg in args.split(",")[1:3]), (name, args)
    # ... where folding had left a tuple of them, built and taken apart at every run.
    assert not [name for name, _ in calls if name in ("vm.builtin.make_tuple", "vm.builtin.tuple_getitem")], main
    # Every other call is one of the model's kernels or the VM's memory bookkeeping.
    names = {t.name for t in tasks}
    assert {name.removesuffix("_prepacked") for name, _ in calls if not name.startswith("vm.builtin.")} <= names, main


def test_the_shipped_program_is_compiled_and_computes_what_the_bytecode_does(relu6_built, tmp_path):
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    model, shipped, bytecode = relu6_built.model, relu6_built.shipped, relu6_built.bytecode
    # Compiled, the VM has no instructions of main to interpret: its program is a function of the library.
    assert "@main:" in bytecode.as_text() and "@main:" not in shipped.as_text()
    shape = [int(d) for d in model.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    outputs = []
    for executable in (shipped, bytecode):
        path = tmp_path / f"model-{len(outputs)}.so"
        executable.export_library(str(path))
        vm = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
        outputs.append(vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy())
    assert outputs[0].shape == outputs[1].shape and np.abs(outputs[0]).max() > 0
    np.testing.assert_array_equal(outputs[0], outputs[1])
