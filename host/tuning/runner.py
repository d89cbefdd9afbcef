"""A MetaSchedule runner that measures candidates on every free board of a key, through the tracker.

- one measuring thread per board registered under the key (TVM's ``RPCRunner`` uses one in total);
- every wait has a deadline: with no free board (all gone, or the tracker gone) a measurement waits
  up to ``NO_BOARD_DEADLINE_SEC`` and then the session stops with :class:`NoBoardError` instead of
  hanging;
- a board that drops a session is retried once on another board before the candidate is recorded
  as a failed trial; a candidate that crashes or hangs the board is a failed trial, never a stop;
- sessions prove the team key to the tracker and to each board (:mod:`host.tracker.client`); a tracker
  that cannot prove it ends the session (:class:`SessionStop`) instead of being waited for;
- a board that stops answering without closing the connection (power cut, cable pulled, frozen) is
  given up after its session timeout plus ``BOARD_ANSWER_GRACE_SEC`` (after ``BOARD_HANDSHAKE_SEC``
  before its session started): the candidate it was measuring is a failed trial that names it, it is
  reported once (a ``board-lost`` event), and measuring goes on on the other boards of the key.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, PyRunnerFuture, RunnerInput, RunnerResult
from tvm.s_tir.meta_schedule.runner.rpc_runner import (
    default_alloc_argument,
    default_cleanup,
    default_run_evaluator,
    default_upload_module,
)
from tvm.ir.utils import derived_object

from .. import config
from ..errors import EdgetuneError, NoBoardError, TrackerUnreachable
from ..tracker.client import (BoardSession, BoardSilent, TrackerAddr, TrackerNotTrusted, open_board_session,
                              servers_of_key, tracker_summary)

from .timing import COLD, kernel_timing

logger = logging.getLogger(__name__)

# How many boards a candidate may be tried on when boards drop the session (not the candidate's fault).
MAX_BOARD_ATTEMPTS = 2


def boards_elsewhere(hosts: Sequence[str]) -> bool:
    """True when every board runs on another machine than this one (``hosts``: the addresses the tracker
    lists them under, none of them this machine's): only then may the workstation build while a board
    times, without the build skewing the timing. False with no board."""
    import ipaddress

    import psutil

    mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}

    def here(host: str) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback or host in mine
        except ValueError:  # a name, not an address
            return host in ("localhost", os.uname().nodename)

    return bool(hosts) and not any(here(h) for h in hosts)


class SessionStop(EdgetuneError):
    """Raised out of the tuning loop: no board (or no tracker) before the deadline."""


@derived_object
class BoardFuture(PyRunnerFuture):
    def __init__(self, future: Future) -> None:
        super().__init__()
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> RunnerResult:
        # A SessionStop raised by the job propagates out of the tuning loop and ends the session.
        return self.future.result()


# Cold weights (a session's ``cold_weights``): a kernel in the model finds its weights out of the caches
# (the model's weights do not fit), while repeated timing of one kernel keeps them hot. Each timed run is
# one run after MetaSchedule's cache flush (a second would be hot again); a candidate's result is the
# fastest three of its five runs. Which kernels are timed so is :func:`timing.kernel_timing`'s rule.
COLD_EVALUATOR = EvaluatorConfig(number=1, repeat=5, min_repeat_ms=0, enable_cpu_cache_flush=True)
COLD_RUNS_KEPT = 3


@derived_object
class BoardRunner(PyRunner):
    """Measures on the boards of ``key`` found through the tracker at ``tracker``."""

    def __init__(
        self,
        tracker: TrackerAddr,
        key: str,
        evaluator_config: EvaluatorConfig | None = None,
        cold_weights: bool = False,
        session_timeout_sec: float | None = None,
        no_board_deadline_sec: float | None = None,
        on_event: Callable[[dict], None] | None = None,
        board_log: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        # artifact path -> board that measured it, read by the session's history
        self.board_log = board_log if board_log is not None else {}
        self.tracker = tracker
        self.key = key
        self.evaluator_config = evaluator_config or EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40)
        self.cold_weights = cold_weights
        self.session_timeout_sec = config.MEASURE_SESSION_SEC if session_timeout_sec is None else session_timeout_sec
        self.answer_within_sec = max(_answer_deadline_sec(evaluator, self.session_timeout_sec)
                                     for evaluator in (self.evaluator_config, COLD_EVALUATOR))
        self.no_board_deadline_sec = (config.NO_BOARD_DEADLINE_SEC if no_board_deadline_sec is None
                                      else no_board_deadline_sec)
        self.on_event = on_event or (lambda event: None)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._lock = threading.Lock()
        self._waiting_since: float | None = None
        self.measured_by: dict[str, int] = {}
        self.lost: dict[str, str] = {}  # board -> why it was given up (until it measures again)
        self.stopped: SessionStop | None = None
        self._open: dict[int, BoardSession] = {}  # sessions open now (by id), cut at once by shutdown()
        self.busy: list[tuple[float, float]] = []  # (start, end) of each candidate's session on a board, monotonic

    # -- board count -----------------------------------------------------------------------------
    def count_boards(self) -> int:
        """Boards registered under the key now (0 when the tracker does not answer)."""
        try:
            return len(servers_of_key(tracker_summary(self.tracker), self.key))
        except TrackerUnreachable:
            return 0

    def _executor(self) -> ThreadPoolExecutor:
        boards = max(1, self.count_boards())
        with self._lock:
            if self._pool is None or boards > self._pool_size:
                old = self._pool
                self._pool = ThreadPoolExecutor(max_workers=boards, thread_name_prefix="edgetune-measure")
                self._pool_size = boards
                if old is not None:
                    old.shutdown(wait=False)
            return self._pool

    # -- measuring -----------------------------------------------------------------------------
    def evaluator_for(self, args_info: list) -> EvaluatorConfig:
        """How a kernel with these arguments is timed: cold when the session says so and they do not
        fit in the caches, else the runner's own evaluator."""
        if kernel_timing(self.cold_weights, args_info) == COLD:
            return COLD_EVALUATOR
        return self.evaluator_config

    def run(self, runner_inputs: list[RunnerInput]) -> list[BoardFuture]:
        pool = self._executor()
        return [BoardFuture(pool.submit(self._measure, inp)) for inp in runner_inputs]

    def _note_waiting(self, reason: str) -> None:
        with self._lock:
            first = self._waiting_since is None
            if first:
                self._waiting_since = time.monotonic()
        if first:
            self.on_event({"event": "waiting", "reason": reason, "deadline_s": self.no_board_deadline_sec})

    def _note_board_ok(self, board: str) -> None:
        with self._lock:
            was_waiting = self._waiting_since is not None
            self._waiting_since = None
            self.measured_by[board] = self.measured_by.get(board, 0) + 1
            self.lost.pop(board, None)  # it registered again and answers: a later silence is news again
        if was_waiting:
            self.on_event({"event": "resumed", "board": board})

    def _note_board_lost(self, board: str, reason: str, during: str, silent_s: float | None) -> None:
        with self._lock:
            first = board not in self.lost
            self.lost[board] = reason
        if first:
            logger.warning("%s; measuring goes on without it (it is used again once it registers again)", reason)
            self.on_event({"event": "board-lost", "board": board, "reason": reason, "during": during,
                           "silent_s": silent_s})

    def _acquire(self) -> BoardSession:
        """A session to a free board, waiting up to the no-board deadline (shared by all jobs)."""
        while True:
            with self._lock:
                if self.stopped is not None:
                    raise self.stopped
                start = self._waiting_since if self._waiting_since is not None else time.monotonic()
            deadline = start + self.no_board_deadline_sec
            if time.monotonic() >= deadline:
                break
            try:
                return open_board_session(self.tracker, self.key, self.session_timeout_sec,
                                          min(deadline, time.monotonic() + 5.0),
                                          answer_within_sec=self.answer_within_sec)
            except NoBoardError:
                self._note_waiting(f"no free board of key {self.key!r} on tracker {self.tracker[0]}:{self.tracker[1]}")
            except TrackerNotTrusted as err:
                # Waiting does not help: it will not learn the key. Stop with the log intact.
                with self._lock:
                    self.stopped = self.stopped or SessionStop(str(err))
                raise self.stopped from None
            except TrackerUnreachable as err:
                self._note_waiting(str(err))
                time.sleep(1.0)
            except BoardSilent as err:
                # Not the candidate's fault: it did not reach the board. Another board takes it.
                self._note_board_lost(err.board, str(err), "connecting", err.waited_sec)
                self._note_waiting(str(err))
            except ConnectionError as err:
                self._note_waiting(str(err))
                time.sleep(0.5)
        stop = SessionStop(
            f"no board of key {self.key!r} was available for {self.no_board_deadline_sec:g} s "
            f"(tracker {self.tracker[0]}:{self.tracker[1]}): the tuning log is intact; start a board "
            "(`edgetune-agent serve --key " + self.key + "`) and run the same command again to resume"
        )
        with self._lock:
            self.stopped = self.stopped or stop
        raise self.stopped

    def _measure(self, inp: RunnerInput) -> RunnerResult:
        artifact = str(inp.artifact_path)
        last_error = ""
        try:
            for _attempt in range(MAX_BOARD_ATTEMPTS):
                opened = self._acquire()
                board, silent_s = opened.board, opened.answer_within_sec
                self.board_log[artifact] = board
                with self._lock:
                    self._open[id(opened)] = opened
                started = time.monotonic()
                try:
                    costs, uploaded, error, silent = self._measure_on(opened, inp, artifact)
                finally:
                    with self._lock:
                        self.busy.append((started, time.monotonic()))
                        self._open.pop(id(opened), None)
                    opened.close()
                    del opened  # the session's connection closes here
                if silent is not None:
                    during = "cleaning up" if error is None else ("measuring" if uploaded else "uploading")
                    self._note_board_lost(board, silent, during, silent_s)
                if error is None:
                    if silent is None:
                        self._note_board_ok(board)
                    return RunnerResult(costs, None)
                if silent is not None:
                    if not uploaded:
                        last_error = silent
                        continue  # the candidate never reached the board: another board takes it
                    # It may be what froze the board: never tried on another one.
                    return RunnerResult(None, f"{silent}; the candidate counts as a failed trial")
                last_error = error
                if not uploaded and _is_connection_error(last_error):
                    continue  # the board dropped us before the candidate ran: try another board
                if "kShutdown" in last_error:
                    last_error = "the candidate crashed the board's session process"
                return RunnerResult(None, f"on board {board}: {last_error}")
            return RunnerResult(None, f"boards dropped the session {MAX_BOARD_ATTEMPTS} times: {last_error}")
        finally:
            shutil.rmtree(os.path.dirname(artifact), ignore_errors=True)

    def _measure_on(self, opened: BoardSession, inp: RunnerInput,
                    artifact: str) -> tuple[list[float] | None, bool, str | None, str | None]:
        """Upload, time and clean up one candidate on an open session.

        Returns (costs, uploaded, error, silent): ``silent`` is the sentence saying the board stopped
        answering, when it did (then the session is cut, so freeing its remote objects does not wait).
        """
        session = opened.session
        remote = os.path.basename(artifact)
        uploaded = False
        costs: list[float] | None = None
        error: str | None = None
        try:
            device = session.device(str(inp.device_type), 0)
            rt_mod = default_upload_module(session, artifact, remote)
            uploaded = True
            args_info = [a.as_json() for a in inp.args_info]
            evaluator = self.evaluator_for(args_info)
            args = default_alloc_argument(session, device, tuple(args_info), 1)
            costs = [float(c) for c in default_run_evaluator(session, rt_mod, device, evaluator, args)]
            if evaluator.enable_cpu_cache_flush and len(costs) > COLD_RUNS_KEPT:
                # Single cold runs of a kernel of microseconds: one of them caught by an interrupt or a
                # page fault doubles the mean. The fastest few are the kernel's own time.
                costs = sorted(costs)[:COLD_RUNS_KEPT]
        except Exception as err:  # noqa: BLE001 - any failure on the board is the trial's result
            error = _one_line(err)
        silent = opened.stopped_answering(error) if error else None
        if silent is None:
            try:
                default_cleanup(session, remote)
            except Exception as err:  # noqa: BLE001 - the session may be gone already
                silent = opened.stopped_answering(err)
        if silent is not None:
            opened.cut()
        return costs, uploaded, error, silent

    def time_interleaved(self, inputs: list[RunnerInput], evaluator: EvaluatorConfig,
                         rounds: int) -> list[list[float] | None]:
        """Time several candidates of one kernel against each other in one session on one board: in
        ``rounds`` rounds, each round timing every candidate once with ``evaluator`` in an order reversed
        every other round, so that a board whose speed drifts (a shared host's memory) slows them alike.
        Returns per candidate its rounds' median times in seconds, or None when it failed. Raises
        :class:`EdgetuneError` when no board answers; the artifacts' folders are removed."""
        opened = self._acquire()
        with self._lock:
            self._open[id(opened)] = opened
        session = opened.session
        loaded: list[tuple[str, Any, Any, Any] | None] = []
        try:
            for number, inp in enumerate(inputs):
                # Every candidate under a name of its own: one uploaded over another already loaded
                # would rewrite the code the board's process runs.
                remote = f"{number}-{os.path.basename(str(inp.artifact_path))}"
                try:
                    device = session.device(str(inp.device_type), 0)
                    rt_mod = default_upload_module(session, str(inp.artifact_path), remote)
                    args = default_alloc_argument(session, device, tuple(a.as_json() for a in inp.args_info), 1)[0]
                    loaded.append((remote, rt_mod, device, args))
                except Exception as err:  # noqa: BLE001 - this candidate does not run: the others still do
                    self._give_up_if_silent(opened, err)
                    logger.debug("candidate %s not timed: %s", remote, _one_line(err))
                    loaded.append(None)
            medians: list[list[float] | None] = [[] if item else None for item in loaded]
            for index in range(rounds):
                order = list(range(len(loaded))) if index % 2 == 0 else list(reversed(range(len(loaded))))
                for i in order:
                    item = loaded[i]
                    if item is None or medians[i] is None:
                        continue
                    remote, rt_mod, device, args = item
                    try:
                        costs = default_run_evaluator(session, rt_mod, device, evaluator, [args])
                        medians[i].append(float(sorted(costs)[len(costs) // 2]))
                    except Exception as err:  # noqa: BLE001
                        self._give_up_if_silent(opened, err)
                        medians[i] = None
            for item in loaded:
                if item is not None:
                    try:
                        default_cleanup(session, item[0])
                    except Exception:  # noqa: BLE001 - the session may be gone
                        pass
            return medians
        finally:
            with self._lock:
                self._open.pop(id(opened), None)
            opened.close()
            for inp in inputs:
                shutil.rmtree(os.path.dirname(str(inp.artifact_path)), ignore_errors=True)

    def _give_up_if_silent(self, opened: BoardSession, err: BaseException) -> None:
        """Raise :class:`EdgetuneError` when ``err`` says the board stopped answering: its session is cut
        (closing it would wait on the board) and the board reported lost, as for a single candidate."""
        silent = opened.stopped_answering(err)
        if silent is not None:
            opened.cut()
            self._note_board_lost(opened.board, silent, "timing finalists", opened.answer_within_sec)
            raise EdgetuneError(silent) from None

    def shutdown(self) -> None:
        """Stop measuring: jobs still waiting for a board give up at once (an interpreter exit would
        otherwise wait for them up to the no-board deadline)."""
        with self._lock:
            if self.stopped is None:
                self.stopped = SessionStop("the tuning session ended")
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            still_open = list(self._open.values())
        for opened in still_open:  # a job still waiting on a board ends now, not at the board's deadline
            opened.cut()


def _answer_deadline_sec(evaluator: EvaluatorConfig, session_timeout_sec: float) -> float:
    """How long a board may go without answering before it is taken as gone, in seconds.

    The evaluator's timed runs (``repeat`` rounds of at least ``min_repeat_ms`` each) happen inside the
    session, and the board itself ends the session at ``session_timeout_sec`` and says so: a board that
    answers always does so by then. A candidate's speed is not known beforehand, so nothing tighter
    holds; ``BOARD_ANSWER_GRACE_SEC`` covers the board stopping its session and the answer's way back.
    Raises :class:`EdgetuneError` when the timed runs alone cannot fit in the session.
    """
    timed_sec = (evaluator.repeat or 1) * (evaluator.min_repeat_ms or 0) / 1000.0
    if timed_sec >= session_timeout_sec:
        raise EdgetuneError(
            f"the evaluator's timed runs need at least {timed_sec:g} s, but a board ends a measurement session "
            f"after {session_timeout_sec:g} s: raise EDGETUNE_MEASURE_SESSION_SEC or lower repeat/min_repeat_ms"
        )
    return session_timeout_sec + config.BOARD_ANSWER_GRACE_SEC


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM errors put the useful line last, after a traceback.
    return (lines[-1] if lines else type(err).__name__)[:300]


def _is_connection_error(message: str) -> bool:
    lowered = message.lower()
    return any(s in lowered for s in ("connection", "socket", "broken pipe", "reset by peer", "eof"))
