"""``edgetune tracker``."""

from __future__ import annotations

import signal
import threading
import time

import click

from .server import TrackerPolicy, bind_tracker_socket, run_tracker
from .teamkey import ensure_team_key


def _say(message: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} {message}", err=True)


@click.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9190, show_default=True, help="Port (0 = any free port).")
@click.option("--no-advertise", is_flag=True, help="Do not advertise the tracker on mDNS.")
@click.option("--open", "open_mode", is_flag=True,
              help="Also obey clients without the team key (stock TVM scripts, stock MetaSchedule): anyone on "
                   "the network can then list, register and request boards. Prints a warning.")
@click.option("--allow-plain-key", "plain_keys", multiple=True, metavar="KEY",
              help="Let stock TVM RPC servers (e.g. phones running tvm_rpc) register under KEY without the "
                   "team key, and do nothing else (repeatable). Prints a warning.")
def tracker(host: str, port: int, no_advertise: bool, open_mode: bool, plain_keys: tuple[str, ...]) -> None:
    """Run a TVM RPC tracker and advertise it on mDNS, so agents join by themselves.

    The tracker obeys only boards and hosts that prove they hold the team key
    (~/.config/edgetune/team.key, created on first use; EDGETUNE_TEAM_KEY_FILE moves it).

    \b
    Example:
      edgetune tracker                 # 0.0.0.0:9190, advertised as _tvm-tracker._tcp
      edgetune tracker --port 9191 --no-advertise
      edgetune tracker --allow-plain-key android   # phones running TVM's own tvm_rpc
    """
    team, notice = ensure_team_key()
    policy = TrackerPolicy(team, open_mode=open_mode, plain_keys=frozenset(plain_keys))
    sock = bind_tracker_socket(host, port)
    bound = sock.getsockname()[1]
    advertiser = None
    if not no_advertise:
        from .advertise import TrackerAdvertiser

        advertiser = TrackerAdvertiser(host, bound)
    stop = threading.Event()

    def _on_signal(signum, _frame) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    if notice:
        _say(notice)
    _say(f"team key {team.path} (fingerprint {team.fingerprint}): only boards and hosts that prove it are obeyed")
    if open_mode:
        _say("warning: open mode (--open): clients without the team key may list, register and request boards "
             "(STOP still needs the key); anyone on the network can use the boards registered here")
    for key in sorted(policy.plain_keys):
        _say(f"warning: --allow-plain-key {key}: any TVM RPC server may register as a board of key {key!r} "
             "without the team key (its timings are only as trustworthy as the network)")
    where = f"{host}:{bound}"
    if advertiser is not None:
        where += f" (advertised on mDNS at {', '.join(advertiser.addresses)})"
    _say(f"tracker listening on {where}")
    click.echo(f"EDGETUNE_TRACKER={'127.0.0.1' if host == '0.0.0.0' else host}:{bound}")
    try:
        run_tracker(sock, policy, stop_event=stop)
    finally:
        if advertiser is not None:
            advertiser.close()
        sock.close()
        _say("tracker stopped")
