"""The convolutions' data layout: kernels tuned and built in NHWC keep their epilogues (ReLU6 included),
compute the model's result, and a tuning log is built in the layout it was tuned in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import HOST_TARGET


def relu6_net_onnx(path: Path) -> Path:
    """A small mobilenet-like ONNX model: a stride-2 conv, a depthwise conv and a 1x1 projection, each
    followed by ``Clip(0, 6)`` (ReLU6, which TVM's importer turns into ready-made max/min kernels), then
    a max pool, a global average pool and a dense layer. Seeded random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)

    def weight(name: str, shape: tuple[int, ...]) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"]),
        helper.make_node("Clip", ["c3", "lo", "hi"], ["r3"]),
        helper.make_node("MaxPool", ["r3"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["out"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "relu6_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 10])],
        initializer=[weight("w1", (8, 3, 3, 3)), weight("b1", (8,)), weight("w2", (8, 1, 3, 3)), weight("b2", (8,)),
                     weight("w3", (16, 8, 1, 1)), weight("b3", (16,)), weight("w4", (10, 16)), weight("b4", (10,)),
                     numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                     numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def relu6_net(tmp_path_factory) -> Path:
    return relu6_net_onnx(tmp_path_factory.mktemp("relu6") / "relu6_net.onnx")


def test_a_log_says_its_layout_and_an_older_log_was_tuned_in_nchw():
    from host.tuning.layout import log_layout

    assert log_layout({"layout": "NCHW"}, True) == "NCHW"
    assert log_layout({"layout": "NHWC"}, True, "NCHW") == "NHWC"
    assert log_layout({"layout_rewrite": True}, True) == "NCHW"  # records from before the layout was recorded
    assert log_layout({}, False) == "NHWC"  # a new log: the default
    assert log_layout({}, False, "NCHW") == "NCHW"
    assert log_layout({"layout": "NHWC"}, False, "NCHW") == "NCHW"  # no records yet: what is asked now


def test_in_nhwc_relu6_stays_in_its_convolution_and_the_kernels_read_channels_last(relu6_net):
    from host.models.onnx_import import load_onnx
    from host.tuning.siblings import main_signature
    from host.tuning.tasks import extract_tasks

    model = load_onnx(relu6_net)
    by_layout = {layout: extract_tasks(model.mod, HOST_TARGET, True, layout) for layout in ("NCHW", "NHWC")}
    for layout, tasks in by_layout.items():
        convs = [t for t in tasks if "conv2d" in t.name]
        assert len(convs) == 3, (layout, [t.name for t in tasks])
        # Each ReLU6 is the epilogue of its conv's kernel, not a kernel of its own between transposes.
        assert all("maximum" in t.name and "minimum" in t.name for t in convs), [t.name for t in tasks]
        assert not [t for t in tasks if "maximum" in t.name and "conv2d" not in t.name]
    # NHWC: a transpose of the model's input and one before Flatten (of the pooled 16 values), none around
    # the convs; the stride-2 conv reads its (padded) input channels last.
    transposes = sorted(t.name for t in by_layout["NHWC"] if "transpose" in t.name)
    assert len(transposes) == 2 and "transpose1" in transposes and "reshape" in transposes[0], transposes
    assert not [t for t in by_layout["NCHW"] if "transpose" in t.name]
    stem = {layout: next(t for t in tasks if "conv2d" in t.name and t.flops == max(x.flops for x in tasks))
            for layout, tasks in by_layout.items()}
    read_shapes = {layout: main_signature(t.extracted.dispatched[0])[0][1] for layout, t in stem.items()}
    assert (1, 34, 34, 3) in read_shapes["NHWC"] and (1, 3, 34, 34) in read_shapes["NCHW"], read_shapes


def _write_log(folder: Path, model, session_extra: dict[str, Any], tasks) -> Path:
    """A tuning log of ``model`` for this machine with one default schedule per task of ``tasks``."""
    from host.build.build import fallback_database
    from host.logs.tuninglog import TuningLog

    import tvm

    records = fallback_database(tasks, tvm.target.Target(HOST_TARGET)).get_all_tuning_records()
    log = TuningLog.open(folder, create=True)
    try:
        log.session.update({"format": 1, "model": {"name": model.name, "sha256": model.sha256},
                            "target": HOST_TARGET, "layout_rewrite": True, **session_extra})
        log.save_session()
        db = log.database()
        for record in records:
            db.commit_tuning_record(record.__class__(record.trace, db.commit_workload(record.workload.mod),
                                                     record.run_secs, record.target, record.args_info))
    finally:
        log.close()
    return folder


def test_a_log_builds_in_the_layout_it_was_tuned_in_and_both_layouts_match_onnxruntime(relu6_net, tmp_path):
    from host.build.build import build
    from host.models.onnx_import import load_onnx
    from host.tuning.tasks import extract_tasks

    model = load_onnx(relu6_net)
    nchw_tasks = extract_tasks(model.mod, HOST_TARGET, True, "NCHW")
    nhwc_tasks = extract_tasks(model.mod, HOST_TARGET, True, "NHWC")
    # Kernels the layout does not touch (the dense layer) are the same workload in both.
    same = [t.name for t in nhwc_tasks if t.workload_hash in {n.workload_hash for n in nchw_tasks}]
    assert same and not [name for name in same if "conv2d" in name or "pool" in name], same

    def built(name: str, log: Path | None) -> dict[str, Any]:
        result = build(str(relu6_net), "test-board", tmp_path / name, log_dir=str(log) if log else None,
                       target=HOST_TARGET, compare=False, use_schedules=False)
        info = json.loads((tmp_path / name / "build.json").read_text())
        assert info["host_check"]["max_abs_err"] < 1e-4, info["host_check"]  # against ONNX Runtime
        return {"layout": info["layout"], "tuned": sum(1 for c in result.coverage if c.tuned)}

    # A log written before the layout was recorded holds NCHW kernels: built in NCHW, every record used.
    old = _write_log(tmp_path / "old-log", model, {}, nchw_tasks)
    assert built("old", old) == {"layout": "NCHW", "tuned": len(nchw_tasks)}
    # The same records in a log that says NHWC match none of its convolutions (defaults for them).
    said = _write_log(tmp_path / "nhwc-log", model, {"layout": "NHWC"}, nchw_tasks)
    assert built("said-nhwc", said) == {"layout": "NHWC", "tuned": len(same)}
    # Without a log: NHWC, the default.
    assert built("no-log", None)["layout"] == "NHWC"
