"""Shared pieces of the ``edgetune`` command line: options every command repeats, output, errors.

Only CLI modules (this one, ``host/cli.py`` and each feature's ``command.py``) import click.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import click



json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
tracker_option = click.option(
    "--tracker",
    metavar="HOST:PORT",
    envvar="EDGETUNE_TRACKER",
    help="The TVM RPC tracker (default: $EDGETUNE_TRACKER, else the tracker found by mDNS).",
)


def to_jsonable(data: Any) -> Any:
    """Dataclasses, tuples and paths to plain JSON values."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        if hasattr(data, "as_dict"):
            return to_jsonable(data.as_dict())
        return {f.name: to_jsonable(getattr(data, f.name)) for f in dataclasses.fields(data)}
    if isinstance(data, dict):
        return {str(k): to_jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple, set)):
        return [to_jsonable(v) for v in data]
    if hasattr(data, "__fspath__"):
        return str(data)
    return data


def emit(data: Any, as_json: bool, render: Callable[[Any], str] | None = None) -> None:
    """Print ``data`` as JSON (``--json``) or through ``render`` for people."""
    if as_json or render is None:
        click.echo(json.dumps(to_jsonable(data), indent=2, sort_keys=False))
    else:
        text = render(data)
        if text:
            click.echo(text)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

