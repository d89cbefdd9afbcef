"""The package signing key: an ed25519 key pair in OpenSSH format.

Default place ``~/.config/edgetune/signing_key`` (+ ``.pub``); ``$EDGETUNE_SIGNING_KEY`` overrides.
The private key is written with mode 0600 and never overwritten unless asked to. Boards trust the
public key line (``ssh-ed25519 AAAA...``) placed in their trust directory.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.fsutil import write_atomic
from device_agent.manifest import fingerprint, public_key_line

from ..errors import EdgetuneError

logger = logging.getLogger(__name__)

KEY_ENV = "EDGETUNE_SIGNING_KEY"


@dataclass
class KeyInfo:
    """A signing key pair: where it is, its public key line and fingerprint."""

    path: str
    public_path: str
    public_key: str
    fingerprint: str
    created: bool


def default_key_path() -> Path:
    """``$EDGETUNE_SIGNING_KEY``, else ``~/.config/edgetune/signing_key``."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.config/edgetune/signing_key").expanduser()


def init_keys(path: str | os.PathLike[str] | None = None, force: bool = False) -> KeyInfo:
    """Create a signing key pair at ``path`` (default :func:`default_key_path`) and ``path.pub``.

    Raises :class:`EdgetuneError` when a key is already there and ``force`` is false.
    """
    key_path = Path(path).expanduser() if path is not None else default_key_path()
    pub_path = key_path.with_name(key_path.name + ".pub")
    if key_path.exists() and not force:
        raise EdgetuneError(
            f"a signing key already exists at {key_path}: keep using it, or pass --force to replace it "
            "(boards that trust the old key will then refuse new packages until they trust the new one)"
        )
    key = Ed25519PrivateKey.generate()
    comment = f"edgetune@{socket.gethostname()}"
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    line = public_key_line(key.public_key(), comment)
    try:
        key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(key_path, private, 0o600)
        write_atomic(pub_path, (line + "\n").encode(), 0o644)
    except OSError as err:
        raise EdgetuneError(f"cannot write the signing key to {key_path} ({err.strerror}): "
                            f"pick another place with --key PATH or ${KEY_ENV}") from None
    logger.info("created signing key %s", key_path)
    return KeyInfo(path=str(key_path), public_path=str(pub_path), public_key=line,
                   fingerprint=fingerprint(key.public_key()), created=True)


def load_signing_key(path: str | os.PathLike[str] | None = None) -> tuple[Ed25519PrivateKey, Path]:
    """The private signing key and its path. Raises :class:`EdgetuneError` when missing or unusable."""
    key_path = Path(path).expanduser() if path is not None else default_key_path()
    try:
        data = key_path.read_bytes()
    except FileNotFoundError:
        raise EdgetuneError(f"no signing key at {key_path}: run `edgetune keys init` (or pass --key PATH)") from None
    except OSError as err:
        raise EdgetuneError(f"cannot read the signing key {key_path} ({err.strerror}): check its permissions") from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise EdgetuneError(
            f"{key_path} is not an unencrypted OpenSSH private key ({err}): create one with `edgetune keys init`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgetuneError(f"{key_path} is not an ed25519 key: create one with `edgetune keys init`")
    return key, key_path
