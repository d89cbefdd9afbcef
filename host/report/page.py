"""The report's self-contained HTML page: header, embedded plots, task table, best decisions."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from host.logs.format import SESSION_FILE

from .load import ReportLog

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
    data: ReportLog, result_est: float | None, first_est: float | None
) -> list[tuple[str, str]]:
    s = data.session
    rows: list[tuple[str, str]] = [("tuning log", str(data.path))]
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
            ("source", f"MetaSchedule database only (no {SESSION_FILE}): task names from the workloads, weights 1")
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
    baseline = data.onnxruntime_ms()
    if baseline is not None:
        text = f"{baseline:.4g} ms (p50, measured at the start of the session)"
        if result_est is not None:
            text += f"; the estimate is {result_est / baseline:.2f}x that"
        rows.append(("ONNX Runtime on the board", text))
    return rows


def write_html(
    path: Path,
    data: ReportLog,
    pngs: list[tuple[Path, str]],
    est: float | None,
    first_est: float | None,
) -> None:
    """Write the page to ``path``: ``pngs`` (file, alt text) are embedded, so the page loads nothing."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgetune report: {_e(data.path.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Tuning report: {_e((data.session.get('model') or {}).get('name') or data.path.name)}</h1>",
        f'<p class="muted">generated {_e(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))}</p>',
        "<dl>",
    ]
    for key, value in _header_rows(data, est, first_est):
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
    for s in data.tasks:
        weighted = s.best_us * s.weight if s.best_us is not None else None
        parts.append(
            f'<tr><td class="num">{s.index}</td><td><code>{_e(s.name)}</code></td>'
            f'<td class="num">{s.weight}</td><td class="num">{_e(_fmt_flops(s.flops))}</td>'
            f'<td class="num">{_fmt(s.best_us, ".4g")}</td>'
            f'<td class="num">{_fmt(s.gflops, ".3g")}</td>'
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
    for s in data.tasks:
        parts.append(f"<h3>#{s.index} <code>{_e(s.name)}</code></h3>")
        if s.decisions_note:
            parts.append(f'<p class="muted">{_e(s.decisions_note)}</p>')
        if s.decisions:
            parts.append("<pre>" + _e("\n".join(s.decisions)) + "</pre>")
        elif s.best_us is None:
            parts.append('<p class="fallback">no successful trial: nothing to show</p>')
        elif not s.decisions_note:
            parts.append('<p class="muted">the best record has no sampled decisions (a fixed schedule)</p>')
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")

