"""Write resnet34.onnx: ResNet-34 with seeded random weights, in the form of ../shared/models/resnet18.onnx.

    python bench/make_resnet34.py [--out PATH] [--seed 34]

The same graph as resnet18.onnx (opset 17; batch norm folded into each conv's bias; stem 7x7/2 conv,
3x3/2 max pool; basic blocks of two 3x3 convs with a 1x1/2 conv on the skip where the stage halves
the image; global mean; fc 512 -> 1000), with ResNet-34's blocks per stage (3, 4, 6, 3) instead of
(2, 2, 2, 2). Every conv shape of resnet34 is one of resnet18's, so the two models have the same
tuning tasks with other weights: the schedule-store benchmark tunes one to seed the other.
Weights: He-normal, biases zero, from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path.home() / ".cache" / "edgetune" / "models" / "resnet34.onnx"
STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))


def build(seed: int = 34):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list = []
    weights: list = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str) -> str:
        w = rng.normal(0.0, (2.0 / (cin * k * k)) ** 0.5, (cout, cin, k, k)).astype("float32")
        weights.append(numpy_helper.from_array(w, f"{name}.weight"))
        weights.append(numpy_helper.from_array(np.zeros(cout, "float32"), f"{name}.bias"))
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"],
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                                      dilations=[1, 1], group=1))
        return f"{name}.out"

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"]))
        return f"{x}.relu"

    x = relu(conv("input", 3, 64, 7, 2, "stem"))
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4,
                                  ceil_mode=0, dilations=[1, 1]))
    x, cin, block = "pool", 64, 0
    for stage, (cout, blocks) in enumerate(STAGES):
        for i in range(blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            name = f"blocks.{block}"
            y = conv(relu(conv(x, cin, cout, 3, stride, f"{name}.c1")), cout, cout, 3, 1, f"{name}.c2")
            skip = conv(x, cin, cout, 1, stride, f"{name}.down") if stride != 1 or cin != cout else x
            nodes.append(helper.make_node("Add", [y, skip], [f"{name}.add"]))
            x, cin, block = relu(f"{name}.add"), cout, block + 1
    nodes.append(helper.make_node("ReduceMean", [x], ["mean"], axes=[2, 3], keepdims=0))
    fc = rng.normal(0.0, 0.025, (1000, 512)).astype("float32")
    weights += [numpy_helper.from_array(fc, "fc.weight"), numpy_helper.from_array(np.zeros(1000, "float32"), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["mean", "fc.weight", "fc.bias"], ["output"], alpha=1.0, beta=1.0, transB=1))
    graph = helper.make_graph(nodes, "resnet34", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1000])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgetune-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write(out: Path = DEFAULT_OUT, seed: int = 34) -> Path:
    """Write the model to ``out`` (atomically) unless a file is there already; return its path."""
    import onnx

    out = Path(out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(out.name + ".part")
        onnx.save(build(seed), str(part))
        part.replace(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=34)
    args = parser.parse_args()
    print(write(args.out, args.seed))


if __name__ == "__main__":
    main()
