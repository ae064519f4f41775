"""The `vsal` orchestrator model: Triton's Python backend, decoupled (one request, many responses).

It is the runtime's own Pipeline (request checks, media decoding, preprocessing, alignment, prompt
assembly, generation), built with a backend factory whose graphs run as calls to the repository's
graph models (BLS) instead of ONNX Runtime sessions (a graph the repository leaves to this model, the
decoder with --decoder orchestrator, runs here on the pipeline's own backend), and a step wrapper
that checks the request before each decoder step: Triton batches the encoders' calls across
concurrent requests. Each request
is served on its own thread; text pieces stream back as they come (TEXT), then the whole answer as
JSON (RESULT, the last response).

A user mistake (the VsalError tree: bad media, an invalid prompt, options or a limit) comes back as
an error "vsal-error: <file>: <problem>", one line naming the client's file, not the server's copy;
a request that ends early, "vsal-stopped: the request was ..." (the marks: runtime.serving.client).
Anything else is a bug: its traceback goes to the server log once, the client gets one line.
Before each decoder step the request is checked: a client that went away (Triton cancels its
request) or a server that is stopping (`vsal serve` creates VSAL_STOP_FILE) ends its generation.

Inputs: PROMPT, VIDEO / AUDIO (the files' bytes), VIDEO_NAME / AUDIO_NAME (the client's names for
them), OPTIONS (JSON of DecodingOptions fields; absent: the release's defaults from the manifest).
Parameters (config.pbtxt): max_upload_mib (each media file), max_new_tokens_limit.
"""

import json
import os
import re
import shutil
import site
import tempfile
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

for _folder in os.environ.get("VSAL_SITE_DIRS", "").split(os.pathsep):  # set by `vsal serve`
    if _folder:
        site.addsitedir(_folder)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from vsal.runtime.backends import Runner  # noqa: E402
from vsal.runtime.errors import ConfigError, LimitError, VsalError  # noqa: E402
from vsal.runtime.limits import MAX_NEW_TOKENS_LIMIT, MAX_UPLOAD_MIB  # noqa: E402
from vsal.runtime.pipeline import Pipeline  # noqa: E402
from vsal.runtime.prompt import DecodingOptions  # noqa: E402
from vsal.runtime.serving.client import ERROR_PREFIX, MIB, STOPPED_PREFIX, upload_limit_message  # noqa: E402
from vsal.runtime.serving.triton_models.dlpack import from_numpy, to_numpy  # noqa: E402
from vsal.runtime.serving.triton_models.supervision import exit_with_parent  # noqa: E402

TEXT_LIMIT = 1 * MIB  # PROMPT, OPTIONS and the file names: far past any prompt the decoder takes


class Stopped(Exception):
    """A request that ends before its answer: the client went away, or the server is stopping."""


class GraphModelError(Exception):
    """A graph model of this server that failed a call (not the request's fault)."""


class Request(threading.local):
    """What the serving thread knows of its request: checked before each call to a graph."""

    sender = None
    steps = 0  # decoder steps run

    def check(self):
        if self.sender is None:
            return
        if self.sender.is_cancelled():
            raise Stopped(f"cancelled by its client after {self.steps} decoder steps")
        stop_file = os.environ.get("VSAL_STOP_FILE")
        if stop_file and os.path.exists(stop_file):
            raise Stopped(f"stopped after {self.steps} decoder steps: the server is stopping")


CURRENT = Request()


class CheckedStep:
    """A decoder step (one per token, per beam search step) that counts itself and, run here (no
    BLS call to check first), checks its request before it runs."""

    def __init__(self, step, local):
        self.step = step
        self.local = local

    def __call__(self, *args, **kwargs):
        if self.local:
            CURRENT.check()
        CURRENT.steps += 1
        return self.step(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.step, name)


class BlsBackend(Runner):
    """A graph run by another model of this server (a `Runner`: its feeds are checked by the base,
    its decoder step is the base's host round trip)."""

    def __init__(self, name, model, info, precision):
        super().__init__(name, info, precision, f"triton model {model} (BLS)")
        self.model = model
        self._inputs = [t.name for t in info.inputs]
        self._outputs = [t.name for t in info.outputs]

    def input_names(self):
        return list(self._inputs)

    def output_names(self):
        return list(self._outputs)

    def _run(self, feeds, outputs):
        request = pb_utils.InferenceRequest(
            model_name=self.model,
            requested_output_names=outputs,
            inputs=[from_numpy(k, v) for k, v in feeds.items()],  # contiguous copies where needed
        )
        CURRENT.check()  # no new call for a request that has ended
        response = request.exec()
        if response.has_error():
            CURRENT.check()  # a server that began to stop meanwhile refuses calls: not a bug
            message = response.error().message()
            raise GraphModelError(f"{self.name}: Triton model {self.model} failed ({message})")
        return {n: to_numpy(pb_utils.get_output_tensor_by_name(response, n)) for n in outputs}


def graph_backends(graph_models, local_graphs):
    """The pipeline's backend factory: each graph a BLS call to its model of this repository, but
    None (the pipeline's own backend) for the graphs run here."""

    def open_backend(name, info, file, precision):
        if name in local_graphs:
            return None
        return BlsBackend(name, graph_models[name], info, precision)

    return open_backend


def _size(request, name):
    """Bytes of an optional UINT8 [-1] input (its shape: nothing is copied), None when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else int(np.prod(tensor.shape()))


def _bytes(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return to_numpy(tensor).tobytes()  # UINT8 [-1]: UTF-8 text or a file's bytes


def _tensor(name, data: bytes):
    return from_numpy(name, np.frombuffer(data, dtype=np.uint8))


def _client_name(request, kind):
    """The client's name for its upload, as shown in messages: any text, control characters as "?"
    (a message stays one printable line)."""
    name = (_bytes(request, f"{kind}_NAME") or kind.lower().encode()).decode("utf-8", "replace")
    return re.sub("[\x00-\x1f\x7f-\x9f]", "?", name)


def _local_name(kind, name):
    """The server's name for an upload: the kind and the client's extension, if a plain one (the
    client's name is any text: a path, `..`, NUL; it is only ever shown, never used as a path)."""
    suffix = Path(name).suffix
    return kind.lower() + (suffix if suffix[1:].isalnum() and len(suffix) <= 10 else "")


def _options(data):
    """DecodingOptions from the request's JSON (checked by DecodingOptions itself), None when absent."""
    if not data:
        return None
    try:
        fields = json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError: also not UTF-8, or an int past 4300 digits
        reason = str(exc).splitlines()[0].split("; use sys.set_int_max_str_digits")[0]  # not the client's
        raise ConfigError(f"OPTIONS is not JSON ({reason[:200]})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"OPTIONS must be a JSON object of decoding options, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(DecodingOptions.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown decoding options {unknown}")
    if "eos_token_id" in fields:
        raise ConfigError("OPTIONS: eos_token_id comes from the package's manifest: leave it out")
    return DecodingOptions(**fields)


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / params["package"]
        graph_models = json.loads(params["graph_models"])
        local_graphs = tuple(json.loads(params.get("local_graphs", "[]")))  # run here, not by a model
        precision = params.get("precision") or None
        provider = None if local_graphs else "cpu"  # a local decoder: the best provider here
        # Here: the manifest, tokenizers, embeddings, local graphs (the others are models of their own);
        # exact_precision: a local graph runs the file the repository holds, whatever the provider.
        # A local decoder keeps its KV cache in its backend (ONNX Runtime's IO binding); one behind
        # BLS checks its request in each call, so its step need not check first.
        self.pipeline = Pipeline.load(
            folder,
            provider=provider,
            verbose=False,
            verify=False,
            precision=precision,
            exact_precision=True,
            backend_factory=graph_backends(graph_models, local_graphs),
            step_wrapper=partial(CheckedStep, local="llm_decoder" in local_graphs),
        )
        # a repository written before the limits were parameters gets vsal serve's defaults
        self.max_upload_mib = int(params.get("max_upload_mib", MAX_UPLOAD_MIB))
        self.max_new_tokens = int(params.get("max_new_tokens_limit", MAX_NEW_TOKENS_LIMIT))
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
            number = self.counter
        folder = Path(self.workdir) / str(number)
        names = {}
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        CURRENT.sender, CURRENT.steps = sender, 0
        try:
            self._check_sizes(request)
            prompt = _bytes(request, "PROMPT") or b""  # UTF-8 checked by the pipeline
            options = self._limit(_options(_bytes(request, "OPTIONS")))
            folder.mkdir()
            media = {}
            for kind in ("VIDEO", "AUDIO"):
                data = _bytes(request, kind)
                if data is None:
                    continue
                name = _client_name(request, kind)
                path = folder / _local_name(kind, name)
                path.write_bytes(data)
                names[str(path)] = name
                media[kind.lower()] = path

            def on_text(piece):
                sender.send(pb_utils.InferenceResponse(output_tensors=[_tensor("TEXT", piece.encode())]))

            answer = self.pipeline.ask(
                prompt, video=media.get("video"), audio=media.get("audio"), options=options, on_text=on_text
            )
            response = pb_utils.InferenceResponse(
                output_tensors=[_tensor("RESULT", json.dumps(answer.to_dict()).encode())]
            )
            sender.send(response, flags=final)
        except VsalError as exc:  # the user's mistake, in one line
            message = str(exc)
            for path, name in names.items():
                message = message.replace(path, name)
            line = message.splitlines()[0] if message else type(exc).__name__
            error = pb_utils.TritonError(ERROR_PREFIX + line)
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
        except Stopped as exc:
            pb_utils.Logger.log_info(f"vsal: request {number} {exc}")
            error = pb_utils.TritonError(
                f"{STOPPED_PREFIX}the request was {exc}", pb_utils.TritonError.CANCELLED
            )
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
        except Exception as exc:  # a bug (or the server's machine failing): its traceback, once
            pb_utils.Logger.log_error(f"vsal: request {number} failed: " + traceback.format_exc())
            error = pb_utils.TritonError(
                f"internal error in the vsal model (see the server log): {type(exc).__name__}"
            )
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
        finally:
            CURRENT.sender = None
            shutil.rmtree(folder, ignore_errors=True)

    def _check_sizes(self, request):
        """Each input against its bound, from its shape, before any bytes are copied."""
        for name in ("PROMPT", "OPTIONS", "VIDEO_NAME", "AUDIO_NAME"):
            size = _size(request, name)
            if size is not None and size > TEXT_LIMIT:
                raise LimitError(
                    f"{name} is {size / MIB:.1f} MiB; the server takes at most {TEXT_LIMIT // MIB} MiB of it"
                )
        for kind in ("VIDEO", "AUDIO"):
            size = _size(request, kind)
            if size is not None and size > self.max_upload_mib * MIB:
                name = _client_name(request, kind)
                raise LimitError(upload_limit_message(name, size, self.max_upload_mib))

    def _limit(self, options):
        """The request's options within the server's max_new_tokens limit; the release's defaults,
        capped to it, when the request gives none."""
        if options is None:
            defaults = self.pipeline.default_options()
            return replace(defaults, max_new_tokens=min(defaults.max_new_tokens, self.max_new_tokens))
        if options.max_new_tokens > self.max_new_tokens:
            raise LimitError(
                f"max_new_tokens {options.max_new_tokens} is over this server's limit of "
                f"{self.max_new_tokens} (vsal serve --max-new-tokens-limit): ask for at most "
                f"{self.max_new_tokens} (--max-new-tokens)"
            )
        return options

    def finalize(self):
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
