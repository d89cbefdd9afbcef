#!/usr/bin/env python3
"""The emulated Raspberry Pi 4 test board, for developers (run as root).

    python scripts/emulated_board.py build            build or reuse the cached image
    python scripts/emulated_board.py start [...]      start a board that stays up after this command
    python scripts/emulated_board.py status [--json]  boards of this cache
    python scripts/emulated_board.py shell [-b RUN] [-- CMD...]  a shell (or CMD) inside a board
    python scripts/emulated_board.py ssh [-b RUN] [-- CMD...]    the same over SSH with the throwaway key
    python scripts/emulated_board.py stop [RUN|--all]  stop boards (also cleans up after crashes)

The library is tests/e2e/board.py; the cache is $EDGETUNE_BOARD_CACHE (default /var/cache/edgetune/board).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

import board  # noqa: E402  (tests/e2e is not a package)


def _pick_run(run_id: str | None) -> str:
    if run_id:
        return run_id
    live = [s["run_id"] for s in board.list_boards() if not s["stale"]]
    if len(live) != 1:
        raise board.BoardError(f"{len(live)} boards running ({', '.join(live) or 'none'}): name one "
                               f"(python scripts/emulated_board.py status)")
    return live[0]


def cmd_build(args: argparse.Namespace) -> int:
    rootfs = board.ensure_board_image(progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(rootfs)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    agent_argv = None
    if args.stock_rpc_server:
        if not args.tracker:
            raise board.BoardError("--stock-rpc-server needs --tracker HOST:PORT (may use {host_ip})")
        agent_argv = ["python", "-m", "tvm.exec.rpc_server", "--tracker", "{tracker}", "--key", "{key}",
                      "--host", "{board_ip}", "--port", "9090", "--port-end", "9199"]
    elif args.no_agent:
        agent_argv = []
    handle = board.start_board(
        tracker=args.tracker, key=args.key, name=args.name, advertise=not args.no_advertise,
        repo_root=REPO_ROOT, agent_argv=agent_argv, install_agent=not args.no_install, detached=True,
        progress=lambda m: print(m, file=sys.stderr, flush=True))
    info = board.handle_as_dict(handle)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"board {handle.run_id}: {handle.board_ip} (host end {handle.host_ip}, netns {handle.netns})")
        print(f"  ssh:   {' '.join(handle.ssh_argv())}")
        print(f"  agent: pid {handle.agent_pid}, log {handle.agent_log}")
        print(f"  stop:  python scripts/emulated_board.py stop {handle.run_id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    boards = board.list_boards()
    if args.json:
        print(json.dumps(boards, indent=2))
        return 0
    if not boards:
        print("no boards running")
    for s in boards:
        flag = "stale" if s["stale"] else ("up" if s["alive"] else "down")
        print(f"{s['run_id']}  {flag:5}  board {s['board_ip']}  netns {s['netns']}  key {s.get('key', '')}"
              f"  tracker {s.get('tracker') or '-'}")
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    handle = board.handle_from_state(_pick_run(args.run))
    argv = handle.board_argv(args.cmd or ["/bin/bash", "-l"])
    os.execvpe(argv[0], argv, handle.board_env({"TERM": os.environ.get("TERM", "xterm")}))


def cmd_ssh(args: argparse.Namespace) -> int:
    handle = board.handle_from_state(_pick_run(args.run))
    argv = handle.ssh_argv(*args.cmd)
    if not args.cmd:
        argv.insert(1, "-t")
    os.execvp(argv[0], argv)


def cmd_stop(args: argparse.Namespace) -> int:
    if args.all:
        done = board.cleanup_stale(include_detached=True)
        print(f"stopped {len(done)} board(s){': ' + ', '.join(done) if done else ''}")
        return 0
    if args.run is None:
        done = board.cleanup_stale()
        live = [s["run_id"] for s in board.list_boards()]
        if len(live) == 1:
            board.stop_board(live[0])
            done.append(live[0])
        elif live:
            raise board.BoardError(f"{len(live)} boards running: name one or use --all")
        print(f"stopped {len(done)} board(s){': ' + ', '.join(done) if done else ''}")
        return 0
    board.stop_board(args.run)
    print(f"stopped {args.run}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details, tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build or reuse the cached board image").set_defaults(func=cmd_build)
    p = sub.add_parser("start", help="start a board (stays up; stop it with 'stop')")
    p.add_argument("--tracker", help="HOST:PORT of a tracker; '{host_ip}' is the host end of the link")
    p.add_argument("--key", default="rpi4-emu")
    p.add_argument("--name", default="emu-pi4")
    p.add_argument("--no-advertise", action="store_true")
    p.add_argument("--no-install", action="store_true", help="do not install the agent from the working tree")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stock-rpc-server", action="store_true", help="run TVM's rpc_server instead of the agent")
    g.add_argument("--no-agent", action="store_true", help="start only sshd")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("status", help="boards of this cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    for name, func in (("shell", cmd_shell), ("ssh", cmd_ssh)):
        p = sub.add_parser(name, help=f"{'chroot' if name == 'shell' else 'SSH'} into a board")
        p.add_argument("-b", "--board", dest="run", metavar="RUN", help="run id (default: the only board up)")
        p.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run (default: a login shell)")
        p.set_defaults(func=func)
    p = sub.add_parser("stop", help="stop a board (or all, with --all); cleans leftovers of crashed runs")
    p.add_argument("run", nargs="?")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_stop)
    args = parser.parse_args(argv)
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except board.BoardError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
