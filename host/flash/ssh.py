"""Flash a package onto boards over SSH (paramiko): upload, `edgetune-agent install --json`, clean up.

Host keys are checked against a known_hosts file; an unknown host is refused unless the caller asks
to trust new hosts (the key is then recorded in that file), and a changed host key is always
refused. A board found by mDNS comes with its board id, which is bound to the host key it presents
the first time (:mod:`.known_boards`): that id at a host with another key is refused, with or without
``--trust-new-host``. Each board is flashed in its own thread; one board's failure never stops the others.

The board's answer is the install answer of :mod:`device_agent.install_answer`, parsed strictly: a
malformed answer, or one that does not name the package sent (its sha256, model and key), is a failure.

Every wait on a board has a deadline: paramiko's own for connecting and for each upload step, and
``SSH_INSTALL_SEC`` for the whole install command, whose output is read up to ``MAX_OUTPUT_BYTES``.
The calling thread watches the boards: it cuts the connection of a board past its deadline (paramiko
waits for some answers without one), and on Ctrl-C it cuts every board's connection at once, leaves
pending boards unstarted and raises :class:`FlashInterrupted` with every board's outcome.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import paramiko

from device_agent.errors import AgentError
from device_agent.install_answer import InstallAnswer, InstallStatus, parse as parse_answer
from device_agent.manifest import PACKAGE_SUFFIX, Manifest, sha256_file
from device_agent.schema import clean_text

from .. import config
from ..errors import EdgetuneError
from ..package.package import read_package_manifest
from .known_boards import DEFAULT_KNOWN_BOARDS, KnownBoards, changed

logger = logging.getLogger(__name__)

DEFAULT_AGENT_COMMAND = "edgetune-agent"
DEFAULT_REMOTE_DIR = "/tmp"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
# Boards flashed at the same time; each holds one SSH connection and one upload.
MAX_PARALLEL = 16
# How often the command's output is polled while it runs.
_POLL_SEC = 0.05
# The agent's install answer is one JSON object of a few KiB. A command that prints more than this is
# not giving that answer (a wrong --agent-command, a loop) and is stopped rather than read to the end.
MAX_OUTPUT_BYTES = 1 << 20
# One read of the command's output, in bytes.
_CHUNK = 65536
# How often the calling thread looks at the boards' deadlines (and can take Ctrl-C).
_WATCH_SEC = 0.2
# The install command's own loop ends it at its deadline; the watch cuts the connection this much later,
# for the SSH calls that wait for an answer without a deadline (paramiko's exec_command).
_WATCH_GRACE_SEC = 1.0


@dataclass(frozen=True)
class FlashTarget:
    """One board to flash: where its SSH server is and who to log in as."""

    name: str
    host: str
    port: int = 22
    user: str = "root"
    key_file: str | None = None
    board_id: str | None = None  # from the board's mDNS record: bound to its SSH host key

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


@dataclass
class FlashResult:
    """What happened on one board. ``install`` is the board's install answer, when it gave a readable one."""

    name: str
    address: str
    ok: bool
    slot: str | None = None
    model_name: str | None = None
    self_check_ok: bool | None = None
    p50_ms: float | None = None
    max_abs_err: float | None = None
    rolled_back: bool = False
    current: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    install: InstallAnswer | None = None
    board_id: str | None = None


class FlashInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`flash`. ``results`` has every board's outcome, in order: boards that were
    flashed before it, and the others failed with what the interrupt left them in."""

    def __init__(self, results: list[FlashResult]) -> None:
        super().__init__("interrupted")
        self.results = results


class _Watch:
    """One board as the calling thread sees it: its step, that step's deadline, and its SSH connection,
    which :meth:`cut` closes so that every SSH call blocked on that board returns at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self.step = "waiting"
        self._deadline: float | None = None
        self._deadline_reason = ""
        self.stop_reason: str | None = None

    def enter(self, step: str, deadline: float | None = None, reason: str = "") -> None:
        with self._lock:
            self.step, self._deadline, self._deadline_reason = step, deadline, reason

    def attach(self, client: paramiko.SSHClient) -> None:
        with self._lock:
            self._client = client
            cut = self.stop_reason is not None
        if cut:
            _close_transport(client)

    def check(self, now: float) -> None:
        """Cut the connection if the current step is past its deadline."""
        with self._lock:
            late = self._deadline is not None and now > self._deadline + _WATCH_GRACE_SEC
            reason = self._deadline_reason
        if late:
            self.cut(reason)

    def cut(self, reason: str) -> None:
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
            client = self._client
        if client is not None:
            _close_transport(client)

    def interrupted(self) -> str:
        """What Ctrl-C leaves the board in, for its result."""
        step = self.step
        if step == "waiting":
            return "not flashed: interrupted (Ctrl-C) before it started; flash it again"
        if step in ("installing", "cleaning up"):
            return ("interrupted (Ctrl-C) while installing: the board switches packages atomically, so it runs "
                    "the new package or its previous one; check with `edgetune-agent status` there, or flash again")
        return f"interrupted (Ctrl-C) while {step}: the board still runs its previous package; flash it again"


def _close_transport(client: paramiko.SSHClient) -> None:
    transport = client.get_transport()
    if transport is not None:
        try:
            transport.close()
        except Exception:  # noqa: BLE001 - closing a connection that is breaking anyway
            logger.debug("closing an SSH connection failed", exc_info=True)


class _KnownHosts:
    """The known_hosts file shared by all threads of one flash; new keys are appended under a lock."""

    def __init__(self, path: Path, trust_new: bool) -> None:
        self.path = path
        self.trust_new = trust_new
        self.lock = threading.Lock()

    def policy(self, notes: list[str], target: FlashTarget, boards: KnownBoards) -> paramiko.MissingHostKeyPolicy:
        return _Policy(self, notes, target, boards)


class _Policy(paramiko.MissingHostKeyPolicy):
    """RejectPolicy with a sentence that says what to do, or record-on-first-use when asked to.

    A board whose id is bound to a host key is judged by that key alone: the same key at a new address
    is the same board, and another key is refused even when trusting new hosts.
    """

    def __init__(self, known: _KnownHosts, notes: list[str], target: FlashTarget, boards: KnownBoards) -> None:
        self.known = known
        self.notes = notes
        self.target = target
        self.boards = boards

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        fp = key.fingerprint
        bound = self.boards.lookup(self.target.board_id) if self.target.board_id else None
        if bound is not None:
            if not bound.same_key(key):
                raise changed(bound, self.target.name, key, self.boards.path)
            client.get_host_keys().add(hostname, key.get_name(), key)
            self.notes.append(f"new address {hostname} presents the host key board id {bound.board_id} is bound to "
                              f"({fp}): the same board")
            return
        if not self.known.trust_new:
            host, _, port = hostname.strip("[").partition("]:")
            scan = f"ssh-keyscan -p {port} {host}" if port else f"ssh-keyscan {hostname}"
            raise EdgetuneError(
                f"host key of {hostname} is unknown ({key.get_name()} {fp}, not in {self.known.path}): "
                f"check it and add it (`{scan} >> {self.known.path}`), or pass --trust-new-host to record it"
            )
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with self.known.lock:
            self.known.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(self.known.path, "a", encoding="utf-8") as f:
                f.write(line)
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.notes.append(f"new host key {key.get_name()} {fp} recorded in {self.known.path}")
        logger.warning("recorded new host key of %s (%s) in %s", hostname, fp, self.known.path)


@dataclass(frozen=True)
class _Options:
    known: _KnownHosts
    boards: KnownBoards
    package_sha256: str
    manifest: Manifest
    agent_command: str
    store: str | None
    remote_dir: str
    progress: Callable[[str, str], None]
    cancel: threading.Event


def _connect(target: FlashTarget, opts: _Options, notes: list[str], watch: _Watch) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    watch.attach(client)
    try:
        if opts.known.path.is_file():
            client.load_host_keys(str(opts.known.path))
    except (OSError, paramiko.SSHException) as err:
        raise EdgetuneError(f"cannot read known hosts {opts.known.path} ({err}): fix the file or pass --known-hosts FILE") from None
    client.set_missing_host_key_policy(opts.known.policy(notes, target, opts.boards))
    explicit_key = target.key_file is not None
    try:
        client.connect(
            target.host, port=target.port, username=target.user, key_filename=target.key_file,
            timeout=config.SSH_CONNECT_SEC, banner_timeout=config.SSH_CONNECT_SEC,
            auth_timeout=config.SSH_CONNECT_SEC, channel_timeout=config.SSH_CONNECT_SEC,
            allow_agent=not explicit_key, look_for_keys=not explicit_key,
        )
    except EdgetuneError:
        client.close()
        raise
    except paramiko.BadHostKeyException as err:
        client.close()
        name = f"[{target.host}]:{target.port}" if target.port != 22 else target.host
        raise EdgetuneError(
            f"host key of {name} has CHANGED ({err.key.get_name()} {err.key.fingerprint}, known_hosts has "
            f"{err.expected_key.fingerprint}): refusing to connect; if the board was reinstalled, remove the old "
            f"key with `ssh-keygen -R '{name}' -f {opts.known.path}` and flash again"
        ) from None
    except paramiko.AuthenticationException as err:
        client.close()
        how = f"the key {target.key_file}" if explicit_key else "your SSH agent / ~/.ssh keys"
        raise EdgetuneError(
            f"SSH login as {target.user} refused ({err}) with {how}: pass --user and --identity FILE "
            "of a key in the board's authorized_keys"
        ) from None
    except (socket.timeout, TimeoutError):
        client.close()
        raise EdgetuneError(
            f"no SSH answer within {config.SSH_CONNECT_SEC:g} s: check the board is on and the address "
            "(raise EDGETUNE_SSH_CONNECT_SEC on slow links)"
        ) from None
    except (paramiko.SSHException, OSError) as err:
        client.close()
        raise EdgetuneError(
            f"cannot connect over SSH to {target.host}:{target.port} ({_reason(err)}): check the board is on, "
            "sshd runs there, and the port"
        ) from None
    if target.board_id is not None:
        _bind(client, target, opts, notes)
    return client


def _bind(client: paramiko.SSHClient, target: FlashTarget, opts: _Options, notes: list[str]) -> None:
    """Check the verified host key against the one the board id is bound to, binding it on first use.

    Raises :class:`EdgetuneError` (the connection closed) when the id is bound to another key.
    """
    transport = client.get_transport()
    key = transport.get_remote_server_key() if transport is not None else None
    if key is None or target.board_id is None:
        client.close()
        raise EdgetuneError("the SSH connection dropped before its host key could be checked: flash again")
    try:
        entry = opts.boards.bind(target.board_id, target.name, key)
    except EdgetuneError:
        client.close()
        raise
    if entry is not None:
        notes.append(f"board id {entry.board_id} bound to host key {entry.fingerprint} in {opts.boards.path}")


def _reason(err: Exception) -> str:
    if isinstance(err, paramiko.ssh_exception.NoValidConnectionsError):
        inner = [e for e in err.errors.values() if isinstance(e, OSError)]
        if inner:
            return _reason(inner[0])
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _run(client: paramiko.SSHClient, command: str, timeout: float, watch: _Watch) -> tuple[int, str, str]:
    """Run ``command`` on the board; ``(exit status, stdout, stderr)``.

    ``timeout`` (seconds) bounds the whole command, and at most ``MAX_OUTPUT_BYTES`` of its output are
    read. Raises :class:`EdgetuneError` at the deadline or the cap (the command's channel is closed).
    """
    transport = client.get_transport()
    if transport is None:
        raise EdgetuneError("the SSH connection dropped: flash again")
    chan = transport.open_session(timeout=config.SSH_CONNECT_SEC)
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    too_slow = (f"`{command}` did not finish within {timeout:g} s on the board: check it with "
                "`edgetune-agent status` there (raise EDGETUNE_SSH_INSTALL_SEC for slow boards)")
    watch.enter("installing", deadline, too_slow)
    try:
        chan.exec_command(command)  # waits for the board without a deadline of its own: the watch has one
        while True:
            busy = False
            while chan.recv_ready():
                out += chan.recv(_CHUNK)
                busy = True
                _check_output_size(command, out, err)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(_CHUNK)
                busy = True
                _check_output_size(command, out, err)
            if chan.exit_status_ready() and (chan.eof_received or chan.closed) and not busy:
                break
            if time.monotonic() > deadline:
                raise EdgetuneError(too_slow)
            if not busy:
                time.sleep(_POLL_SEC)
        return chan.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace")
    finally:
        watch.enter("cleaning up")
        chan.close()


def _check_output_size(command: str, out: bytearray, err: bytearray) -> None:
    if len(out) + len(err) > MAX_OUTPUT_BYTES:
        raise EdgetuneError(
            f"`{command}` printed more than {MAX_OUTPUT_BYTES // 1024} KiB on the board, which is no install "
            "answer; stopped it: check --agent-command runs `edgetune-agent` there"
        )


def _read_answer(status: int, stdout: str, stderr: str, agent_command: str) -> InstallAnswer:
    """The board's install answer from the command's exit status and output.

    Raises :class:`EdgetuneError` (one line) when there is none, or it is unreadable (see
    :func:`device_agent.install_answer.parse`), or it contradicts the exit status.
    """
    if not stdout.strip():
        if status == 127:
            raise EdgetuneError(
                f"`{agent_command}` was not found on the board (exit 127): install edgetune on it, "
                "or pass --agent-command with its full path"
            )
        tail = clean_text((stderr.strip().splitlines() or ["no output"])[-1])[:300]
        raise EdgetuneError(f"`{agent_command} install` failed on the board (exit {status}) without an install "
                            f"answer: {tail}")
    try:
        answer = parse_answer(stdout)
    except AgentError as err:
        raise EdgetuneError(str(err)) from None
    if answer.exit_status != status:
        raise EdgetuneError(
            f"unreadable install answer (it says {answer.status.value}, but the command exited {status}): "
            "check that --agent-command runs edgetune's `edgetune-agent` on the board"
        )
    return answer


def _take_answer(result: FlashResult, answer: InstallAnswer, opts: _Options) -> None:
    """Fill ``result`` from the board's answer. Raises :class:`EdgetuneError` for an installed answer
    that does not name the package sent."""
    result.install = answer
    check = answer.self_check
    if check is not None:
        result.self_check_ok, result.p50_ms, result.max_abs_err = check.ok, check.p50_ms, check.max_abs_err
    result.rolled_back = answer.rolled_back
    result.current = answer.current
    if answer.status is not InstallStatus.INSTALLED:
        result.error = answer.error
        return
    wrong = answer.mismatch(opts.package_sha256, opts.manifest)
    if wrong is not None:
        raise EdgetuneError(
            f"the install answer is not for the package sent ({wrong}): not counted as installed; check that "
            "--agent-command runs edgetune's `edgetune-agent` on the board and `edgetune-agent status` there"
        )
    result.ok = True
    result.slot = answer.slot
    result.model_name = answer.model_name
    result.notes.extend(answer.warnings)


def _flash_one(pkg: Path, size: int, target: FlashTarget, opts: _Options, watch: _Watch) -> FlashResult:
    result = FlashResult(name=target.name, address=target.address, ok=False, board_id=target.board_id)
    start = time.monotonic()

    def say(msg: str) -> None:
        opts.progress(target.name, msg)

    client: paramiko.SSHClient | None = None
    sftp: paramiko.SFTPClient | None = None
    remote_part = f"{opts.remote_dir.rstrip('/')}/edgetune-{secrets.token_hex(8)}{PACKAGE_SUFFIX}.part"
    remote_pkg = remote_part[: -len(".part")]
    try:
        say("connecting")
        watch.enter("connecting")
        client = _connect(target, opts, result.notes, watch)
        say(f"uploading {size / 1e6:.1f} MB")
        watch.enter("uploading")
        sftp = client.open_sftp()
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(config.SSH_CONNECT_SEC)
        # Uploaded under .part and renamed only once complete: the agent refuses .part files.
        sftp.put(str(pkg), remote_part, confirm=True)
        sftp.posix_rename(remote_part, remote_pkg)
        command = f"{opts.agent_command} install {shlex.quote(remote_pkg)} --json"
        if opts.store:
            command += f" --store {shlex.quote(opts.store)}"
        say("installing")
        status, stdout, stderr = _run(client, command, config.SSH_INSTALL_SEC, watch)
        _take_answer(result, _read_answer(status, stdout, stderr, opts.agent_command), opts)
    except EdgetuneError as err:
        result.error = watch.stop_reason or str(err)
    except (paramiko.SSHException, OSError, EOFError) as err:
        result.error = watch.stop_reason or (
            f"SSH transfer failed ({err}): check the board's disk space and connection, then flash again")
    finally:
        if sftp is not None:
            if watch.stop_reason is None:  # a cut connection cannot clean up
                for path in (remote_pkg, remote_part):
                    try:
                        sftp.remove(path)
                    except (OSError, paramiko.SSHException, EOFError):
                        pass
            sftp.close()
        if client is not None:
            client.close()
        result.seconds = round(time.monotonic() - start, 3)
    say("done" if result.ok else f"failed: {result.error}")
    return result


def flash(
    pkg: str | os.PathLike[str],
    targets: list[FlashTarget],
    *,
    known_hosts: str | os.PathLike[str] | None = None,
    known_boards: str | os.PathLike[str] | None = None,
    trust_new_host: bool = False,
    agent_command: str = DEFAULT_AGENT_COMMAND,
    store: str | None = None,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    on_progress: Callable[[str, str], None] | None = None,
) -> list[FlashResult]:
    """Install ``pkg`` on every target, in parallel; one :class:`FlashResult` per target, in order.

    A target with a ``board_id`` is flashed only on a host presenting the SSH host key that id is bound
    to in ``known_boards`` (bound on first use). A board counts as flashed only when its install answer
    is well-formed and names this package (its file's sha256, model and key).

    Deadlines: ``SSH_CONNECT_SEC`` for connecting and each upload step, ``SSH_INSTALL_SEC`` for the
    agent's install (its output read up to ``MAX_OUTPUT_BYTES``). ``on_progress(board name, message)``
    reports steps. Raises :class:`EdgetuneError` only for problems that concern every board (no targets,
    not a package); a board's own failure is in its result. On Ctrl-C, raises :class:`FlashInterrupted`
    (a ``KeyboardInterrupt``) with every board's result within ``FLASH_CANCEL_SEC`` seconds.
    """
    path = Path(pkg)
    if not targets:
        raise EdgetuneError("no board to flash: pass --host HOST, --device NAME or --key KEY")
    if not path.is_file():
        raise EdgetuneError(f"package {path} not found: make one with `edgetune package OUT --log DIR -o {path}`")
    manifest = read_package_manifest(path)  # refuse a non-package here rather than on every board
    opts = _Options(
        known=_KnownHosts(Path(known_hosts or DEFAULT_KNOWN_HOSTS).expanduser(), trust_new_host),
        boards=KnownBoards(Path(known_boards or DEFAULT_KNOWN_BOARDS).expanduser()),
        package_sha256=sha256_file(path),
        manifest=manifest,
        agent_command=agent_command,
        store=store,
        remote_dir=remote_dir,
        progress=on_progress or (lambda _name, _msg: None),
        cancel=threading.Event(),
    )
    size = path.stat().st_size
    watches = [_Watch() for _ in targets]
    results: list[FlashResult | None] = [None] * len(targets)
    slots = threading.BoundedSemaphore(min(len(targets), MAX_PARALLEL))

    def work(i: int) -> None:
        with slots:
            if opts.cancel.is_set():
                return  # Ctrl-C came before this board's turn
            try:
                results[i] = _flash_one(path, size, targets[i], opts, watches[i])
            except Exception as err:  # noqa: BLE001 - one board's surprise must not lose the others' results
                logger.debug("flashing %s failed", targets[i].name, exc_info=True)
                error = f"flashing failed unexpectedly ({type(err).__name__}: {err}): please report it"
                results[i] = FlashResult(targets[i].name, targets[i].address, ok=False,
                                         error=watches[i].stop_reason or error, board_id=targets[i].board_id)

    # Daemon threads rather than a pool: after Ctrl-C nothing waits for a board (a pool's threads are
    # joined when the interpreter exits).
    threads = [threading.Thread(target=work, args=(i,), name=f"flash-{t.name}", daemon=True)
               for i, t in enumerate(targets)]
    try:
        for thread in threads:
            thread.start()
        _watch(threads, watches)
    except KeyboardInterrupt:
        opts.cancel.set()
        for watch in watches:
            watch.cut(watch.interrupted())
        end = time.monotonic() + config.FLASH_CANCEL_SEC
        for thread in threads:
            if thread.is_alive():
                thread.join(max(0.0, end - time.monotonic()))
        outcomes = [_outcome(r, t, w, w.interrupted()) for r, t, w in zip(results, targets, watches)]
        raise FlashInterrupted(outcomes) from None
    return [_outcome(r, t, w, "the board's flash ended without a result: please report it")
            for r, t, w in zip(results, targets, watches)]


def _watch(threads: list[threading.Thread], watches: list[_Watch]) -> None:
    """Wait for every board, cutting the connection of any that is past its step's deadline."""
    while True:
        alive = [t for t in threads if t.is_alive()]
        if not alive:
            return
        alive[0].join(_WATCH_SEC)
        now = time.monotonic()
        for watch in watches:
            watch.check(now)


def _outcome(result: FlashResult | None, target: FlashTarget, watch: _Watch, missing: str) -> FlashResult:
    if result is not None:
        return result
    return FlashResult(target.name, target.address, ok=False, error=watch.stop_reason or missing,
                       board_id=target.board_id)
