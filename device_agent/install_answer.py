"""The install answer: what ``edgetune-agent install --json`` prints and ``edgetune flash`` reads back.

One JSON object on stdout, always, whatever happened; the exit status says the same (0 installed,
1 refused, 2 internal error). Defined once here: the board prints it with :meth:`InstallAnswer.to_json`,
the workstation reads it with :func:`parse`, which accepts only what ``to_json`` writes (exact keys and
types, one document, no control characters) and raises :class:`InstallAnswerError` for anything else.

An installed answer echoes what was installed (the package file's sha256, the model's name and sha256
and the device key from the signed manifest) so the workstation can check that the board installed the
package it sent: a generic ``{"ok": true}`` is no answer. It does not prove who answered; the SSH host
key does that (see ``host/flash``).
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from .errors import AgentError
from .schema import clean_text, is_clean_text
from .selfcheck import SelfCheckResult

if TYPE_CHECKING:
    from .manifest import Manifest
    from .store import InstallError, InstallResult

ANSWER_VERSION = 1
# A real answer is a few KiB (a dozen fields, a few warnings and pruned slots); anything past this is
# not one, and is refused before it is parsed.
MAX_ANSWER_BYTES = 64 << 10
# One string of the answer (an error message, a path, a warning), in characters; longer ones are cut
# by the board and refused by the workstation.
MAX_TEXT = 2000
# Warnings or pruned slots in one answer.
MAX_ITEMS = 100

_SHA256 = re.compile(r"[0-9a-f]{64}")
_STEP = re.compile(r"[a-z][a-z-]{0,31}")
_HINT = ("check that --agent-command runs edgetune's `edgetune-agent` on the board, "
         "at the same version as this workstation's edgetune")


class InstallAnswerError(AgentError):
    """An install answer that is not one: malformed, of another version, or inconsistent."""


class InstallStatus(enum.Enum):
    """How an install ended, and the exit status of ``edgetune-agent install --json`` that goes with it."""

    INSTALLED = "installed"  # verified, self-checked and made current
    REFUSED = "refused"  # the package or the board said no; the current package is unchanged
    ERROR = "error"  # the agent failed unexpectedly; the current package is unchanged

    @property
    def exit_status(self) -> int:
        return {InstallStatus.INSTALLED: 0, InstallStatus.REFUSED: 1, InstallStatus.ERROR: 2}[self]


def _carried(check: SelfCheckResult) -> SelfCheckResult:
    """A self-check as the answer carries it: finite figures (or none) and clean, bounded text."""
    return SelfCheckResult(ok=bool(check.ok), max_abs_err=_finite(check.max_abs_err), p50_ms=_finite(check.p50_ms),
                           load_ms=_finite(check.load_ms), runs=int(check.runs), error=_text(check.error))


@dataclass(frozen=True)
class InstallAnswer:
    """One install's outcome on a board.

    Installed: ``slot`` (== ``current``), what was installed (``package_sha256``, ``model_name``,
    ``model_sha256``, ``key``), who signed it, when, and a passed ``self_check``. Refused or error:
    ``error`` (one line: what failed and what to do), the ``step`` it failed at, whether the package
    had reached the store and was taken out again (``rolled_back``), the slot in use afterwards
    (``current``) and the self-check when it ran.
    """

    status: InstallStatus
    current: str | None = None
    error: str | None = None
    step: str | None = None
    rolled_back: bool = False
    slot: str | None = None
    previous: str | None = None
    model_name: str | None = None
    model_sha256: str | None = None
    key: str | None = None
    package_sha256: str | None = None
    signer: str | None = None
    installed_at: str | None = None
    store: str | None = None
    self_check: SelfCheckResult | None = None
    warnings: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()
    version: int = field(default=ANSWER_VERSION)

    @property
    def ok(self) -> bool:
        return self.status is InstallStatus.INSTALLED

    @property
    def exit_status(self) -> int:
        return self.status.exit_status

    # -- the board's side --------------------------------------------------------------------------
    @classmethod
    def installed(cls, result: "InstallResult") -> "InstallAnswer":
        """The answer for a package installed by :func:`device_agent.store.install`."""
        return cls(
            status=InstallStatus.INSTALLED, current=result.slot, slot=result.slot, previous=result.previous,
            model_name=_text(result.model_name), model_sha256=result.model_sha256, key=_text(result.key),
            package_sha256=result.package_sha256, signer=_text(result.signer), installed_at=result.installed_at,
            store=_text(result.store), self_check=_carried(result.self_check),
            warnings=tuple(_text(w) or "" for w in result.warnings[:MAX_ITEMS]),
            pruned=tuple(_text(p) or "" for p in result.pruned[:MAX_ITEMS]),
        )

    @classmethod
    def refused(cls, err: "InstallError") -> "InstallAnswer":
        """The answer for an install the store refused (it raised :class:`device_agent.store.InstallError`)."""
        return cls(
            status=InstallStatus.REFUSED, current=err.current, error=_one_line(str(err)), step=err.step,
            rolled_back=bool(err.rolled_back),
            self_check=_carried(err.self_check) if err.self_check is not None else None,
        )

    @classmethod
    def failed(cls, step: str, message: str, current: str | None) -> "InstallAnswer":
        """The answer for an install the agent could not finish (an internal error at ``step``)."""
        return cls(status=InstallStatus.ERROR, current=current, error=_one_line(message), step=step)

    def mismatch(self, package_sha256: str, manifest: "Manifest") -> str | None:
        """Why this installed answer is not for the package sent (its file's sha256, its signed
        manifest), or None when it is."""
        sent = {"package_sha256": package_sha256, "model_name": _text(manifest.model_name),
                "model_sha256": manifest.model_sha256, "key": _text(manifest.key)}
        for name, value in sent.items():
            got = getattr(self, name)
            if got != value:
                return f"{name} {_short(got)}, the package sent has {_short(value)}"
        return None

    def as_dict(self) -> dict[str, Any]:
        """The answer as JSON values; its keys are exactly :data:`_FIELDS`."""
        return {
            "version": self.version,
            "status": self.status.value,
            "ok": self.ok,
            "error": self.error,
            "step": self.step,
            "rolled_back": self.rolled_back,
            "current": self.current,
            "slot": self.slot,
            "previous": self.previous,
            "model_name": self.model_name,
            "model_sha256": self.model_sha256,
            "key": self.key,
            "package_sha256": self.package_sha256,
            "signer": self.signer,
            "installed_at": self.installed_at,
            "store": self.store,
            "self_check": self.self_check.as_dict() if self.self_check is not None else None,
            "warnings": list(self.warnings),
            "pruned": list(self.pruned),
        }

    def to_json(self) -> str:
        """The one JSON document ``edgetune-agent install --json`` prints."""
        return json.dumps(self.as_dict(), indent=2, allow_nan=False)


def _finite(value: float | None) -> float | None:
    """A float the answer can carry (JSON has no NaN or infinity: those say "no figure")."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value: str | None) -> str | None:
    """A string as the answer carries it: printable, at most :data:`MAX_TEXT` characters."""
    return None if value is None else clean_text(str(value))[:MAX_TEXT]


def _short(value: str | None) -> str:
    if value is None:
        return "none"
    return json.dumps(value if len(value) <= 24 else value[:16] + "...", ensure_ascii=False)


def _one_line(message: str) -> str:
    lines = message.strip().splitlines()
    return _text(lines[0] if lines else "") or "failed without a message"


# -- the workstation's side ------------------------------------------------------------------------
class _Refuse(Exception):
    """Why a document is not an install answer (the reason, inside the one-line error)."""


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Refuse(f'"{name}" is {_kind(value)}, not a string')
    if len(value) > MAX_TEXT:
        raise _Refuse(f'"{name}" is {len(value)} characters, more than {MAX_TEXT}')
    if not is_clean_text(value):
        raise _Refuse(f'"{name}" holds control characters')
    return value


def _opt_string(value: Any, name: str) -> str | None:
    return None if value is None else _string(value, name)


def _nonempty(value: Any, name: str) -> str:
    text = _string(value, name)
    if not text.strip():
        raise _Refuse(f'"{name}" is empty')
    return text


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _Refuse(f'"{name}" is {_kind(value)}, not true or false')
    return value


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refuse(f'"{name}" is {_kind(value)}, not a number')
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise _Refuse(f'"{name}" is {str(value)[:20]}, not a finite number of 0 or more')
    return number


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Refuse(f'"{name}" is {_kind(value)}, not a count')
    return value


def _sha256(value: Any, name: str) -> str:
    text = _string(value, name)
    if not _SHA256.fullmatch(text):
        raise _Refuse(f'"{name}" is not a sha256 (64 lowercase hex digits)')
    return text


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Refuse(f'"{name}" is {_kind(value)}, not a list')
    if len(value) > MAX_ITEMS:
        raise _Refuse(f'"{name}" has {len(value)} items, more than {MAX_ITEMS}')
    return tuple(_string(item, f"{name}[{i}]") for i, item in enumerate(value))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "true or false", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _exact_keys(data: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise _Refuse(f"{what} lacks " + ", ".join(f'"{k}"' for k in missing))
    extra = sorted(k for k in data if k not in keys)
    if extra:
        shown = ", ".join(json.dumps(clean_text(k)[:40]) for k in extra[:5])
        raise _Refuse(f"{what} has unknown field{'s' if len(extra) > 1 else ''} {shown}")


_CHECK_FIELDS = tuple(f.name for f in fields(SelfCheckResult))


def _self_check(value: Any) -> SelfCheckResult | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Refuse(f'"self_check" is {_kind(value)}, not an object')
    _exact_keys(value, _CHECK_FIELDS, '"self_check"')
    return SelfCheckResult(
        ok=_bool(value["ok"], "self_check.ok"),
        max_abs_err=_number(value["max_abs_err"], "self_check.max_abs_err"),
        p50_ms=_number(value["p50_ms"], "self_check.p50_ms"),
        load_ms=_number(value["load_ms"], "self_check.load_ms"),
        runs=_count(value["runs"], "self_check.runs"),
        error=_opt_string(value["error"], "self_check.error"),
    )


def _status(value: Any) -> InstallStatus:
    try:
        return InstallStatus(value)
    except (ValueError, TypeError):
        known = ", ".join(s.value for s in InstallStatus)
        raise _Refuse(f'"status" is {json.dumps(clean_text(str(value))[:40])}, not one of {known}') from None


# Key of the answer -> how its value is read. The order is the order of :meth:`InstallAnswer.as_dict`.
_READERS: dict[str, Callable[[Any, str], Any]] = {
    "version": lambda v, n: v,  # checked first, on its own
    "status": lambda v, n: _status(v),
    "ok": _bool,
    "error": _opt_string,
    "step": _opt_string,
    "rolled_back": _bool,
    "current": _opt_string,
    "slot": _opt_string,
    "previous": _opt_string,
    "model_name": _opt_string,
    "model_sha256": _opt_string,
    "key": _opt_string,
    "package_sha256": _opt_string,
    "signer": _opt_string,
    "installed_at": _opt_string,
    "store": _opt_string,
    "self_check": lambda v, n: _self_check(v),
    "warnings": _strings,
    "pruned": _strings,
}
_FIELDS = tuple(_READERS)


def _reject_constant(name: str) -> NoReturn:
    raise _Refuse(f"it holds {name}, which JSON does not have")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all different: with a key twice, which value counts is a guess."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _Refuse(f"{json.dumps(clean_text(key)[:40])} appears twice in one object")
        data[key] = value
    return data


def _document(text: str) -> Any:
    """The one JSON document ``text`` holds (white space around it allowed)."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_ANSWER_BYTES:
        raise _Refuse(f"it is {size} bytes, more than the {MAX_ANSWER_BYTES} an answer takes")
    body = text.strip()
    if not body:
        raise _Refuse("it is empty")
    decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    try:
        data, end = decoder.raw_decode(body)
    except json.JSONDecodeError as err:
        raise _Refuse(f"not JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise _Refuse("nested too deep") from None
    except ValueError as err:  # e.g. a number of more digits than Python converts
        raise _Refuse(f"not JSON: {(str(err).splitlines() or ['?'])[0][:100]}") from None
    if body[end:].strip():
        raise _Refuse("more text follows the JSON object")
    return data


def _read(text: str) -> InstallAnswer:
    data = _document(text)
    if not isinstance(data, dict):
        raise _Refuse(f"it is {_kind(data)}, not an object")
    if "version" not in data:
        raise _Refuse('it lacks "version"')
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Refuse(f'"version" is {_kind(version)}, not a number')
    if version != ANSWER_VERSION:
        raise _Refuse(f"it is version {str(version)[:20]}, this edgetune reads version {ANSWER_VERSION}")
    _exact_keys(data, _FIELDS, "it")
    values = {name: read(data[name], name) for name, read in _READERS.items()}
    if values.pop("ok") is not (values["status"] is InstallStatus.INSTALLED):
        raise _Refuse(f'"ok" contradicts "status" {values["status"].value!r}')
    answer = InstallAnswer(**values)
    _consistent(answer)
    return answer


def _consistent(answer: InstallAnswer) -> None:
    """What each status requires of the other fields."""
    if answer.status is InstallStatus.INSTALLED:
        for name in ("slot", "model_name", "key", "signer", "installed_at", "store"):
            _nonempty(getattr(answer, name), name)
        _sha256(answer.package_sha256, "package_sha256")
        _sha256(answer.model_sha256, "model_sha256")
        if answer.current != answer.slot:
            raise _Refuse('"current" is not the installed "slot"')
        if answer.error is not None or answer.step is not None or answer.rolled_back:
            raise _Refuse('an installed answer has "error", "step" or "rolled_back" set')
        if answer.self_check is None or not answer.self_check.ok:
            raise _Refuse("an installed answer has no passed self-check")
        return
    _nonempty(answer.error, "error")
    if answer.step is None or not _STEP.fullmatch(answer.step):
        raise _Refuse('"step" is not an install step')
    for name in ("slot", "previous", "model_name", "model_sha256", "key", "package_sha256", "signer",
                 "installed_at", "store"):
        if getattr(answer, name) is not None:
            raise _Refuse(f'a {answer.status.value} answer has "{name}" set')
    if answer.warnings or answer.pruned:
        raise _Refuse(f'a {answer.status.value} answer has "warnings" or "pruned"')


def parse(text: str) -> InstallAnswer:
    """Read the install answer a board printed (its whole stdout).

    Raises :class:`InstallAnswerError` (one line starting "unreadable install answer") for anything
    :meth:`InstallAnswer.to_json` does not write: not JSON, two documents, missing, unknown or repeated
    keys, wrong types, an unknown status or version, control characters, fields that contradict the status.
    """
    try:
        return _read(text)
    except _Refuse as why:
        raise InstallAnswerError(f"unreadable install answer ({why}): {_HINT}") from None
