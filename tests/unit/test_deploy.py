"""deploy/ and README.md: the systemd unit verifies, the shell scripts parse, and the README documents
commands and options that exist (checked against the real ``--help`` output)."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

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
    assert service["StateDirectory"] == "edgetune-rpc"
    # The store root installs into; the agent itself writes only its StateDirectory (ProtectSystem=strict).
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


# --- who can write the board's store ---------------------------------------------------------------------

LAYOUT_SCRIPT = DEPLOY / "store-layout.sh"
# What systemd's specifiers stand for in a system unit.
_SPECIFIERS = {"%S": "/var/lib", "%C": "/var/cache", "%L": "/var/log", "%t": "/run"}
# useradd, userdel, runuser and the layout script: each well under a second.
USER_CMD_SEC = 60.0


def _expand(path: str) -> str:
    path = path.lstrip("-+:")  # "-": ignore if missing; "+"/":": prefixes of some path settings
    for spec, value in _SPECIFIERS.items():
        path = path.replace(spec, value)
    return path.rstrip("/")


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def test_unit_gives_the_rpc_user_no_way_to_write_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: the RPC server ran with the store as its StateDirectory, so code uploaded to it could change
    what root installs. Every path the unit makes writable for the service must stay clear of the store."""
    entries = _unit_entries(UNIT.read_text())["Service"]
    service = dict(entries)

    def values(key: str) -> list[str]:
        return [word for k, v in entries if k == key for word in v.split()]

    environment = dict(v.split("=", 1) for k, v in entries if k == "Environment")
    store = _expand(environment["EDGETUNE_STORE"])
    assert store == "/var/lib/edgetune"
    writable = ([f"/var/lib/{d}" for d in values("StateDirectory")]
                + [f"/var/cache/{d}" for d in values("CacheDirectory")]
                + [f"/var/log/{d}" for d in values("LogsDirectory")]
                + [_expand(p) for p in values("ReadWritePaths")])
    assert writable, "the service has no state directory of its own"
    for path in writable:
        assert not _overlaps(path, store), f"the unit lets the RPC user write {path}, which overlaps the store {store}"
    # Everything else is read-only to the service, the store explicitly so.
    assert service["ProtectSystem"] == "strict"
    assert store in [_expand(p) for p in values("ReadOnlyPaths")]
    assert service["User"] not in ("", "root", "0") and service.get("DynamicUser", "no") == "no"
    # The agent's own state is in its StateDirectory, and the agent's default agrees with the unit.
    state = _expand(environment["EDGETUNE_RPC_STATE_DIR"])
    assert state in writable and _expand(environment["HOME"]) == state
    from device_agent.config import rpc_state_dir

    monkeypatch.delenv("EDGETUNE_RPC_STATE_DIR", raising=False)
    assert rpc_state_dir(store) == state
    # install-agent.sh makes the store root's before anything trusts or starts from it.
    script = INSTALL_SCRIPT.read_text()
    layout = script.index('bash "$SCRIPT_DIR/$LAYOUT_SCRIPT" "$store" "$RPC_STATE" "$SERVICE_USER"')
    assert layout < script.index('"$AGENT" trust') < script.index('systemctl restart "$UNIT_NAME"')
    assert "RPC_STATE=/var/lib/edgetune-rpc" in script and "SERVICE_USER=edgetune" in script


@pytest.fixture()
def rpc_user() -> Iterator[str]:
    """A throwaway unprivileged system user, the RPC server's stand-in; removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("this test creates a user (useradd): run it as root, as `make test` does")
    name = f"et-rpc-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True, timeout=USER_CMD_SEC)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=USER_CMD_SEC)


def test_store_layout_takes_the_store_back_from_the_rpc_user(rpc_user: str, tmp_path: Path) -> None:
    """A store as an older install left it (the RPC user's StateDirectory), given to root by the script
    install-agent.sh runs: afterwards the real RPC user can read the store but change nothing in it, writes
    its own state directory, and keeps its board id; root's store check accepts the store."""
    from device_agent import store as store_mod
    from device_agent.errors import AgentError
    from host.package import init_keys

    pub = Path(init_keys(tmp_path / "keys" / "signing_key").public_path)
    # Under /tmp (sticky, as on a board /var/lib is root's) so that the user can reach it at all.
    base = Path(tempfile.mkdtemp(prefix="edgetune-layout-"))
    try:
        base.chmod(0o755)
        store, state = base / "edgetune", base / "edgetune-rpc"
        slot = store / "slots" / "20260101T000000Z-0123abcd"
        for sub in (store / "staging", slot, store / "trusted"):
            sub.mkdir(parents=True)
        (slot / "model.so").write_bytes(b"model bytes")
        (store / "trusted" / "ed25519-planted.pub").write_text("ssh-ed25519 AAAAplanted planted@rpc\n")
        os.symlink("slots/" + slot.name, store / "current")
        board_id = secrets.token_hex(16)
        (store / "board-id").write_text(board_id + "\n")
        user = pwd.getpwnam(rpc_user)
        for path in (store, *store.rglob("*")):
            os.lchown(path, user.pw_uid, user.pw_gid)

        def as_user(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["runuser", "-u", rpc_user, "--", *argv], capture_output=True, text=True,
                                  timeout=USER_CMD_SEC)

        assert as_user("touch", f"{store}/staging/planted").returncode == 0  # the old layout's hole
        with pytest.raises(AgentError, match=f"is owned by {rpc_user}, not root"):
            store_mod.trust(pub, store)

        layout = [str(LAYOUT_SCRIPT), str(store), str(state), rpc_user]
        proc = subprocess.run(["bash", *layout], capture_output=True, text=True, timeout=USER_CMD_SEC)
        assert proc.returncode == 0, proc.stderr
        assert "making it root's" in proc.stderr and "ed25519-planted.pub" in proc.stderr

        for argv in (["touch", f"{store}/new"], ["touch", f"{store}/staging/new"], ["mkdir", f"{store}/slots/new"],
                     ["mv", f"{store}/staging", f"{store}/elsewhere"], ["ln", "-sfn", "/", f"{store}/current"],
                     ["rm", "-rf", f"{store}/trusted"], ["touch", f"{store}/trusted/mine.pub"],
                     ["sh", "-c", f"echo tampered >> {slot}/model.so"], ["chmod", "0777", str(store)]):
            result = as_user(*argv)
            assert result.returncode != 0, f"{rpc_user} could still run {' '.join(argv)} on the store"
        assert as_user("cat", f"{store}/current/model.so").stdout == "model bytes"
        assert as_user("touch", f"{state}/session-state").returncode == 0
        assert (state / "board-id").read_text().strip() == board_id and not (store / "board-id").exists()
        assert os.stat(state).st_uid == user.pw_uid

        # root's rule accepts the store now; a second run has nothing to take back.
        assert store_mod.trust(pub, store).added
        again = subprocess.run(["bash", *layout], capture_output=True, text=True, timeout=USER_CMD_SEC)
        assert again.returncode == 0 and "making it root's" not in again.stderr, again.stderr
        assert (state / "board-id").read_text().strip() == board_id
    finally:
        shutil.rmtree(base)


def test_store_layout_refuses_a_state_dir_inside_the_store(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(LAYOUT_SCRIPT), str(tmp_path / "store"), str(tmp_path / "store" / "rpc"), "nobody"],
                          capture_output=True, text=True, timeout=USER_CMD_SEC)
    assert proc.returncode == 1 and "inside the store" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "store").exists()


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


_GROUPS = {("edgetune", "log"): {"show", "merge", "export"}, ("edgetune", "keys"): {"init"},
           ("edgetune", "schedules"): {"ls", "show", "import", "export"}, ("edgetune", "android"): {"connect"}}
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
