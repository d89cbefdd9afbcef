"""Self-check of an installed package: load ``model.so``, run the reference input, compare with the
expected output, then time a few runs.

Run as ``python -m device_agent.selfcheck SLOT --json``; the store runs it in a child process with a
deadline, so a model that crashes (illegal instruction) or hangs cannot take the agent down. The JSON
printed as the last line of stdout is :class:`SelfCheckResult`; the exit status is 0 when it passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import config
from .errors import AgentError
from .manifest import MANIFEST_NAME, MODEL_NAME, Manifest

logger = logging.getLogger(__name__)

# Latency part: one warm-up run, then up to this many timed runs within SELF_CHECK_BENCH_SEC.
WARMUP_RUNS = 1
TIMED_RUNS = 10
MIN_TIMED_RUNS = 3


@dataclass
class SelfCheckResult:
    """Outcome of one self-check. Errors are in the ms/absolute units of the model's outputs."""

    ok: bool
    max_abs_err: float | None = None
    p50_ms: float | None = None
    load_ms: float | None = None
    runs: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flatten(value: Any) -> list[Any]:
    """The VM returns a tensor, or a (nested) tuple/Array of tensors."""
    if hasattr(value, "numpy"):
        return [value.numpy()]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        out: list[Any] = []
        for item in value:
            out.extend(_flatten(item))
        return out
    raise AgentError(f"the model returned {type(value).__name__}, not tensors: rebuild the package")


def _target_cores(target: dict[str, Any]) -> int:
    """The ``num-cores`` the package was built for; 0 when it does not say."""
    try:
        return max(0, int(target.get("num-cores", 0)))
    except (TypeError, ValueError):
        return 0


def run_selfcheck(slot: Path, bench_sec: float | None = None) -> SelfCheckResult:
    """Check the package in ``slot`` on this board. Raises :class:`AgentError` on a broken slot or a wrong
    output (the message says which); TVM errors propagate as they are."""
    import numpy as np
    import tvm

    bench_sec = config.SELF_CHECK_BENCH_SEC if bench_sec is None else bench_sec
    manifest = Manifest.from_json((slot / MANIFEST_NAME).read_bytes())
    config.use_target_threads(_target_cores(manifest.target))  # as the board's agent measured it
    with np.load(slot / manifest.reference.input, allow_pickle=False) as npz:
        missing = [t.name for t in manifest.inputs if t.name not in npz.files]
        if missing:
            raise AgentError(f"reference input lacks {', '.join(missing)}: rebuild the package")
        inputs = [npz[t.name] for t in manifest.inputs]
    with np.load(slot / manifest.reference.output, allow_pickle=False) as npz:
        expected = [npz[f"output_{i}"] for i in range(len(manifest.outputs)) if f"output_{i}" in npz.files]
    if len(expected) != len(manifest.outputs):
        raise AgentError("reference output lacks some outputs (output_0, output_1, ...): rebuild the package")

    start = time.monotonic()
    lib = tvm.runtime.load_module(str(slot / MODEL_NAME))
    vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
    main = vm["main"]
    args = [tvm.runtime.tensor(a) for a in inputs]
    got = _flatten(main(*args))
    load_ms = (time.monotonic() - start) * 1000.0

    if len(got) != len(expected):
        raise AgentError(f"the model returned {len(got)} outputs, the reference has {len(expected)}: rebuild the package")
    max_abs_err = 0.0
    for i, (g, e) in enumerate(zip(got, expected)):
        if tuple(g.shape) != tuple(e.shape):
            raise AgentError(f"output {i} has shape {tuple(g.shape)}, the reference {tuple(e.shape)}: rebuild the package")
        if g.size:
            diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
            max_abs_err = max(max_abs_err, float(np.nanmax(diff)) if not np.isnan(diff).all() else float("inf"))
        if not np.allclose(g, e, rtol=manifest.reference.rtol, atol=manifest.reference.atol, equal_nan=True):
            return SelfCheckResult(
                ok=False,
                max_abs_err=max_abs_err,
                load_ms=load_ms,
                error=(
                    f"output {i} differs from the reference (max abs error {max_abs_err:.3g}, tolerance "
                    f"atol {manifest.reference.atol:g} + rtol {manifest.reference.rtol:g}): the model computes "
                    "something else on this board; rebuild and package it again"
                ),
            )

    for _ in range(WARMUP_RUNS):
        main(*args)
    times: list[float] = []
    deadline = time.monotonic() + bench_sec
    while len(times) < TIMED_RUNS and (len(times) < MIN_TIMED_RUNS or time.monotonic() < deadline):
        t0 = time.perf_counter()
        main(*args)
        times.append((time.perf_counter() - t0) * 1000.0)
    return SelfCheckResult(
        ok=True, max_abs_err=max_abs_err, p50_ms=statistics.median(times), load_ms=load_ms, runs=len(times)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m device_agent.selfcheck",
        description="Load an installed package, check its reference output and time it. "
        "Example: python -m device_agent.selfcheck /var/lib/edgetune/current --json",
    )
    parser.add_argument("slot", type=Path, help="an installed slot (or the store's 'current' link)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = run_selfcheck(args.slot)
    except AgentError as err:
        result = SelfCheckResult(ok=False, error=str(err))
    except Exception as err:  # noqa: BLE001 - TVM raises many types; each is a failed check, reported
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        result = SelfCheckResult(ok=False, error=(
            f"the model failed to load or run ({type(err).__name__}: {first_line}): "
            "rebuild the package for this board's target"))
    if args.json:
        sys.stdout.write("\n" + json.dumps(result.as_dict()) + "\n")
    elif result.ok:
        sys.stdout.write(f"ok: max abs error {result.max_abs_err:.3g}, p50 {result.p50_ms:.3f} ms, "
                         f"load {result.load_ms:.0f} ms\n")
    else:
        sys.stdout.write(f"failed: {result.error}\n")
    sys.stdout.flush()
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
