"""Winograd convolutions: a 3x3 convolution with a quarter of the multiplications.

A direct 3x3 convolution multiplies every input value with nine weights per output channel. Winograd's
F(4x4, 3x3) computes each 4x4 tile of the output from a 6x6 tile of the input: the input tile and the
weights are transformed (``B^T d B`` and ``G g G^T``), multiplied element by element, summed over the
input channels and transformed back (``A^T m A``). The sum over channels is a batch of 36 matrix
products (``bgemm``) with 36 multiplications per 16 outputs and input channel where the direct
convolution needs 144; the transforms cost a few additions per value. ONNX Runtime's CPU kernels run
3x3 convolutions directly (NCHWc), so this is where a tuned model can pass it on resnet-style models.

The weights are constants of the model, so their transform runs once, at build time (``FoldConstant``
after legalization); the kernel that is tuned and shipped reads the transformed weights. The kernel's
three stages are one tuning task, with the epilogue the model fuses into it. It comes in two forms:

- ``FUSED`` (new logs): the whole kernel is one parallel loop over rows of output tiles. Each
  iteration transforms its tiles' inputs, multiplies them for all 36 points (the products' sums kept in
  registers over the input channels), transforms them back and writes its rows of the output with the
  epilogue, so what one stage writes the next reads from the same core's L1, and the thread pool is
  launched once, not four times. Its rule (:func:`_fused_rule`) samples the tile rows per iteration
  and the register block of the products (tiles x output channels). Against the separate form's best
  after a 256-trial session, tiny_cnn's kernel took 10-12 us instead of 21.5 (13 against 46 in a
  stretch when the VM's two cores computed slowly side by side), and resnet18's 56x56 and 28x28
  kernels 202-209 us instead of 245-297 (its best after 1,000 trials), with decisions picked by hand
  from a small grid, before any search.
- ``True`` (logs from before): three parallel stages. ``bgemm`` takes MetaSchedule's own multi-level
  tiling and the two transforms the rules here; a log tuned this way keeps building this way.

Whether a tuning log's 3x3 convolutions are Winograd kernels, and in which form, is part of its kernel
form (see :func:`log_winograd`); a log that does not say has direct ones. Numerically, F(4x4, 3x3) in
float32 differs from the direct sum by a few units in the sixth digit.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

TILE = 4  # F(4x4, 3x3): 6x6 input tiles
MIN_CHANNELS = 16  # below this, the transforms cost more than the products they save
# Transformed weights are 4x the size (36 values per 9): they pay where many tiles share them. At 14x14
# and 7x7 (16 and 4 tiles; resnet18's last two stages, 256 and 512 channels) direct kernels were as fast
# or faster after the same trials, and their weights are what a cold run reads from memory.
MIN_TILES = 32
DATA_PACK_RULE = "edgetune_winograd_data_pack"
INVERSE_RULE = "edgetune_winograd_inverse"
FUSED_RULE = "edgetune_winograd_fused"
FUSED = "fused"  # the kernel form of a new log's Winograd kernels (``True``: the three-stage form)


def log_winograd(session: dict[str, Any], has_records: bool, wanted: bool = True) -> bool | str:
    """How a tuning log's 3x3 convolutions are computed: ``False`` (direct), ``True`` (Winograd in three
    parallel stages) or ``FUSED`` (Winograd in one parallel loop). A log with records keeps what its
    session recorded, and one from before the choice was recorded has direct ones; an empty log takes
    ``FUSED`` when ``wanted``."""
    from ..logs.format import kernel_form

    return kernel_form(session, "winograd", has_records, False, FUSED if wanted else False,
                       lambda value: isinstance(value, bool) or value == FUSED)


@lru_cache(maxsize=None)
def _matrices(tile: int):
    """Winograd's (A, B, G) for F(tile x tile, 3x3), as float64 numpy arrays (TVM's Cook-Toom points)."""
    import numpy as np
    from tvm.topi.nn import winograd_util

    points = winograd_util._interpolation_points(tile + 2)  # noqa: SLF001 - TVM's own choice of points
    a, b, g = winograd_util._cook_toom_convolution(points, tile, 3)  # noqa: SLF001
    return np.array(a, dtype="float64"), np.array(b, dtype="float64"), np.array(g, dtype="float64")


def _transform(matrix: Any, i: Any, read: Any, dtype: str) -> Any:
    """``sum_a matrix[a, i] * read(a)`` with the zero terms left out and the unit coefficients as plain
    additions: one short expression per value of ``i``, chosen by ``i``. Once the rules unroll ``i``,
    each value is two to five additions with constants (the 2-D transforms are two of these)."""
    from tvm import tirx

    rows, cols = matrix.shape
    expr = None
    for ii in range(cols):
        terms = None
        for a in range(rows):
            coeff = float(matrix[a, ii])
            if coeff == 0.0:
                continue
            term = read(a)
            if coeff == -1.0:
                term = -term
            elif coeff != 1.0:
                term = term * tirx.const(coeff, dtype)
            terms = term if terms is None else terms + term
        expr = terms if expr is None else tirx.Select(i == ii, terms, expr)
    return expr


def weight_transform(weight: Any, tile: int = TILE) -> Any:
    """The transformed weights ``[6, 6, CI, CO]`` of OHWI 3x3 weights (run at build time): the output
    channels innermost, as the products read them (a vector of output channels per input value)."""
    from tvm import te
    from tvm.topi.utils import const_matrix

    co_n, kh_n, kw_n, ci_n = (int(d) for d in weight.shape)
    alpha = tile + 2
    g = const_matrix(_matrices(tile)[2].astype(str(weight.dtype)), "G")
    kh = te.reduce_axis((0, kh_n), "r_kh")
    kw = te.reduce_axis((0, kw_n), "r_kw")
    return te.compute((alpha, alpha, ci_n, co_n),
                      lambda eps, nu, ci, co: te.sum(weight[co, kh, kw, ci] * g[eps, kh] * g[nu, kw], axis=[kh, kw]),
                      name="winograd_weight")


def conv2d_nhwc(data: Any, packed: Any, tile: int = TILE, fused: bool = False) -> Any:
    """A 3x3, stride-1, padding-1 NHWC convolution of ``data`` with transformed weights ``packed``;
    ``fused``: the kernel takes :func:`_fused_rule` (the stages take no rule of their own), else the
    three-stage form's rules. The computation is the same; the attributes make them two workloads."""
    from tvm import te, tirx
    from tvm.topi.nn.pad import pad

    n_n, h_n, w_n, ci_n = (int(d) for d in data.shape)
    alpha, co_n, dtype = tile + 2, int(packed.shape[3]), data.dtype
    a_mat, b_mat, _ = _matrices(tile)
    tiles_h, tiles_w = (h_n + tile - 1) // tile, (w_n + tile - 1) // tile
    per_image = tiles_h * tiles_w
    padded = pad(data, (0, 1, 1, 0), (0, tiles_h * tile + 1 - h_n, tiles_w * tile + 1 - w_n, 0),
                 name="winograd_pad", attrs={"schedule_rule": "None"})

    def input_tile(a, b, p, ci):
        return padded[p // per_image, (p // tiles_w) % tiles_h * tile + a, p % tiles_w * tile + b, ci]

    tiles = n_n * per_image
    # B^T d B as two 1-D transforms: the rows of every tile, then its columns.
    data_rows = te.compute(
        (alpha, alpha, tiles, ci_n),
        lambda eps, b, p, ci: _transform(b_mat, eps, lambda a: input_tile(a, b, p, ci), dtype),
        name="data_pack_rows", attrs={"schedule_rule": "None"})
    stage = {"schedule_rule": "None"} if fused else None
    data_pack = te.compute(
        (alpha, alpha, tiles, ci_n),
        lambda eps, nu, p, ci: _transform(b_mat, nu, lambda b: data_rows[eps, b, p, ci], dtype),
        name="data_pack", attrs=stage or {"schedule_rule": DATA_PACK_RULE})
    ci = te.reduce_axis((0, ci_n), "ci")
    bgemm = te.compute((alpha, alpha, tiles, co_n),
                       lambda eps, nu, p, co: te.sum(data_pack[eps, nu, p, ci] * packed[eps, nu, ci, co], axis=[ci]),
                       name="bgemm", attrs=stage)
    # A reduction of one step: MetaSchedule's tiling of bgemm fuses a *spatial* consumer into its tiles,
    # which the transform's constant indices cannot take.
    one = te.reduce_axis((0, 1), "one")
    inverse_rows = te.compute(
        (tile, alpha, tiles, co_n),
        lambda vh, b, p, co: te.sum(_transform(a_mat, vh, lambda a: bgemm[a + one, b, p, co], dtype), axis=[one]),
        name="inverse_rows", attrs={"schedule_rule": "None"})
    inverse = te.compute(
        (tile, tile, tiles, co_n),
        lambda vh, vw, p, co: _transform(a_mat, vw, lambda b: inverse_rows[vh, b, p, co], dtype),
        name="inverse", attrs=stage or {"schedule_rule": INVERSE_RULE})
    return te.compute((n_n, h_n, w_n, co_n),
                      lambda n, h, w, co: inverse[h % tile, w % tile,
                                                  n * per_image + h // tile * tiles_w + w // tile, co],
                      name="conv2d_winograd", attrs={"schedule_rule": FUSED_RULE} if fused else None)


def eligible(call: Any) -> bool:
    """Whether a ``relax.nn.conv2d`` call is one this module computes: NHWC/OHWI float32, 3x3, stride 1,
    dilation 1, one group, padding 1 on every side, static shapes, at least MIN_CHANNELS channels and
    MIN_TILES output tiles."""
    attrs = call.attrs
    try:
        data_shape = [int(d) for d in call.args[0].ty.shape]
        weight_shape = [int(d) for d in call.args[1].ty.shape]
    except (TypeError, AttributeError):
        return False
    return (attrs.data_layout == "NHWC" and attrs.kernel_layout == "OHWI" and attrs.out_layout == "NHWC"
            and [int(s) for s in attrs.strides] == [1, 1] and [int(d) for d in attrs.dilation] == [1, 1]
            and int(attrs.groups) == 1 and [int(p) for p in attrs.padding] == [1, 1, 1, 1]
            and str(call.args[0].ty.dtype) == "float32" and str(call.args[1].ty.dtype) == "float32"
            and (attrs.out_dtype is None or str(attrs.out_dtype) in ("", "void", "float32"))
            and len(data_shape) == 4 and len(weight_shape) == 4 and weight_shape[1:3] == [3, 3]
            and weight_shape[3] == data_shape[3] >= MIN_CHANNELS and weight_shape[0] >= MIN_CHANNELS
            and -(-data_shape[1] // TILE) * -(-data_shape[2] // TILE) >= MIN_TILES)


def legalize_map(form: bool | str = FUSED) -> dict[str, Any]:
    """``LegalizeOps``' customisation: eligible 3x3 convolutions become a weight transform (folded at
    build time) and a Winograd kernel of ``form`` (``True`` or ``FUSED``, see :func:`log_winograd`);
    every other convolution takes TVM's own legalization."""
    import tvm

    register_rules()
    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")

    def conv2d(bb, call):
        if not eligible(call):
            return default(bb, call)
        packed = bb.emit_te(weight_transform, call.args[1], primfunc_name_hint="winograd_weight")
        return bb.call_te(conv2d_nhwc, call.args[0], packed, fused=form == FUSED, primfunc_name_hint="conv2d_winograd")

    return {"relax.nn.conv2d": conv2d}


def _transform_schedule(sch: Any, block: Any) -> list[Any]:
    """A 2-D transform's schedule: tiles x channels split by sampled factors, the outer parts in
    parallel, the inner channels vectorised, and per tile the values of both 1-D passes unrolled (the
    row pass computed there, into a few registers' worth of values)."""
    (rows,) = sch.get_producers(block)
    loops = sch.get_loops(block)
    corner, (tiles, channels) = loops[:2], loops[2:4]
    tiles_out, tiles_in = sch.split(tiles, sch.sample_perfect_tile(tiles, n=2, max_innermost_factor=16))
    chan_out, chan_in = sch.split(channels, sch.sample_perfect_tile(channels, n=2, max_innermost_factor=64))
    sch.reorder(tiles_out, chan_out, tiles_in, *corner, chan_in)
    for loop in corner:
        sch.unroll(loop)
    sch.compute_at(rows, tiles_in, preserve_unit_loops=True)
    # Under tiles_in: the row pass's own loops (then, for the inverse, its one-step reduction).
    outer, inner, _tile, chan = sch.get_loops(rows)[3:7]
    sch.unroll(outer)
    sch.unroll(inner)
    sch.vectorize(chan)
    sch.parallel(sch.fuse(tiles_out, chan_out))
    sch.vectorize(chan_in)
    return [sch]


def _data_pack_rule(sch: Any, block: Any) -> list[Any]:
    """The input transform's schedule, reading the padded input in place.

    The padding's bounds test then sits in every term of the unrolled row pass, which makes a
    candidate slow to compile and to extract cost-model features from (tiny_cnn's kernel: 0.58 s and
    36 ms, against 0.13 s and 3.8 ms for its direct convolution). Copying each tile's 6x6 input
    values beside it instead halves both (0.29 s, 17.5 ms) but makes the tuned kernels slower:
    resnet18's 28x28 kernel reached 574 us against 399 us in 128 trials of stock MetaSchedule each,
    and 697-710 us in a 500-trial session of resnet18 where one with the padding read in place got
    286-314 us.

    Padding the whole input once per kernel (its own block, rows in parallel, channels vectorised)
    cuts them more (0.43 s and 13 ms; resnet18's 28x28 kernel 0.48 -> 0.25 s), but every schedule
    runs 2-5% slower with the extra pass (the same decisions replayed in both forms: medians 1.024-1.045
    over 4-8 tuned schedules), and a 500-trial resnet18 session ran only 1.16x faster (8.8 against
    10.2 min, back to back), ending at 0.923x ONNX Runtime against 0.915x (estimates 9.3 and 7.9 ms)."""
    (rows,) = sch.get_producers(block)
    for producer in sch.get_producers(rows):  # the padding
        sch.compute_inline(producer)
    return _transform_schedule(sch, block)


def _fused_rule(sch: Any, block: Any) -> list[Any]:
    """The fused form's schedule, applied at the kernel's last stage (``conv2d_winograd``).

    The output's rows are split into rows of tiles (4 rows each), ``rows`` of them (sampled) per
    iteration of one parallel loop, under which every stage computes what those rows need: the input
    transform of their tiles (padding read in place, the 36 values of a tile unrolled, the channels
    vectorised), the products for all 36 points, the inverse transform and the output with the epilogue
    the model fused in (inlined). The products are blocked in registers: a sampled number of tiles times
    a sampled vector of output channels, summed over the input channels in a local buffer, then stored.
    Every loop is kept when its extent is 1, so that the trace's loops are the same for every decision
    (the search replays the trace with other decisions)."""
    (inverse,) = sch.get_producers(block)
    (inverse_rows,) = sch.get_producers(inverse)
    (bgemm,) = sch.get_producers(inverse_rows)
    (data_pack,) = sch.get_producers(bgemm)
    (data_rows,) = sch.get_producers(data_pack)
    for producer in sch.get_producers(data_rows):  # the padding
        sch.compute_inline(producer)
    # The epilogue: this block and every one after it but the kernel's output, inlined into the output
    # (FuseOps fuses only elementwise and broadcast operators after a convolution).
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    *epilogue, out = blocks[names.index(sch.get(block).name_hint):]
    for stage in epilogue:
        sch.compute_inline(stage)
    batch, height, _width, channels = sch.get_loops(out)
    tile_rows, _in_tile = sch.split(height, [None, TILE])
    outer, _rows = sch.split(tile_rows, sch.sample_perfect_tile(tile_rows, n=2, max_innermost_factor=8))
    chunk = sch.fuse(batch, outer)
    sch.parallel(chunk)
    sch.vectorize(channels)

    _tile_by_tile(sch, inverse, inverse_rows, chunk)

    sch.compute_at(bgemm, chunk, preserve_unit_loops=True)
    eps, nu, tiles, chan, ci = sch.get_loops(bgemm)[-5:]
    tiles_out, tiles_in = sch.split(tiles, sch.sample_perfect_tile(tiles, n=2, max_innermost_factor=8))
    chan_out, chan_in = sch.split(chan, sch.sample_perfect_tile(chan, n=2, max_innermost_factor=64))
    local = sch.cache_write(bgemm, 0, "local")
    sch.reorder(eps, nu, tiles_out, chan_out, ci, tiles_in, chan_in)
    sch.reverse_compute_at(local, chan_out, preserve_unit_loops=True)
    sch.unroll(tiles_in)
    sch.vectorize(chan_in)
    sch.vectorize(sch.get_loops(local)[-1])

    _tile_by_tile(sch, data_pack, data_rows, chunk)
    return [sch]


def _tile_by_tile(sch: Any, stage: Any, rows: Any, chunk: Any) -> None:
    """A 2-D transform of the fused kernel, computed in each ``chunk`` for its tiles: tile by tile, the
    values of both 1-D passes unrolled (the row pass computed per tile), the channels vectorised."""
    sch.compute_at(stage, chunk, preserve_unit_loops=True)
    first, second, tiles, chan = sch.get_loops(stage)[-4:]
    sch.reorder(tiles, first, second, chan)
    sch.compute_at(rows, tiles, preserve_unit_loops=True)
    # Under chunk and tile: the row pass's two value loops, its tile (extent 1), its channels (and the
    # inverse's one-step reduction), then the pass over the rows' values.
    rows_first, rows_second, _tile, rows_chan = sch.get_loops(rows)[2:6]
    for a, b, channels in ((first, second, chan), (rows_first, rows_second, rows_chan)):
        sch.unroll(a)
        sch.unroll(b)
        sch.vectorize(channels)


_registered = False


def register_rules() -> None:
    """Register the transforms' schedule rules with MetaSchedule (for every CPU target, once)."""
    global _registered
    if _registered:
        return
    import tvm

    tvm.register_global_func(f"s_tir.meta_schedule.cpu.{DATA_PACK_RULE}", _data_pack_rule, override=True)
    tvm.register_global_func(f"s_tir.meta_schedule.cpu.{INVERSE_RULE}", _transform_schedule, override=True)
    tvm.register_global_func(f"s_tir.meta_schedule.cpu.{FUSED_RULE}", _fused_rule, override=True)
    _registered = True

