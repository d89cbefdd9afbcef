"""Make a package from a build directory and a tuning log.

The package format is defined in :mod:`device_agent.manifest` (shared with the board). The file is
written under a temporary name and renamed into place, so a half-written package never exists.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from device_agent.errors import AgentError
from device_agent.manifest import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    LOG_DIR,
    MANIFEST_NAME,
    MODEL_NAME,
    REFERENCE_INPUT,
    REFERENCE_OUTPUT,
    SIGNATURE_NAME,
    Manifest,
    Reference,
    TensorSpec,
    encode_signature,
    fingerprint,
    sha256_file,
)

from ..errors import EdgetuneError
from ..logs.format import LOG_FILES  # the files of a tuning log; those that exist go into the package
from .keys import load_signing_key

logger = logging.getLogger(__name__)

BUILD_JSON = "build.json"
BUILD_FORMAT = 1


@dataclass
class PackageResult:
    """A package written to ``path``; ``files`` maps each packaged file to its sha256."""

    path: str
    sha256: str
    size: int
    model_name: str
    key: str
    target: dict[str, Any]
    signer: str
    files: dict[str, str] = field(default_factory=dict)
    log_files: list[str] = field(default_factory=list)


def _read_build(out: Path) -> dict[str, Any]:
    path = out / BUILD_JSON
    try:
        build = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgetuneError(f"{out} has no {BUILD_JSON}: run `edgetune build MODEL --device KEY -o {out}` first") from None
    except (OSError, json.JSONDecodeError) as err:
        raise EdgetuneError(f"{path} is unreadable ({err}): run `edgetune build` again") from None
    if not isinstance(build, dict) or build.get("format") != BUILD_FORMAT:
        raise EdgetuneError(
            f"{path} has format {build.get('format') if isinstance(build, dict) else None!r}, expected {BUILD_FORMAT}: "
            "run `edgetune build` again with this version of edgetune"
        )
    for name in ("model", "key", "target", "inputs", "outputs"):
        if name not in build:
            raise EdgetuneError(f"{path} lacks {name!r}: run `edgetune build` again")
    if not isinstance(build["target"], dict) or not build["target"].get("mtriple"):
        raise EdgetuneError(f"{path} has no target triple: run `edgetune build --device KEY` again")
    return build


def _check_reference(out: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    import numpy as np

    for rel, wanted in ((REFERENCE_INPUT, [t.name for t in inputs]),
                        (REFERENCE_OUTPUT, [f"output_{i}" for i in range(len(outputs))])):
        path = out / rel
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [name for name in wanted if name not in npz.files]
        except FileNotFoundError:
            raise EdgetuneError(f"{path} is missing: run `edgetune build` again") from None
        except (OSError, ValueError) as err:
            raise EdgetuneError(f"{path} is not a readable .npz ({err}): run `edgetune build` again") from None
        if missing:
            raise EdgetuneError(f"{path} lacks {', '.join(missing)}: run `edgetune build` again")


def _log_files(log_dir: Path) -> list[Path]:
    if not log_dir.is_dir():
        raise EdgetuneError(f"tuning log {log_dir} not found: pass the --log DIR given to `edgetune tune`")
    found = [log_dir / name for name in LOG_FILES if (log_dir / name).is_file()]
    if not found:
        raise EdgetuneError(
            f"{log_dir} is not a tuning log (none of {', '.join(LOG_FILES)}): pass the --log DIR given to `edgetune tune`"
        )
    return found


def package(
    out_dir: str | os.PathLike[str],
    log_dir: str | os.PathLike[str],
    pkg_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> PackageResult:
    """Package the build in ``out_dir`` with the tuning log ``log_dir`` into ``pkg_path``, signed with the
    key at ``key_path`` (default: :func:`host.package.keys.default_key_path`).

    ``rtol``/``atol`` set the self-check tolerance (default: build.json's ``tolerance``, else 1e-4).
    Raises :class:`EdgetuneError` when the build, the log or the key is missing or broken.
    """
    progress = on_progress or (lambda _msg: None)
    out = Path(out_dir)
    pkg = Path(pkg_path)
    build = _read_build(out)
    private_key, _ = load_signing_key(key_path)
    public_key = private_key.public_key()
    try:
        inputs = [TensorSpec.from_dict(t) for t in build["inputs"]]
        outputs = [TensorSpec.from_dict(t) for t in build["outputs"]]
    except (KeyError, TypeError, ValueError) as err:
        raise EdgetuneError(f"{out / BUILD_JSON} has a broken inputs/outputs list ({err}): run `edgetune build` again") from None
    if not (out / MODEL_NAME).is_file():
        raise EdgetuneError(f"{out / MODEL_NAME} is missing: run `edgetune build` again")
    _check_reference(out, inputs, outputs)
    logs = _log_files(Path(log_dir))

    progress("hashing files")
    sources: dict[str, Path] = {MODEL_NAME: out / MODEL_NAME, REFERENCE_INPUT: out / REFERENCE_INPUT,
                                REFERENCE_OUTPUT: out / REFERENCE_OUTPUT}
    for path in logs:
        sources[f"{LOG_DIR}/{path.name}"] = path
    files = {name: sha256_file(path) for name, path in sources.items()}

    tolerance = build.get("tolerance") or {}
    latency = build.get("estimated_latency_ms")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        manifest = Manifest(
            model_name=str(build["model"]["name"]),
            model_sha256=str(build["model"].get("sha256", "")),
            key=str(build["key"]),
            target=dict(build["target"]),
            board=build.get("board"),
            tvm_version=str(build.get("tvm_version", "")),
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            reference=Reference(
                rtol=float(rtol if rtol is not None else tolerance.get("rtol", DEFAULT_RTOL)),
                atol=float(atol if atol is not None else tolerance.get("atol", DEFAULT_ATOL)),
            ),
            latency_ms=float(latency) if latency is not None else None,
            created=created,
            files=files,
            # Signed sizes: a board writes no file past its size while unpacking, before any hash.
            sizes={name: path.stat().st_size for name, path in sources.items()},
        )
        manifest.check_files()
    except (KeyError, TypeError, ValueError, AgentError) as err:
        raise EdgetuneError(f"{out / BUILD_JSON} is broken ({err}): run `edgetune build` again") from None
    manifest_bytes = manifest.to_json()
    signature = encode_signature(private_key.sign(manifest_bytes), public_key)

    progress(f"writing {pkg}")
    mtime = int(datetime.fromisoformat(created).timestamp())
    tmp = pkg.with_name(f".{pkg.name}.{os.getpid()}.tmp")
    try:
        pkg.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                # manifest.json and manifest.sig first: the board verifies them before unpacking anything else.
                for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature)):
                    tar.addfile(_tarinfo(name, len(data), mtime), io.BytesIO(data))
                for name, path in sources.items():
                    with open(path, "rb") as f:
                        tar.addfile(_tarinfo(name, os.fstat(f.fileno()).st_size, mtime), f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, pkg)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise EdgetuneError(f"cannot write {pkg} ({err.strerror}): choose another -o path") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%d files)", pkg, len(files) + 2)
    return PackageResult(
        path=str(pkg), sha256=sha256_file(pkg), size=pkg.stat().st_size, model_name=manifest.model_name,
        key=manifest.key, target=manifest.target, signer=fingerprint(public_key), files=files,
        log_files=[p.name for p in logs],
    )


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def read_package_manifest(pkg_path: str | os.PathLike[str]) -> Manifest:
    """The manifest of a package, unverified (the board verifies); for showing what is being flashed.

    Raises :class:`EdgetuneError` when the file is not a package.
    """
    pkg = Path(pkg_path)
    try:
        with tarfile.open(pkg, mode="r:*") as tar:
            member = tar.next()
            if member is None or member.name != MANIFEST_NAME:
                raise EdgetuneError(f"{pkg} is not an edgetune package (no manifest.json first): make one with `edgetune package`")
            src = tar.extractfile(member)
            data = src.read() if src is not None else b""
    except FileNotFoundError:
        raise EdgetuneError(f"package {pkg} not found: make one with `edgetune package OUT --log DIR -o {pkg}`") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise EdgetuneError(f"{pkg} is not a readable package ({err}): make it again with `edgetune package`") from None
    try:
        return Manifest.from_json(data)
    except AgentError as err:
        raise EdgetuneError(f"{pkg}: {err}") from None
