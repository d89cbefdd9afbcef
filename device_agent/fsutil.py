"""Crash-safe file writes, shared by the board's store and the workstation's keys and logs; and the checks
of directories the board's store trusts (owned by the caller, writable by nobody else, never a symlink)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file created with ``mode`` (so a private key is never
    readable by others, whatever the umask), fsync it, and ``os.replace`` it in: a reader or a crash
    never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


# --- directories only their owner can change ------------------------------------------------------------
# What OpenSSH's StrictModes checks before it trusts a file: whoever can write a directory can replace
# every entry in it, so a process that trusts what it reads there (root installing a package, a key it
# verifies with) must own the directory and be the only one who can write it.

# A directory opened to list, fstat, fsync and use as dir_fd: never through a symlink.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def dir_problem(st: os.stat_result, owner: int) -> str | None:
    """Why a directory with status ``st`` is not safe for a process of uid ``owner`` to trust, in a few
    words ("a symbolic link", "owned by nobody, not root", "writable by its group or others (mode 0775)"),
    or ``None``."""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != owner:
        return f"owned by {user_name(st.st_uid)}, not {user_name(owner)}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by its group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def ancestor_problem(st: os.stat_result, owner: int) -> str | None:
    """Why a directory above a trusted one is unsafe: it is owned by someone other than root and ``owner``,
    or others can write it without the sticky bit (in /tmp, mode 1777, nobody renames another's entry)."""
    if st.st_uid not in (0, owner):
        return f"owned by {user_name(st.st_uid)}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"writable by its group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def user_name(uid: int) -> str:
    """The login name of ``uid`` (``uid 1001`` when it has none)."""
    import pwd  # POSIX only; the workstation side imports this module too

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def open_dir(name: str | os.PathLike[str], dir_fd: int | None = None) -> int:
    """Open the directory ``name`` (relative to ``dir_fd`` when given) without following a symlink there.
    Raises OSError (ELOOP or ENOTDIR for a symlink)."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def open_beneath(dir_fd: int, relpath: str, owner: int | None = None) -> int:
    """Open the regular file ``relpath`` ("reference/input.npz") under the directory ``dir_fd`` for reading,
    following no symlink on the way; with ``owner``, every directory passed through must pass
    :func:`dir_problem`. Raises OSError: ELOOP for a symlink, ENOENT, EPERM (with the reason) otherwise."""
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise OSError(errno.EINVAL, f"not a path inside the directory: {relpath!r}")
    fd = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            sub = open_dir(part, dir_fd=fd)
            os.close(fd)
            fd = sub
            problem = dir_problem(os.fstat(fd), owner) if owner is not None else None
            if problem:
                raise OSError(errno.EPERM, f"{part}/ is {problem}")
        # O_NONBLOCK: a FIFO in its place would block the open forever (it is refused below instead).
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        file_fd = os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise OSError(errno.EINVAL, f"{relpath} is not a regular file")
    return file_fd
