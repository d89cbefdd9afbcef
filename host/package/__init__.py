"""Packages: the signed, deployable artifact of a build (model, reference I/O, tuning log, manifest)."""

from .keys import KeyInfo, default_key_path, init_keys, load_signing_key
from .package import PackageResult, package, read_package_manifest

__all__ = [
    "KeyInfo", "PackageResult", "default_key_path", "init_keys", "load_signing_key", "package",
    "read_package_manifest",
]
