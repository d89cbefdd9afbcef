"""``edgetune android connect`` and the ``--adb``/``--dest`` options of ``edgetune flash``."""

from __future__ import annotations

import json
from typing import Any

import click

from ..cliutil import emit, json_option, table, tracker_option
from ..errors import EdgetuneError


@click.group()
def android() -> None:
    """Android phones as boards, over adb (USB or Wireless debugging).

    \b
    Example:
      edgetune android connect 49281FDAQ0011J --rpc-binary build-android/tvm_rpc
      edgetune android connect 192.168.1.23:37651 --key android-tokay
    """


def _render_connect(data: dict[str, Any]) -> str:
    phone = data["phone"]
    lines = [
        f"phone:   {phone['model']} ({phone['soc']}), Android {phone['release']} (API {phone['api_level']}), "
        f"serial {data['serial']}",
        f"key:     {data['key']}",
        f"target:  {json.dumps(data['target'])}",
        f"tracker: {data['tracker']} (adb reverse); tvm_rpc port {data['rpc_port']} (adb forward)",
    ]
    if data["rpc_started"]:
        lines.append("tvm_rpc: started on the phone and registered with the tracker")
    lines.append(f"recorded in {data['record']}: tune and build --device {data['key']} use this target")
    lines += [f"note: {note}" for note in data["notes"]]
    return "\n".join(lines)


@android.command()
@click.argument("serial")
@click.option("--key", help="Device key for the phone (default: android-<codename>, e.g. android-husky).")
@click.option("--rpc-binary", type=click.Path(dir_okay=False),
              help="TVM's tvm_rpc built with the NDK; it and the lib*.so beside it are pushed and started.")
@tracker_option
@json_option
def connect(serial: str, key: str | None, rpc_binary: str | None, tracker: str | None, as_json: bool) -> None:
    """Make an adb-attached phone a tunable board: read its profile, tunnel the tracker over adb,
    start tvm_rpc on it and record its target for tune and build.

    SERIAL is what `adb devices -l` lists (USB), or HOST:PORT from the phone's Wireless debugging
    screen (adb connect is run first). The tracker must run on this workstation.

    \b
    Example:
      edgetune tracker --allow-plain-key android-tokay &
      edgetune android connect 49281FDAQ0011J --key android-tokay --rpc-binary build-android/tvm_rpc
      edgetune tune model.onnx --device android-tokay --trials 256 --log runs/tokay
    """
    from ..tracker.client import resolve_tracker
    from .connect import connect_phone

    addr = resolve_tracker(tracker)
    result = connect_phone(serial, addr, key=key, rpc_binary=rpc_binary,
                           on_progress=None if as_json else (lambda m: click.echo(m, err=True)))
    emit(result.as_dict(), as_json, _render_connect)


def _render_flash(data: dict[str, Any]) -> str:
    rows = [[name, digest] for name, digest in data["files"].items()]
    text = table(rows, ["file", "sha256 (checked on the phone)"])
    text += f"\n{data['model']} is now in {data['serial']}:{data['dest']}"
    return "\n".join([text, *data["notes"]])


def with_adb_flash(flash: click.Command) -> click.Command:
    """``flash`` with ``--adb SERIAL --dest DIR`` for phones; without ``--adb`` it is ``flash`` unchanged."""
    adb_option = click.Option(["--adb", "adb_serial"], metavar="SERIAL",
                              help="Push the Android build to this adb phone instead (with --dest).")
    dest_option = click.Option(["--dest"], metavar="DIR",
                               help="With --adb: the folder on the phone (e.g. /data/local/tmp/model).")

    def callback(adb_serial: str | None, dest: str | None, **kwargs: Any) -> Any:
        if adb_serial is None:
            if dest is not None:
                raise EdgetuneError("--dest goes with --adb SERIAL (the phone to push the build to)")
            return flash.callback(**kwargs) if flash.callback else None
        if kwargs.get("hosts") or kwargs.get("device") or kwargs.get("key") or kwargs.get("all_boards"):
            raise EdgetuneError("--adb SERIAL flashes one phone: drop --host, --device, --key and --all")
        if not dest:
            raise EdgetuneError("--adb needs --dest DIR, the folder on the phone (e.g. --dest /data/local/tmp/model)")
        from .flash import flash_phone

        as_json = bool(kwargs.get("as_json"))
        result = flash_phone(kwargs["pkg"], adb_serial, dest,
                             on_progress=None if as_json else (lambda m: click.echo(f"{adb_serial}: {m}", err=True)))
        emit(result.as_dict(), as_json, _render_flash)
        return None

    epilog = ("Android phones (no agent, no SSH): edgetune flash model.etpkg --adb 49281FDAQ0011J "
              "--dest /data/local/tmp/model   (sha256 checked on the phone before the switch; the previous "
              "build is kept as *.prev)")
    return click.Command(flash.name, params=[*flash.params, adb_option, dest_option], callback=callback,
                         help=flash.help, epilog=epilog, short_help=flash.short_help,
                         context_settings=flash.context_settings)
