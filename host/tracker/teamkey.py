"""The workstation's team key (format and proofs: :mod:`device_agent.auth`).

``edgetune tracker`` and ``edgetune demo`` create it on first use, as ESPHome generates a device's API
key; every command that talks to a tracker or a board reads it.
"""

from __future__ import annotations

from device_agent.auth import (TEAM_KEY_ENV, TeamKey, TeamKeyError, TeamKeyMissing, load_or_create_team_key,
                               load_team_key, workstation_key_path)

from ..errors import EdgetuneError


def team_key() -> TeamKey:
    """The workstation's team key. Raises :class:`EdgetuneError` saying how to get one when it is missing
    or unusable."""
    path = workstation_key_path()
    try:
        return load_team_key(path)
    except TeamKeyMissing:
        raise EdgetuneError(
            f"no team key at {path}: run `edgetune tracker` on this machine once (it creates the key), or copy "
            f"your team's key file there (chmod 600) or point {TEAM_KEY_ENV} at it"
        ) from None
    except TeamKeyError as err:
        raise EdgetuneError(str(err)) from None


def ensure_team_key() -> tuple[TeamKey, str | None]:
    """The workstation's team key, created when there is none: ``(key, notice)``, where ``notice`` is the
    one line to show the user when the key was just created (else None). Raises :class:`EdgetuneError`."""
    try:
        key, created = load_or_create_team_key(workstation_key_path())
    except TeamKeyError as err:
        raise EdgetuneError(str(err)) from None
    return key, created_notice(key) if created else None


def created_notice(key: TeamKey) -> str:
    """What to tell the user about a team key just created."""
    return (f"created the team key {key.path} (fingerprint {key.fingerprint}): only boards and hosts holding a "
            f"copy can use this tracker; give it to each board with `sudo deploy/install-agent.sh --team-key "
            f"team.key` (or copy it to /etc/edgetune/team.key, mode 640)")
