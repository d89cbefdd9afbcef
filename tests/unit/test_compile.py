"""What the compiled model does at each run: its kernels and nothing the build could have done once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import HOST_TARGET
from tests.unit.test_layout import relu6_net_onnx


@pytest.fixture(scope="module")
def relu6_net(tmp_path_factory) -> Path:
    return relu6_net_onnx(tmp_path_factory.mktemp("relu6") / "relu6_net.onnx")


def test_each_kernel_gets_its_repacked_weights_as_constants_with_no_tuples_at_run_time(relu6_net):
    import tvm

    from host.build.build import fallback_database
    from host.models.onnx_import import load_onnx
    from host.tuning.intrinsics import cpu_intrinsics_only
    from host.tuning.tasks import compile_tuned, extract_tasks

    cpu_intrinsics_only()
    model = load_onnx(str(relu6_net))
    target = tvm.target.Target(HOST_TARGET)
    tasks = extract_tasks(model.mod, HOST_TARGET, True, "NHWC")
    text = compile_tuned(fallback_database(tasks, target), model.mod, target).as_text()
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
