"""The install answer (what `edgetune-agent install --json` prints and `flash` reads): every answer the
board writes reads back the same, and every other shape is refused with one line."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest

from device_agent.install_answer import (
    ANSWER_VERSION,
    MAX_ANSWER_BYTES,
    MAX_ITEMS,
    MAX_TEXT,
    InstallAnswer,
    InstallAnswerError,
    InstallStatus,
    parse,
)
from device_agent.manifest import Manifest
from device_agent.selfcheck import SelfCheckResult
from device_agent.store import InstallError, InstallResult

PACKAGE_SHA = "b" * 64
MODEL_SHA = "a" * 64


def _installed_result(**changes: Any) -> InstallResult:
    values: dict[str, Any] = dict(
        store="/var/lib/edgetune", slot="20261203T031500Z-1a2b3c4d", previous="20261202T101010Z-99887766",
        model_name="tiny_cnn", model_sha256=MODEL_SHA, key="rpi4", package_sha256=PACKAGE_SHA,
        signer="SHA256:abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", installed_at="2026-12-03T03:15:00+00:00",
        self_check=SelfCheckResult(ok=True, max_abs_err=2.4e-7, p50_ms=0.21, load_ms=31.0, runs=10),
        pruned=["20261201T000000Z-00000000"], warnings=["built with TVM 0.27.0, the board runs 0.27.1"],
    )
    values.update(changes)
    return InstallResult(**values)


def _manifest(**changes: Any) -> Manifest:
    values: dict[str, Any] = dict(model_name="tiny_cnn", model_sha256=MODEL_SHA, key="rpi4", target={},
                                  tvm_version="0.27.0", inputs=(), outputs=(), created="2026-12-03T03:00:00+00:00",
                                  files={})
    values.update(changes)
    return Manifest(**values)


INSTALLED = InstallAnswer.installed(_installed_result())
REFUSED = InstallAnswer.refused(InstallError(
    "self-check", "self-check failed: output differs by 3.1; install rolled back, 20261202T101010Z-99887766 is current",
    rolled_back=True, current="20261202T101010Z-99887766",
    self_check=SelfCheckResult(ok=False, max_abs_err=3.1, p50_ms=None, load_ms=30.0, runs=1, error="output differs"),
))
FAILED = InstallAnswer.failed("files", "internal error (RuntimeError: a bug): please report it", None)


# -- what the board writes reads back ------------------------------------------------------------------
@pytest.mark.parametrize("answer", [INSTALLED, REFUSED, FAILED], ids=["installed", "refused", "error"])
def test_every_answer_the_board_writes_reads_back_the_same(answer: InstallAnswer) -> None:
    assert parse(answer.to_json()) == answer
    assert parse("\n  " + answer.to_json() + "\n\n") == answer  # white space around it is fine


def test_statuses_and_exit_codes() -> None:
    assert (INSTALLED.status, INSTALLED.ok, INSTALLED.exit_status) == (InstallStatus.INSTALLED, True, 0)
    assert (REFUSED.status, REFUSED.ok, REFUSED.exit_status) == (InstallStatus.REFUSED, False, 1)
    assert (FAILED.status, FAILED.ok, FAILED.exit_status) == (InstallStatus.ERROR, False, 2)
    data = json.loads(INSTALLED.to_json())
    assert data["version"] == ANSWER_VERSION and data["status"] == "installed" and data["ok"] is True
    assert data["package_sha256"] == PACKAGE_SHA and data["self_check"]["p50_ms"] == 0.21


def test_the_board_writes_only_printable_one_line_text_and_no_nan() -> None:
    answer = InstallAnswer.refused(InstallError(
        "files", "model.so does not match\x1b[2J its sha256\nsecond line", current=None,
        self_check=SelfCheckResult(ok=False, max_abs_err=float("nan"), p50_ms=float("inf"), error="a\rb"),
    ))
    assert answer.error == "model.so does not match its sha256"
    assert answer.self_check == SelfCheckResult(ok=False, max_abs_err=None, p50_ms=None, error="a?b")
    text = answer.to_json()
    assert "NaN" not in text and "Infinity" not in text
    assert parse(text) == answer
    long = InstallAnswer.failed("extract", "x" * (MAX_TEXT + 500), None)
    assert len(long.error or "") == MAX_TEXT and parse(long.to_json()) == long


def test_mismatch_names_what_differs_from_the_package_sent() -> None:
    assert INSTALLED.mismatch(PACKAGE_SHA, _manifest()) is None
    assert "package_sha256" in (INSTALLED.mismatch("c" * 64, _manifest()) or "")
    assert "model_name" in (INSTALLED.mismatch(PACKAGE_SHA, _manifest(model_name="resnet18")) or "")
    assert "model_sha256" in (INSTALLED.mismatch(PACKAGE_SHA, _manifest(model_sha256="d" * 64)) or "")
    assert "key" in (INSTALLED.mismatch(PACKAGE_SHA, _manifest(key="rpi5")) or "")


# -- every other shape is refused ----------------------------------------------------------------------
def _genuine() -> dict[str, Any]:
    return json.loads(INSTALLED.to_json())


def _with(change: Callable[[dict[str, Any]], None], base: InstallAnswer = INSTALLED) -> str:
    data = json.loads(base.to_json())
    change(data)
    return json.dumps(data)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data[key] = value
    return change


def _set_check(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["self_check"][key] = value
    return change


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        del data[key]
    return change


GENUINE = INSTALLED.to_json()
MALFORMED: dict[str, tuple[str, str]] = {
    # name: (stdout, a word of the reason)
    "empty": ("", "empty"),
    "white space": ("  \n\t ", "empty"),
    "not json": ("installed ok\n", "not JSON"),
    "truncated": (GENUINE[: len(GENUINE) // 2], "not JSON"),
    "truncated by one byte": (GENUINE.rstrip()[:-1], "not JSON"),
    "bare ok true": ('{"ok": true}', '"version"'),
    "bare ok true with version": ('{"version": 1, "ok": true}', "lacks"),
    "a list": (json.dumps([_genuine()]), "not an object"),
    "a string": ('"installed"', "not an object"),
    "two documents": (GENUINE + "\n" + GENUINE, "more text follows"),
    "junk after": (GENUINE + "\ninstalled\n", "more text follows"),
    "junk before": ("Welcome to the board!\n" + GENUINE, "not JSON"),
    "version 2": (_with(_set("version", 2)), "version 2"),
    "version as text": (_with(_set("version", "1")), '"version"'),
    "version true": (_with(_set("version", True)), '"version"'),
    "extra field": (_with(_set("trusted", True)), 'unknown field "trusted"'),
    "a key twice": (GENUINE.replace('"ok": true,', '"ok": false, "ok": true,'), '"ok" appears twice'),
    "missing slot": (_with(_drop("slot")), 'lacks "slot"'),
    "missing self_check": (_with(_drop("self_check")), 'lacks "self_check"'),
    "unknown status": (_with(_set("status", "done")), '"status"'),
    "status as number": (_with(_set("status", 0)), '"status"'),
    "ok contradicts status": (_with(_set("ok", False)), "contradicts"),
    "ok as number": (_with(_set("ok", 1)), '"ok"'),
    "ok as text": (_with(_set("ok", "true")), '"ok"'),
    "rolled_back as null": (_with(_set("rolled_back", None)), '"rolled_back"'),
    "slot as number": (_with(_set("slot", 7)), '"slot"'),
    "warnings as text": (_with(_set("warnings", "none")), '"warnings"'),
    "warnings of numbers": (_with(_set("warnings", [1])), '"warnings[0]"'),
    "too many warnings": (_with(_set("warnings", ["w"] * (MAX_ITEMS + 1))), "more than"),
    "package sha not hex": (_with(_set("package_sha256", "z" * 64)), "sha256"),
    "package sha short": (_with(_set("package_sha256", "b" * 63)), "sha256"),
    "package sha missing on installed": (_with(_set("package_sha256", None)), '"package_sha256"'),
    "model name empty": (_with(_set("model_name", " ")), "empty"),
    "current is not the slot": (_with(_set("current", "20261202T101010Z-99887766")), '"current"'),
    "installed with an error": (_with(_set("error", "boom")), '"error"'),
    "installed with a step": (_with(_set("step", "switch")), '"step"'),
    "installed, rolled back": (_with(_set("rolled_back", True)), '"rolled_back"'),
    "installed without self-check": (_with(_set("self_check", None)), "self-check"),
    "installed with a failed self-check": (_with(_set_check("ok", False)), "self-check"),
    "self_check as list": (_with(_set("self_check", [True])), '"self_check"'),
    "self_check extra key": (_with(_set_check("gflops", 3.0)), 'unknown field "gflops"'),
    "self_check missing key": (_with(lambda d: d["self_check"].pop("runs")), 'lacks "runs"'),
    "p50 as text": (_with(_set_check("p50_ms", "0.2")), "p50_ms"),
    "p50 negative": (_with(_set_check("p50_ms", -1.0)), "p50_ms"),
    "p50 true": (_with(_set_check("p50_ms", True)), "p50_ms"),
    "p50 beyond a float": (_with(_set_check("p50_ms", 10 ** 400)), "p50_ms"),
    "a number of 5000 digits": (GENUINE.replace('"runs": 10', '"runs": ' + "9" * 5000), "not JSON"),
    "status as list": (_with(_set("status", ["installed"])), '"status"'),
    "runs as float": (_with(_set_check("runs", 1.5)), "runs"),
    "runs true": (_with(_set_check("runs", True)), "runs"),
    "NaN": (GENUINE.replace('"p50_ms": 0.21', '"p50_ms": NaN'), "NaN"),
    "Infinity": (GENUINE.replace('"p50_ms": 0.21', '"p50_ms": Infinity'), "Infinity"),
    "escape in a warning": (_with(_set("warnings", ["\x1b[31mred"])), "control characters"),
    "newline in the model name": (_with(_set("model_name", "tiny\ncnn")), "control characters"),
    "string too long": (_with(_set("store", "/" * (MAX_TEXT + 1))), "more than"),
    "too big": (GENUINE + " " * MAX_ANSWER_BYTES, "bytes"),
    "nested deep": ('{"version": 1, "self_check": ' + "[" * 30000 + "]" * 30000 + "}", "deep"),
    "refused without error": (_with(_set("error", None), REFUSED), '"error"'),
    "refused with empty error": (_with(_set("error", ""), REFUSED), '"error"'),
    "refused without step": (_with(_set("step", None), REFUSED), '"step"'),
    "refused with a made-up step": (_with(_set("step", "Step 9!"), REFUSED), '"step"'),
    "refused naming a package": (_with(_set("package_sha256", PACKAGE_SHA), REFUSED), '"package_sha256"'),
    "refused with a slot": (_with(_set("slot", "20261203T031500Z-1a2b3c4d"), REFUSED), '"slot"'),
    "refused with warnings": (_with(_set("warnings", ["w"]), REFUSED), '"warnings"'),
    "error that says ok": (_with(_set("ok", True), FAILED), "contradicts"),
}


@pytest.mark.parametrize("stdout,reason", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_answer_is_refused_in_one_line(stdout: str, reason: str) -> None:
    with pytest.raises(InstallAnswerError) as caught:
        parse(stdout)
    message = str(caught.value)
    assert message.startswith("unreadable install answer (") and "\n" not in message, message
    assert reason in message, message
    assert len(message) < 600, message
    assert "\x1b" not in message


def test_every_field_is_required() -> None:
    for key in _genuine():
        with pytest.raises(InstallAnswerError, match=f'lacks "{key}"|lacks "version"'):
            parse(_with(_drop(key)))
