"""Model files that `vsal.runtime.serving.triton_repo` copies into a Triton repository as `model.py`.

They run inside Triton's Python backend (they import `triton_python_backend_utils`, which only the
backend provides): `onnx_graph.py` runs one ONNX graph with ONNX Runtime (the `python` flavor),
`orchestrator.py` is the decoupled `vsal` model.
"""
