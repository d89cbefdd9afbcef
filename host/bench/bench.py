"""``edgetune bench``: on-board latency, tuned against ONNX Runtime and against untuned (TVM's default
build), all measured on the same board in the same run.

ONNX Runtime is what a user would run instead: the board times it itself (the agent's
``edgetune.onnxruntime_bench`` RPC function, with the optional ``[ort]`` extra installed there) on the
same input, and its output is checked like the builds'. Both builds are uploaded to a board of the key through the tracker and timed there with TVM's own
time evaluator: warm-up runs, then ``runs`` single timed runs, giving p50/p90/p99 and the mean, plus
the first-load time (upload excluded: load + VM set-up + first run). The board's output is checked
against ONNX Runtime's on the workstation for the same input.

The timings are taken in ``rounds`` that alternate the builds (tuned, ONNX Runtime, untuned, then the
other way round), with nothing being built meanwhile: a board whose speed drifts (a shared host, a
warming SoC) slows every build alike, and the ratio a user reads is the median of the rounds' ratios.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import config
from ..errors import EdgetuneError
from ..models.onnx_import import load_onnx
from ..toolchain import check_target, toolchain_for
from ..tracker.client import TrackerAddr, open_board_session

logger = logging.getLogger(__name__)

WARMUP_RUNS = 3
DEFAULT_ROUNDS = 3


def _timed_in_rounds(builds: list[tuple[str, Callable[[int], Timing | None]]], runs: int, rounds: int,
                     say: Callable[[str], None]) -> tuple[dict[str, list[Timing]], list[dict[str, float]]]:
    """Time each build ``runs`` times in all, in ``rounds`` rounds, the order reversed every other round
    so that neither build always comes first. A build that cannot be timed (``None``: ONNX Runtime
    missing on the board) is not asked again. Returns each build's timings and each round's p50s."""
    timed: dict[str, list[Timing]] = {label: [] for label, _ in builds}
    per_round: list[dict[str, float]] = []
    left = dict(builds)
    for index in range(rounds):
        n = runs // rounds + (1 if index < runs % rounds else 0)
        order = [label for label, _ in builds if label in left]
        p50s: dict[str, float] = {}
        for label in order if index % 2 == 0 else reversed(order):
            say(f"timing {label} on the board" + (f" (round {index + 1} of {rounds})" if rounds > 1 else ""))
            timing = left[label](n)
            if timing is None:
                del left[label]
                continue
            timed[label].append(timing)
            p50s[label] = timing.p50_ms
        per_round.append(p50s)
    return timed, per_round


@dataclass
class Timing:
    label: str
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    first_load_ms: float
    max_abs_err: float | None
    board: str
    samples: list[float] = field(default_factory=list, repr=False)  # every run's milliseconds

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "samples"}

    @classmethod
    def of(cls, label: str, ms: list[float], first_load_ms: float, max_abs_err: float | None, board: str) -> "Timing":
        return cls(label, len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99), float(np.mean(ms)),
                   first_load_ms, max_abs_err, board, list(ms))


def pooled(rounds: list[Timing]) -> Timing:
    """One build's timings of several rounds as one: every run's figure, the first load of the first
    round, the largest output error of any."""
    errors = [t.max_abs_err for t in rounds if t.max_abs_err is not None]
    return Timing.of(rounds[0].label, [m for t in rounds for m in t.samples], rounds[0].first_load_ms,
                     max(errors) if errors else None, rounds[0].board)


@dataclass
class BenchResult:
    model: str
    key: str
    target: dict[str, Any]
    tuned: Timing | None
    untuned: Timing | None
    speedup: float | None = None  # untuned p50 / tuned p50
    notes: list[str] = field(default_factory=list)
    onnxruntime: Timing | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)  # each round's p50 ms per build

    @property
    def onnxruntime_ratio(self) -> float | None:
        """Tuned p50 / ONNX Runtime p50 on the board, the median of the rounds' (each round times both
        within seconds of each other): below 1 the tuned model is faster."""
        if self.tuned is None or self.onnxruntime is None or self.onnxruntime.p50_ms <= 0:
            return None
        ratios = [r["tuned"] / r["onnxruntime"] for r in self.rounds if r.get("tuned") and r.get("onnxruntime")]
        return float(np.median(ratios)) if ratios else self.tuned.p50_ms / self.onnxruntime.p50_ms

    def as_dict(self) -> dict[str, Any]:
        ratio = self.onnxruntime_ratio
        return {"model": self.model, "key": self.key, "target": self.target,
                "tuned": self.tuned.as_dict() if self.tuned else None,
                "untuned": self.untuned.as_dict() if self.untuned else None,
                "onnxruntime": self.onnxruntime.as_dict() if self.onnxruntime else None,
                "speedup": round(self.speedup, 3) if self.speedup else None,
                "tuned_over_onnxruntime": round(ratio, 4) if ratio else None, "notes": self.notes,
                "rounds": [{k: round(v, 4) for k, v in r.items()} for r in self.rounds]}


def vs_onnxruntime(ratio: float, where: str = "on the board") -> str:
    """One phrase for tuned p50 / ONNX Runtime p50 (``ratio``), the comparison users care about."""
    if ratio <= 1.0:
        return f"tuned is {1 / ratio:.2f}x faster than ONNX Runtime {where}"
    return f"tuned is {ratio:.2f}x slower than ONNX Runtime {where}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype="float64"), q))


def time_on_board(tracker: TrackerAddr, key: str, module_path: Path, inputs: list[np.ndarray],
                  expected: list[np.ndarray] | None, runs: int, label: str,
                  deadline_sec: float | None = None) -> Timing:
    """Upload ``module_path`` to a free board of ``key`` and time it. Raises :class:`EdgetuneError`."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from ..build.build import flatten_outputs

    remote_name = f"bench-{label}-{os.getpid()}.so"
    with _board_session(tracker, key, deadline_sec, f"benchmark of the {label} build") as (session, board):
        try:
            session.upload(str(module_path), remote_name)
            dev = session.cpu()
            start = time.perf_counter()
            rlib = session.load_module(remote_name)
            vm = VirtualMachine(rlib, dev)
            args = [tvm.runtime.tensor(a, dev) for a in inputs]
            out = vm["main"](*args)
            outputs = flatten_outputs(out)
            first_load_ms = (time.perf_counter() - start) * 1000
            err = None
            if expected is not None:
                err = max(float(np.max(np.abs(o.astype("float64") - e.astype("float64")))) for o, e in zip(outputs, expected))
            vm.set_input("main", *args)
            for _ in range(WARMUP_RUNS):
                vm.invoke_stateful("main")
            timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=runs)
            secs = [float(s) for s in timer("main").results]
        finally:
            try:
                session.remove(remote_name)
            except Exception:  # noqa: BLE001 - the session may be gone
                pass
    return Timing.of(label, [s * 1000 for s in secs], first_load_ms, err, board)


@contextlib.contextmanager
def _board_session(tracker: TrackerAddr, key: str, deadline_sec: float | None, what: str):
    """``(session, "host:port")`` of a free board of ``key`` for one benchmark, every wait on it bounded: a
    board that stops answering (power cut, frozen) fails it ``BOARD_ANSWER_GRACE_SEC`` after the session's
    timeout with a sentence saying so. Anything the board raises becomes one :class:`EdgetuneError` line
    naming ``what`` failed."""
    wait = config.NO_BOARD_DEADLINE_SEC if deadline_sec is None else deadline_sec
    opened = open_board_session(tracker, key, config.BENCH_SESSION_SEC, time.monotonic() + wait,
                                answer_within_sec=config.BENCH_SESSION_SEC + config.BOARD_ANSWER_GRACE_SEC)
    try:
        yield opened.session, opened.board
    except EdgetuneError:
        raise
    except Exception as err:  # noqa: BLE001 - anything the board raises: one line
        silent = opened.stopped_answering(err)
        if silent is not None:
            opened.cut()
            raise EdgetuneError(silent) from None
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise EdgetuneError(f"{what} on board {opened.board} failed: "
                            f"{(lines[-1] if lines else type(err).__name__)[:300]}") from None
    finally:
        opened.close()


def onnxruntime_on_board(tracker: TrackerAddr, key: str, onnx_path: Path, inputs: dict[str, np.ndarray],
                         expected: list[np.ndarray] | None, runs: int,
                         deadline_sec: float | None = None) -> tuple[Timing | None, str | None]:
    """Time ONNX Runtime on a free board of ``key`` (the agent's ``edgetune.onnxruntime_bench``).

    Returns (timing, None), or (None, a note saying why not and how to fix it) when the board has no
    ONNX Runtime or is not an edgetune agent. Raises :class:`EdgetuneError` when no board answers.
    """
    from device_agent.ort_bench import FUNCTION

    stem = f"bench-ort-{os.getpid()}"
    names = (f"{stem}.onnx", f"{stem}-in.npz", f"{stem}-out.npz")
    with tempfile.TemporaryDirectory(prefix="edgetune-ort-") as tmp, \
            _board_session(tracker, key, deadline_sec, "ONNX Runtime benchmark") as (session, board):
        local_in = Path(tmp) / "in.npz"
        np.savez(local_in, **inputs)
        try:
            try:
                remote = session.get_function(FUNCTION)
            except Exception:  # noqa: BLE001 - a plain TVM RPC server or an older agent
                remote = None
            if remote is None:
                return None, (f"board {board} cannot run ONNX Runtime (not an edgetune agent, or an older one): "
                              "update edgetune-agent there to compare with ONNX Runtime on the board")
            session.upload(str(onnx_path), names[0])
            session.upload(str(local_in), names[1])
            answer = json.loads(remote(names[0], names[1], names[2], runs))
            if not answer.get("available"):
                return None, f"board {board}: {answer.get('error')}"
            outputs = np.load(io.BytesIO(bytes(session.download(names[2]))))
            got = [outputs[f"output_{i}"] for i in range(len(outputs.files))]
        finally:
            for name in names:
                try:
                    session.remove(name)
                except Exception:  # noqa: BLE001 - the session may be gone
                    pass
    err = None
    if expected is not None:
        err = max(float(np.max(np.abs(o.astype("float64") - e.astype("float64")))) for o, e in zip(got, expected))
    return Timing.of(f"onnxruntime {answer.get('version', '')}".strip(), [float(v) for v in answer["ms"]], 0.0, err,
                     board), None


def _untuned_build(model, target: dict[str, Any], path: Path) -> None:
    """TVM's default build: ``tvm.compile`` with no schedules (what a user gets without tuning)."""
    import tvm

    executable = tvm.compile(model.mod, target=tvm.target.Target(target))
    executable.export_library(str(path), fcompile=toolchain_for(target).fcompile())


def _unpack_package(pkg: Path, into: Path) -> dict[str, Any]:
    try:
        with tarfile.open(pkg) as tar:
            manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
            model = tar.getmember("model.so")
            if not model.isfile():
                raise EdgetuneError(f"{pkg}: model.so is not a file")
            with open(into / "model.so", "wb") as out:
                out.write(tar.extractfile(model).read())  # type: ignore[union-attr]
            for name in ("reference/input.npz", "reference/output.npz"):
                member = tar.getmember(name)
                (into / name).parent.mkdir(exist_ok=True)
                (into / name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    except (tarfile.TarError, KeyError, OSError, ValueError) as err:
        raise EdgetuneError(f"{pkg} is not an edgetune package ({err}): make one with `edgetune package`") from None
    return manifest


def bench(model_or_pkg: str, key: str, tracker: TrackerAddr, log_dir: str | None = None,
          model: str | None = None, target: dict[str, Any] | None = None, runs: int = 50,
          input_shapes: dict[str, tuple[int, ...]] | None = None,
          on_progress: Callable[[str], None] | None = None, with_untuned: bool = True,
          with_onnxruntime: bool = True, rounds: int = DEFAULT_ROUNDS) -> BenchResult:
    """Benchmark a model (tuned = built with ``log_dir``) or a package (tuned = its module; untuned
    and ONNX Runtime need the ONNX ``model``) on a board of ``key``: ``runs`` timed runs of each build,
    in ``rounds`` alternating rounds. Raises :class:`EdgetuneError`."""
    from ..build.build import build as run_build
    from ..logs.tuninglog import TuningLog

    say = on_progress or (lambda message: None)
    if runs < 1:
        raise EdgetuneError("--runs must be at least 1")
    if not 1 <= rounds <= runs:
        raise EdgetuneError(f"--rounds must be between 1 and --runs ({runs})")
    work = Path(tempfile.mkdtemp(prefix="edgetune-bench-"))
    notes: list[str] = []
    try:
        is_package = Path(model_or_pkg).is_file() and tarfile.is_tarfile(model_or_pkg)
        if is_package:
            manifest = _unpack_package(Path(model_or_pkg), work)
            target = manifest["target"]
            tuned_path: Path | None = work / "model.so"
            ref_in = np.load(work / "reference/input.npz")
            ref_out = np.load(work / "reference/output.npz")
            input_names = [i["name"] for i in manifest["inputs"]]
            inputs = [ref_in[n] for n in input_names]
            expected = [ref_out[f"output_{i}"] for i in range(len(ref_out.files))]
            onnx_model = load_onnx(model, input_shapes) if model else None
            name = manifest.get("model_name") or (manifest.get("model") or {}).get("name") or Path(model_or_pkg).stem
            if onnx_model is None:
                notes.append("untuned build skipped: pass --model MODEL.onnx to compare with TVM's default build")
        else:
            onnx_model = load_onnx(model_or_pkg, input_shapes)
            name = onnx_model.name
            if target is None and log_dir:
                target = TuningLog.open(log_dir).session.get("target")
            if target is None:
                raise EdgetuneError("no target: pass --log DIR (the tuning log knows its target) or --target JSON")
            tuned_path = None
            if log_dir:
                say("building the tuned model")
                run_build(model_or_pkg, key, work / "tuned", log_dir, target, input_shapes=input_shapes, compare=False)
                tuned_path = work / "tuned" / "model.so"
            else:
                notes.append("tuned build skipped: pass --log DIR to compare the tuned model")
            from ..build.build import reference_io

            ref_inputs, expected = reference_io(onnx_model)
            inputs = [ref_inputs[s.name] for s in onnx_model.inputs]
        check_target(target)
        if onnx_model is not None and with_untuned:
            say("building the untuned (default) build")
            _untuned_build(onnx_model, target, work / "untuned.so")
        # Every build is made before the first timing: nothing is compiled while the board times.
        builds: list[tuple[str, Callable[[int], Timing | None]]] = []
        if tuned_path is not None:
            builds.append(("tuned", lambda n: time_on_board(tracker, key, tuned_path, inputs, expected, n, "tuned")))
        if onnx_model is not None and with_untuned:
            builds.append(("untuned", lambda n: time_on_board(tracker, key, work / "untuned.so", inputs, expected, n,
                                                              "untuned")))
        if onnx_model is not None and with_onnxruntime:
            def onnxruntime(n: int) -> Timing | None:
                timing, note = onnxruntime_on_board(tracker, key, onnx_model.path,
                                                    {s.name: a for s, a in zip(onnx_model.inputs, inputs)}, expected, n)
                if note:
                    notes.append(note)
                return timing
            builds.append(("onnxruntime", onnxruntime))
        timed, per_round = _timed_in_rounds(builds, runs, rounds, say)
        tuned, untuned, ort = (pooled(timed[k]) if timed.get(k) else None for k in ("tuned", "untuned", "onnxruntime"))
        speedup = untuned.p50_ms / tuned.p50_ms if (tuned and untuned and tuned.p50_ms > 0) else None
        return BenchResult(name, key, target, tuned, untuned, speedup, notes, ort, per_round)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
