"""Run TVM's tracker (its own ``TrackerServerHandler``, unchanged protocol) in this process.

TVM's ``Tracker`` class runs it in a popen worker that keeps the port when its parent is killed; here
the tracker lives in the calling process, so SIGTERM stops it and frees the port. The summary gains a
per-server ``free`` flag (which exact board is busy), which stock clients simply ignore.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from typing import Callable

from ..errors import EdgetuneError

logger = logging.getLogger(__name__)


def bind_tracker_socket(host: str, port: int) -> socket.socket:
    """Bind the tracker's listen socket (``port=0``: any free port). Raises :class:`EdgetuneError`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise EdgetuneError(
                f"port {port} on {host} is in use (another tracker?): pass --port with a free port, or --port 0"
            ) from None
        raise EdgetuneError(f"cannot listen on {host}:{port} ({err.strerror}): pass --host with an address of this machine") from None
    sock.listen(64)
    return sock


def _handler_class():
    from tvm.rpc.tracker import TrackerServerHandler

    class EdgetuneTrackerHandler(TrackerServerHandler):
        def summary(self):
            data = super().summary()
            free_values = set()
            for scheduler in self._scheduler_map.values():
                free_values.update(id(v) for v in getattr(scheduler, "_values", []))
            for conn in self._connections:
                info = conn.summary()
                if info.get("key", "").startswith("server"):
                    # conn._info is the dict the summary holds, so this shows in ``data`` too.
                    info["free"] = any(id(v) in free_values for v in conn.put_values)
            return data

    return EdgetuneTrackerHandler


def run_tracker(sock: socket.socket, ready: Callable[[int], None] | None = None,
                stop_event: threading.Event | None = None) -> None:
    """Serve the tracker on ``sock`` in the calling thread until ``stop_event`` is set (or forever)."""
    from tornado import ioloop

    asyncio.set_event_loop(asyncio.new_event_loop())
    handler = _handler_class()(sock, stop_key="edgetune-tracker")
    loop = ioloop.IOLoop.current()
    if stop_event is not None:
        def _check() -> None:
            if stop_event.is_set():
                handler.stop()

        ioloop.PeriodicCallback(_check, 200).start()
    if ready:
        loop.add_callback(ready, sock.getsockname()[1])
    handler.run()
