"""deploy/ and README.md: the systemd unit verifies, the shell scripts parse, and the README documents
commands and options that exist (checked against the real ``--help`` output)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "edgetune-agent.service"
README = REPO / "README.md"
INSTALL_SCRIPT = DEPLOY / "install-agent.sh"
ANDROID_SCRIPT = DEPLOY / "android" / "start-agent.sh"
AGENT_PATH = "/opt/edgetune/venv/bin/edgetune-agent"

# systemd-analyze verify loads the unit and its dependencies: about a second here.
VERIFY_SEC = 60.0
# bash -n / shellcheck of one script.
SHELL_CHECK_SEC = 60.0
# `edgetune CMD --help` imports click and the command's module only (no TVM): well under a second.
HELP_SEC = 60.0
# apt-get install systemd, only when systemd-analyze is missing (make test installs it beforehand).
APT_SEC = 600.0

LONG_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _shell_scripts() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.sh"), *(REPO / "scripts").glob("*.sh")])


def _readme() -> str:
    return README.read_text(encoding="utf-8")


# --- the systemd unit ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """The systemd-analyze binary; installs Debian's `systemd` package when it is missing."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail("systemd-analyze is missing: install the `systemd` package (apt-get install systemd) "
                    "or run `make test`, which does")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"],
                   env=env, check=True, timeout=APT_SEC)
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze still missing after apt-get install systemd"
    return found


def _unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> [(key, value)] (systemd allows repeated keys, so no configparser)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{UNIT.name}: {line!r} outside a section"
        sections[current].append((key.strip(), value.strip()))
    return sections


def test_unit_passes_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    # systemd-analyze verify fails when ExecStart's binary does not exist ("Command ... is not
    # executable"), and /opt/edgetune/venv exists only on a board. So verify a copy whose ExecStart
    # points at a stub executable; every other line is the shipped unit, unchanged.
    stub = tmp_path / "edgetune-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(AGENT_PATH) == 1, f"ExecStart of {UNIT.name} should run {AGENT_PATH}"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(AGENT_PATH, str(stub)))
    proc = subprocess.run([systemd_analyze, "verify", str(copy)], capture_output=True, text=True,
                          timeout=VERIFY_SEC)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    assert proc.returncode == 0 and not ours, (
        f"systemd-analyze verify {UNIT.name} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    )


def test_unit_runs_the_agent_as_documented() -> None:
    entries = _unit_entries(UNIT.read_text())
    unit, service = dict(entries["Unit"]), dict(entries["Service"])
    assert "network-online.target" in unit["After"] and "network-online.target" in unit["Wants"]
    assert service["ExecStart"].startswith(f"{AGENT_PATH} serve --key ${{EDGETUNE_KEY}}")
    assert service["EnvironmentFile"] == "-/etc/default/edgetune-agent"
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "control-group"
    assert service["StateDirectory"] == "edgetune"
    # The store the agent writes must be the StateDirectory (ProtectSystem=strict forbids any other).
    environment = [v for k, v in entries["Service"] if k == "Environment"]
    assert "EDGETUNE_STORE=%S/edgetune" in environment
    assert service["ProtectSystem"] == "strict"
    assert dict(entries["Install"])["WantedBy"] == "multi-user.target"
    # The install script creates the user the unit runs as and installs the same agent path.
    script = INSTALL_SCRIPT.read_text()
    assert "useradd --system" in script and service["User"] in script
    assert 'VENV="$PREFIX/venv"' in script and "PREFIX=/opt/edgetune" in script


def test_environment_file_example_names_only_known_settings() -> None:
    example = (DEPLOY / "edgetune-agent.default").read_text()
    names = set(re.findall(r"^#?(EDGETUNE_[A-Z_]+)=", example, flags=re.M))
    unit = UNIT.read_text()
    known = {"EDGETUNE_TRACKER", "EDGETUNE_STORE", "EDGETUNE_MDNS_INTERFACES"} | set(_timing_constants())
    for name in names:
        assert name in unit or name in known, f"{name} in edgetune-agent.default is used by nothing"
    assert "EDGETUNE_KEY" in names


# --- shell scripts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_parses(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=SHELL_CHECK_SEC)
    assert proc.returncode == 0, f"bash -n {script.relative_to(REPO)}:\n{proc.stderr}"


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_passes_shellcheck(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: `make test` installs it (scripts/install-system-deps.sh)"
    proc = subprocess.run([shellcheck, "--severity=warning", str(script)], capture_output=True, text=True,
                          timeout=SHELL_CHECK_SEC)
    assert proc.returncode == 0, f"shellcheck {script.relative_to(REPO)}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("script", [INSTALL_SCRIPT, ANDROID_SCRIPT], ids=lambda p: p.name)
def test_deploy_script_help_and_bad_options(script: Path) -> None:
    # --help and option errors are handled before anything touches the system.
    ok = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=SHELL_CHECK_SEC)
    assert ok.returncode == 0 and "usage:" in ok.stdout
    bad = subprocess.run(["bash", str(script), "--no-such-option"], capture_output=True, text=True,
                         timeout=SHELL_CHECK_SEC)
    assert bad.returncode == 1 and "unknown" in bad.stderr


def test_readme_shows_only_options_the_deploy_scripts_have() -> None:
    for script in (INSTALL_SCRIPT, ANDROID_SCRIPT):
        usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                               timeout=SHELL_CHECK_SEC).stdout
        for snippet in _code_snippets(_readme()):
            for match in re.finditer(rf"{re.escape(script.name)}\b(.*)", snippet):
                segment = re.split(r"(?<![\w/.-])edgetune(?:-agent)?\s", match.group(1))[0]
                for flag in LONG_FLAG.findall(segment):
                    assert flag in usage, f"README shows `{script.name} {flag}`, which its --help does not list"


# --- README -------------------------------------------------------------------------------------------------


def _code_snippets(text: str) -> list[str]:
    """Fenced code blocks (one snippet per command line, joining "\\" continuations) and inline code."""
    snippets: list[str] = []
    fenced = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.S | re.M)
    for block in fenced.findall(text):
        snippets.extend(line for line in block.replace("\\\n", " ").splitlines() if line.strip())
    prose = fenced.sub("", text)
    snippets.extend(span.replace("\\|", "|") for span in re.findall(r"`([^`\n]+)`", prose))
    return snippets


def _edgetune_commands() -> list[str]:
    from host.cli import COMMANDS

    return list(COMMANDS)


def _agent_commands() -> list[str]:
    import click

    from device_agent.cli import cli

    return cli.list_commands(click.Context(cli))


_GROUPS = {("edgetune", "log"): {"show", "merge", "export"}, ("edgetune", "keys"): {"init"}}
_INVOCATION = re.compile(r"(?<![\w/.-])(edgetune(?:-agent)?)[ \t]+([a-z]+)(?:[ \t]+([a-z]+))?")


def _documented_invocations() -> dict[tuple[str, ...], set[str]]:
    """(program, command[, subcommand]) -> the long options the README shows with it."""
    known = {"edgetune": set(_edgetune_commands()), "edgetune-agent": set(_agent_commands())}
    found: dict[tuple[str, ...], set[str]] = {}
    for snippet in _code_snippets(_readme()):
        matches = [m for m in _INVOCATION.finditer(snippet) if m.group(2) in known[m.group(1)]]
        for i, match in enumerate(matches):
            prog, cmd, sub = match.groups()
            argv: tuple[str, ...] = (prog, cmd)
            if sub and sub in _GROUPS.get((prog, cmd), ()):
                argv += (sub,)
            end = matches[i + 1].start() if i + 1 < len(matches) else len(snippet)
            # Cut at a shell comment or the next command of a pipeline / list.
            segment = re.split(r"\s#|&&|\|\||;", snippet[match.end():end])[0]
            found.setdefault(argv, set()).update(LONG_FLAG.findall(segment))
    return found


def test_readme_has_the_two_commands() -> None:
    text = _readme()
    block = re.search(r"## Two commands\s*```\n(.*?)```", text, flags=re.S)
    assert block, "README has no '## Two commands' section with a code block"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert "make demo" in lines and "make test" in lines


@pytest.mark.parametrize("command", _edgetune_commands())
def test_readme_mentions_every_edgetune_command(command: str) -> None:
    assert re.search(rf"`edgetune {command}\b", _readme()), f"README does not show `edgetune {command}`"


@pytest.mark.parametrize("command", _agent_commands())
def test_readme_mentions_every_agent_command(command: str) -> None:
    assert re.search(rf"`edgetune-agent {command}\b", _readme()), f"README does not show `edgetune-agent {command}`"


def _program(name: str) -> list[str]:
    """The console script installed beside this interpreter, else its module."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"edgetune": "host.cli", "edgetune-agent": "device_agent.cli"}[name]]


@pytest.mark.parametrize("argv", sorted(a for a, flags in _documented_invocations().items() if flags),
                         ids=lambda a: " ".join(a))
def test_readme_options_exist_in_help(argv: tuple[str, ...]) -> None:
    flags = _documented_invocations()[argv]
    shown = " ".join(argv)
    proc = subprocess.run([*_program(argv[0]), *argv[1:], "--help"], capture_output=True, text=True,
                          timeout=HELP_SEC, cwd=REPO)
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    assert proc.returncode == 0, (
        f"`{shown} --help` failed (exit {proc.returncode}): the README documents {sorted(flags)} for a "
        f"command that does not load (not written yet, or broken):\n{tail}"
    )
    options = set(LONG_FLAG.findall(proc.stdout))
    missing = sorted(flags - options)
    assert not missing, f"README shows {missing} for `{shown}`, but `{shown} --help` has no such option"


# --- configuration ------------------------------------------------------------------------------------------


def _timing_constants() -> dict[str, float]:
    """EDGETUNE_<NAME> -> default, read from the source of both config modules (the environment of the
    test run must not change what the README is checked against)."""
    found: dict[str, float] = {}
    for module in (REPO / "host" / "config.py", REPO / "device_agent" / "config.py"):
        for name, default in re.findall(r'_seconds\("([A-Z_]+)",\s*([0-9.]+)\)', module.read_text()):
            found[f"EDGETUNE_{name}"] = float(default)
    return found


def test_readme_lists_every_timing_constant_with_its_default() -> None:
    constants = _timing_constants()
    assert len(constants) > 10, "no _seconds(...) constants found: did the config modules change shape?"
    text = _readme()
    for name, default in constants.items():
        row = re.search(rf"^\|\s*`{name}`\s*\|\s*([0-9.]+)\s*\|", text, flags=re.M)
        assert row, f"README's configuration tables have no row for {name}"
        assert float(row.group(1)) == default, f"README says {name} defaults to {row.group(1)}, the code {default:g}"
