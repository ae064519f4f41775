"""The `vsal` orchestrator model: Triton's Python backend, decoupled (one request, many responses).

It is the runtime's own Pipeline (media decoding, preprocessing, alignment, prompt assembly,
generation), whose graphs run as calls to the repository's graph models (BLS) instead of ONNX
Runtime sessions: Triton batches the encoders' calls across concurrent requests. Each request is
served on its own thread; text pieces stream back as they come (TEXT), then the whole answer as
JSON (RESULT, the last response). A user mistake (bad media, empty prompt, bad options) comes back
as an error "vsal-error: <file>: <problem>", naming the client's file, not the server's copy.

Inputs: PROMPT, VIDEO / AUDIO (the files' bytes), VIDEO_NAME / AUDIO_NAME (the client's names for
them), OPTIONS (JSON of DecodingOptions fields; absent: the release's defaults from the manifest).
"""

import json
import os
import shutil
import site
import tempfile
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

for _folder in os.environ.get("VSAL_SITE_DIRS", "").split(os.pathsep):  # set by `vsal serve`
    if _folder:
        site.addsitedir(_folder)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from vsal.runtime.backends import BackendError, FeedChecker  # noqa: E402
from vsal.runtime.errors import ConfigError, VsalError  # noqa: E402
from vsal.runtime.generation import GraphDecoderStep  # noqa: E402
from vsal.runtime.pipeline import Pipeline  # noqa: E402
from vsal.runtime.prompt import DecodingOptions  # noqa: E402
from vsal.runtime.triton_models.dlpack import from_numpy, to_numpy  # noqa: E402

ERROR_PREFIX = "vsal-error: "  # what the client shows as a one-line error


class BlsBackend:
    """A graph run by another model of this server (a `Backend`: runtime.backends)."""

    def __init__(self, name, model, info):
        self.name = name
        self.model = model
        self.description = f"triton model {model} (BLS)"
        self.checker = FeedChecker(name, info)
        self._inputs = [t.name for t in info.inputs]
        self._outputs = [t.name for t in info.outputs]

    def input_names(self):
        return list(self._inputs)

    def output_names(self):
        return list(self._outputs)

    def run(self, feeds, outputs=None):
        feeds = {k: np.ascontiguousarray(np.asarray(v)) for k, v in feeds.items()}
        self.checker.check(feeds)
        names = outputs or self._outputs
        request = pb_utils.InferenceRequest(
            model_name=self.model,
            requested_output_names=names,
            inputs=[from_numpy(k, v) for k, v in feeds.items()],
        )
        response = request.exec()
        if response.has_error():
            raise BackendError(
                f"{self.name}: Triton model {self.model} failed ({response.error().message()})"
            )
        return {n: to_numpy(pb_utils.get_output_tensor_by_name(response, n)) for n in names}


class TritonPipeline(Pipeline):
    """The runtime pipeline with every graph behind a BLS call."""

    graph_models = {}
    local_graphs = ()  # graphs run here (ONNX Runtime), not by another model

    def backend(self, name):
        if name in self.local_graphs:
            return Pipeline.backend(self, name)
        if name not in self._backends:
            self._backends[name] = BlsBackend(name, self.graph_models[name], self.manifest.graphs[name])
        return self._backends[name]

    def _step(self):
        if "llm_decoder" in self.local_graphs:
            return Pipeline._step(self)  # IO binding: the KV cache stays in ONNX Runtime
        llm = self.llm
        head_dim = llm["hidden_size"] // llm["num_attention_heads"]
        run = self.backend("llm_decoder").run
        return GraphDecoderStep(run, llm["num_hidden_layers"], llm["num_key_value_heads"], head_dim)


def _string(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return to_numpy(tensor).tobytes()  # UINT8 [-1]: UTF-8 text or a file's bytes


def _tensor(name, data: bytes):
    return from_numpy(name, np.frombuffer(data, dtype=np.uint8))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / params["package"]
        TritonPipeline.graph_models = json.loads(params["graph_models"])
        TritonPipeline.local_graphs = tuple(json.loads(params.get("local_graphs", "[]")))
        precision = params.get("precision") or None
        provider = None if TritonPipeline.local_graphs else "cpu"  # a local decoder: the best provider here
        # Here: the manifest, tokenizers, embeddings, local graphs (the others are models of their own);
        # exact_precision: a local graph runs the file the repository holds, whatever the provider.
        self.pipeline = TritonPipeline.load(
            folder, provider=provider, verbose=False, verify=False, precision=precision, exact_precision=True
        )
        self.pool = ThreadPoolExecutor(int(params.get("threads", "16")), thread_name_prefix="vsal")
        self.workdir = tempfile.mkdtemp(prefix="vsal-triton-")
        self.counter = 0
        self.lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._serve, request, request.get_response_sender())
        return None

    def _serve(self, request, sender):
        with self.lock:
            self.counter += 1
            folder = Path(self.workdir) / str(self.counter)
        names = {}
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            folder.mkdir()
            prompt = (_string(request, "PROMPT") or b"").decode("utf-8")
            options_json = _string(request, "OPTIONS")
            options = None
            if options_json:
                fields = json.loads(options_json)
                if not isinstance(fields, dict):
                    raise ConfigError("OPTIONS must be a JSON object of decoding options")
                unknown = sorted(set(fields) - set(DecodingOptions.__dataclass_fields__))
                if unknown:
                    raise ConfigError(f"unknown decoding options {unknown}")
                options = DecodingOptions(**fields)
            media = {}
            for kind in ("VIDEO", "AUDIO"):
                data = _string(request, kind)
                if data is None:
                    continue
                name = (_string(request, f"{kind}_NAME") or kind.lower().encode()).decode("utf-8")
                path = folder / kind.lower() / (Path(name).name or kind.lower())
                path.parent.mkdir()
                path.write_bytes(data)
                names[str(path)] = name
                media[kind.lower()] = path

            def on_text(piece):
                sender.send(pb_utils.InferenceResponse(output_tensors=[_tensor("TEXT", piece.encode())]))

            answer = self.pipeline.ask(
                prompt, video=media.get("video"), audio=media.get("audio"), options=options, on_text=on_text
            )
            result = {
                "answer": answer.text,
                "token_ids": answer.token_ids,
                "av_tokens": answer.av_tokens,
                "timings": {k: round(v, 4) for k, v in answer.timings.items()},
                "backends": answer.backends,
            }
            response = pb_utils.InferenceResponse(
                output_tensors=[_tensor("RESULT", json.dumps(result).encode())]
            )
            sender.send(response, flags=final)
        except (VsalError, ValueError, OSError) as exc:  # the user's mistake, in one line
            message = str(exc)
            for path, name in names.items():
                message = message.replace(path, name)
            error = pb_utils.TritonError(ERROR_PREFIX + message.splitlines()[0] if message else ERROR_PREFIX)
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
        except Exception as exc:
            pb_utils.Logger.log_error("vsal: " + traceback.format_exc())
            error = pb_utils.TritonError(f"internal error in the vsal model: {type(exc).__name__}: {exc}")
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def finalize(self):
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
