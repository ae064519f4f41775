"""scripts/profile_ops.py and the $VSAL_ORT_PROFILE hook it relies on (runtime.backends.sessions)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper
from vsal.runtime.backends.sessions import PROFILE_ENV, ort_session

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_ops.py"


def _script():
    spec = importlib.util.spec_from_file_location("profile_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relu_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_sessions_write_their_profile_under_the_folder_and_the_script_sums_it(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    monkeypatch.setenv(PROFILE_ENV, str(folder))
    session = ort_session(_relu_model(), name="relu_graph")
    for _ in range(3):
        session.run(None, {"x": np.ones(4, np.float32)})
    del session  # ONNX Runtime writes the profile when the session ends
    times = _script().kernel_times(folder)
    assert list(times) == ["relu_graph"] and set(times["relu_graph"]) == {"Relu"}
    monkeypatch.delenv(PROFILE_ENV)
    ort_session(_relu_model(), name="quiet")
    assert not list(folder.glob("quiet*"))  # without the variable, nothing is profiled


def test_the_script_profiles_a_whole_run_of_the_tiny_package(tiny_package):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tiny_package), "--max-new-tokens", "4", "--top", "5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "| llm_decoder |" in done.stdout and "| vision_encoder |" in done.stdout
    assert "top 5 (graph, op type):" in done.stdout


def test_the_script_refuses_a_folder_that_is_not_a_package(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and "not a vsal package" in done.stderr
