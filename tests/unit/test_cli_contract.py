"""The command-line contract: every command answers --help with an example; listing commands take --json;
bad targets and missing toolchains are one-line errors naming what to do."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from device_agent.cli import cli as agent_cli
from host.cli import COMMANDS, cli
from host.errors import EdgetuneError


def _leaves(group, prefix=()):
    import click

    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from _leaves(command, prefix + (name,))
        else:
            yield prefix + (name,)


@pytest.mark.parametrize("path", list(_leaves(cli)), ids=" ".join)
def test_every_edgetune_command_has_help_with_an_example(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


@pytest.mark.parametrize("path", list(_leaves(agent_cli)), ids=" ".join)
def test_every_agent_command_has_help_with_an_example(path):
    result = CliRunner().invoke(agent_cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_listing_commands_take_json():
    for path in (("devices",), ("tasks",), ("log", "show"), ("bench",), ("build",), ("tune",), ("report",)):
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert "--json" in result.output, path
    assert set(COMMANDS) >= {"tracker", "devices", "tasks", "tune", "build", "package", "flash", "bench",
                             "report", "log", "keys", "demo"}


def test_tasks_lists_each_distinct_kernel_once_most_benefit_first(host_target):
    result = CliRunner().invoke(cli, ["tasks", "tiny_cnn",
                                      "--device", "x86", "--target", json.dumps(host_target), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    tasks = data["tasks"]
    # Five convs (ReLU6 fused), the mean, the dense layer and the NHWC transpose of the input.
    assert len(tasks) == 8 and len({t["name"] for t in tasks}) == 8
    benefit = [t["flops"] * t["weight"] for t in tasks]
    assert benefit == sorted(benefit, reverse=True)
    assert tasks[0]["name"].startswith("fused_conv2d")


def test_repeated_kernels_are_one_task_with_a_weight(host_target, tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from host.models.onnx_import import load_onnx
    from host.tuning.tasks import extract_tasks

    # Three blocks of one shape (conv 3x3, 16 channels, then ReLU), as MobileNetV2 and ResNet repeat theirs.
    rng = np.random.default_rng(3)
    nodes, weights, x = [], [], "x"
    for i in range(3):
        weights.append(numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    shape = [1, 16, 16, 16]
    graph = helper.make_graph(nodes, "repeated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], initializer=weights)
    model = tmp_path / "repeated.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    tasks = extract_tasks(load_onnx(str(model)).mod, host_target)
    names = [t.name for t in tasks]
    assert len(names) == len(set(names))
    convs = [t for t in tasks if "conv2d" in t.name]
    assert len(convs) == 1 and convs[0].weight == 3
    assert sum(t.weight for t in tasks) > len(tasks)


@pytest.mark.parametrize("target, env, expected", [
    ({"kind": "llvm", "mtriple": "aarch64-linux-android", "mcpu": "cortex-a76", "num-cores": 4},
     {"ANDROID_NDK_HOME": None, "TVM_NDK_CC": None}, "set ANDROID_NDK_HOME"),
    ({"kind": "llvm", "mtriple": "aarch64-linux-android", "num-cores": 4},
     {"ANDROID_NDK_HOME": "/nonexistent/ndk", "TVM_NDK_CC": None}, "ANDROID_NDK_HOME=/nonexistent/ndk"),
    ({"kind": "llvm", "mtriple": "riscv64-linux-gnu", "num-cores": 4}, {}, "no known toolchain"),
])
def test_toolchain_errors_say_what_to_do(monkeypatch, target, env, expected):
    from host.toolchain import toolchain_for

    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(EdgetuneError, match=expected.replace("(", r"\(")):
        toolchain_for(target)


def test_missing_cross_compiler_names_the_package(monkeypatch):
    from host.toolchain import toolchain_for

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EdgetuneError, match=r"apt-get install g\+\+-arm-linux-gnueabihf"):
        toolchain_for({"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "num-cores": 4})
    with pytest.raises(EdgetuneError, match=r"apt-get install g\+\+-aarch64-linux-gnu"):
        toolchain_for({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "num-cores": 4})


@pytest.mark.parametrize("value, expected", [
    ("not json", "is not JSON"),
    ('{"kind": "llvm"}', 'must be an llvm target with an "mtriple"'),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "native"}', "native"),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "no-such-cpu-9000"}', "LLVM does not know CPU"),
])
def test_bad_targets_are_refused(value, expected):
    from host.toolchain import parse_target

    with pytest.raises(EdgetuneError, match=expected):
        parse_target(value)


def test_symbolic_input_needs_a_shape_and_unsupported_ops_are_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from host.models.onnx_import import load_onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    relu = onnx.helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                  opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "relu.onnx"
    onnx.save(relu, str(path))
    with pytest.raises(EdgetuneError, match=r"symbolic shape .*--input-shape x:"):
        load_onnx(path)
    model = load_onnx(path, {"x": (2, 8)})
    assert model.inputs[0].shape == (2, 8) and model.outputs[0].shape == (2, 8)

    odd = onnx.helper.make_model(helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], domain="")], "g",
                                                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])]),
                                 opset_imports=[helper.make_opsetid("", 17)])
    odd_path = tmp_path / "odd.onnx"
    onnx.save(odd, str(odd_path))
    with pytest.raises(EdgetuneError, match="operators TVM cannot import: FancyOp"):
        load_onnx(odd_path)
