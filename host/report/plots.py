"""The convergence plots of a report (PNG), drawn on bare matplotlib Figures (no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .load import ReportLog, estimate_curve

# Panel titles longer than this are shortened (fused kernel names can run to 100+ characters).
TITLE_CHARS = 34
PANEL_COLUMNS = 3
DPI = 110


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


# The convergence plot switches to a log scale when its highest point is this many times its lowest.
LOG_SCALE_RANGE = 20.0


def plot_overall(data: ReportLog, path: Path) -> None:
    """Estimated model latency (ms, best so far) against the trial number; failed trials as red crosses."""
    from matplotlib.ticker import MaxNLocator

    xs, ys, complete = estimate_curve(data)
    failed = [t.trial for t in data.trials if t.latency_us is None]
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
        if full_x[0] == 0:  # the session measured the untuned model first: the curve starts there
            ax.plot(full_x[:1], full_y[:1], "o", color="#555555", markersize=5)
            ax.annotate(f"untuned {_num(full_y[0])} ms", (0, full_y[0]), textcoords="offset points",
                        xytext=(8, -8), ha="left", va="top", fontsize=9, color="#555555")
        ax.plot(full_x[-1:], full_y[-1:], "o", color="#1f77b4", markersize=5)
        ax.annotate(f"{_num(full_y[-1])} ms", (full_x[-1], full_y[-1]), textcoords="offset points",
                    xytext=(-4, 8), ha="right", fontsize=9, color="#1f77b4")
    baseline = data.onnxruntime_ms()
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
    if ys and min(ys) > 0 and max(ys) / min(ys) > LOG_SCALE_RANGE:
        ax.set_yscale("log")  # from the untuned model down to the tuned one: both ends readable
    else:
        ax.set_ylim(bottom=0)
    if data.trials:
        ax.set_xlim(-0.5 if xs and xs[0] == 0 else 0.5, max(t.trial for t in data.trials) + 0.5)
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


def plot_tasks(data: ReportLog, path: Path) -> None:
    """One panel per task: GFLOPS (or latency, for a kernel without FLOPs) of each trial and the best so far."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    n = max(1, len(data.tasks))
    cols = min(PANEL_COLUMNS if n <= 12 else PANEL_COLUMNS + 1, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.6 * cols, 2.7 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
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
        headline = ""
        if task.best_us is not None:
            if use_gflops and task.gflops:
                headline = f"best {_num(task.gflops)} GFLOPS"
            else:
                headline = f"best {_num(task.best_us)} µs"
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

