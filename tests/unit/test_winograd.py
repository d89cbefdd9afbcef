"""3x3 convolutions as Winograd kernels: which convolutions, the log's kernel form, and the numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import HOST_TARGET
from tests.unit.test_layout import _write_log


def mixed_convs_onnx(path: Path) -> Path:
    """Convolutions of every kind a model has: a 3x3 stride-1 one with 16 channels on 24x24 (36 tiles
    of 4x4: Winograd's), then a 3x3 with 8 input channels, a stride-2 3x3, a depthwise 3x3 and a 1x1
    (all direct), with a residual add after the first. Seeded random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)

    def weight(name: str, shape: tuple[int, ...]) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),  # 16 -> 16, 3x3: Winograd
        helper.make_node("Add", ["c1", "x"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),  # 1x1, 16 -> 8
        helper.make_node("Conv", ["c2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]),  # 3x3 with 8 in: direct
        helper.make_node("Conv", ["c3", "w4", "b4"], ["c4"], pads=[1, 1, 1, 1], strides=[2, 2]),  # stride 2
        helper.make_node("Conv", ["c4", "w5", "b5"], ["out"], pads=[1, 1, 1, 1], group=16),  # depthwise
    ]
    graph = helper.make_graph(
        nodes, "mixed_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 24, 24])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 12, 12])],
        initializer=[weight("w1", (16, 16, 3, 3)), weight("b1", (16,)), weight("w2", (8, 16, 1, 1)), weight("b2", (8,)),
                     weight("w3", (16, 8, 3, 3)), weight("b3", (16,)), weight("w4", (16, 16, 3, 3)), weight("b4", (16,)),
                     weight("w5", (16, 1, 3, 3)), weight("b5", (16,))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def mixed_convs(tmp_path_factory) -> Path:
    return mixed_convs_onnx(tmp_path_factory.mktemp("mixed") / "mixed_convs.onnx")


def test_a_log_says_whether_its_3x3_convs_are_winograd_and_an_older_log_has_direct_ones():
    from host.tuning.winograd import log_winograd

    assert log_winograd({"winograd": True}, True) is True  # the three-stage form: its records keep it
    assert log_winograd({"winograd": "fused"}, True) == "fused"
    assert log_winograd({"winograd": False}, True, wanted=True) is False  # its records keep their form
    assert log_winograd({"layout": "NHWC"}, True) is False  # records from before the choice was recorded
    assert log_winograd({"winograd": "tiles"}, True) is False  # a form this version does not know
    assert log_winograd({}, False, wanted=False) is False and log_winograd({}, False) == "fused"  # an empty log


def test_only_3x3_stride_1_convs_with_enough_channels_and_tiles_become_winograd_kernels(mixed_convs, tmp_path):
    from host.models.onnx_import import load_onnx
    from host.tuning.tasks import extract_tasks
    from tests.helpers_build import twin_convs_onnx

    model = load_onnx(str(mixed_convs))
    tasks = {t.name: t for t in extract_tasks(model.mod, HOST_TARGET, True, "NHWC", True)}
    direct = {t.name: t for t in extract_tasks(model.mod, HOST_TARGET, True, "NHWC", False)}
    winograd = [name for name in tasks if "winograd" in name]
    # One kernel: the first convolution with its bias, residual add and ReLU; its weights are
    # transformed at build time (no kernel of the model does it at run time).
    assert len(winograd) == 1 and winograd[0].startswith("fused_conv2d_winograd_add_add1_relu"), sorted(tasks)
    assert not [name for name in tasks if "winograd_weight" in name]
    # Every other convolution is the same workload as without Winograd.
    assert {t.workload_hash for name, t in tasks.items() if name not in winograd} \
        == {t.workload_hash for name, t in direct.items() if "relu" not in name}
    # Its kernel has a quarter of the direct convolution's multiplications, and a few transforms.
    (twin,) = [t for name, t in direct.items() if name.startswith("fused_conv2d_add_add1_relu")]
    assert 0.3 < tasks[winograd[0]].flops / twin.flops < 0.8, (tasks[winograd[0]].flops, twin.flops)
    # Without NHWC (the model's own NCHW layout), no convolution is Winograd's.
    assert not [t for t in extract_tasks(model.mod, HOST_TARGET, True, "NCHW", True) if "winograd" in t.name]
    # Nor on a small image, where few tiles share the (four times larger) transformed weights: 28x28 has
    # 49 tiles of 4x4, 12x12 has 9.
    for size, expected in ((28, 2), (12, 0)):
        twins = load_onnx(str(twin_convs_onnx(tmp_path / f"twins{size}.onnx", channels=16, size=size)))
        assert len([t for t in extract_tasks(twins.mod, HOST_TARGET, True, "NHWC", True) if "winograd" in t.name]) \
            == expected, size


def test_winograd_kernels_match_onnxruntime_and_a_log_builds_in_the_form_it_was_tuned_in(mixed_convs, tmp_path):
    from host.build.build import build
    from host.models.onnx_import import load_onnx
    from host.tuning.tasks import extract_tasks

    model = load_onnx(str(mixed_convs))
    fused_tasks = extract_tasks(model.mod, HOST_TARGET, True, "NHWC", "fused")
    winograd_tasks = extract_tasks(model.mod, HOST_TARGET, True, "NHWC", True)
    direct_tasks = extract_tasks(model.mod, HOST_TARGET, True, "NHWC", False)

    def built(name: str, log: Path) -> dict[str, Any]:
        result = build(str(mixed_convs), "test-board", tmp_path / name, log_dir=str(log), target=HOST_TARGET,
                       compare=False, use_schedules=False)
        info = json.loads((tmp_path / name / "build.json").read_text())
        assert info["host_check"]["max_abs_err"] < 1e-4, info["host_check"]  # against ONNX Runtime
        return {"winograd": info["winograd"], "tuned": sum(1 for c in result.coverage if c.tuned),
                "tasks": len(result.coverage)}

    # A new log's Winograd kernels (one sampled schedule per task): every record used, the numbers right.
    fused = _write_log(tmp_path / "fused-log", model, {"layout": "NHWC", "winograd": "fused"}, fused_tasks)
    assert built("fused", fused) == {"winograd": "fused", "tuned": len(fused_tasks), "tasks": len(fused_tasks)}
    # The two forms are two workloads: a log keeps building the form it was tuned in.
    def winograd_hashes(tasks):
        return {t.workload_hash for t in tasks if "winograd" in t.name}

    assert len(winograd_hashes(fused_tasks)) == 1 and not winograd_hashes(fused_tasks) & winograd_hashes(winograd_tasks)
    # A log of three-stage Winograd kernels, from before the fused form.
    said = _write_log(tmp_path / "winograd-log", model, {"layout": "NHWC", "winograd": True}, winograd_tasks)
    assert built("winograd", said) == {"winograd": True, "tuned": len(winograd_tasks), "tasks": len(winograd_tasks)}
    # A log from before the choice was recorded holds direct kernels: built with them, every record used.
    old = _write_log(tmp_path / "old-log", model, {"layout": "NHWC"}, direct_tasks)
    assert built("old", old) == {"winograd": False, "tuned": len(direct_tasks), "tasks": len(direct_tasks)}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "three-stage"])
def test_every_sampled_schedule_of_a_winograd_kernel_computes_the_convolution(fused):
    """Both forms' schedules with their decisions drawn at random (the fused rule's tile rows and
    register blocks; the three-stage form's transform rules and MetaSchedule's tiling of the products):
    each schedule's kernel gives the direct convolution's numbers, on an image whose last tiles are partly
    outside it."""
    import tvm
    from tvm import te, tirx
    from tvm.s_tir import meta_schedule as ms

    from host.tuning import winograd

    winograd.register_rules()
    size, cin, cout = 10, 16, 24  # 3x3 tiles of 4, the last one partly outside the image
    data = te.placeholder((1, size, size, cin), "float32", name="data")
    packed = te.placeholder((6, 6, cin, cout), "float32", name="packed")
    conv = winograd.conv2d_nhwc(data, packed, fused=fused)
    # An epilogue that reads the convolution twice (a block with two consumers, as SiLU's has).
    relu = te.compute(conv.shape, lambda *i: te.max(conv(*i), tirx.const(0.0, "float32")), name="relu")
    gate = te.compute(conv.shape, lambda *i: te.sigmoid(conv(*i)), name="gate")
    out = te.compute(conv.shape, lambda *i: relu(*i) + gate(*i) * tirx.const(0.5, "float32"), name="out")
    mod = tvm.IRModule({"main": te.create_prim_func([data, packed, out])})
    target = tvm.target.Target(HOST_TARGET)

    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, size, size, cin)).astype("float32")
    w = (rng.standard_normal((cout, 3, 3, cin)) * 0.2).astype("float32")  # OHWI
    g = winograd._matrices(winograd.TILE)[2]
    padded = np.pad(x.astype("float64"), ((0, 0), (1, 1), (1, 1), (0, 0)))
    direct = sum(np.einsum("nhwc,oc->nhwo", padded[:, i:i + size, j:j + size, :], w[:, i, j, :])
                 for i in range(3) for j in range(3))
    expected = np.maximum(direct, 0) + 0.5 / (1 + np.exp(-direct))
    # The weight transform as TVM runs it at build time, against G g G^T in float64.
    weight = te.placeholder(w.shape, "float32", name="w")
    transform = tvm.compile(tvm.IRModule({"main": te.create_prim_func([weight, winograd.weight_transform(weight)])}),
                            target="llvm")
    dev = tvm.cpu()
    packed_np = tvm.runtime.empty((6, 6, cin, cout), "float32", dev)
    transform["main"](tvm.runtime.tensor(w, dev), packed_np)
    np.testing.assert_allclose(packed_np.numpy(), np.einsum("ek,fl,oklc->efco", g, g, w.astype("float64")),
                               rtol=1e-5, atol=1e-5)

    ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply", task_name="winograd",
                         search_strategy="replay-trace", rand_state=1)
    spaces = ctx.generate_design_space()
    assert spaces
    built = 0
    for seed, space in enumerate(list(spaces) * (6 if fused else 2)):
        sch = tvm.s_tir.Schedule(mod, seed=seed + 1)
        space.trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=lambda *_: None)
        if not all(p.apply(sch) for p in ctx.space_generator.postprocs):
            continue
        if fused:  # one parallel loop: the thread pool is launched once a run
            assert sch.mod.script().count("T.parallel(") == 1, sch.mod.script()
        lib = tvm.compile(sch.mod, target=target)
        out = tvm.runtime.empty((1, size, size, cout), "float32", dev)
        lib["main"](tvm.runtime.tensor(x, dev), packed_np, out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
        built += 1
    assert built >= len(spaces) * (6 if fused else 2) // 2
