"""A client of `vsal serve` (or any Triton server with a vsal repository): gRPC streaming, torch-free.

    from vsal.runtime import Client
    client = Client("127.0.0.1:8001")
    answer = client.ask("What is said?", video="talk.mp4", options=DecodingOptions(num_beams=1))
    for piece in client.stream("Who speaks?", video="talk.mp4"):
        print(piece, end="", flush=True)

The media files' bytes are sent (the server needs no access to the client's files); text streams
back as the decoupled `vsal` model produces it. A user mistake comes back as the same one-line
VsalError as in-process (naming the client's file); a server that cannot be reached is a ServeError.
Files over the server's upload limit (`vsal serve --max-upload-mib`, read from the model's
config) are refused before they are read. Leaving a stream early (Ctrl-C, an exception, a
generator closed) cancels the request: the server stops its generation at the next token.
Needs the `serve` extra (tritonclient[grpc]).
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict

import numpy as np
from vsal.runtime.errors import ConfigError, LimitError, VsalError
from vsal.runtime.limits import PORTS
from vsal.runtime.media import check_media_file
from vsal.runtime.prompt import DecodingOptions, check_prompt
from vsal.runtime.serving.triton_repo import ORCHESTRATOR

# The orchestrator's marks at the start of an error's message (it imports them from here)
ERROR_PREFIX = "vsal-error: "  # a user mistake: one line naming the client's file
STOPPED_PREFIX = "vsal-stopped: "  # a request that ended early: cancelled, or the server is stopping
MIB = 1024 * 1024


class ServerError(VsalError, ValueError):
    """What the server said was wrong with the request (bad media, empty prompt, bad options)."""


class ConnectionFailed(VsalError):
    """The server cannot be reached, or failed in a way that is not the request's fault."""


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise ConnectionFailed("the client needs tritonclient: pip install 'vsal[serve]'") from None
    return grpcclient


def _server_exception() -> type[Exception]:
    """What tritonclient raises for a server that fails or cannot be reached (gRPC errors included)."""
    _grpc()
    from tritonclient.utils import InferenceServerException

    return InferenceServerException


class Client:
    """Talks to the `vsal` model of a Triton server at host:port (gRPC)."""

    def __init__(
        self, url: str = "127.0.0.1:8001", model: str = ORCHESTRATOR, timeout_s: float | None = None
    ):
        self.url = check_url(url)
        self.model = model
        self.timeout_s = timeout_s  # per request; None: no limit
        self._upload_limit_mib: int | None = None

    def upload_limit_mib(self) -> int | None:
        """The server's limit on each media file (its model config), None when it sets none."""
        if self._upload_limit_mib is None:
            client = _grpc().InferenceServerClient(self.url)
            try:
                config = client.get_model_config(self.model, as_json=True)["config"]
            except _server_exception() as exc:
                raise _error(self.url, exc) from None
            finally:
                client.close()
            value = config.get("parameters", {}).get("max_upload_mib", {}).get("string_value")
            self._upload_limit_mib = int(value) if value else 0
        return self._upload_limit_mib or None

    def _inputs(self, prompt: str, video, audio, options: DecodingOptions | None) -> list:
        grpcclient = _grpc()
        if video is None and audio is None:
            raise ServerError("give a video file, an audio file or both")
        values: dict[str, bytes] = {"PROMPT": check_prompt(prompt).encode("utf-8")}  # as in-process
        for kind, path in (("VIDEO", video), ("AUDIO", audio)):
            if path is not None:
                path = check_media_file(path)  # missing, a directory, empty: the same error as in-process
                limit = self.upload_limit_mib()
                size = path.stat().st_size
                if limit is not None and size > limit * MIB:
                    raise LimitError(upload_limit_message(path, size, limit))
                values[kind] = path.read_bytes()
                values[f"{kind}_NAME"] = str(path).encode("utf-8")
        if options is not None:
            fields = {k: v for k, v in asdict(options).items() if k != "eos_token_id"}
            values["OPTIONS"] = json.dumps(fields).encode("utf-8")
        inputs = []
        for name, data in values.items():
            tensor = grpcclient.InferInput(name, [len(data)], "UINT8")  # UTF-8 text or file bytes
            tensor.set_data_from_numpy(np.frombuffer(data, dtype=np.uint8))
            inputs.append(tensor)
        return inputs

    def _responses(self, prompt, video, audio, options) -> Iterator[tuple[str, object]]:
        """("text", piece) as they come, then ("result", dict)."""
        grpcclient = _grpc()
        inputs = self._inputs(prompt, video, audio, options)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("TEXT", "RESULT")]
        events: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        try:
            client.start_stream(callback=lambda result, error: events.put((result, error)))
            try:
                client.async_stream_infer(
                    self.model, inputs, outputs=outputs, enable_empty_final_response=True
                )
            except _server_exception() as exc:  # the stream failed before the request went out
                try:
                    _, error = events.get(timeout=5)  # its reason, when the callback has it
                except queue.Empty:
                    error = exc
                raise _error(self.url, error) from None
            while True:
                try:
                    result, error = events.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise ConnectionFailed(f"{self.url}: no answer within {self.timeout_s} s") from None
                if error is not None:
                    raise _error(self.url, error)
                text = result.as_numpy("TEXT")
                if text is not None:
                    yield "text", text.tobytes().decode("utf-8")
                answer = result.as_numpy("RESULT")
                if answer is not None:
                    yield "result", json.loads(answer.tobytes())
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        finally:
            try:
                client.stop_stream(cancel_requests=True)  # left early: the server stops the request
            finally:
                client.close()

    def stream(
        self, prompt: str, video=None, audio=None, options: DecodingOptions | None = None
    ) -> Iterator[str]:
        """Text pieces as they come (one beam); with beam search, the answer in one piece at the end."""
        streamed = False
        with closing(self._responses(prompt, video, audio, options)) as responses:  # left early: cancelled
            for kind, value in responses:
                if kind == "text":
                    streamed = True
                    yield value
                elif not streamed and value["answer"]:
                    yield value["answer"]

    def ask(self, prompt: str, video=None, audio=None, options: DecodingOptions | None = None, on_text=None):
        """The whole answer (a pipeline.Answer); `on_text(piece)` is called as text arrives."""
        from vsal.runtime.pipeline import Answer

        result = None
        for kind, value in self._responses(prompt, video, audio, options):
            if kind == "text" and on_text is not None:
                on_text(value)
            elif kind == "result":
                result = value
        if result is None:
            raise ConnectionFailed(f"{self.url}: the stream ended without an answer")
        timings = {k: float(v) for k, v in result["timings"].items()}
        return Answer(result["answer"], result["token_ids"], result["av_tokens"], timings, result["backends"])

    def ready(self) -> bool:
        client = _grpc().InferenceServerClient(self.url)
        try:
            return bool(client.is_server_ready() and client.is_model_ready(self.model))
        except _server_exception():  # not listening (yet), or not serving the model
            return False
        finally:
            client.close()


def check_url(url: str) -> str:
    """url when it is HOST:PORT with a port from 1 to 65535 (an IPv6 host in brackets), else a
    ConfigError: gRPC would log its own complaint, or wrap the port modulo 65536."""
    host, _, port = url.rpartition(":") if isinstance(url, str) else ("", "", "")
    number = int(port) if port.isascii() and port.isdigit() else 0
    if not host.strip("[]").strip() or not PORTS[0] <= number <= PORTS[1]:
        raise ConfigError(
            f"--server {url!r}: expected HOST:PORT with a port from 1 to 65535, as 127.0.0.1:8001"
        )
    return url


def upload_limit_message(name, size: int, limit_mib: int) -> str:
    """The one line for a media file over the upload limit (the server says the same)."""
    return (
        f"{name}: {size / MIB:.1f} MiB is over the server's upload limit of {limit_mib} MiB "
        "(vsal serve --max-upload-mib): send a shorter or smaller file, or raise the limit"
    )


def _error(url: str, error) -> VsalError:
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    message = message or str(error)
    if ERROR_PREFIX in message:
        return ServerError(message.split(ERROR_PREFIX, 1)[1])
    if STOPPED_PREFIX in message:  # the server is stopping (a client that left hears nothing)
        return ConnectionFailed(f"{url}: {message.split(STOPPED_PREFIX, 1)[1].splitlines()[0]}")
    if any(word in message.lower() for word in ("unavailable", "connect", "resolving")):
        return ConnectionFailed(f"{url}: cannot reach the server ({message.splitlines()[0]})")
    return ConnectionFailed(f"{url}: the server failed ({message.splitlines()[0]})")
