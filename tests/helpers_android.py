"""Captured phone outputs (tests/fixtures/boards/, see its SOURCES.md) and Android packages for the tests of
host/android. No phone is attached to these machines: these are what real phones printed."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from device_agent.manifest import Manifest, TensorSpec, encode_signature

BOARDS = Path(__file__).resolve().parent / "fixtures" / "boards"
PIXEL8_GETPROP = (BOARDS / "pixel8pro-tensor-g3" / "getprop.txt").read_text()
PIXEL8_CPUINFO = (BOARDS / "pixel8pro-tensor-g3" / "cpuinfo").read_text()
POCO_GETPROP = (BOARDS / "poco-f6-sm8635" / "getprop.txt").read_text()
PIXEL9_ADB = (BOARDS / "adb-devices" / "pixel9-usb.txt").read_text()
MI8_ADB = (BOARDS / "adb-devices" / "xiaomi-mi8-usb.txt").read_text()
# The Pixel 8 Pro capture has no ro.serialno; tests reach it by this adb serial.
PIXEL8_SERIAL = "HUSKYCAPTURE1"


def android_package(path: Path, model: bytes, target: dict, board: dict) -> Path:
    """A package laid out as `edgetune package` makes it, for an Android target. ``model`` stands in for
    model.so (no NDK here to link a real one): what is checked with it is the copy, the sha256 and the
    switch, not loading it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    files = {"model.so": model, "reference/input.npz": b"input", "reference/output.npz": b"output"}
    manifest = Manifest(
        model_name="tiny_cnn", model_sha256="0" * 64, key="android-husky", target=target, tvm_version="0.27.0",
        inputs=(TensorSpec("input", (1, 3, 64, 64), "float32"),), outputs=(TensorSpec("output", (1, 10), "float32"),),
        created="2026-12-03T03:00:00+00:00", files={n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
        board=board, sizes={n: len(d) for n, d in files.items()},
    ).to_json()
    key = Ed25519PrivateKey.generate()
    signature = encode_signature(key.sign(manifest), key.public_key())
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("manifest.json", manifest), ("manifest.sig", signature), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
