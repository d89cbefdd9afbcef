"""The ``edgetune-agent`` command, run on the board."""

from __future__ import annotations

import importlib
import json
import logging
import time

import click

from . import __version__
from .cliutil import run_main
from .errors import AgentError
from .schema import parse_hostport

# Commands living beside their library code, imported only when they run (TVM imports are slow).
LAZY_COMMANDS = {
    "install": "device_agent.install_cli:install",
    "rollback": "device_agent.install_cli:rollback",
    "status": "device_agent.install_cli:status",
    "trust": "device_agent.install_cli:trust",
}


class AgentGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module_name, attr = LAZY_COMMANDS[cmd_name].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, cmd_name)


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log details and show tracebacks of errors.")
@click.version_option(__version__, prog_name="edgetune-agent")
def cli(verbose: bool) -> None:
    """edgetune-agent: makes this board tunable (TVM RPC + mDNS) and installs tuned packages.

    \b
    Example:
      edgetune-agent probe
      edgetune-agent serve --key rpi4
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def probe(as_json: bool) -> None:
    """Show what this board is and the TVM target proposed for it.

    \b
    Example:
      edgetune-agent probe --json
    """
    from . import probe as probe_mod

    profile = probe_mod.read_profile()
    if as_json:
        click.echo(json.dumps(profile.as_dict(), indent=2))
    else:
        click.echo(probe_mod.describe(profile))


def _parse_tracker(value: str | None) -> tuple[str, int] | None:
    return parse_hostport(value) if value else None


@cli.command()
@click.option("--key", required=True, help="Device key: the class of board (e.g. rpi4). No ':'.")
@click.option("--tracker", envvar="EDGETUNE_TRACKER", metavar="HOST:PORT",
              help="Tracker to register with (default: $EDGETUNE_TRACKER, else found by mDNS).")
@click.option("--name", help="This board's name on the LAN (default: the host name).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to serve RPC on.")
@click.option("--port", type=int, default=None, help="RPC port (default: first free in 9090-9199; 0 = any).")
@click.option("--no-advertise", is_flag=True, help="Do not advertise the board on mDNS.")
@click.option("--store", type=click.Path(file_okay=False), help="Artifact store (default: $EDGETUNE_STORE, else /var/lib/edgetune as root, else ~/.local/share/edgetune).")
@click.option("--team-key-file", envvar="EDGETUNE_TEAM_KEY_FILE", type=click.Path(dir_okay=False),
              help="The team key: only hosts that hold it run code here (default: $EDGETUNE_TEAM_KEY_FILE, "
                   "else /etc/edgetune/team.key).")
@click.option("--open", "open_mode", is_flag=True, envvar="EDGETUNE_OPEN",
              help="Serve any TVM client (stock scripts, stock MetaSchedule): anyone on the network can run "
                   "code on this board. Prints a warning.")
def serve(key: str, tracker: str | None, name: str | None, host: str, port: int | None,
          no_advertise: bool, store: str | None, team_key_file: str | None, open_mode: bool) -> None:
    """Serve TVM RPC for tuning, registered with the tracker, and advertise the board.

    Only hosts that hold the team key get a session, and the board registers only with a tracker that
    proves it holds the key too.

    \b
    Example:
      edgetune-agent serve --key rpi4                      # tracker found by mDNS
      edgetune-agent serve --key rpi4 --tracker 192.168.1.10:9190 --name pi-kitchen
      edgetune-agent serve --key rpi4 --team-key-file ~/team.key
    """
    from .agent import ServeOptions, serve as run_serve

    def on_event(message: str) -> None:
        click.echo(f"{time.strftime('%H:%M:%S')} {message}", err=True)

    options = ServeOptions(
        key=key, tracker=_parse_tracker(tracker), name=name, host=host, port=port,
        advertise=not no_advertise, store=store, team_key_file=team_key_file, open_mode=open_mode,
    )
    run_serve(options, on_event)


def main() -> None:
    run_main(cli, "edgetune-agent", (AgentError,))


if __name__ == "__main__":
    main()
