"""One ONNX graph of a vsal package, run by ONNX Runtime inside Triton's Python backend.

Written into a repository of the `python` flavor (servers that have only the Python backend). With
dynamic batching, Triton hands `execute` several requests at once: those whose non-batch dims match
run as one batch (concatenated on axis 0, split back after), so the encoders' requests from
concurrent clients share one ONNX Runtime call.
"""

import json
import os
import site

for _folder in os.environ.get("VSAL_SITE_DIRS", "").split(os.pathsep):  # set by `vsal serve`
    if _folder:
        site.addsitedir(_folder)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from vsal.runtime.backends import ort_session  # noqa: E402
from vsal.runtime.serving.triton_models.dlpack import from_numpy, to_numpy  # noqa: E402
from vsal.runtime.serving.triton_models.supervision import exit_with_parent  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        exit_with_parent()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        info = json.loads(params["graph_info"])
        self.name = args["model_name"]
        self.batched = config.get("max_batch_size", 0) > 0
        self.inputs = [t["name"] for t in info["inputs"]]
        path = Path(args["model_repository"]) / args["model_version"] / params["graph_file"]
        providers = ["CPUExecutionProvider"]
        if params.get("device") == "gpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(args.get("model_instance_device_id", 0))
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        threads = int(params.get("threads", "0"))
        self.session = ort_session(path, threads=threads, providers=providers)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        feeds = [
            {name: to_numpy(pb_utils.get_input_tensor_by_name(r, name)) for name in self.inputs}
            for r in requests
        ]
        groups = {}
        for i, feed in enumerate(feeds):
            key = tuple(feed[n].shape[1:] for n in self.inputs) if self.batched else i
            groups.setdefault(key, []).append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            if len(members) == 1:
                batch = feeds[members[0]]
            else:
                batch = {n: np.concatenate([feeds[i][n] for i in members]) for n in self.inputs}
            try:
                values = self.session.run(self.outputs, batch)
            except Exception as exc:  # onnxruntime's own exception types
                error = pb_utils.TritonError(f"{self.name}: ONNX Runtime failed ({str(exc).splitlines()[0]})")
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            sizes = [feeds[i][self.inputs[0]].shape[0] for i in members]
            splits = np.cumsum(sizes)[:-1]
            parts = [np.split(v, splits) if len(members) > 1 else [v] for v in values]
            for j, i in enumerate(members):
                tensors = [from_numpy(n, p[j]) for n, p in zip(self.outputs, parts, strict=True)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
