"""What a tuning record decided, in people's words: tile sizes, unrolling, parallel and vector loops.

A MetaSchedule tuning record keeps its schedule as a trace: the schedule primitives that were applied
(``trace.insts``) and the random decisions made on the sampling ones (``trace.decisions``). This module
walks a trace and pulls out the decisions worth reading:

- tile sizes: each ``SamplePerfectTile`` / ``SamplePartitionedTile`` decision, per loop
  (``C: i(64) -> [4, 2, 2, 4]``, outermost factor first);
- unrolling: ``meta_schedule.unroll_explicit`` / ``unroll_implicit`` annotations (their value comes from a
  ``SampleCategorical`` decision) and the ``pragma_auto_unroll_max_step`` the post-processors set;
- parallel / vector / unrolled loops: the limits the schedule rules annotated
  (``meta_schedule.parallel`` / ``meta_schedule.vectorize``) and, after post-processing, the loops that were
  actually made parallel, vectorized or unrolled, with their extents;
- compute-at locations (``ComputeAt`` / ``ReverseComputeAt`` and sampled compute locations) and inlined blocks.

Loop and block names: with the workload's IRModule (``mod``), the trace is replayed on a schedule of it and the
names and extents are TVM's own (``i_0``, ``j_1``, ``C_global``). Without it, names are derived from the trace
alone: original loops are ``loop0``, ``loop1``, ... of their block, and split loops get TVM's ``_0``, ``_1``
suffixes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

log = logging.getLogger(__name__)

# Annotation key -> the ``kind`` of an ``unroll`` entry. The first two are the schedule rule's sampled limit
# (the value is a max step); the post-processors turn them into the two pragmas on the outer loop.
_UNROLL_KEYS = {
    "meta_schedule.unroll_explicit": "explicit",
    "meta_schedule.unroll_implicit": "implicit",
    "pragma_auto_unroll_max_step": "auto_max_step",
    "pragma_unroll_explicit": "explicit_flag",
}
_TILE_SAMPLERS = ("SamplePerfectTile", "SamplePartitionedTile")
_LOOP_KINDS = {"Parallel": "parallel", "Vectorize": "vectorize", "Unroll": "unrolled_loops"}


# ----------------------------------------------------------------------------------------------------
# Trace walking


@dataclasses.dataclass
class _Loop:
    name: str
    extent: int | None = None


class _Names:
    """Names and extents of the blocks and loops a trace's random variables stand for (trace alone)."""

    def __init__(self) -> None:
        self.blocks: dict[Any, str] = {}
        self.loops: dict[Any, _Loop] = {}
        self.values: dict[Any, Any] = {}  # ExprRV -> sampled value
        self.choices: dict[Any, list[Any]] = {}  # ExprRV -> the candidates it was sampled from
        self._unknown = 0

    def block(self, rv: Any) -> str:
        name = self.blocks.get(rv)
        if name is None:
            self._unknown += 1
            name = self.blocks[rv] = f"block{self._unknown}"
        return name

    def loop(self, rv: Any) -> _Loop:
        loop = self.loops.get(rv)
        if loop is None:
            self._unknown += 1
            loop = self.loops[rv] = _Loop(f"loop?{self._unknown}")
        return loop

    def value(self, v: Any) -> Any:
        if v in self.values:
            return self.values[v]
        return _plain(v)


def _plain(v: Any) -> Any:
    """A TVM attribute or decision as a plain JSON value."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "value") and isinstance(getattr(v, "value"), (bool, int, float, str)):
        return v.value
    if isinstance(v, (list, tuple)) or type(v).__name__ in ("Array", "List", "Tuple"):
        return [_plain(x) for x in v]
    try:
        return int(v)
    except (TypeError, ValueError):
        return str(v)


def _ints(v: Any) -> list[int]:
    return [int(x) for x in v]


@dataclasses.dataclass
class _Step:
    """One instruction of a trace, with what a replay (if any) learned about its inputs."""

    kind: str
    inst: Any
    inputs: list[Any]
    attrs: list[Any]
    decision: Any
    postproc: bool
    # With a replayed schedule: live block names / loops of the inputs, by position.
    live_blocks: dict[int, str] = dataclasses.field(default_factory=dict)
    live_loops: dict[int, _Loop] = dataclasses.field(default_factory=dict)


def _replay_steps(trace: Any, mod: Any) -> list[_Step] | None:
    """Replay ``trace`` on a schedule of ``mod`` to learn the real names and extents of its inputs."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    steps: list[_Step] = []
    postproc = [False]

    def provider(inst: Any, inputs: Any, attrs: Any, decision: Any) -> Any:
        kind = str(inst.kind.name)
        # The walker keys names by the trace's own random variables; the live ones only give names.
        step = _Step(kind, inst, list(inst.inputs), list(attrs), decision, postproc[0])
        for pos, rv in enumerate(inputs):
            try:
                obj = sch.get(rv)
            except Exception:  # noqa: BLE001 - not a block/loop RV (an int, a string, an expr)
                continue
            if hasattr(obj, "loop_var"):
                extent = obj.extent
                step.live_loops[pos] = _Loop(
                    str(obj.loop_var.name), int(extent.value) if hasattr(extent, "value") else None
                )
            elif hasattr(obj, "name_hint"):
                step.live_blocks[pos] = str(obj.name_hint)
        if kind == "EnterPostproc":
            postproc[0] = True
        steps.append(step)
        return decision

    try:
        trace.apply_to_schedule(sch, remove_postproc=False, decision_provider=provider)
    except Exception as err:  # noqa: BLE001 - a trace that does not replay still reads from the trace alone
        log.debug("trace does not replay on its workload (%s); naming loops from the trace alone", err)
        return None
    return steps


def _trace_steps(trace: Any) -> list[_Step]:
    steps = []
    postproc = False
    for inst in trace.insts:
        kind = str(inst.kind.name)
        steps.append(
            _Step(kind, inst, list(inst.inputs), list(inst.attrs), trace.get_decision(inst), postproc)
        )
        if kind == "EnterPostproc":
            postproc = True
    return steps


def _walk(trace: Any, mod: Any = None) -> dict[str, Any]:
    steps = _replay_steps(trace, mod) if mod is not None else None
    replayed = steps is not None
    if steps is None:
        steps = _trace_steps(trace)
    names = _Names()
    out: dict[str, Any] = {
        "loop_names": "workload" if replayed else "trace",
        "tiling": [],
        "tiles": [],
        "unroll": [],
        "parallel": [],
        "vectorize": [],
        "unrolled_loops": [],
        "compute_at": [],
        "inlined": [],
        "annotations": [],
        "categorical": [],
        "instructions": len(steps),
    }
    get_loops_calls: dict[str, int] = {}

    def block_of(step: _Step, pos: int) -> str:
        if pos in step.live_blocks:
            return step.live_blocks[pos]
        return names.block(step.inputs[pos])

    def loop_of(step: _Step, pos: int) -> _Loop:
        sym = names.loop(step.inputs[pos])
        live = step.live_loops.get(pos)
        if live is None:
            return sym
        return _Loop(live.name, live.extent if live.extent is not None else sym.extent)

    # The block a loop belongs to, for tile lines (loops of one block are tiled together).
    loop_block: dict[Any, str] = {}

    for step in steps:
        kind, inst, attrs, decision = step.kind, step.inst, step.attrs, step.decision
        outputs = list(inst.outputs)
        if kind == "GetSBlock":
            for rv in outputs:
                names.blocks[rv] = str(attrs[0])
        elif kind == "GetLoops":
            block = block_of(step, 0)
            # The first call sees the block's original loops; later calls see them transformed.
            calls = get_loops_calls[block] = get_loops_calls.get(block, 0) + 1
            for i, rv in enumerate(outputs):
                names.loops[rv] = _Loop(f"loop{i}" if calls == 1 else f"loop{i}~{calls}")
                loop_block[rv] = block
        elif kind in ("CacheWrite", "CacheRead", "ReIndex", "CacheInplace"):
            scope = str(attrs[-1]) if attrs else "cache"
            base = block_of(step, 0) if step.inputs else "block"
            for rv in outputs:
                names.blocks[rv] = f"{base}_{scope}"
        elif kind in ("GetChildBlocks", "GetProducers", "GetConsumers", "GetOutputBlocks"):
            base = block_of(step, 0) if step.inputs else "block"
            relation = {"GetChildBlocks": "child", "GetProducers": "producer"}.get(kind, "consumer")
            for i, rv in enumerate(outputs):
                names.blocks[rv] = f"{base}.{relation}{i}"
        elif kind in _TILE_SAMPLERS:
            loop = loop_of(step, 0)
            factors = _ints(decision) if decision is not None else []
            for rv, f in zip(outputs, factors):
                names.values[rv] = f
            extent = loop.extent if loop.extent is not None else (math.prod(factors) if factors else None)
            out["tiles"].append(
                {
                    "block": loop_block.get(step.inputs[0]),
                    "loop": loop.name,
                    "extent": extent,
                    "factors": factors,
                    "postproc": step.postproc,
                }
            )
        elif kind == "Split":
            loop = loop_of(step, 0)
            factors = [names.value(v) for v in step.inputs[1:]]
            block = loop_block.get(step.inputs[0])
            for i, rv in enumerate(outputs):
                f = factors[i] if i < len(factors) and isinstance(factors[i], int) else None
                names.loops[rv] = _Loop(f"{loop.name}_{i}", f)
                if block is not None:
                    loop_block[rv] = block
        elif kind == "Fuse":
            loops = [loop_of(step, i) for i in range(len(step.inputs))]
            extents = [lp.extent for lp in loops]
            extent = math.prod(extents) if all(e is not None for e in extents) else None
            block = loop_block.get(step.inputs[0]) if step.inputs else None
            for rv in outputs:
                names.loops[rv] = _Loop("_".join(lp.name for lp in loops) + "_fused", extent)
                if block is not None:
                    loop_block[rv] = block
        elif kind == "SampleCategorical":
            candidates = _plain(attrs[0]) if attrs else []
            value = None
            if decision is not None and isinstance(candidates, list):
                index = int(_plain(decision))
                value = candidates[index] if 0 <= index < len(candidates) else None
            for rv in outputs:
                names.values[rv] = value
                names.choices[rv] = candidates
            out["categorical"].append({"candidates": candidates, "chosen": value})
        elif kind == "SampleComputeLocation":
            block = block_of(step, 0)
            index = int(_plain(decision)) if decision is not None else None
            where = {-1: "root", -2: "inline"}.get(index) if index is not None else None
            for rv in outputs:
                names.loops[rv] = _Loop(where or f"loop #{index} of {block}")
        elif kind in ("ComputeAt", "ReverseComputeAt"):
            block = block_of(step, 0)
            loop = loop_of(step, 1)
            out["compute_at"].append(
                {
                    "block": block,
                    "how": "reverse_compute_at" if kind == "ReverseComputeAt" else "compute_at",
                    "loop": loop.name,
                    "postproc": step.postproc,
                }
            )
        elif kind in ("ComputeInline", "ReverseComputeInline"):
            out["inlined"].append(block_of(step, 0))
        elif kind in ("Parallel", "Vectorize", "Unroll"):
            loop = loop_of(step, 0)
            entry = {
                "block": loop_block.get(step.inputs[0]),
                "loop": loop.name,
                "extent": loop.extent,
                "postproc": step.postproc,
            }
            out[_LOOP_KINDS[kind]].append(entry)
        elif kind == "Annotate":
            key = str(attrs[0]) if attrs else ""
            # The annotated block or loop (its name; "?" if the trace never said which it is).
            if 0 in step.live_blocks:
                target = step.live_blocks[0]
            elif 0 in step.live_loops:
                target = step.live_loops[0].name
            elif step.inputs[0] in names.blocks:
                target = names.blocks[step.inputs[0]]
            elif step.inputs[0] in names.loops:
                target = names.loops[step.inputs[0]].name
            else:
                target = "?"
            value = names.value(step.inputs[1]) if len(step.inputs) > 1 else None
            if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if key in _UNROLL_KEYS:
                entry = {"on": target, "kind": _UNROLL_KEYS[key], "value": value, "postproc": step.postproc}
                if len(step.inputs) > 1 and step.inputs[1] in names.choices:
                    entry["candidates"] = names.choices[step.inputs[1]]
                out["unroll"].append(entry)
            elif key == "meta_schedule.parallel":
                out["parallel"].append({"on": target, "loop": None, "max_extent": value, "postproc": False})
            elif key == "meta_schedule.vectorize":
                out["vectorize"].append({"on": target, "loop": None, "max_extent": value, "postproc": False})
            elif key == "meta_schedule.tiling_structure":
                out["tiling"].append({"block": target, "structure": value})
            else:
                out["annotations"].append({"on": target, "key": key, "value": value})
    return out


def decisions_dict(trace: Any, mod: Any = None) -> dict[str, Any]:
    """The decisions of a trace as plain JSON data.

    ``trace`` is a ``tvm.s_tir.schedule.Trace`` (``record.trace``); ``mod`` is the workload's IRModule
    (``record.workload.mod``), optional, for TVM's own loop names and extents.

    Keys: ``tiles`` (``block``, ``loop``, ``extent``, ``factors`` outermost first), ``tiling`` (multi-level
    tiling structures such as ``SSRSRS``), ``unroll`` (``on``; ``kind``: ``explicit`` / ``implicit`` for the
    sampled max step, ``auto_max_step`` / ``explicit_flag`` for the post-processors' pragmas; ``value``;
    ``candidates`` when sampled), ``parallel`` and
    ``vectorize`` (rule limits as ``max_extent``; post-processed loops as ``loop`` + ``extent`` in
    iterations), ``unrolled_loops``, ``compute_at`` (``block``, ``how``, ``loop``), ``inlined`` (blocks),
    ``annotations`` (other annotations), ``categorical`` (other sampled choices), ``instructions`` (count),
    ``loop_names`` (``"workload"`` or ``"trace"``: where the names came from). Entries made by
    post-processors carry ``postproc: true``.
    """
    return _walk(trace, mod)


def describe_trace(trace: Any, mod: Any = None) -> list[str]:
    """Short lines for people, one per decision, e.g. ``C tile i(64): [4, 2, 2, 4]``.

    ``trace`` and ``mod`` as for :func:`decisions_dict`.
    """
    return describe_decisions(_walk(trace, mod))


def describe_decisions(d: dict[str, Any]) -> list[str]:
    """The lines of :func:`describe_trace` from a :func:`decisions_dict` result."""
    lines: list[str] = []
    for t in d.get("tiling", []):
        lines.append(f"{t['block']}: multi-level tiling {t['structure']}")
    for t in d.get("tiles", []):
        where = f"{t['block']} " if t.get("block") else ""
        extent = f"({t['extent']})" if t.get("extent") is not None else ""
        lines.append(f"{where}tile {t['loop']}{extent}: {t['factors']}")
    for c in d.get("compute_at", []):
        lines.append(f"{c['block']}: {c['how']} loop {c['loop']}")
    if d.get("inlined"):
        lines.append("inlined: " + ", ".join(d["inlined"]))

    limits = []
    for kind, unit in (("parallel", "iterations"), ("vectorize", "lanes")):
        for p in d.get(kind, []):
            if p.get("loop") is None:
                limits.append(f"{kind} <= {p['max_extent']} {unit}")
    for u in d.get("unroll", []):
        if u["kind"] in ("explicit", "implicit"):
            chosen = f" (chosen from {u['candidates']})" if u.get("candidates") else ""
            limits.append(f"unroll {u['kind']} <= {u['value']} steps{chosen}")
    if limits:
        lines.append("limits: " + ", ".join(limits))

    for kind in ("parallel", "vectorize", "unrolled_loops"):
        verb = "unroll" if kind == "unrolled_loops" else kind
        for p in d.get(kind, []):
            if p.get("loop") is None:
                continue
            where = f"{p['block']} " if p.get("block") else ""
            extent = f" (extent {p['extent']})" if p.get("extent") is not None else ""
            lines.append(f"{where}{verb} loop {p['loop']}{extent}")
    explicit_on = {u["on"] for u in d.get("unroll", []) if u["kind"] == "explicit_flag" and u["value"]}
    for u in d.get("unroll", []):
        if u["kind"] == "auto_max_step":
            how = "explicit" if u["on"] in explicit_on else "implicit"
            lines.append(f"auto-unroll ({how}) <= {u['value']} steps on loop {u['on']}")
    for a in d.get("annotations", []):
        lines.append(f"{a['on']}: {a['key']} = {a['value']}")
    if not lines:  # a kernel timed without a schedule (host/tuning/variants.py): nothing was decided
        lines.append("no schedule: TVM's default loops")
    return lines

