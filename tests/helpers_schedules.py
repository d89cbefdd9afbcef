"""Schedule-store test data: the real small tuning log fixture, and the same log as measured on another CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from host.logs.format import RECORD_FILE, WORKLOAD_FILE, mean_run_secs

SMALL = Path(__file__).resolve().parent / "fixtures" / "logs" / "small"
ZNVER4 = "llvm/x86_64-linux-gnu/znver4"
A72 = "llvm/aarch64-linux-gnu/cortex-a72"
A72_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "num-cores": 4}


def records_of(folder: Path) -> list[list]:
    return [json.loads(line) for line in (folder / RECORD_FILE).read_text().splitlines() if line.strip()]


def retargeted(tmp_path: Path, target: dict, scale: float = 1.0, source: Path = SMALL) -> Path:
    """A log (the small fixture by default) as measured on another CPU: the same workloads and traces,
    another target and times."""
    out = tmp_path / f"{source.name}-{target['mcpu']}"
    out.mkdir()
    shutil.copy(source / WORKLOAD_FILE, out / WORKLOAD_FILE)
    lines = []
    for index, record in records_of(source):
        record[1] = [s * scale for s in record[1]]
        record[2] = {**record[2], **target, "keys": ["arm_cpu", "cpu"]}
        lines.append(json.dumps([index, record]))
    (out / RECORD_FILE).write_text("\n".join(lines) + "\n")
    return out


def timed_cold(tmp_path: Path, scale: float) -> Path:
    """The small fixture as a session timing ``cold_weights`` wrote it: the same workloads and traces, its
    times ``scale`` times the hot ones (a kernel run after a cache flush is slower)."""
    out = retargeted(tmp_path, json.loads((SMALL / "session.json").read_text())["target"], scale)
    session = json.loads((SMALL / "session.json").read_text())
    (out / "session.json").write_text(json.dumps({**session, "cold_weights": True}))
    return out
