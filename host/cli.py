"""The ``edgetune`` command. Each subcommand lives beside its library code in ``host/<area>/command.py``
and is imported only when it runs, so ``edgetune --help`` answers without importing TVM."""

from __future__ import annotations

import importlib
import logging

import click

from . import __version__
from device_agent.cliutil import run_main
from .errors import AgentError, EdgetuneError

# command name -> "module:attribute"
COMMANDS = {
    "tracker": "host.tracker.command:tracker",
    "devices": "host.discovery.command:devices",
    "tasks": "host.tuning.command:tasks",
    "tune": "host.tuning.command:tune",
    "log": "host.logs.command:log",
    "schedules": "host.schedules.command:schedules",
    "build": "host.build.command:build",
    "package": "host.package.command:package",
    "keys": "host.package.command:keys",
    "flash": "host.flash.command:flash",
    "bench": "host.bench.command:bench",
    "report": "host.report.command:report",
    "demo": "host.demo.command:demo",
    "android": "host.android.command:android",
}

SHORT_HELP = {
    "tracker": "Run a TVM RPC tracker and advertise it on mDNS.",
    "devices": "List boards found by mDNS, merged with the tracker's view.",
    "tasks": "List the tuning tasks of a model for a board.",
    "tune": "Tune a model on the boards of a key (resumable).",
    "log": "Inspect and combine tuning logs.",
    "schedules": "The schedule store every session reads and writes (SQLite or PostgreSQL).",
    "build": "Compile a model for a board with its tuning log applied.",
    "package": "Make a signed, deployable package of a build.",
    "keys": "Manage the package signing key.",
    "flash": "Install a package on one board or every board of a key.",
    "bench": "Measure on-board latency, tuned against untuned.",
    "report": "Convergence plots and tables of a tuning log (PNG + HTML).",
    "demo": "The whole loop on this machine: tracker, agent, tune, build, flash, bench.",
    "android": "Android phones as boards, over adb: connect a phone.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        if cmd_name == "flash":  # phones: --adb SERIAL --dest DIR, implemented in host/android
            from .android.command import with_adb_flash

            command = with_adb_flash(command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, SHORT_HELP[name]) for name in COMMANDS])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log details and show tracebacks of errors.")
@click.version_option(__version__, prog_name="edgetune")
def cli(verbose: bool) -> None:
    """edgetune: tune deep-learning models on the boards they will run on, and ship them.

    \b
    Example, with a board on the LAN running `edgetune-agent serve --key rpi4`:
      edgetune tracker &                      # or pass --tracker HOST:PORT everywhere
      edgetune devices
      edgetune tune model.onnx --device rpi4 --trials 256 --log runs/rpi4
      edgetune build model.onnx --device rpi4 --log runs/rpi4 -o out/
      edgetune package out/ --log runs/rpi4 -o model.etpkg
      edgetune flash model.etpkg --key rpi4 --all
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # MetaSchedule prints its scheduler's progress to stdout at INFO; edgetune draws its own progress
    # and MetaSchedule keeps writing everything to the log folder's logs/ files. -v shows it too.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main() -> None:
    run_main(cli, "edgetune", (EdgetuneError, AgentError))


if __name__ == "__main__":
    main()
