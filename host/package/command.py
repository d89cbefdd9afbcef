"""``edgetune package`` and ``edgetune keys``."""

from __future__ import annotations

import click

from ..cliutil import emit, json_option
from .keys import KEY_ENV, init_keys
from .package import PackageResult, package as make_package

_KEY_HELP = f"Signing key (default: ${KEY_ENV}, else ~/.config/edgetune/signing_key)."


@click.command()
@click.argument("out", type=click.Path(file_okay=False, exists=True))
@click.option("--log", "log_dir", required=True, type=click.Path(file_okay=False),
              help="The tuning log directory the build used (as given to `edgetune tune --log`).")
@click.option("-o", "--output", "pkg", required=True, type=click.Path(dir_okay=False),
              help="The package file to write (e.g. model.etpkg).")
@click.option("--key", "key_path", type=click.Path(dir_okay=False), help=_KEY_HELP)
@click.option("--rtol", type=float, help="Relative tolerance of the board's self-check (default 1e-4).")
@click.option("--atol", type=float, help="Absolute tolerance of the board's self-check (default 1e-4).")
@json_option
def package(out: str, log_dir: str, pkg: str, key_path: str | None, rtol: float | None, atol: float | None,
            as_json: bool) -> None:
    """Make a signed package of the build in OUT: model, reference input/output, tuning log, manifest.

    \b
    Example:
      edgetune keys init                      # once
      edgetune package out/ --log runs/rpi4 -o model.etpkg
      edgetune flash model.etpkg --key rpi4 --all
    """
    result = make_package(out, log_dir, pkg, key_path=key_path, rtol=rtol, atol=atol)
    emit(result, as_json, _render_package)


def _render_package(result: PackageResult) -> str:
    return (
        f"wrote {result.path} ({result.size / 1e6:.1f} MB, sha256 {result.sha256[:16]}...)\n"
        f"model {result.model_name} for key {result.key} ({result.target.get('mtriple')}), "
        f"{len(result.files)} files, signed by {result.signer}"
    )


@click.group()
def keys() -> None:
    """Manage the key packages are signed with.

    \b
    Example:
      edgetune keys init
    """


@keys.command("init")
@click.option("--force", is_flag=True, help="Replace an existing key (boards must then trust the new one).")
@click.option("--key", "key_path", type=click.Path(dir_okay=False), help=_KEY_HELP)
@json_option
def keys_init(force: bool, key_path: str | None, as_json: bool) -> None:
    """Create the package signing key and print its public key for the boards' trust directories.

    \b
    Example:
      edgetune keys init
      scp ~/.config/edgetune/signing_key.pub pi@board:
      ssh root@board edgetune-agent trust signing_key.pub
    """
    info = init_keys(key_path, force=force)
    emit(info, as_json, lambda i: (
        f"created {i.path} (private, mode 0600) and {i.public_path}\n"
        f"public key ({i.fingerprint}):\n  {i.public_key}\n"
        f"make each board trust it: copy {i.public_path} to the board and run "
        f"`edgetune-agent trust {i.public_path.rsplit('/', 1)[-1]}`, or put it in the board's trust directory "
        "(/var/lib/edgetune/trusted/)"
    ))
