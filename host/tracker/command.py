"""``edgetune tracker``."""

from __future__ import annotations

import signal
import threading
import time

import click

from .server import bind_tracker_socket, run_tracker


@click.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9190, show_default=True, help="Port (0 = any free port).")
@click.option("--no-advertise", is_flag=True, help="Do not advertise the tracker on mDNS.")
def tracker(host: str, port: int, no_advertise: bool) -> None:
    """Run a TVM RPC tracker and advertise it on mDNS, so agents join by themselves.

    \b
    Example:
      edgetune tracker                 # 0.0.0.0:9190, advertised as _tvm-tracker._tcp
      edgetune tracker --port 9191 --no-advertise
    """
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
    where = f"{host}:{bound}"
    if advertiser is not None:
        where += f" (advertised on mDNS at {', '.join(advertiser.addresses)})"
    click.echo(f"{time.strftime('%H:%M:%S')} tracker listening on {where}", err=True)
    click.echo(f"EDGETUNE_TRACKER={'127.0.0.1' if host == '0.0.0.0' else host}:{bound}")
    try:
        run_tracker(sock, stop_event=stop)
    finally:
        if advertiser is not None:
            advertiser.close()
        sock.close()
        click.echo(f"{time.strftime('%H:%M:%S')} tracker stopped", err=True)
