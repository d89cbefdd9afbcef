"""The data layout a model's kernels are tuned and built in.

ONNX models are NCHW: a convolution's output rows run along the image's width, so a kernel vectorised
along them loads its input with the convolution's stride (a gather for the stride-2 convs and the stem)
and has as many lanes as the image is wide (7 at resnet18's last stage). In NHWC the channels are
innermost: a kernel broadcasts one input value and multiplies it with a vector of output channels, for
every convolution shape and stride alike; ONNX Runtime's CPU kernels work on channel blocks (NCHWc) for
the same reason. Relax's ``ConvertLayout`` rewrites the model's convolutions to NHWC and carries the
layout through the element-wise operators, pools and reductions after them, with one transpose where
the model's input comes in (and one before an operator that needs NCHW).

The layout is part of a tuning log's kernel form (its workloads are NHWC kernels): a log records it,
and a log that does not say was tuned in NCHW (see :func:`log_layout`).
"""

from __future__ import annotations

from typing import Any

NCHW = "NCHW"
NHWC = "NHWC"
LAYOUTS = (NCHW, NHWC)
DEFAULT = NHWC


def log_layout(session: dict[str, Any], has_records: bool, wanted: str = DEFAULT) -> str:
    """The layout of a tuning log's kernels: what its session recorded; a log with records from before
    the layout was recorded was tuned in NCHW; an empty log takes ``wanted``."""
    from ..logs.format import kernel_form

    return kernel_form(session, "layout", has_records, NCHW, wanted, lambda value: value in LAYOUTS)


def convert_layout(mod: Any, layout: str) -> Any:
    """``mod`` with its 2-D convolutions in ``layout`` (the model as imported for NCHW)."""
    if layout == NCHW:
        return mod
    if layout != NHWC:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    from tvm import relax

    mod = scalar_bounds_as_ops(mod)
    return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)


def _scalar_bound(func: Any) -> str | None:
    """``"maximum"`` or ``"minimum"`` when ``func`` is an element-wise max/min of a tensor with a 0-d
    tensor (what TVM's ONNX importer makes of ``Clip``, as a ready-made kernel), else None."""
    from tvm import tirx
    from tvm.ir import IRModule
    from tvm.ir.expr import TensorLoad
    from tvm.s_tir import Schedule

    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3:
        return None
    try:
        sch = Schedule(IRModule({"main": func}))
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - not a kernel of blocks
        return None
    if len(blocks) != 1:
        return None
    block = sch.get(blocks[0])
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, (tirx.Max, tirx.Min)):
        return None
    block_vars = [iv.var for iv in block.iter_vars]

    def over_block(indices) -> bool:
        return len(indices) == len(block_vars) and all(i.same_as(v) for i, v in zip(indices, block_vars))

    loads = sorted((store.value.a, store.value.b), key=lambda e: len(getattr(e, "indices", ())))
    bound, data = loads
    if not (isinstance(bound, TensorLoad) and isinstance(data, TensorLoad)
            and len(bound.indices) == 0 and len(bound.source.shape) == 0
            and over_block(data.indices) and over_block(store.indices)
            and [int(d) for d in data.source.shape] == [int(d) for d in store.buffer.shape]
            and [int(iv.dom.extent) for iv in block.iter_vars] == [int(d) for d in store.buffer.shape]
            and data.source.dtype == store.buffer.dtype):
        return None
    return "maximum" if isinstance(store.value, tirx.Max) else "minimum"


def scalar_bounds_as_ops(mod: Any) -> Any:
    """``mod`` with its ready-made element-wise max/min-with-a-scalar kernels (the importer's ``Clip``,
    ReLU6 in mobilenet_v2) turned back into ``R.maximum``/``R.minimum``, which layout conversion
    carries through; left as kernels, each would be wrapped in two transposes and fused with nothing."""
    import tvm
    from tvm import relax

    kinds = {gv.name_hint: _scalar_bound(func) for gv, func in mod.functions.items()}
    kinds = {name: kind for name, kind in kinds.items() if kind}
    if not kinds:
        return mod
    call_tir = tvm.ir.Op.get("relax.call_tir")
    ops = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - the visitor's name
            call = super().visit_call_(call)
            callee = call.args[0] if call.op.same_as(call_tir) else None
            if isinstance(callee, relax.GlobalVar) and callee.name_hint in kinds \
                    and isinstance(call.args[1], relax.Tuple) and len(call.args[1].fields) == 2:
                bound, data = sorted(call.args[1].fields, key=lambda arg: arg.ty.ndim)
                if bound.ty.ndim == 0 and data.ty.ndim > 0 and bound.ty.dtype == data.ty.dtype:
                    return ops[kinds[callee.name_hint]](data, bound)
            return call

    rewriter = _Rewrite(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
