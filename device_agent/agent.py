"""``edgetune-agent serve``: the RPC server, its tracker, and the board's mDNS advertisement together."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__, config
from .auth import (AUTH_OPEN, AUTH_TEAM, OPEN_WARNING, TXT_AUTH, TeamKey, TeamKeyMissing, board_key_path,
                   load_team_key)
from .errors import AgentError
from .schema import BoardRecord, check_key

logger = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    key: str
    tracker: tuple[str, int] | None = None  # None: find it by mDNS
    name: str | None = None
    host: str = "0.0.0.0"
    port: int | None = None  # None: first free in 9090-9199; 0: any
    advertise: bool = True
    store: str | None = None
    team_key_file: str | None = None  # None: $EDGETUNE_TEAM_KEY_FILE, else /etc/edgetune/team.key
    open_mode: bool = False  # sessions for anyone on the network (stock TVM clients), with a warning


def board_id(state_dir: str, legacy_store: str | None = None) -> str:
    """A stable id for this board, kept in the RPC server's own state directory (not the store, which the
    RPC server must not be able to write): survives restarts and address changes. An id an older agent kept
    in ``legacy_store`` is carried over, so the board keeps its identity.

    Raises :class:`AgentError` when the state directory cannot be written.
    """
    path = Path(state_dir) / "board-id"
    try:
        existing = path.read_text().strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    except OSError as err:
        raise AgentError(f"cannot read {path} ({err.strerror}): check EDGETUNE_RPC_STATE_DIR") from None
    old = ""
    if legacy_store:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            old = (Path(legacy_store) / "board-id").read_text().strip()
    new_id = old if len(old) == 32 and all(c in "0123456789abcdef" for c in old) else uuid.uuid4().hex
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(new_id + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise AgentError(f"cannot write the board id to {path} ({err.strerror}): set EDGETUNE_RPC_STATE_DIR "
                         "to a writable directory") from None
    return new_id


def load_board_team_key(options: ServeOptions) -> TeamKey | None:
    """The board's team key; None in open mode when there is none.

    Raises :class:`AgentError` when there is none outside open mode, or when the file is not a usable key.
    """
    path = Path(options.team_key_file).expanduser() if options.team_key_file else board_key_path()
    try:
        return load_team_key(path)
    except TeamKeyMissing:
        if options.open_mode:
            return None
        raise AgentError(
            f"no team key at {path}: copy the workstation's ~/.config/edgetune/team.key (made by `edgetune tracker`) "
            "there (deploy/install-agent.sh --team-key FILE does it) or pass --team-key-file FILE; "
            f"--open serves without one ({OPEN_WARNING})"
        ) from None


def make_record(options: ServeOptions, rpc_port: int, profile, board: str) -> BoardRecord:
    import tvm

    target = profile.target
    return BoardRecord(
        board_id=board,
        name=options.name or socket.gethostname().split(".")[0] or "board",
        key=options.key,
        arch=profile.arch,
        triple=target.get("mtriple", profile.triple),
        cpu=target.get("mcpu", ""),
        cores=int(target.get("num-cores", profile.cores)),
        features=tuple(profile.features),
        mattr=tuple(target.get("mattr", ())),
        os=profile.os,
        model=(profile.board_model or profile.cpu_model)[:120],
        tvm_version=str(tvm.__version__),
        agent_version=__version__,
        rpc_port=rpc_port,
        llc_kib=profile.llc_kib,
        extra={TXT_AUTH: AUTH_OPEN if options.open_mode else AUTH_TEAM},
    )


def stop_handler(agent_pid: int, server: Callable[[], object | None], on_event: Callable[[str], None]):
    """The agent's SIGTERM/SIGINT handler: stop the server (``server()``, once it exists), or interrupt
    the set-up before it does.

    A session process is forked from the agent and runs this handler too until it has set its own
    (a session stopped at once, e.g. by a timeout of 1e-300 s, gets the signal in that moment): there it
    must not stop the agent's server, whose session object it cannot stop and which printed a
    traceback; it ends by the signal, as it would without a handler."""

    def _stop(signum, _frame) -> None:
        if os.getpid() != agent_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        on_event(f"stopping ({signal.Signals(signum).name})")
        running = server()
        if running is not None:
            running.stop()
        else:
            raise KeyboardInterrupt

    return _stop


def serve(options: ServeOptions, on_event: Callable[[str], None]) -> None:
    """Run the board until SIGTERM/SIGINT. Raises :class:`AgentError` on bad options or set-up failures."""
    from . import ort_bench, probe
    from .mdns import Advertiser, TrackerLocator, advertised_addresses, open_zeroconf
    from .server import RPCAgentServer, bind_listen_socket

    check_key(options.key)
    team_key = load_board_team_key(options)
    store = options.store or config.default_store()
    sock = bind_listen_socket(options.host, options.port)
    port = sock.getsockname()[1]
    zc = locator = advertiser = None
    server: RPCAgentServer | None = None

    previous = {s: signal.signal(s, stop_handler(os.getpid(), lambda: server, on_event))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        profile = probe.read_profile()
        record = make_record(options, port, profile, board_id(config.rpc_state_dir(store), legacy_store=store))
        threads = config.use_target_threads(record.cores)  # before any session process is forked
        ort_bench.register()  # ONNX Runtime on the board, for `edgetune bench`
        if options.advertise or options.tracker is None:
            zc = open_zeroconf()
        tracker_source: Callable[[], list[tuple[str, int]]]
        if options.tracker is not None:
            fixed = [options.tracker]
            tracker_source = lambda: fixed  # noqa: E731
        else:
            locator = TrackerLocator(zc)
            tracker_source = locator.candidates
        custom_addr = None if options.host in ("", "0.0.0.0") else options.host
        server = RPCAgentServer(sock, options.key, tracker_source, custom_addr=custom_addr, on_event=on_event,
                                team_key=team_key, open_mode=options.open_mode)
        if options.advertise:
            advertiser = Advertiser(record, advertised_addresses(options.host), zc)
        on_event(
            f"board {record.name!r} (id {record.board_id[:8]}, {record.arch}, {record.cpu or '?'} x{record.cores}, "
            f"{threads or 'default'} runtime threads) serving TVM RPC on {options.host}:{port} as key {options.key!r}"
            + ("" if options.advertise else " (not advertised)")
        )
        if options.open_mode:
            on_event(f"warning: open mode (--open): {OPEN_WARNING}: any TVM client that reaches port {port} gets a "
                     "session; give the board the team key and drop --open to allow only your hosts")
        if team_key is not None:
            on_event(f"team key {team_key.path} (fingerprint {team_key.fingerprint})"
                     + ("" if options.open_mode else ": sessions only for hosts that prove it"))
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.stop()
        else:
            sock.close()
        if advertiser is not None:
            advertiser.close()
        if locator is not None:
            locator.close()
        if zc is not None:
            zc.close()
        on_event("stopped")
