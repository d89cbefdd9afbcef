"""Read a package (a gzip-compressed tar) as one stream, with every size bounded before it is read.

Python's tarfile trusts the sizes a tar's headers claim: it reads a pax or GNU long-name header whole into
memory (a 204 KB package claiming a 200 MB long name costs 400 MB), recurses once per chained extended
header, and keeps every member it has seen in a list (200,000 entries cost 87 MB). A package is untrusted
until its manifest's signature is verified, so the store reads it with this instead:

- gzip is decompressed in chunks of at most :data:`CHUNK` bytes, at most ``max_unpacked`` bytes in all;
- at most ``max_members`` headers (members, directories and extended headers) are read;
- a pax or GNU long-name header may hold at most ``max_ext_header`` bytes, one of each per member;
- a member's path is short and a safe relative path (:func:`device_agent.manifest.check_member_name`);
- members are regular files and directories only: links, devices, FIFOs, sparse files and pax global
  headers are refused;
- header checksums, zero padding, the end-of-archive blocks and the gzip trailer (CRC) are checked.

Only ``edgetune package`` makes packages (Python's tarfile, pax format), so anything stranger is refused::

    with open(pkg, "rb") as raw:
        tar = PackageTar(raw, limits)
        for member in tar:
            if not member.is_dir:
                for chunk in tar.chunks():
                    ...
        tar.finish()
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .errors import AgentError
from .manifest import check_member_name

BLOCK = 512
# Tar writers pad an archive to a record of 20 blocks; at most this much may follow the end marker.
RECORD = 20 * BLOCK
# Most bytes decompressed (and held) at once.
CHUNK = 64 << 10

_ZERO_BLOCK = bytes(BLOCK)
_REBUILD = "rebuild it with `edgetune package`"
_REFLASH = "copy or flash it again"
_KINDS = {
    b"1": "link", b"2": "link", b"K": "link", b"3": "special file", b"4": "special file", b"6": "special file",
    b"7": "contiguous file", b"S": "sparse file", b"g": "pax global header", b"V": "volume label",
    b"M": "multi-volume part", b"N": "GNU old long name",
}


class PackageFormatError(AgentError):
    """The package is not a tar this board accepts; the message is one line and says what to do."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one package (see :mod:`device_agent.config` for the reasons of the defaults)."""

    max_unpacked: int
    max_members: int
    max_ext_header: int


@dataclass(frozen=True)
class Member:
    """A regular file (``size`` bytes) or a directory of the package."""

    name: str
    size: int
    is_dir: bool


def _damaged(why: str) -> PackageFormatError:
    return PackageFormatError(f"the package is damaged or incomplete ({why}): {_REFLASH}")


class _Gunzip:
    """Decompress one gzip stream from ``raw``: at most ``limit`` output bytes in all, at most ``n`` per read."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""
        self._total = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` (> 0) bytes; ``b""`` only at the end of the gzip stream."""
        while not self._z.eof:
            if not self._pending:
                self._pending = self._raw.read(CHUNK)
                if not self._pending:
                    raise _damaged("it is cut off")
            try:
                data = self._z.decompress(self._pending, n)
            except zlib.error as err:
                raise _damaged(f"gzip: {err}") from None
            self._pending = self._z.unconsumed_tail
            if data:
                self._total += len(data)
                if self._total > self._limit:
                    raise PackageFormatError(
                        f"the package unpacks to more than {self._limit} bytes, more than this board accepts "
                        f"(EDGETUNE_MAX_UNPACKED_BYTES): refusing it; {_REBUILD} or raise the limit")
                return data
        return b""

    def read_exact(self, n: int, what: str) -> bytes:
        parts = []
        while n:
            data = self.read(min(n, CHUNK))
            if not data:
                raise _damaged(f"it ends inside {what}")
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def check_end(self) -> None:
        """Nothing follows the gzip stream (called once :meth:`read` returned ``b""``: zlib checked its CRC)."""
        if self._z.unused_data or self._raw.read(1):
            raise _damaged("data after the end of the gzip stream")


def _number(field: bytes, what: str) -> int:
    """A tar header number: octal (NUL or space terminated) or GNU base-256."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise _damaged(f"a negative {what} in a tar header")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _damaged(f"a broken {what} in a tar header") from None


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PackageFormatError(f"the package holds a {what} that is not UTF-8: refusing it; {_REBUILD}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``"<length> <key>=<value>\\n"`` records of a pax header (already bounded in size)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 12)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[pos:pos + length]
        if length <= space - pos + 1 or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise _damaged("a broken pax header")
        key, _, value = record[space - pos + 1:-1].partition(b"=")
        records[_text(key, "pax header key")] = _text(value, "pax header value")
        pos += length
    return records


class PackageTar:
    """The members of a package, read once from ``raw`` (an open binary file) within ``limits``.

    Iterate for :class:`Member` s; read a regular file's data with :meth:`chunks` before the next one
    (unread data is skipped); call :meth:`finish` after the last. Raises :class:`AgentError`
    (:class:`PackageFormatError`, or an unsafe path from :func:`check_member_name`).
    """

    def __init__(self, raw: BinaryIO, limits: Limits) -> None:
        self._gz = _Gunzip(raw, limits.max_unpacked)
        self._limits = limits
        self._headers = 0
        self._left = 0  # data bytes of the current member not read yet
        self._pad = 0  # its padding after them
        self._ended = False

    def __iter__(self) -> Iterator[Member]:
        while True:
            for _ in self.chunks():
                pass
            member = self._next()
            if member is None:
                return
            yield member

    def chunks(self) -> Iterator[bytes]:
        """The data of the member last yielded, in pieces of at most :data:`CHUNK` bytes."""
        while self._left:
            data = self._gz.read(min(self._left, CHUNK))
            if not data:
                raise _damaged("it ends inside a file")
            self._left -= len(data)
            yield data
        if self._pad:
            self._padding(self._pad)
            self._pad = 0

    def finish(self) -> None:
        """Check what follows the last member: the end-of-archive blocks, zeros, the gzip trailer."""
        if not self._ended:
            raise RuntimeError("PackageTar.finish() called before its last member was read")
        tail = 0
        while data := self._gz.read(CHUNK):
            tail += len(data)
            if tail > RECORD or data.count(0) != len(data):
                raise _damaged("data after the end of the archive")
        self._gz.check_end()

    def _padding(self, size: int) -> None:
        if self._gz.read_exact(size, "padding").count(0) != size:
            raise _damaged("padding that is not zeros")

    def _next(self) -> Member | None:
        """The next member, after the extended headers that describe it; ``None`` at the end marker."""
        pax: dict[str, str] = {}
        long_name: str | None = None
        extended = b""
        while True:
            block = self._gz.read_exact(BLOCK, "a tar header")
            if block == _ZERO_BLOCK:
                if extended:
                    raise _damaged("an extended header with no member after it")
                self._ended = True
                return None
            self._headers += 1
            if self._headers > self._limits.max_members:
                raise PackageFormatError(
                    f"the package has more than {self._limits.max_members} members (EDGETUNE_MAX_PACKAGE_MEMBERS): "
                    f"refusing it; {_REBUILD}")
            name, size, typeflag = self._parse_header(block)
            if typeflag in (b"x", b"L"):
                kind = "pax header" if typeflag == b"x" else "long-name header"
                if typeflag in extended:
                    raise PackageFormatError(f"the package chains one extended header ({kind}) after another: "
                                             f"refusing it; {_REBUILD}")
                extended += typeflag
                if size > self._limits.max_ext_header:
                    raise PackageFormatError(
                        f"the package has a {kind} of {size} bytes (at most {self._limits.max_ext_header}): "
                        f"refusing it; {_REBUILD}")
                data = self._gz.read_exact(size, f"a {kind}")
                self._padding(-size % BLOCK)
                if typeflag == b"x":
                    pax = _pax_records(data)
                else:
                    long_name = _text(data.split(b"\0", 1)[0], "path")
                continue
            return self._member(pax.get("path", long_name if long_name is not None else name), size, typeflag, pax)

    def _parse_header(self, block: bytes) -> tuple[str, int, bytes]:
        stored = _number(block[148:156], "checksum")
        if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise _damaged("a tar header with a wrong checksum")
        magic = block[257:265]
        if magic not in (b"ustar\x0000", b"ustar  \0"):
            raise PackageFormatError(f"the package is not a ustar/pax tar: refusing it; {_REBUILD}")
        name = block[:100].split(b"\0", 1)[0]
        prefix = block[345:500].split(b"\0", 1)[0] if magic == b"ustar\x0000" else b""
        if prefix:
            name = prefix + b"/" + name
        return _text(name, "path"), _number(block[124:136], "size"), block[156:157]

    def _member(self, name: str, size: int, typeflag: bytes, pax: dict[str, str]) -> Member:
        is_dir = typeflag == b"5"
        check_member_name(name.rstrip("/") if is_dir else name)  # its length and safety, before anything else
        sparse = any(key.startswith("GNU.sparse.") for key in pax)
        if not is_dir and (typeflag not in (b"0", b"\0") or sparse):
            kind = "sparse file" if sparse else _KINDS.get(typeflag, f"member of type {typeflag!r}")
            raise PackageFormatError(f"the package holds a {kind} {name!r}: refusing it; {_REBUILD}")
        if is_dir:
            name, size = name.rstrip("/"), 0  # a directory has no data, whatever its header says
        elif "size" in pax:
            if not (pax["size"].isascii() and pax["size"].isdigit() and len(pax["size"]) <= 20):
                raise _damaged("a broken size in a pax header")
            size = int(pax["size"])
        self._left, self._pad = size, -size % BLOCK
        return Member(name=name, size=size, is_dir=is_dir)
