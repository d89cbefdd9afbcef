"""Fixtures for tests on the emulated Raspberry Pi 4 (see board.py).

- ``emulated_board_image`` (session): installs the host's packages and qemu 10 when missing, builds
  or reuses the cached board image, returns its root file system.
- ``start_emulated_board`` / ``start_emulated_board_module``: factories calling board.start_board with
  this checkout as the agent's source; every board started through them is stopped at teardown. A board
  running ``edgetune-agent`` gets the test session's team key (``team_key`` in tests/conftest.py) in its
  /etc/edgetune/team.key, as ``deploy/install-agent.sh --team-key`` would install it.
- ``stock_tracker`` / ``stock_tracker_module``: factories starting TVM's own tracker on a host address
  (port from the OS). Pass one as ``tracker=`` to start a tracker on the board's link::

      def test_x(start_emulated_board, stock_tracker):
          handle = start_emulated_board(tracker=stock_tracker)   # tracker bound to handle.host_ip
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

try:
    from . import board
except ImportError:  # tests/e2e is not a package: pytest put this directory on sys.path
    import board

REPO_ROOT = Path(__file__).resolve().parents[2]


def _progress(message: str) -> None:
    # Shown with -s; the cold build takes minutes and should not look hung.
    print(f"[emulated board] {message}", flush=True)


@pytest.fixture(scope="session")
def emulated_board_image() -> Path:
    if os.geteuid() != 0:
        pytest.fail("e2e tests need root: chroot, mounts, network namespaces and binfmt_misc")
    return board.ensure_board_image(progress=_progress, repo_root=REPO_ROOT)


class BoardFactory:
    """Starts boards and remembers them so teardown stops every one, whatever happened."""

    def __init__(self) -> None:
        self.handles: list[board.BoardHandle] = []

    def __call__(self, **kw) -> board.BoardHandle:
        kw.setdefault("repo_root", REPO_ROOT)
        kw.setdefault("tracker", None)
        kw.setdefault("progress", _progress)
        handle = board.start_board(**kw)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        errors = []
        for handle in reversed(self.handles):
            try:
                board.stop_board(handle)
            except Exception as err:  # stop the others anyway, then report
                errors.append(err)
        self.handles.clear()
        if errors:
            raise errors[0]


class TrackerFactory:
    """Starts TVM's stock tracker on a host address; teardown stops every one (children first)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs = []

    def __call__(self, host: str) -> str:
        proc, addr = board.start_stock_tracker(host, log_path=self.log_dir / f"tracker-{len(self.procs)}.log")
        self.procs.append(proc)
        return addr

    def close(self) -> None:
        for proc in reversed(self.procs):
            board.stop_process(proc)
        self.procs.clear()


@pytest.fixture
def start_emulated_board(emulated_board_image: Path, team_key) -> Iterator[Callable[..., board.BoardHandle]]:
    factory = BoardFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def start_emulated_board_module(emulated_board_image: Path, team_key) -> Iterator[Callable[..., board.BoardHandle]]:
    factory = BoardFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def stock_tracker(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    factory = TrackerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def stock_tracker_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    factory = TrackerFactory(tmp_path_factory.mktemp("trackers"))
    try:
        yield factory
    finally:
        factory.close()
