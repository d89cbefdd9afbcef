"""The command-line contract shared by ``edgetune`` and ``edgetune-agent``: one-line errors, exit codes."""

from __future__ import annotations

import sys

import click



def run_main(group: click.Group, prog: str, errors: tuple[type[BaseException], ...]) -> None:
    """Run a click group: known errors as one line (traceback with -v), unknown ones as a report."""
    verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:])
    try:
        code = group.main(prog_name=prog, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except errors as err:
        if verbose:
            import traceback

            traceback.print_exc()
        click.echo(f"{prog}: error: {err}", err=True)
        sys.exit(1)
    except Exception:  # noqa: BLE001 - the last resort for bugs: print everything, ask for a report
        import traceback

        traceback.print_exc()
        click.echo(
            f"{prog}: internal error (the traceback above): please report it with the command you ran",
            err=True,
        )
        sys.exit(2)

