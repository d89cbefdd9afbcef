"""``edgetune-agent install | rollback | status | trust``: the board's side of `edgetune flash`."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, NoReturn

import click

from . import store as store_mod
from .install_answer import InstallAnswer

logger = logging.getLogger(__name__)

_STORE_HELP = ("Artifact store (default: $EDGETUNE_STORE, else /var/lib/edgetune as root, "
               "else ~/.local/share/edgetune).")
store_option = click.option("--store", type=click.Path(file_okay=False), help=_STORE_HELP)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


_STEP_TEXT = {
    "extract": "unpacking",
    "signature": "verifying the signature",
    "files": "verifying the files",
    "compatibility": "checking the package suits this board",
    "slot": "storing it in a new slot",
    "self-check": "running the self-check",
    "switch": "switching to it",
    "prune": "removing old slots",
}


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _answer(answer: InstallAnswer) -> NoReturn:
    """Print the install answer (the contract `edgetune flash` reads) and exit with its status."""
    click.echo(answer.to_json())
    sys.exit(answer.exit_status)


@click.command()
@click.argument("pkg", type=click.Path())
@store_option
@click.option("--trust-dir", type=click.Path(file_okay=False),
              help="Directory of trusted public keys (default: STORE/trusted).")
@click.option("--allow-downgrade", is_flag=True,
              help="Install it even if it was built before the installed package.")
@json_option
def install(pkg: str, store: str | None, trust_dir: str | None, allow_downgrade: bool, as_json: bool) -> None:
    """Verify a package, install it and make it current; roll back if its self-check fails.

    Checks the signature against the trusted keys, every file's size and sha256, that the package's
    target suits this board's CPU, then runs the model on its reference input. The model that was
    current before stays current when any of that fails.

    A package built before the installed one is refused (an old signed package cannot be put back by
    whoever holds a copy); go back with `edgetune-agent rollback`, or pass --allow-downgrade.

    With --json the answer is always one JSON object on stdout (the install answer `edgetune flash`
    reads): exit 0 when installed, 1 when refused, 2 on an internal error (-v logs its traceback).

    \b
    Example:
      edgetune-agent install /tmp/model.etpkg
      edgetune-agent install model.etpkg --store /data/edgetune --json
    """
    last_step = ["extract"]

    def on_step(step: str) -> None:
        last_step[0] = step
        if not as_json:
            click.echo(f"  {_STEP_TEXT.get(step, step)}", err=True)

    try:
        result = store_mod.install(pkg, store, trust_dir, on_step=on_step, allow_downgrade=allow_downgrade)
    except store_mod.InstallError as err:
        if not as_json:
            raise
        _answer(InstallAnswer.refused(err))
    except Exception as err:  # noqa: BLE001 - with --json, `flash` reads an answer whatever happened
        if not as_json:
            raise
        logger.debug("install failed with an internal error", exc_info=True)
        try:
            current = store_mod.status(store).current
        except Exception:  # noqa: BLE001 - the answer matters more than naming the current slot
            current = None
        reason = (str(err).splitlines() or [""])[0][:200]
        _answer(InstallAnswer.failed(
            last_step[0], f"internal error ({type(err).__name__}: {reason}): please report it with the command you ran",
            current,
        ))
    if as_json:
        _answer(InstallAnswer.installed(result))
    check = result.self_check
    click.echo(f"installed {result.model_name} (key {result.key}) as {result.slot}")
    click.echo(f"self-check passed: max abs error {check.max_abs_err:.3g}, p50 {check.p50_ms:.3f} ms, "
               f"load {check.load_ms:.0f} ms")
    click.echo(f"previous: {result.previous or 'none'} (undo with `edgetune-agent rollback`)")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@click.command()
@store_option
@json_option
def rollback(store: str | None, as_json: bool) -> None:
    """Make the previously installed package current again.

    \b
    Example:
      edgetune-agent rollback
    """
    result = store_mod.rollback(store)
    if as_json:
        _echo_json(result.__dict__)
    else:
        click.echo(f"rolled back: {result.model_name} ({result.current}) is current; "
                   f"previous: {result.previous or 'none'}")


@click.command()
@store_option
@json_option
def status(store: str | None, as_json: bool) -> None:
    """Show the installed package: model, key, when, its self-check and latency.

    \b
    Example:
      edgetune-agent status --json
    """
    result = store_mod.status(store)
    if as_json:
        _echo_json(result.__dict__)
        return
    click.echo(f"store:     {result.store}")
    if result.current is None:
        click.echo("current:   none (install a package with `edgetune flash` or `edgetune-agent install PKG`)")
        return
    check = "passed" if result.self_check_ok else ("failed" if result.self_check_ok is False else "unknown")
    p50 = f"{result.p50_ms:.3f} ms" if result.p50_ms is not None else "-"
    click.echo(f"current:   {result.model_name} (key {result.key}) {result.current}")
    click.echo(f"installed: {result.installed_at or '-'}; self-check {check}; p50 {p50}")
    click.echo(f"previous:  {result.previous_model or '-'} {result.previous or ''}".rstrip())


@click.command()
@click.argument("pubkey", type=click.Path(dir_okay=False, exists=True))
@store_option
@click.option("--trust-dir", type=click.Path(file_okay=False),
              help="Directory of trusted public keys (default: STORE/trusted).")
@json_option
def trust(pubkey: str, store: str | None, trust_dir: str | None, as_json: bool) -> None:
    """Trust packages signed by a key (the .pub file `edgetune keys init` printed).

    \b
    Example:
      edgetune-agent trust signing_key.pub
    """
    result = store_mod.trust(pubkey, store, trust_dir)
    if as_json:
        _echo_json(result.__dict__)
    elif result.added:
        click.echo(f"trusted {result.fingerprint} ({result.path})")
    else:
        click.echo(f"already trusted: {result.fingerprint} ({result.path})")


COMMANDS = [install, rollback, status, trust]
