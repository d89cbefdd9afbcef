"""The agent's SIGTERM/SIGINT handler stops the agent's server in the agent, and in a session process
forked a moment ago (which inherits it until it sets its own) only ends that process, by the signal."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from device_agent.agent import stop_handler


class _Server:
    """Counts stop() calls (the handler's only use of the server)."""

    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


def test_in_the_agent_the_signal_stops_its_server_or_interrupts_the_set_up():
    events: list[str] = []
    server = _Server()
    handler = stop_handler(os.getpid(), lambda: server, events.append)
    handler(signal.SIGTERM, None)
    assert server.stops == 1 and events == ["stopping (SIGTERM)"]
    with pytest.raises(KeyboardInterrupt):  # before the server exists
        stop_handler(os.getpid(), lambda: None, events.append)(signal.SIGINT, None)
    assert events[-1] == "stopping (SIGINT)"


def _forked_session(agent_pid: int, events) -> None:
    server = _Server()
    signal.signal(signal.SIGTERM, stop_handler(agent_pid, lambda: server, events.put))
    os.kill(os.getpid(), signal.SIGTERM)
    events.put(f"survived, server stopped {server.stops} times")


def test_in_a_forked_session_process_the_signal_ends_that_process_only():
    ctx = multiprocessing.get_context("fork")
    events = ctx.Queue()
    proc = ctx.Process(target=_forked_session, args=(os.getpid(), events))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGTERM  # ended by the signal, as without a handler: no traceback, no exit code 1
    assert events.empty()  # neither "stopping" (the agent's message) nor a stopped server
