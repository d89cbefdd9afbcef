"""The report of a tuning log: convergence plots (PNG) and one self-contained HTML page.

Sources, in order of preference:

- edgetune's ``history.jsonl`` (one line per measured trial, failed ones included) with ``session.json``
  (tasks, weights, FLOPs);
- MetaSchedule's database alone (a stock work dir, or a session whose history is missing): trials in the
  order of ``database_tuning_record.json``, one task per workload, named after the workload function's
  ``global_symbol``, FLOPs estimated from its TIR, weight 1.

The estimated model latency after a trial is the sum over tasks of weight x best latency of the task so
far; it is known only once every task has a successful trial. Until then the plot draws the sum over the
measured tasks as a dotted lower bound.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

from host.errors import EdgetuneError
from host.logs.decisions import (
    DecisionsError,
    best_records,
    describe_decisions,
    decisions_dict,
    function_name,
    hash_key,
    mean_run_us,
    read_database_rows,
    read_session,
)

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
REPORT_DIR = "report"
OVERALL_PNG = "convergence_overall.png"
TASKS_PNG = "convergence_tasks.png"
HTML_FILE = "report.html"
# Panel titles longer than this are shortened (fused kernel names can run to 100+ characters).
TITLE_CHARS = 34
PANEL_COLUMNS = 3
DPI = 110


class ReportError(EdgetuneError):
    """A report could not be made from a tuning log."""


@dataclasses.dataclass
class TaskSummary:
    """One tuning task of the report. Latency in microseconds, FLOPs per run of the kernel."""

    index: int
    name: str
    weight: int
    flops: float | None
    trials: int
    failed: int
    best_latency_us: float | None
    best_gflops: float | None
    best_trial: int | None
    workload_hash: str | None
    decisions: list[str]
    decisions_note: str | None = None

    @property
    def status(self) -> str:
        """``tuned`` (has a successful record) or ``fallback`` (the build will use the default schedule)."""
        return "tuned" if self.best_latency_us is not None else "fallback"

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["status"] = self.status
        return out


@dataclasses.dataclass
class ReportResult:
    """What ``make_report`` wrote and the figures it found.

    ``estimated_latency_ms`` is the weighted sum of the tasks' best latencies (``None`` while a task has no
    successful trial; ``fallback_tasks`` names those). ``source`` is ``history`` or ``database``.
    """

    out_dir: Path
    html: Path
    pngs: list[Path]
    source: str
    trials: int
    failed: int
    tasks: list[TaskSummary]
    estimated_latency_ms: float | None
    first_estimated_latency_ms: float | None
    fallback_tasks: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "html": str(self.html),
            "pngs": [str(p) for p in self.pngs],
            "out_dir": str(self.out_dir),
            "source": self.source,
            "trials": self.trials,
            "failed": self.failed,
            "estimated_latency_ms": self.estimated_latency_ms,
            "first_estimated_latency_ms": self.first_estimated_latency_ms,
            "fallback_tasks": self.fallback_tasks,
            "tasks": [t.as_dict() for t in self.tasks],
        }


# ----------------------------------------------------------------------------------------------------
# Reading the log


@dataclasses.dataclass
class _Task:
    index: int
    name: str
    weight: int
    flops: float | None
    workload_hash: str | None


@dataclasses.dataclass
class _Trial:
    number: int
    task: int
    latency_us: float | None
    gflops: float | None
    error: str | None
    elapsed_s: float | None = None


@dataclasses.dataclass
class _Log:
    source: str
    session: dict[str, Any] | None
    tasks: list[_Task]
    trials: list[_Trial]


def _no_trials(log_dir: Path) -> ReportError:
    return ReportError(
        f"{log_dir} has no measured trials yet: run `edgetune tune MODEL --device KEY --trials N "
        f"--log {log_dir}` first (or point `edgetune report` at a tuning log directory)"
    )


def _read_history(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last and rows:
                # A session killed mid-write leaves a partial last line; everything before it is good.
                log.warning("%s:%d is cut short; ignoring it", path, i + 1)
                break
            raise ReportError(
                f"{path}:{i + 1} is not valid JSON ({err.msg}): the history is damaged; remove that line"
            ) from err
        if not isinstance(row, dict) or "task" not in row:
            raise ReportError(f"{path}:{i + 1} is not a trial entry: the history is damaged; remove that line")
        rows.append(row)
    return rows


def _float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _gflops(flops: float | None, latency_us: float | None) -> float | None:
    if not flops or not latency_us or latency_us <= 0:
        return None
    return flops / (latency_us * 1e3)


def _tasks_from_session(session: dict[str, Any]) -> list[_Task]:
    tasks = []
    for i, t in enumerate(session.get("tasks") or []):
        tasks.append(
            _Task(
                index=int(t.get("index", i)),
                name=str(t.get("name") or f"task{i}"),
                weight=int(t.get("weight") or 1),
                flops=_float(t.get("flops")),
                workload_hash=hash_key(t.get("workload_hash")),
            )
        )
    return tasks


def _load_from_history(session: dict[str, Any] | None, rows: list[dict[str, Any]]) -> _Log:
    tasks = _tasks_from_session(session or {})
    by_index = {t.index: t for t in tasks}
    trials = []
    for n, row in enumerate(rows, start=1):
        index = int(row["task"])
        task = by_index.get(index)
        if task is None:  # a history entry the session does not list: keep it, named as the entry says
            task = by_index[index] = _Task(index, str(row.get("task_name") or f"task{index}"), 1, None, None)
            tasks.append(task)
        latency = _float(row.get("latency_us"))
        error = row.get("error")
        if latency is not None and latency <= 0:
            latency = None
        if latency is None and not error:
            error = "no latency recorded"
        gflops = _float(row.get("gflops")) if latency is not None else None
        if latency is not None and gflops is None:
            gflops = _gflops(task.flops, latency)
        trials.append(
            _Trial(
                number=int(row.get("trial") or n),
                task=index,
                latency_us=latency,
                gflops=gflops,
                error=str(error) if error and latency is None else None,
                elapsed_s=_float(row.get("elapsed_s")),
            )
        )
    tasks.sort(key=lambda t: t.index)
    return _Log("history", session, tasks, trials)


def _workload_name_and_flops(row: Any, index: int) -> tuple[str, float | None]:
    """A stock work dir names no tasks: use the workload function's global_symbol and estimate its FLOPs."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        mod = ms.database.Workload.from_json(row).mod
    except Exception as err:  # noqa: BLE001 - an unreadable workload still has trials worth plotting
        log.warning("workload %d of the database does not load (%s)", index, err)
        return f"workload{index}", None
    name = function_name(mod) or f"workload{index}"
    try:
        flops = float(estimate_tir_flops(mod))
    except Exception as err:  # noqa: BLE001 - FLOPs are optional: the plot falls back to latency
        log.debug("no FLOP estimate for workload %d (%s)", index, err)
        flops = None
    return name, flops


def _load_from_database(log_dir: Path, session: dict[str, Any] | None) -> _Log:
    try:
        hashes, rows = read_database_rows(log_dir)
    except DecisionsError as err:
        raise _no_trials(log_dir) from err
    if not rows:
        raise _no_trials(log_dir)
    # Session tasks keep their index and name; workloads the session does not know become extra tasks.
    tasks = _tasks_from_session(session or {})
    by_hash = {t.workload_hash: t for t in tasks if t.workload_hash}
    workload_rows = [
        json.loads(line)
        for line in (log_dir / "database_workload.json").read_text().splitlines()
        if line.strip()
    ]
    task_of_workload: list[_Task] = []
    extra: list[_Task] = []
    next_index = max((t.index for t in tasks), default=-1) + 1
    for index, key in enumerate(hashes):
        known = by_hash.get(key)
        if known is None:
            name, flops = _workload_name_and_flops(workload_rows[index], index)
            known = _Task(next_index, name, 1, flops, key)
            next_index += 1
            extra.append(known)
        task_of_workload.append(known)
    names = [t.name for t in extra]
    for t in extra:  # two workloads of one function (other shapes) must stay apart in the table
        if names.count(t.name) > 1:
            t.name = f"{t.name}#{t.index}"
    tasks += extra
    trials = []
    for number, (index, rec) in enumerate(rows, start=1):
        task = task_of_workload[index]
        latency = mean_run_us(rec[1] if len(rec) > 1 else None)
        trials.append(
            _Trial(
                number=number,
                task=task.index,
                latency_us=latency,
                gflops=_gflops(task.flops, latency),
                error=None if latency is not None else "no run time in the record (the measurement failed)",
            )
        )
    return _Log("database", session, tasks, trials)


def _load(log_dir: Path) -> _Log:
    if not log_dir.is_dir():
        raise ReportError(f"{log_dir} is not a directory: give the --log DIR of a tuning session")
    session = read_session(log_dir)
    history = log_dir / HISTORY_FILE
    rows = _read_history(history) if history.exists() else []
    if rows:
        return _load_from_history(session, rows)
    return _load_from_database(log_dir, session)


# ----------------------------------------------------------------------------------------------------
# Summaries


def _summaries(log_dir: Path, data: _Log) -> list[TaskSummary]:
    try:
        best = best_records(log_dir)
    except DecisionsError as err:
        log.info("no decisions: %s", err)
        best = []
    best_by_hash = {b.workload_hash: b for b in best if b.record is not None}
    # A session task without a workload hash can still be found by its kernel's name.
    best_by_function = {b.function: b for b in best if b.record is not None and b.function}

    out = []
    for task in data.tasks:
        own = [t for t in data.trials if t.task == task.index]
        ok = [t for t in own if t.latency_us is not None]
        top = min(ok, key=lambda t: t.latency_us) if ok else None  # type: ignore[arg-type, return-value]
        lines: list[str] = []
        note = None
        found = best_by_hash.get(task.workload_hash or "")
        if found is None and task.workload_hash is None:
            found = best_by_function.get(task.name)
        if found is not None:
            try:
                lines = describe_decisions(decisions_dict(found.record.trace, found.mod))
            except Exception as err:  # noqa: BLE001 - a trace we cannot read must not cost the whole report
                log.warning("decisions of task %s unreadable: %s", task.name, err)
                note = f"the best record's trace could not be read ({err})"
            differs = top is not None and found.latency_us is not None and (
                abs(found.latency_us - top.latency_us) > 0.05 * top.latency_us  # type: ignore[operator]
            )
            if differs:
                note = (
                    f"decisions of the database's best record ({found.latency_us:.1f} µs), which differs from "
                    "the best trial of the history"
                )
        elif ok:
            note = "no record of this task in the database (no workload hash matched)"
        out.append(
            TaskSummary(
                index=task.index,
                name=task.name,
                weight=task.weight,
                flops=task.flops,
                trials=len(own),
                failed=len(own) - len(ok),
                best_latency_us=top.latency_us if top else None,
                best_gflops=_best_gflops(task, top),
                best_trial=top.number if top else None,
                workload_hash=task.workload_hash,
                decisions=lines,
                decisions_note=note,
            )
        )
    return out


def _best_gflops(task: _Task, top: _Trial | None) -> float | None:
    if top is None:
        return None
    return top.gflops if top.gflops is not None else _gflops(task.flops, top.latency_us)


def _estimate_curve(data: _Log) -> tuple[list[int], list[float], list[bool]]:
    """Per trial: estimated model latency (ms) from the best latencies so far, and whether it is complete."""
    best: dict[int, float] = {}
    weights = {t.index: t.weight for t in data.tasks}
    xs, ys, complete = [], [], []
    for trial in data.trials:
        if trial.latency_us is not None:
            held = best.get(trial.task)
            if held is None or trial.latency_us < held:
                best[trial.task] = trial.latency_us
        if not best:
            continue
        xs.append(trial.number)
        ys.append(sum(weights.get(k, 1) * v for k, v in best.items()) / 1e3)
        complete.append(all(t.index in best for t in data.tasks))
    return xs, ys, complete


# ----------------------------------------------------------------------------------------------------
# Plots


def _figure(width_in: float, height_in: float) -> Any:
    # A bare Figure draws with the Agg canvas and touches no global pyplot state or backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _short(name: str, limit: int = TITLE_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _num(v: float) -> str:
    """A figure for a label: three significant digits, no exponent below a million."""
    if abs(v) >= 1e6:
        return f"{v:.3g}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _mark_failures(ax: Any, xs: list[int], label: str | None) -> None:
    if not xs:
        return
    # Failed trials have no value: a red x on the x axis, drawn over the frame.
    ax.scatter(
        xs,
        [0.0] * len(xs),
        marker="x",
        color="#d62728",
        s=28,
        linewidths=1.4,
        transform=ax.get_xaxis_transform(),
        clip_on=False,
        zorder=5,
        label=label,
    )


def _onnxruntime_ms(data: _Log) -> float | None:
    """ONNX Runtime's p50 on the board, measured at the start of the session (None if it was not)."""
    return _float(((data.session or {}).get("baseline") or {}).get("onnxruntime_p50_ms"))


def _plot_overall(data: _Log, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    xs, ys, complete = _estimate_curve(data)
    failed = [t.number for t in data.trials if t.latency_us is None]
    fig = _figure(8.0, 4.4)
    ax = fig.add_subplot()
    full_x = [x for x, c in zip(xs, complete) if c]
    full_y = [y for y, c in zip(ys, complete) if c]
    part_x = [x for x, c in zip(xs, complete) if not c]
    part_y = [y for y, c in zip(ys, complete) if not c]
    if part_x:
        if full_x:  # join the dotted part to the solid one
            part_x, part_y = part_x + full_x[:1], part_y + full_y[:1]
        ax.step(part_x, part_y, where="post", color="#7f7f7f", linestyle=":", linewidth=1.6,
                label="lower bound (some tasks not measured yet)")
    if full_x:
        ax.step(full_x, full_y, where="post", color="#1f77b4", linewidth=2.0,
                label="estimated model latency (best so far)")
        ax.plot(full_x[-1:], full_y[-1:], "o", color="#1f77b4", markersize=5)
        ax.annotate(f"{_num(full_y[-1])} ms", (full_x[-1], full_y[-1]), textcoords="offset points",
                    xytext=(-4, 8), ha="right", fontsize=9, color="#1f77b4")
    baseline = _onnxruntime_ms(data)
    if baseline is not None:
        ax.axhline(baseline, color="#ff7f0e", linestyle="--", linewidth=1.4,
                   label=f"ONNX Runtime on the board ({_num(baseline)} ms)")
    _mark_failures(ax, failed, f"failed trial ({len(failed)})")
    n_ok = len(data.trials) - len(failed)
    ax.set_title(
        f"Convergence: {len(data.trials)} trials ({n_ok} measured, {len(failed)} failed), "
        f"{len(data.tasks)} tasks",
        fontsize=11,
    )
    ax.set_xlabel("trial number (all tasks)")
    ax.set_ylabel("estimated latency (ms, lower is better)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    if data.trials:
        ax.set_xlim(0.5, max(t.number for t in data.trials) + 0.5)
    ax.grid(True, alpha=0.3)
    if not xs:
        ax.text(0.5, 0.5, "no successful trial yet", transform=ax.transAxes, ha="center", va="center",
                color="#d62728", fontsize=12)
    elif not full_x:
        measured = {t.task for t in data.trials if t.latency_us is not None}
        missing = [f"#{t.index}" for t in data.tasks if t.index not in measured]
        shown = ", ".join(missing[:6]) + (", …" if len(missing) > 6 else "")
        ax.text(0.99, 0.97, f"model latency unknown: {len(missing)} of {len(data.tasks)} tasks have no\n"
                f"successful trial yet ({shown})", transform=ax.transAxes, ha="right", va="top", fontsize=8.5,
                color="#d62728", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    handles, _ = ax.get_legend_handles_labels()
    if handles:  # below the axes: the curve starts high on the right-hand side of a short run
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.savefig(path, format="png")


def _plot_tasks(data: _Log, summaries: list[TaskSummary], path: Path) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    n = max(1, len(data.tasks))
    cols = min(PANEL_COLUMNS if n <= 12 else PANEL_COLUMNS + 1, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.6 * cols, 2.7 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    summary_by_index = {s.index: s for s in summaries}
    for slot, task in enumerate(data.tasks):
        ax = axes[slot // cols][slot % cols]
        own = [t for t in data.trials if t.task == task.index]
        # GFLOPS says more than latency, but a kernel that only moves data (0 FLOPs) has none.
        use_gflops = bool(task.flops)
        xs_ok, ys_ok, xs_fail, best_x, best_y = [], [], [], [], []
        best: float | None = None
        for k, trial in enumerate(own, start=1):
            if trial.latency_us is None:
                xs_fail.append(k)
            else:
                value = trial.gflops if use_gflops else trial.latency_us
                xs_ok.append(k)
                ys_ok.append(value)
                if value is not None and (best is None or (value > best if use_gflops else value < best)):
                    best = value
            if best is not None:
                best_x.append(k)
                best_y.append(best)
        ax.scatter(xs_ok, ys_ok, s=14, color="#1f77b4", alpha=0.55, zorder=3)
        if best_x:
            ax.step(best_x, best_y, where="post", color="#ff7f0e", linewidth=1.8, zorder=4)
        _mark_failures(ax, xs_fail, None)
        s = summary_by_index.get(task.index)
        headline = ""
        if s is not None and s.best_latency_us is not None:
            if use_gflops and s.best_gflops:
                headline = f"best {_num(s.best_gflops)} GFLOPS"
            else:
                headline = f"best {_num(s.best_latency_us)} µs"
        ax.set_title(f"#{task.index} {_short(task.name)}\nweight {task.weight}, {len(own)} trials"
                     + (f", {headline}" if headline else ""), fontsize=9)
        ax.set_xlabel("trial of this task", fontsize=8)
        ylabel = "GFLOPS (higher is better)" if use_gflops else "latency (µs, lower is better)"
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, max(len(own), 1) + 0.5)
        ax.set_ylim(bottom=0, top=(max(ys_ok) * 1.15) if ys_ok else 1)
        ax.grid(True, alpha=0.3)
        if not own:
            ax.text(0.5, 0.5, "not tuned yet", transform=ax.transAxes, ha="center", va="center",
                    color="#7f7f7f")
            ax.set_xticks([])
            ax.set_yticks([])
        elif not xs_ok:
            ax.text(0.5, 0.5, f"no successful trial\n({len(xs_fail)} failed): fallback", transform=ax.transAxes,
                    ha="center", va="center", color="#d62728", fontsize=9)
            ax.set_yticks([])
    for slot in range(len(data.tasks), rows * cols):
        axes[slot // cols][slot % cols].set_visible(False)
    legend = [
        Line2D([], [], marker="o", linestyle="", color="#1f77b4", alpha=0.55, label="one trial"),
        Line2D([], [], color="#ff7f0e", linewidth=1.8, label="best so far"),
        Line2D([], [], marker="x", linestyle="", color="#d62728", label="failed trial"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle("Convergence per task", fontsize=11)
    fig.savefig(path, format="png")


# ----------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{padding:.3em .7em;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.tuned{color:#1a7f37}.fallback{color:#c62828;font-weight:600}.muted{color:#777}
img{max-width:100%;height:auto;border:1px solid #eee}pre{background:#f6f8fa;padding:.6em .8em;margin:.3em 0 1em;
overflow-x:auto;font-size:.85em}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dt{color:#555}dd{margin:0}code{font-size:.9em}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt_flops(flops: float | None) -> str:
    if not flops:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.0f}"


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _header_rows(
    log_dir: Path, data: _Log, result_est: float | None, first_est: float | None
) -> list[tuple[str, str]]:
    s = data.session or {}
    rows: list[tuple[str, str]] = [("tuning log", str(log_dir))]
    if s:
        model = s.get("model") or {}
        rows.append(("model", str(model.get("name") or "-")))
        rows.append(("device key", str(s.get("key") or "-")))
        rows.append(("target", json.dumps(s.get("target"), sort_keys=True)))
        board = s.get("board")
        if isinstance(board, dict):
            plain = [f"{k}={v}" for k, v in board.items() if not isinstance(v, (dict, list))]
            rows.append(("board", ", ".join(plain)))
        rows.append(("strategy", str(s.get("strategy") or "-")))
        done, budget, status = s.get("trials_done", "-"), s.get("budget", "-"), s.get("status", "-")
        rows.append(("budget", f"{done} of {budget} trials done, status {status}"))
        runs = s.get("runs") or []
        if runs:
            spans = [
                f"{r.get('started')} → {r.get('ended') or '…'} ({r.get('trials')} trials, {r.get('status')})"
                for r in runs
            ]
            rows.append(("runs", "; ".join(spans)))
    else:
        rows.append(
            ("source", "MetaSchedule database only (no session.json): task names from the workloads, weights 1")
        )
    elapsed = [t.elapsed_s for t in data.trials if t.elapsed_s is not None]
    failed = sum(1 for t in data.trials if t.latency_us is None)
    line = f"{len(data.trials)} ({failed} failed)"
    if elapsed:
        line += f" in {max(elapsed) / 60:.1f} min"
    rows.append(("trials", line))
    if result_est is not None:
        text = f"{result_est:.4g} ms"
        if first_est and first_est > result_est:
            text += (
                f" ({first_est / result_est:.2f}x faster than the first complete estimate, {first_est:.4g} ms)"
            )
        rows.append(("estimated model latency", text))
    else:
        rows.append(("estimated model latency", "unknown: some tasks have no successful trial yet"))
    baseline = _onnxruntime_ms(data)
    if baseline is not None:
        text = f"{baseline:.4g} ms (p50, measured at the start of the session)"
        if result_est is not None:
            text += f"; the estimate is {result_est / baseline:.2f}x that"
        rows.append(("ONNX Runtime on the board", text))
    return rows


def _write_html(
    path: Path,
    log_dir: Path,
    data: _Log,
    summaries: list[TaskSummary],
    pngs: list[tuple[Path, str]],
    est: float | None,
    first_est: float | None,
) -> None:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgetune report: {_e(log_dir.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Tuning report: {_e((data.session or {}).get('model', {}).get('name') or log_dir.name)}</h1>",
        f'<p class="muted">generated {_e(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))}</p>',
        "<dl>",
    ]
    for key, value in _header_rows(log_dir, data, est, first_est):
        parts.append(f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>")
    parts.append("</dl>")

    parts.append("<h2>Convergence</h2>")
    for png, alt in pngs:
        parts.append(f"<p>{_img(png, alt)}</p>")

    parts.append("<h2>Tasks</h2>")
    parts.append(
        "<table><thead><tr><th>#</th><th>task</th><th>weight</th><th>FLOPs</th><th>best latency (µs)</th>"
        "<th>GFLOPS</th><th>weighted (µs)</th><th>trials</th><th>failed</th><th>best trial</th><th>status</th>"
        "</tr></thead><tbody>"
    )
    for s in summaries:
        weighted = s.best_latency_us * s.weight if s.best_latency_us is not None else None
        parts.append(
            f'<tr><td class="num">{s.index}</td><td><code>{_e(s.name)}</code></td>'
            f'<td class="num">{s.weight}</td><td class="num">{_e(_fmt_flops(s.flops))}</td>'
            f'<td class="num">{_fmt(s.best_latency_us, ".4g")}</td>'
            f'<td class="num">{_fmt(s.best_gflops, ".3g")}</td>'
            f'<td class="num">{_fmt(weighted, ".4g")}</td><td class="num">{s.trials}</td>'
            f'<td class="num">{s.failed}</td><td class="num">{_fmt(s.best_trial, "d")}</td>'
            f'<td class="{s.status}">{s.status}</td></tr>'
        )
    parts.append("</tbody></table>")
    parts.append(
        '<p class="muted">fallback: no successful trial, so the build uses the default schedule for this '
        "kernel. weighted = weight × best latency.</p>"
    )

    parts.append("<h2>Best decisions per task</h2>")
    for s in summaries:
        parts.append(f"<h3>#{s.index} <code>{_e(s.name)}</code></h3>")
        if s.decisions_note:
            parts.append(f'<p class="muted">{_e(s.decisions_note)}</p>')
        if s.decisions:
            parts.append("<pre>" + _e("\n".join(s.decisions)) + "</pre>")
        elif s.best_latency_us is None:
            parts.append('<p class="fallback">no successful trial: nothing to show</p>')
        elif not s.decisions_note:
            parts.append('<p class="muted">the best record has no sampled decisions (a fixed schedule)</p>')
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------


def make_report(
    log_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> ReportResult:
    """Write the convergence plots (PNG) and an HTML report of the tuning log in ``log_dir``.

    ``out_dir`` defaults to ``log_dir/report``. Writes ``convergence_overall.png`` (estimated model latency in
    ms, best so far, against the trial number; failed trials as red crosses), ``convergence_tasks.png``
    (one panel per task: GFLOPS of each trial and the best so far) and ``report.html`` (self-contained: the
    PNGs are embedded). ``progress`` receives short messages.

    Raises ``ReportError`` when the directory has no measured trial (run ``edgetune tune`` first) or its
    files are damaged.
    """
    say = progress or (lambda _msg: None)
    log_dir = Path(log_dir)
    data = _load(log_dir)
    if not data.trials:
        raise _no_trials(log_dir)
    out = Path(out_dir) if out_dir is not None else log_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    say(f"read {len(data.trials)} trials of {len(data.tasks)} tasks from the {data.source}")
    summaries = _summaries(log_dir, data)
    xs, ys, complete = _estimate_curve(data)
    full = [y for y, c in zip(ys, complete) if c]
    est = full[-1] if full else None
    first_est = full[0] if full else None

    overall, per_task = out / OVERALL_PNG, out / TASKS_PNG
    say(f"drawing {overall.name}")
    _plot_overall(data, overall)
    say(f"drawing {per_task.name}")
    _plot_tasks(data, summaries, per_task)
    page = out / HTML_FILE
    _write_html(
        page,
        log_dir,
        data,
        summaries,
        [(overall, "estimated model latency against trials"), (per_task, "GFLOPS of each trial per task")],
        est,
        first_est,
    )
    say(f"wrote {page}")
    return ReportResult(
        out_dir=out,
        html=page,
        pngs=[overall, per_task],
        source=data.source,
        trials=len(data.trials),
        failed=sum(1 for t in data.trials if t.latency_us is None),
        tasks=summaries,
        estimated_latency_ms=est,
        first_estimated_latency_ms=first_est,
        fallback_tasks=[s.name for s in summaries if s.status == "fallback"],
    )
