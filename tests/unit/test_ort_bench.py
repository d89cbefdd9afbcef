"""ONNX Runtime on the board (the agent's `edgetune.onnxruntime_bench`): real ONNX Runtime, and a board
without it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.peers import REPO


def test_times_onnxruntime_and_writes_its_outputs(tmp_path):
    from device_agent.ort_bench import run
    from host.build.build import reference_io
    from host.models.onnx_import import load_onnx

    model = load_onnx("tiny_cnn")
    inputs, expected = reference_io(model)
    np.savez(tmp_path / "in.npz", **inputs)
    answer = run(str(model.path), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), runs=7)
    assert answer["available"] is True and answer["version"]
    assert len(answer["ms"]) == 7 and all(ms > 0 for ms in answer["ms"])
    got = np.load(tmp_path / "out.npz")
    assert np.allclose(got["output_0"], expected[0], atol=1e-6)


def test_a_board_without_onnxruntime_says_how_to_add_it(tmp_path):
    # A real interpreter where `import onnxruntime` fails, as on a board without the [ort] extra.
    code = ("import sys, json; sys.modules['onnxruntime'] = None; "
            "from device_agent.ort_bench import run; "
            "print(json.dumps(run('m.onnx', 'in.npz', 'out.npz', 3)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["available"] is False
    assert "pip install 'edgetune[ort]'" in answer["error"]


def test_a_model_onnxruntime_cannot_load_is_a_one_line_answer(tmp_path):
    from device_agent.ort_bench import run

    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    np.savez(tmp_path / "in.npz", x=np.zeros(3, "float32"))
    answer = run(str(tmp_path / "bad.onnx"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), runs=3)
    assert answer["available"] is False
    assert answer["error"].startswith("ONNX Runtime failed on this board: ") and "\n" not in answer["error"]
