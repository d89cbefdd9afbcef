"""``edgetune flash``."""

from __future__ import annotations

import click

from .. import config
from ..cliutil import emit, json_option, table
from ..errors import EdgetuneError
from .known_boards import DEFAULT_KNOWN_BOARDS
from .ssh import DEFAULT_AGENT_COMMAND, DEFAULT_KNOWN_HOSTS, DEFAULT_REMOTE_DIR, FlashInterrupted, FlashResult
from .ssh import flash as run_flash
from .targets import by_address, by_mdns


def _render(results: list[FlashResult]) -> str:
    rows = []
    for r in results:
        check = "passed" if r.self_check_ok else ("failed" if r.self_check_ok is False else "-")
        p50 = f"{r.p50_ms:.3f} ms" if r.p50_ms is not None else "-"
        rows.append([r.name, r.address, "ok" if r.ok else "failed", r.slot or "-", check, p50, r.error or ""])
    lines = [table(rows, ["board", "address", "result", "slot", "self-check", "p50", "error"])]
    for r in results:
        lines.extend(f"{r.name}: {note}" for note in r.notes)
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} boards flashed" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)


@click.command()
@click.argument("pkg", type=click.Path(dir_okay=False, exists=True))
@click.option("--host", "hosts", multiple=True, metavar="HOST[:PORT]",
              help="A board's SSH address (repeat for several boards).")
@click.option("--device", help="The board of this name, found by mDNS.")
@click.option("--key", help="The boards of this device key, found by mDNS (needs --all if several).")
@click.option("--all", "all_boards", is_flag=True, help="With --key: flash every board of the key, in parallel.")
@click.option("--user", default="root", show_default=True, help="SSH user on the boards.")
@click.option("--identity", type=click.Path(dir_okay=False, exists=True), help="SSH private key file.")
@click.option("--port", type=int, default=22, show_default=True, help="SSH port (when HOST gives none).")
@click.option("--known-hosts", default=DEFAULT_KNOWN_HOSTS, show_default=True, type=click.Path(dir_okay=False),
              help="known_hosts file the boards' host keys are checked against.")
@click.option("--known-boards", default=DEFAULT_KNOWN_BOARDS, show_default=True, type=click.Path(dir_okay=False),
              help="File binding each board id (from mDNS) to the SSH host key it first presented; a board id "
                   "at a host with another key is refused.")
@click.option("--trust-new-host", is_flag=True,
              help="Accept a board whose host key is unknown and record it in --known-hosts (a changed key, or "
                   "a board id known with another key, is still refused).")
@click.option("--agent-command", default=DEFAULT_AGENT_COMMAND, show_default=True,
              help="How to run the agent on the boards (e.g. /opt/edgetune/venv/bin/edgetune-agent).")
@click.option("--store", help="The agent's store directory on the boards (default: the agent's).")
@click.option("--remote-dir", default=DEFAULT_REMOTE_DIR, show_default=True,
              help="Where the package is uploaded on the boards before install (removed afterwards).")
@click.option("--timeout", type=float, default=None, help="Seconds to look for boards on mDNS (default 3).")
@json_option
def flash(pkg: str, hosts: tuple[str, ...], device: str | None, key: str | None,
          all_boards: bool, user: str, identity: str | None, port: int, known_hosts: str, known_boards: str,
          trust_new_host: bool, agent_command: str, store: str | None, remote_dir: str, timeout: float | None,
          as_json: bool) -> None:
    """Install a package on one board or every board of a key, over SSH.

    Each board verifies the signature and files, checks the package suits its CPU, switches to it
    atomically and runs a self-check, rolling back to the previous model if it fails. A board counts
    as flashed only when its answer names this package. Boards found by mDNS are flashed only at a
    host presenting the SSH host key their board id first had; a board id or name advertised twice is
    not flashed (pick the board with --host). Exits non-zero if any board failed.

    \b
    Example:
      edgetune flash model.etpkg --key rpi4 --all
      edgetune flash model.etpkg --device pi-kitchen --identity ~/.ssh/id_ed25519
      edgetune flash model.etpkg --host 192.168.1.20 --host 192.168.1.21:2222 --user pi --json
    """
    if sum(bool(x) for x in (hosts, device, key)) != 1:
        raise EdgetuneError("choose the boards with exactly one of --host HOST, --device NAME or --key KEY")
    if all_boards and not key:
        raise EdgetuneError("--all goes with --key KEY (every board of that key)")
    if hosts:
        plan = by_address(hosts, user, identity, port)
    else:
        from ..discovery.browse import find_boards

        seconds = config.DISCOVERY_SEC if timeout is None else timeout
        boards, _note = find_boards(seconds)
        plan = by_mdns(boards, device, key, all_boards, seconds, user, identity, port)

    def on_progress(board: str, message: str) -> None:
        if not as_json:
            click.echo(f"{board}: {message}", err=True)

    for skipped in plan.skipped:
        on_progress(skipped.name, f"failed: {skipped.error}")
    results = list(plan.skipped)
    try:
        if plan.targets:
            results += run_flash(pkg, plan.targets, known_hosts=known_hosts, known_boards=known_boards,
                                 trust_new_host=trust_new_host, agent_command=agent_command, store=store,
                                 remote_dir=remote_dir, on_progress=on_progress)
    except FlashInterrupted as stop:
        # Every board's outcome first (flashed, or what the interrupt left it in), then exit 130.
        emit(plan.skipped + stop.results, as_json, _render)
        raise
    emit(results, as_json, _render)
    failed = [r.name for r in results if not r.ok]
    if failed:
        # Raised rather than ctx.exit(1): a non-standalone click main returns that status instead of exiting.
        raise EdgetuneError(f"{len(failed)} of {len(results)} boards failed ({', '.join(failed)}): "
                            "see each board's error above, fix it and flash those boards again")
