"""ONNX -> Relax, with the checks a user needs before waiting on a tuning run.

Every problem (not a file, corrupt file, symbolic input shape, unsupported operator) is one
:class:`EdgetuneError` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgetuneError

logger = logging.getLogger(__name__)

BUNDLED_MODELS = {"tiny_cnn": Path(__file__).resolve().parent.parent / "data" / "tiny_cnn.onnx"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class Model:
    """An imported model: the Relax module (weights bound as constants) and what it takes and gives."""

    name: str
    path: Path
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    mod: Any = field(repr=False)  # tvm.IRModule
    weight_bytes: int = 0  # bytes of the model's initializers (its weights), as stored in the file

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "path": str(self.path)}


def parse_input_shapes(values: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """``--input-shape name:1x3x224x224`` (repeatable) to a dict. Raises :class:`EdgetuneError`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.rpartition(":")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise EdgetuneError(f"--input-shape {value!r} is not NAME:DxDxD (e.g. --input-shape input:1x3x224x224)")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def resolve_model_path(model: str | Path) -> Path:
    """A path, or the name of a model shipped with edgetune (``tiny_cnn``)."""
    if str(model) in BUNDLED_MODELS:
        return BUNDLED_MODELS[str(model)]
    path = Path(model)
    if not path.is_file():
        raise EdgetuneError(f"model {str(model)!r} not found: pass the path of an .onnx file (or `tiny_cnn`)")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 16: "bfloat16"}


def _specs(values, initializers: set[str], shapes: dict[str, tuple[int, ...]], path: Path,
           check_static: bool) -> list[TensorSpec]:
    specs = []
    for value in values:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(tensor_type.elem_type, f"onnx-type-{tensor_type.elem_type}")
        if value.name in shapes:
            shape = shapes[value.name]
        else:
            dims = []
            for dim in tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value > 0:
                    dims.append(dim.dim_value)
                elif check_static:
                    raise EdgetuneError(
                        f"{path.name}: input {value.name!r} has a symbolic shape "
                        f"({', '.join(d.dim_param or '?' if not d.HasField('dim_value') else str(d.dim_value) for d in tensor_type.shape.dim)}): "
                        f"give it with --input-shape {value.name}:1x3x224x224 (your sizes)"
                    )
                else:
                    dims.append(-1)
            shape = tuple(dims)
        specs.append(TensorSpec(value.name, tuple(shape), dtype))
    return specs


def load_onnx(model: str | Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Model:
    """Import an ONNX file as a Relax module with static shapes.

    Raises :class:`EdgetuneError` for a missing or corrupt file, symbolic input shapes without
    ``input_shapes``, or operators TVM cannot import (named in the message).
    """
    import onnx

    path = resolve_model_path(model)
    input_shapes = dict(input_shapes or {})
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - protobuf raises several types for a bad file
        raise EdgetuneError(f"{path.name} is not a valid ONNX file ({type(err).__name__}): re-export the model") from None
    graph = proto.graph
    if not graph.node:
        raise EdgetuneError(f"{path.name} has no operators (empty or corrupt ONNX graph): re-export the model")
    initializers = {init.name for init in graph.initializer}
    unknown = set(input_shapes) - {v.name for v in graph.input}
    if unknown:
        raise EdgetuneError(f"--input-shape names {sorted(unknown)} are not inputs of {path.name}; inputs: "
                            f"{[v.name for v in graph.input if v.name not in initializers]}")
    inputs = _specs(graph.input, initializers, input_shapes, path, check_static=True)
    outputs = _specs(graph.output, set(), {}, path, check_static=False)

    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = set(_get_convert_map()) | {"If", "Constant"}
    unsupported = sorted({n.op_type for n in graph.node if n.op_type not in supported})
    if unsupported:
        raise EdgetuneError(
            f"{path.name} uses ONNX operators TVM cannot import: {', '.join(unsupported)}: replace them "
            "(e.g. re-export with another opset or simplify the model with onnxsim)"
        )
    try:
        mod = from_onnx(proto, shape_dict={s.name: list(s.shape) for s in inputs},
                        dtype_dict={s.name: s.dtype for s in inputs}, keep_params_in_input=False)
    except Exception as err:  # noqa: BLE001 - the importer raises anything; report it in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EdgetuneError(f"{path.name}: TVM's ONNX importer failed: {first[:300]}") from None
    # Output shapes come from the imported module when the file leaves them symbolic.
    outputs = _outputs_from_mod(mod, outputs)
    return Model(name=path.stem, path=path, sha256=file_sha256(path), inputs=inputs, outputs=outputs, mod=mod,
                 weight_bytes=_initializer_bytes(graph))


def _initializer_bytes(graph) -> int:
    """Bytes of a graph's initializers: elements x element size (raw data or typed fields alike)."""
    import numpy as np
    from onnx import helper

    total = 0
    for init in graph.initializer:
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 4
        total += int(np.prod(list(init.dims), dtype=np.int64)) * itemsize
    return total


def _outputs_from_mod(mod, declared: list[TensorSpec]) -> list[TensorSpec]:
    ret = mod["main"].ret_ty
    infos = list(ret.fields) if hasattr(ret, "fields") else [ret]
    specs = []
    for i, info in enumerate(infos):
        name = declared[i].name if i < len(declared) else f"output_{i}"
        try:
            shape = tuple(int(d) for d in info.shape.values)
        except (AttributeError, TypeError):
            shape = declared[i].shape if i < len(declared) else ()
        specs.append(TensorSpec(name, shape, str(info.dtype)))
    return specs
