"""``edgetune devices``."""

from __future__ import annotations

import os

import click

from .. import config
from ..cliutil import emit, json_option, table, tracker_option
from ..errors import EdgetuneError
from ..tracker.client import resolve_tracker
from .browse import find_boards


@click.command()
@json_option
@tracker_option
@click.option("--timeout", type=float, default=None, help=f"Seconds to listen on mDNS (default {config.DISCOVERY_SEC:g}).")
def devices(as_json: bool, tracker: str | None, timeout: float | None) -> None:
    """List the boards on the LAN (mDNS) with the tracker's view: free, busy or not registered.

    \b
    Example:
      edgetune devices
      edgetune devices --json --tracker 192.168.1.10:9190
    """
    note = None
    try:
        addr = resolve_tracker(tracker)
    except EdgetuneError as err:
        if tracker:
            raise
        addr, note = None, str(err)
    from ..android.devices import PhoneSearch

    phones = PhoneSearch(timeout)  # Android phones (Wireless debugging on mDNS, adb), beside the board search
    boards, tracker_note = find_boards(timeout, addr)
    boards = phones.merge(boards, None if tracker_note else addr)
    if tracker_note and (tracker or os.environ.get("EDGETUNE_TRACKER")):
        raise EdgetuneError(tracker_note)  # the tracker the user named does not answer
    note = tracker_note or note
    if as_json:
        emit({"tracker": f"{addr[0]}:{addr[1]}" if addr else None, "note": note,
              "boards": [b.as_dict() for b in boards]}, True)
        return
    rows = []
    for b in boards:
        rec = b.record
        rows.append([
            f"! {b.name}" if b.conflict else b.name, b.key, b.status, ",".join(b.addresses), b.rpc_port,
            rec.arch if rec else "?", (f"{rec.cpu} x{rec.cores}" if rec else "plain TVM RPC (no agent)"),
            ",".join(rec.features[:6]) if rec else "",
        ])
    if rows:
        click.echo(table(rows, ["BOARD", "KEY", "STATUS", "ADDRESS", "PORT", "ARCH", "CPU", "FEATURES"]))
    else:
        click.echo("No boards found. Start `edgetune-agent serve --key K` on a board (see README: troubleshooting).")
    if addr:
        click.echo(f"\ntracker: {addr[0]}:{addr[1]}")
    for b in boards:
        if b.conflict:
            click.echo(f"warning: ! {b.name}: {b.conflict}: one may be an impostor; `edgetune flash` skips it "
                       "until you pick the board by address (--host ADDRESS)", err=True)
    if note:
        click.echo(f"note: {note}", err=True)
