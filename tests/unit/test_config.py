"""The board's runtime threads: TVM's pool gets the cores the kernels were compiled for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A fresh interpreter each: TVM reads TVM_NUM_THREADS once, when it makes its thread pool.
PROBE = """
import json, sys
from device_agent import config
in_force = config.use_target_threads(int(sys.argv[1]))
import tvm
print(json.dumps({"in_force": in_force, "runtime": tvm.runtime.num_threads()}))
"""


def threads(cores: int, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, str(cores)], cwd=REPO, env=environ,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_runtime_gets_the_targets_cores():
    cpus = os.cpu_count() or 1
    assert threads(cpus) == {"in_force": cpus, "runtime": cpus}
    assert threads(1) == {"in_force": 1, "runtime": 1}


def test_never_more_threads_than_the_board_has_cpus():
    cpus = os.cpu_count() or 1
    assert threads(cpus + 2) == {"in_force": cpus, "runtime": cpus}


def test_a_thread_count_the_user_set_wins():
    assert threads(2, TVM_NUM_THREADS="1") == {"in_force": 1, "runtime": 1}


def test_a_target_without_cores_leaves_tvms_default():
    default = threads(0)
    assert default["in_force"] == 0 and default["runtime"] >= 1
