"""The package manifest, the package layout and its signature: one definition for host and board.

A package (``*.etpkg``) is a gzip-compressed tar holding::

    manifest.json            this module's Manifest, canonical JSON (sorted keys)
    manifest.sig             ed25519 signature over the exact bytes of manifest.json (JSON, see below)
    model.so                 the relax VM executable, exported for the board's triple
    reference/input.npz      reference input, arrays keyed by input name
    reference/output.npz     expected outputs, keyed output_0, output_1, ...
    log/*                    the tuning log the model was built with

``manifest.json`` lists the sha256 of every other file, so the one signature covers them all, and may
list their sizes in bytes (``sizes``): a board then writes no file past its signed size.

Keys are ed25519 in OpenSSH format: a public key is the single line ``ssh-ed25519 AAAA... comment``
(what ``ssh-keygen -t ed25519`` writes to ``*.pub``), a private key is an unencrypted
``-----BEGIN OPENSSH PRIVATE KEY-----`` file. A board trusts a key when its public key line is a
file in the board's trust directory (one key per file). Key fingerprints are printed like
``ssh-keygen -l`` does (``SHA256:<base64>``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import config
from .errors import AgentError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Layout inside a package (and inside an installed slot).
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MODEL_NAME = "model.so"
REFERENCE_DIR = "reference"
REFERENCE_INPUT = "reference/input.npz"
REFERENCE_OUTPUT = "reference/output.npz"
LOG_DIR = "log"
# Files a package must list in its manifest; anything else must live under log/.
REQUIRED_FILES = (MODEL_NAME, REFERENCE_INPUT, REFERENCE_OUTPUT)
PACKAGE_SUFFIX = ".etpkg"

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4

SIGNATURE_ALGORITHM = "ed25519"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=str(data["name"]), shape=tuple(int(d) for d in data["shape"]), dtype=str(data["dtype"]))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Reference:
    """Where the reference input and expected output are, and how close the board must get.

    A board output ``b`` matches the expected ``e`` when ``|b - e| <= atol + rtol * |e|`` everywhere.
    """

    input: str = REFERENCE_INPUT
    output: str = REFERENCE_OUTPUT
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL


@dataclass(frozen=True)
class Manifest:
    """What a package holds and what it was built for."""

    model_name: str
    model_sha256: str
    key: str
    target: dict[str, Any]
    tvm_version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created: str
    files: dict[str, str]
    board: dict[str, Any] | None = None
    reference: Reference = field(default_factory=Reference)
    latency_ms: float | None = None
    format: int = FORMAT_VERSION
    # Size in bytes of each file in ``files``; None in packages made before sizes were signed.
    sizes: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {
            "format": self.format,
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "key": self.key,
            "target": self.target,
            "board": self.board,
            "tvm_version": self.tvm_version,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
            "reference": asdict(self.reference),
            "latency_ms": self.latency_ms,
            "created": self.created,
            "files": dict(self.files),
        }
        if self.sizes is not None:
            data["sizes"] = dict(self.sizes)
        return data

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, UTF-8, trailing newline): the bytes that get signed."""
        return (json.dumps(self.as_dict(), sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        """Parse ``manifest.json`` (untrusted: bounded in size and depth). Raises :class:`AgentError` on a
        broken or unknown-format manifest."""
        raw = parse_json(data, "the package manifest", config.MAX_MANIFEST_BYTES, "rebuild it with `edgetune package`")
        if not isinstance(raw, dict):
            raise AgentError("the package manifest is not a JSON object: rebuild it with `edgetune package`")
        fmt = raw.get("format")
        if fmt != FORMAT_VERSION:
            if isinstance(fmt, int) and fmt > FORMAT_VERSION:
                raise AgentError(
                    f"the package manifest has format {fmt}, this agent reads format {FORMAT_VERSION}: "
                    "update edgetune-agent on the board"
                )
            raise AgentError(
                f"the package manifest has unknown format {fmt!r} (expected {FORMAT_VERSION}): "
                "rebuild it with `edgetune package`"
            )
        try:
            files = raw["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not an object")
            ref = raw.get("reference") or {}
            manifest = cls(
                format=fmt,
                model_name=str(raw["model"]["name"]),
                model_sha256=str(raw["model"]["sha256"]),
                key=str(raw["key"]),
                target=dict(raw["target"]),
                board=dict(raw["board"]) if raw.get("board") is not None else None,
                tvm_version=str(raw["tvm_version"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in raw["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in raw["outputs"]),
                reference=Reference(
                    input=str(ref.get("input", REFERENCE_INPUT)),
                    output=str(ref.get("output", REFERENCE_OUTPUT)),
                    rtol=float(ref.get("rtol", DEFAULT_RTOL)),
                    atol=float(ref.get("atol", DEFAULT_ATOL)),
                ),
                latency_ms=float(raw["latency_ms"]) if raw.get("latency_ms") is not None else None,
                created=str(raw["created"]),
                files={str(k): str(v) for k, v in files.items()},
                sizes=_sizes(raw.get("sizes")),
            )
        except KeyError as err:
            raise AgentError(f"the package manifest lacks {err}: rebuild it with `edgetune package`") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise AgentError(f"the package manifest is broken ({_reason(err)}): rebuild it with `edgetune package`") from None
        manifest.check_files()
        return manifest

    def check_files(self) -> None:
        """Check the file list: only the known layout, relative safe paths, sha256 values.

        Raises :class:`AgentError`.
        """
        for name in REQUIRED_FILES:
            if name not in self.files:
                raise AgentError(f"the package manifest does not list {name}: rebuild it with `edgetune package`")
        for name in (self.reference.input, self.reference.output):
            if name not in self.files:
                raise AgentError(f"the package manifest does not list its reference file {name}: rebuild the package")
        for name, digest in self.files.items():
            check_member_name(name)
            if name not in REQUIRED_FILES and not name.startswith(LOG_DIR + "/"):
                raise AgentError(f"the package manifest lists an unexpected file {name!r}: rebuild it with `edgetune package`")
            if not _SHA256.match(digest):
                raise AgentError(f"the package manifest has a broken sha256 for {name}: rebuild it with `edgetune package`")
        if self.sizes is not None and set(self.sizes) != set(self.files):
            raise AgentError("the package manifest's sizes do not list the same files as its sha256s: "
                             "rebuild it with `edgetune package`")


def _sizes(raw: Any) -> dict[str, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError("'sizes' is not an object")
    for name, size in raw.items():
        if type(size) is not int or size < 0:
            raise ValueError(f"the size of {name} is not a number of bytes")
    return {str(k): v for k, v in raw.items()}


def parse_json(data: bytes, what: str, max_bytes: int, hint: str) -> Any:
    """Parse untrusted JSON: at most ``max_bytes`` of UTF-8, nested at most ``config.MAX_JSON_DEPTH`` deep.

    Raises :class:`AgentError` (one line: ``"<what> is ...: <hint>"``) for anything else, never
    RecursionError or a bare ValueError.
    """
    if len(data) > max_bytes:
        raise AgentError(f"{what} is {len(data)} bytes, more than the {max_bytes} this board reads: {hint}")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise AgentError(f"{what} is not valid JSON ({_reason(err)}): {hint}") from None
    if _depth(value, config.MAX_JSON_DEPTH) > config.MAX_JSON_DEPTH:
        raise AgentError(f"{what} is nested more than {config.MAX_JSON_DEPTH} levels deep: {hint}")
    return value


def _reason(err: Exception) -> str:
    """An exception's message for a one-line error: its first line, at most 200 characters."""
    lines = str(err).splitlines()
    return lines[0][:200] if lines else type(err).__name__


def _depth(value: Any, stop: int) -> int:
    """How deep lists and objects nest in ``value`` (0 for a scalar), counted up to ``stop + 1``."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > stop:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_member_name(name: str) -> str:
    """Return ``name`` if it is a safe relative path inside a package, at most ``MAX_MEMBER_NAME_BYTES``
    long; raise :class:`AgentError` if not."""
    length = len(name.encode("utf-8", "surrogatepass"))
    if length > config.MAX_MEMBER_NAME_BYTES:
        raise AgentError(f"the package holds a path of {length} bytes (at most {config.MAX_MEMBER_NAME_BYTES}): "
                         "refusing it; rebuild it with `edgetune package`")
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise AgentError(f"the package holds an unsafe path {name!r}: refusing it; rebuild it with `edgetune package`")
    return name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- keys and signatures --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedKey:
    """A public key a board trusts, and where it came from."""

    key: Ed25519PublicKey
    fingerprint: str
    source: str


def public_key_line(key: Ed25519PublicKey, comment: str = "") -> str:
    """The OpenSSH single-line form ``ssh-ed25519 AAAA... comment``."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def fingerprint(key: Ed25519PublicKey) -> str:
    """``SHA256:<base64>`` of the key blob, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_key_line(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_public_key(text: str, source: str = "public key") -> Ed25519PublicKey:
    """Parse an OpenSSH ``ssh-ed25519`` public key line. Raises :class:`AgentError`."""
    line = text.strip()
    if not line.startswith("ssh-ed25519 "):
        raise AgentError(
            f"{source} is not an ed25519 public key line ('ssh-ed25519 AAAA...'): "
            "use the .pub file `edgetune keys init` printed"
        )
    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise AgentError(f"{source} is not a valid ed25519 public key ({err}): use the .pub file `edgetune keys init` wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AgentError(f"{source} is not an ed25519 key: use the .pub file `edgetune keys init` wrote")
    return key


def load_trusted_keys(trust_dir: Path) -> list[TrustedKey]:
    """Every public key in ``trust_dir`` (one per file; unreadable or foreign files are skipped with a warning)."""
    keys: list[TrustedKey] = []
    if not trust_dir.is_dir():
        return keys
    for path in sorted(trust_dir.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            key = load_public_key(path.read_text(encoding="utf-8", errors="replace"), str(path))
        except (AgentError, OSError) as err:
            logger.warning("ignoring %s in the trust directory: %s", path, err)
            continue
        keys.append(TrustedKey(key=key, fingerprint=fingerprint(key), source=str(path)))
    return keys


def encode_signature(signature: bytes, key: Ed25519PublicKey) -> bytes:
    """The ``manifest.sig`` file: JSON with the algorithm, the signer's fingerprint and the signature.

    The fingerprint only names the signer in messages; verification tries every trusted key.
    """
    body = {
        "algorithm": SIGNATURE_ALGORITHM,
        "key": fingerprint(key),
        "signature": base64.b64encode(signature).decode(),
    }
    return (json.dumps(body, sort_keys=True) + "\n").encode()


def decode_signature(data: bytes) -> tuple[bytes, str]:
    """Parse ``manifest.sig`` (untrusted: bounded in size and depth): ``(signature, signer fingerprint)``.
    Raises :class:`AgentError`."""
    hint = "re-sign it with `edgetune package`"
    body = parse_json(data, "the package signature file", config.MAX_SIGNATURE_BYTES, hint)
    if not isinstance(body, dict):
        raise AgentError(f"the package signature file is not a JSON object: {hint}")
    try:
        if body.get("algorithm") != SIGNATURE_ALGORITHM:
            raise ValueError(f"algorithm {body.get('algorithm')!r}, expected {SIGNATURE_ALGORITHM}")
        signature = base64.b64decode(body["signature"], validate=True)
        signer = str(body.get("key", "?"))[:100]
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise AgentError(f"the package signature file is broken ({_reason(err)}): {hint}") from None
    if len(signature) != 64:
        raise AgentError("the package signature has the wrong length: re-sign it with `edgetune package`")
    return signature, signer


def verify_manifest(manifest_bytes: bytes, sig_bytes: bytes, trusted: Iterable[TrustedKey], trust_dir: str) -> TrustedKey:
    """Check ``manifest.sig`` against the trusted keys; return the key that signed it.

    Raises :class:`AgentError` when no trusted key verifies the signature.
    """
    signature, signer = decode_signature(sig_bytes)
    trusted = list(trusted)
    if not trusted:
        raise AgentError(
            f"signature verification failed: no trusted keys in {trust_dir}: "
            "add the workstation's key with `edgetune-agent trust signing_key.pub`"
        )
    for candidate in trusted:
        try:
            candidate.key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return candidate
    if any(c.fingerprint == signer for c in trusted):
        raise AgentError(
            f"signature verification failed: the manifest was altered after it was signed by {signer}: "
            "rebuild the package with `edgetune package` and flash it again"
        )
    raise AgentError(
        f"signature verification failed: the package is signed by {signer}, which is not in {trust_dir}: "
        "trust that key with `edgetune-agent trust KEY.pub`, or sign with a key the board trusts"
    )


# --- compatibility of a target with a board ------------------------------------------------------

# Board feature names (from /proc/cpuinfo, normalised or not) that satisfy an LLVM mattr feature.
_FEATURE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "neon": ("neon", "asimd"),
    "asimd": ("asimd", "neon"),
    "dotprod": ("dotprod", "asimddp"),
    "i8mm": ("i8mm",),
    "sve": ("sve",),
    "sve2": ("sve2",),
    "fullfp16": ("fp16", "fullfp16", "asimdhp", "fphp"),
    "fp16": ("fp16", "fullfp16", "asimdhp", "fphp"),
    "bf16": ("bf16",),
    "crc": ("crc", "crc32"),
    "lse": ("lse", "atomics"),
    "rdm": ("rdm", "asimdrdm"),
    "fp-armv8": ("fp", "fp-armv8", "vfpv4", "vfpv3"),
    "vfp4": ("vfpv4", "vfp4"),
    "sse4.1": ("sse4_1", "sse4.1"),
    "sse4.2": ("sse4_2", "sse4.2"),
    # x86 extensions whose Linux flag has an underscore LLVM's name has not (the probe puts the LLVM
    # names of the first four into a target's mattr).
    **{llvm: (flag, llvm) for llvm, flag in (
        ("avx512vnni", "avx512_vnni"), ("avxvnni", "avx_vnni"), ("avx512bf16", "avx512_bf16"),
        ("avx512fp16", "avx512_fp16"), ("avx512vbmi2", "avx512_vbmi2"), ("avx512bitalg", "avx512_bitalg"),
        ("avx512vpopcntdq", "avx512_vpopcntdq"), ("avx512vp2intersect", "avx512_vp2intersect"))},
}

# Features a named CPU implies even without mattr (code built for it may use them). Only the ones
# whose absence is common on boards are listed; unknown CPUs imply nothing.
_CPU_FEATURES: dict[str, tuple[str, ...]] = {
    **{cpu: ("dotprod",) for cpu in ("cortex-a55", "cortex-a65", "cortex-a75", "cortex-a76", "cortex-a77",
                                      "cortex-a78", "cortex-x1", "neoverse-n1", "neoverse-e1")},
    **{cpu: ("dotprod", "sve", "i8mm") for cpu in ("neoverse-v1", "neoverse-n2", "neoverse-v2", "cortex-a510",
                                                    "cortex-a710", "cortex-a715", "cortex-x2", "cortex-x3")},
    **{cpu: ("avx2",) for cpu in ("haswell", "broadwell", "skylake", "alderlake", "znver1", "znver2", "znver3",
                                   "x86-64-v3")},
    **{cpu: ("avx2", "avx512f") for cpu in ("skylake-avx512", "cascadelake", "cooperlake", "icelake-client",
                                             "icelake-server", "tigerlake", "sapphirerapids", "znver4", "znver5",
                                             "x86-64-v4")},
}

# Features a board profile reports (from /proc/cpuinfo). A target feature outside this set cannot be
# checked here; the install's self-check still catches code the CPU cannot run.
_CHECKABLE = set(_FEATURE_SYNONYMS) | {"avx", "avx2", "fma", "f16c", "sse2", "ssse3", "amx-tile", "amx-int8",
                                       "amx-bf16", "vfp3", "vfp4", "sme", "sme2"}

_ARCH_VERSION = re.compile(r"^(v\d+(\.\d+)?[a-z]?|armv\d+(\.\d+)?-?[a-z]?)$")


def triple_arch(triple: str) -> str:
    """The board ``uname -m`` a target triple runs on: aarch64, armv7l or x86_64 (else the triple's first part)."""
    first = triple.split("-", 1)[0].lower()
    if first in ("aarch64", "arm64", "aarch64_be"):
        return "aarch64"
    if first.startswith("arm") or first.startswith("thumb"):
        return "armv7l"
    if first in ("x86_64", "amd64"):
        return "x86_64"
    return first


def _board_arch(arch: str) -> str:
    arch = arch.lower()
    if arch in ("arm64", "aarch64"):
        return "aarch64"
    if arch.startswith("armv7") or arch == "armv8l":  # armv8l: a 64-bit CPU running 32-bit userland
        return "armv7l"
    if arch in ("amd64", "x86_64"):
        return "x86_64"
    return arch


def required_features(target: Mapping[str, Any]) -> list[str]:
    """CPU features code built for ``target`` may use: its ``+mattr`` entries and what its ``mcpu`` implies."""
    needed: list[str] = []
    for cpu_feature in _CPU_FEATURES.get(str(target.get("mcpu", "")).lower(), ()):
        if cpu_feature not in needed:
            needed.append(cpu_feature)
    mattr = target.get("mattr") or []
    if isinstance(mattr, str):
        mattr = mattr.split(",")
    for attr in mattr:
        attr = str(attr).strip()
        if not attr.startswith("+"):
            continue  # "-feature" only removes instructions
        name = attr[1:].lower()
        if _ARCH_VERSION.match(name) or name in needed:
            continue
        needed.append(name)
    return needed


def _cpu_label(profile: Mapping[str, Any]) -> str:
    for field_name in ("cpu", "cpu_name", "cpu_model", "model_name"):
        value = profile.get(field_name)
        if value:
            return str(value)
    return str(profile.get("arch", "unknown CPU"))


def compatibility_problem(target: Mapping[str, Any], profile: Mapping[str, Any]) -> str | None:
    """Why code built for ``target`` cannot run on the board described by ``profile``; ``None`` if it can.

    ``profile`` is a board profile dict (``arch``, ``features``, optionally ``cpu`` and ``os``).
    """
    triple = str(target.get("mtriple", ""))
    if not triple:
        return "the package's target has no mtriple: rebuild it with `edgetune build --device KEY`"
    board_arch = _board_arch(str(profile.get("arch", "")))
    package_arch = triple_arch(triple)
    if package_arch != board_arch:
        return (
            f"package is built for {package_arch} ({triple}), this board is {board_arch or 'unknown'}: "
            "rebuild for this board's target (`edgetune build --device KEY`)"
        )
    board_os = str(profile.get("os", "")).lower()
    if board_os in ("linux", "android"):
        package_os = "android" if "android" in triple.lower() else "linux"
        if package_os != board_os:
            return (
                f"package is built for {package_os} ({triple}), this board runs {board_os}: "
                "rebuild for this board's target"
            )
    have = {str(f).lower() for f in profile.get("features") or ()}
    for feature in required_features(target):
        if feature not in _CHECKABLE and not feature.startswith("avx512"):
            logger.info("cannot check target feature %s against the board profile; left to the self-check", feature)
            continue
        accepted = _FEATURE_SYNONYMS.get(feature, (feature, feature.replace(".", "_").replace("-", "_")))
        if not have.intersection(accepted):
            return (
                f"package needs {feature}, this board ({_cpu_label(profile)}) lacks it: "
                "rebuild for this board's target"
            )
    return None
