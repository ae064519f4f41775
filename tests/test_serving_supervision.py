"""A supervised `vsal serve`: its Triton and stubs die with it (also on SIGKILL), stale shared memory
of its own is removed at start, uploads and max_new_tokens are bounded, a client that leaves
cancels its generation, SIGTERM stops it with a request in flight, and the log holds no traceback.

Three servers are started (each costs seconds): one shared by the request tests and stopped with
SIGTERM at the end; one with `--decoder orchestrator` (the decoder runs in the orchestrator through
ONNX Runtime's IO binding, the path that once grew to 21.9 GB) for the request limits, a cancel and
a SIGTERM; one killed with SIGKILL. Processes are found through /proc. The orchestrator's error path
(user mistake, bug, cancelled), stop()'s deadline and the DLPack capsules are tested without one."""

from __future__ import annotations

import ctypes
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc")
from vsal.runtime.prompt import DecodingOptions  # noqa: E402
from vsal.runtime.serving.serve import SHM_PREFIX, remove_shm, remove_stale_shm, shm_prefix  # noqa: E402

UPLOAD_MIB = 1
NEW_TOKENS_LIMIT = 512
# The orchestrator-decoder server's cap: above 512, a request can pass it and still not fit the
# context (the tiny decoder's T max 1024 + 512), so the context check is reached through the server.
WIDE_NEW_TOKENS_LIMIT = 1024
CLI = [sys.executable, "-c", "from vsal.runtime.cli import main; main()"]
SHM = Path("/dev/shm")
# Generation that runs to the limit (eos blocked by min_length): minutes of work left to cancel.
LONG = DecodingOptions(num_beams=1, max_new_tokens=NEW_TOKENS_LIMIT, min_length=4096)
BEAMS = DecodingOptions(num_beams=5, max_new_tokens=NEW_TOKENS_LIMIT, min_length=4096)


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, pgrp, ...); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def running(pids) -> list[int]:
    return [p for p in pids if (stat := proc_stat(p)) is not None and stat[0] != "Z"]


def group_of_children(pid: int) -> int:
    """The process group of pid's child (Triton, in a group of its own with its stubs)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and int(stat[1]) == pid:
            return int(stat[2])
    raise AssertionError(f"process {pid} has no child")


def members(group: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))):
            if stat[0] != "Z" and int(stat[2]) == group:
                found.append(int(entry.name))
    return found


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def dead_pid() -> int:
    """A pid that ran and has ended (not reused this soon)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def start_serve(package: Path, tmp: Path, *args: str) -> dict:
    """`vsal serve` in a child process on a free port (temporary files under tmp), once ready."""
    from vsal.runtime.serving.client import Client
    from vsal.runtime.serving.serve import ServeError, find_triton, free_port, libpython_dir

    try:
        find_triton()
        libpython_dir()
    except ServeError as exc:
        pytest.skip(f"no Triton server can run here: {exc}")
    port = free_port()
    log = tmp / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*CLI, "serve", str(package), "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | {"TMPDIR": str(tmp)},
        )
    client = Client(f"127.0.0.1:{port}", timeout_s=120)
    if (
        not wait_until(lambda: client.ready() or process.poll() is not None, 120)
        or process.poll() is not None
    ):
        process.kill()
        pytest.fail(f"vsal serve did not start: {log.read_text()[-2000:]}")
    return {"process": process, "client": client, "port": port, "log": log, "tmp": tmp}


def triton_log(server) -> str:
    (log,) = server["tmp"].glob("vsal-serve-*/tritonserver.log")
    return log.read_text(errors="replace")


@pytest.fixture(scope="module")
def stale(tmp_path_factory):
    """Shared-memory regions planted before the server starts: ours of a server that ended, ours of
    a live process, and one of another program."""
    if not SHM.is_dir():
        pytest.skip("no /dev/shm here")
    names = {
        "dead": f"{SHM_PREFIX}{dead_pid()}_test-region",
        "live": f"{SHM_PREFIX}{os.getpid()}_test-region",
        "other": f"triton_python_backend_shm_region_vsal-test-{os.getpid()}",
    }
    for name in names.values():
        (SHM / name).write_bytes(b"\0" * 4096)
    yield names
    for name in names.values():
        (SHM / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server(stale, tiny_package, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("supervised")
    limits = ["--max-upload-mib", str(UPLOAD_MIB), "--max-new-tokens-limit", str(NEW_TOKENS_LIMIT)]
    served = start_serve(tiny_package, tmp, *limits)
    yield served
    if served["process"].poll() is None:
        served["process"].kill()
        served["process"].wait()


@pytest.fixture(scope="module")
def orchestrator_server(server, tiny_package, tmp_path_factory):
    """`vsal serve --decoder orchestrator`, started after `server` (which finds the stale regions)."""
    tmp = tmp_path_factory.mktemp("supervised-orchestrator")
    limits = ["--max-upload-mib", str(UPLOAD_MIB), "--max-new-tokens-limit", str(WIDE_NEW_TOKENS_LIMIT)]
    served = start_serve(tiny_package, tmp, "--decoder", "orchestrator", *limits)
    yield served
    if served["process"].poll() is None:
        served["process"].kill()
        served["process"].wait()


@pytest.fixture(params=["bls", "orchestrator"])
def served(request):
    """Each server in turn: the decoder as its own model (bls) or in the orchestrator."""
    return request.getfixturevalue({"bls": "server", "orchestrator": "orchestrator_server"}[request.param])


@pytest.fixture(scope="module")
def local(tiny_package):
    """The in-process runtime, whose messages the server's must equal."""
    from vsal.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_package, provider="cpu", verbose=False, verify=False)


def test_remove_stale_shm_takes_only_our_regions_of_ended_servers(tmp_path):
    ended, alive = dead_pid(), os.getpid()
    names = [f"{SHM_PREFIX}{ended}_a", f"{SHM_PREFIX}{alive}_b", "triton_python_backend_shm_region_c"]
    names += [f"{SHM_PREFIX}x_d", f"other_{SHM_PREFIX}{ended}_e"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_shm(tmp_path) == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    assert remove_stale_shm(tmp_path / "missing") == []


def test_a_stopped_server_removes_only_its_own_regions(tmp_path):
    """What a stub killed before releasing its regions leaves, its server removes at stop."""
    mine, other = shm_prefix(port=8001), shm_prefix(port=8002)
    names = [f"{mine}a", f"{mine}b", f"{other}c", f"{shm_prefix()}80010_d"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(remove_shm(mine, tmp_path)) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_stale_shm_of_ours_is_removed_at_start(server, stale):
    assert not (SHM / stale["dead"]).exists()
    assert (SHM / stale["live"]).exists() and (SHM / stale["other"]).exists()
    assert re.search(
        r"removed \d+ shared-memory regions of servers that no longer run", server["log"].read_text()
    )
    regions = [p.name for p in SHM.glob(f"{SHM_PREFIX}{server['process'].pid}_*")]
    assert regions, "the server's own regions carry its pid"


def test_streamed_answer_leaves_no_traceback_in_the_log(server, clip_10s):
    pieces = list(
        server["client"].stream("What happens?", video=clip_10s, options=DecodingOptions(num_beams=1))
    )
    assert "".join(pieces)
    log = triton_log(server)
    assert "Traceback" not in log and "PyCapsule" not in log


def test_upload_over_the_limit_is_refused_in_one_line(server, tmp_path):
    from vsal.runtime.serving.client import Client, ServerError

    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(UPLOAD_MIB * 1024 * 1024 + 1))
    done = subprocess.run(
        [*CLI, "run", "--server", f"127.0.0.1:{server['port']}", "--video", str(big), "--prompt", "What?"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith(f"vsal: error: {big}: 1.0 MiB is over the server's upload limit of 1 MiB")
    assert "--max-upload-mib" in done.stderr
    careless = Client(f"127.0.0.1:{server['port']}", timeout_s=60)
    careless.upload_limit_mib = lambda: None  # a client that does not look: the server refuses too
    with pytest.raises(ServerError, match=f"^{big}: 1.0 MiB is over the server's upload limit of 1 MiB"):
        careless.ask("What?", video=big)


def test_max_new_tokens_over_the_limit_is_refused_in_one_line(server, clip_10s):
    ask = [*CLI, "run", "--server", f"127.0.0.1:{server['port']}", "--video", str(clip_10s)]
    done = subprocess.run(
        [*ask, "--prompt", "What?", "--max-new-tokens", str(NEW_TOKENS_LIMIT + 1)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
    over = NEW_TOKENS_LIMIT + 1
    assert done.stderr.startswith(f"vsal: error: max_new_tokens {over} is over this server's limit of 512")


def raw_ask(server, values: dict[str, bytes]):
    """Ask with the request's tensors as given: a client that checks nothing."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from vsal.runtime.serving.client import Client

    inputs = []
    for name, data in values.items():
        tensor = grpcclient.InferInput(name, [len(data)], "UINT8")
        tensor.set_data_from_numpy(np.frombuffer(data, dtype=np.uint8))
        inputs.append(tensor)
    client = Client(f"127.0.0.1:{server['port']}", timeout_s=60)
    client._inputs = lambda *args: inputs
    return client.ask("unused", video="unused")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"PROMPT": b"\xffWhat?"}, "^the prompt is not valid UTF-8 text \\(byte 0xff at byte 0\\)"),
        ({"PROMPT": b"a" * (2 << 20)}, "^PROMPT is 2.0 MiB; the server takes at most 1 MiB of it$"),
        ({"OPTIONS": b"[" * 100_000 + b"]" * 100_000}, "^OPTIONS is not JSON \\(maximum recursion depth"),
        ({"OPTIONS": b'{"eos_token_id": 5}'}, "^OPTIONS: eos_token_id comes from the package's manifest"),
        ({"OPTIONS": b'{"num_beams": 64}'}, "^num_beams 64 is more than the decoder takes"),
        ({"VIDEO": b"junk" * 100, "VIDEO_NAME": b"../x/\0my clip.mp4"}, "^../x/\\?my clip.mp4: not a media"),
    ],
    ids=["utf8", "prompt-size", "nested-json", "eos", "beams", "name"],
)
def test_the_server_checks_what_a_client_does_not(served, clip_10s, values, message):
    from vsal.runtime.serving.client import ServerError

    request = {"PROMPT": b"What?", "VIDEO": clip_10s.read_bytes(), "OPTIONS": b'{"num_beams": 1}'} | values
    with pytest.raises(ServerError, match=message) as caught:
        raw_ask(served, request)
    assert "\n" not in str(caught.value)


def in_process_refusal(local, prompt: str, options: DecodingOptions, video) -> str:
    from vsal.runtime.errors import LimitError

    with pytest.raises(LimitError) as caught:
        local.check_request(prompt, options, video=video)
    return str(caught.value)


def test_a_prompt_past_t_max_is_refused_as_in_process(served, local, clip_10s):
    from vsal.runtime.serving.client import ServerError

    prompt, options = "a " * 3000, DecodingOptions(num_beams=1, max_new_tokens=8)  # 12 KB, 3000 tokens
    expected = in_process_refusal(local, prompt, options, clip_10s)
    assert "the decoder reads at most 1024 at once (llm_decoder profile T max)" in expected
    with pytest.raises(ServerError) as caught:
        served["client"].ask(prompt, video=clip_10s, options=options)
    assert str(caught.value) == expected


def test_a_request_past_the_context_is_refused_through_the_orchestrator(orchestrator_server, local, clip_10s):
    """Within the server's cap (1024) and T max, yet past the context: input + new tokens > 1536."""
    from vsal.runtime.serving.client import ServerError

    client, prompt = orchestrator_server["client"], "a " * 700  # 896 tokens with the clip
    options = DecodingOptions(num_beams=1, max_new_tokens=1000)
    expected = in_process_refusal(local, prompt, options, clip_10s)
    assert "does not fit: the decoder's context holds 1536 tokens" in expected
    with pytest.raises(ServerError) as caught:
        client.ask(prompt, video=clip_10s, options=options)
    assert str(caught.value) == expected
    huge = DecodingOptions(num_beams=1, max_new_tokens=10**9)
    with pytest.raises(ServerError, match=f"^max_new_tokens {10**9} is over this server's limit of 1024 "):
        client.ask("What?", video=clip_10s, options=huge)


def cancelled_steps(server, count: int) -> list[int]:
    """Decoder steps of the requests cancelled so far, from the log, once there are `count`."""

    def steps():
        lines = [ln for ln in triton_log(server).splitlines() if "cancelled by its client after" in ln]
        return [int(ln.split("after ")[1].split()[0]) for ln in lines]

    assert wait_until(lambda: len(steps()) >= count), triton_log(server)[-3000:]
    return steps()


def test_a_client_that_leaves_cancels_its_generation(server, clip_10s):
    stream = server["client"].stream("What happens?", video=clip_10s, options=LONG)
    next(stream)
    stream.close()  # leaving the stream (Ctrl-C does the same): the request is cancelled
    (steps,) = cancelled_steps(server, 1)
    assert steps < NEW_TOKENS_LIMIT
    script = (
        "import sys\nfrom vsal.runtime.serving.client import Client\n"
        "from vsal.runtime.prompt import DecodingOptions\n"
        f"s = Client('127.0.0.1:{server['port']}').stream('What?', video={str(clip_10s)!r}, "
        f"options=DecodingOptions(num_beams=1, max_new_tokens={NEW_TOKENS_LIMIT}, min_length=4096))\n"
        "next(s); print('streaming', flush=True); sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "streaming"
    child.kill()  # a client killed with SIGKILL: its connection closes
    child.wait()
    assert cancelled_steps(server, 2)[1] < NEW_TOKENS_LIMIT


def test_a_client_that_leaves_cancels_the_orchestrators_own_decoding(orchestrator_server, clip_10s):
    """The decoder in the orchestrator (no BLS call between steps) checks its request itself."""
    stream = orchestrator_server["client"].stream("What happens?", video=clip_10s, options=LONG)
    next(stream)
    stream.close()
    (steps,) = cancelled_steps(orchestrator_server, 1)
    assert steps < NEW_TOKENS_LIMIT


def test_sigterm_stops_the_server_with_a_request_in_flight(server, clip_10s):
    import tritonclient.grpc as grpcclient
    from vsal.runtime.serving.client import ConnectionFailed

    process = server["process"]
    group = group_of_children(process.pid)
    outcome = {}

    def ask():
        try:
            outcome["answer"] = server["client"].ask("What happens?", video=clip_10s, options=BEAMS)
        except ConnectionFailed as exc:
            outcome["error"] = str(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    stats = grpcclient.InferenceServerClient(f"127.0.0.1:{server['port']}")

    def decoding():
        model = stats.get_inference_statistics("llm_decoder", as_json=True)["model_stats"][0]
        return int(model.get("execution_count", 0)) > 0

    assert wait_until(decoding, 60)
    stats.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    asking.join(30)
    assert "answer" not in outcome and "the server is stopping" in outcome["error"]
    assert members(group) == [] and port_free(server["port"])
    assert "stopping the server" in server["log"].read_text()
    assert not list(server["tmp"].glob("vsal-serve-*"))  # its temporary repository is removed


def test_sigterm_ends_the_orchestrators_own_decoding_in_flight(orchestrator_server, clip_10s):
    """The decoder in the orchestrator (no BLS call between steps) checks the stop file itself."""
    from vsal.runtime.serving.client import ConnectionFailed

    process = orchestrator_server["process"]
    group = group_of_children(process.pid)
    stream = orchestrator_server["client"].stream("What happens?", video=clip_10s, options=LONG)
    next(stream)  # decoding
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    with pytest.raises(ConnectionFailed, match="the request was stopped after .* the server is stopping"):
        for _ in stream:
            pass
    assert members(group) == [] and port_free(orchestrator_server["port"])


def test_sigkill_of_vsal_serve_leaves_no_triton_or_stub_and_frees_the_port(tiny_package, tmp_path):
    served = start_serve(tiny_package, tmp_path)
    process = served["process"]
    group = group_of_children(process.pid)
    triton = members(group)
    assert len(triton) > 2  # Triton and its Python backend stubs, in one group
    process.kill()
    process.wait()
    assert wait_until(lambda: not running(triton)), [proc_stat(p) for p in running(triton)]
    assert members(group) == []
    assert wait_until(lambda: port_free(served["port"]))


# --- the orchestrator's error path, without a server ---------------------------------------------


class FakeTensor:
    def __init__(self, data: bytes):
        import numpy as np

        self.array = np.frombuffer(data, dtype=np.uint8).copy()

    def shape(self):
        return list(self.array.shape)

    def as_numpy(self):
        return self.array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


@pytest.fixture
def orchestrator(monkeypatch, tmp_path):
    """The orchestrator model with a stand-in for the Python backend's module (what the backend's
    stub provides: requests, responses, errors, its logger) and a pipeline that fails on demand."""
    import threading
    import types

    logged = []
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    pb.get_output_tensor_by_name = lambda response, name: None
    pb.InferenceResponse = lambda output_tensors=(), error=None: {"error": error}
    pb.Tensor = types.SimpleNamespace(from_dlpack=lambda name, capsule: name)

    class TritonError:
        CANCELLED = "CANCELLED"

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    pb.TritonError = TritonError
    pb.Logger = types.SimpleNamespace(
        log_info=lambda m: logged.append(("info", m)), log_error=lambda m: logged.append(("error", m))
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "vsal.runtime.serving.triton_models.orchestrator", raising=False)
    monkeypatch.delitem(sys.modules, "vsal.runtime.serving.triton_models.dlpack", raising=False)
    orchestrator = importlib.import_module("vsal.runtime.serving.triton_models.orchestrator")  # anew, over pb

    model = orchestrator.TritonPythonModel()
    model.max_upload_mib, model.max_new_tokens = UPLOAD_MIB, NEW_TOKENS_LIMIT
    model.workdir, model.counter, model.lock = str(tmp_path), 0, threading.Lock()

    def serve(failure, **inputs):
        class Pipeline:
            def ask(self, *args, **kwargs):
                raise failure

        model.pipeline = Pipeline()
        sent = []
        sender = types.SimpleNamespace(send=lambda response, flags=0: sent.append((response, flags)))
        request = {"PROMPT": FakeTensor(b"What?"), "OPTIONS": FakeTensor(b'{"num_beams": 1}')}
        model._serve(request | {k: FakeTensor(v) for k, v in inputs.items()}, sender)
        ((response, flags),) = sent  # one response, the final one
        assert flags == 1
        return response["error"]

    yield types.SimpleNamespace(serve=serve, logged=logged, module=orchestrator)
    for name in ("orchestrator", "dlpack"):  # bound to the stand-in: not for later imports
        sys.modules.pop(f"vsal.runtime.serving.triton_models.{name}", None)


def test_orchestrator_user_mistakes_are_one_line_and_bugs_are_logged_once(orchestrator, tmp_path):
    from vsal.runtime.errors import MediaError

    error = orchestrator.serve(MediaError("VIDEO: not a media file\nsecond line"), VIDEO=b"x")
    assert error.message == "vsal-error: VIDEO: not a media file" and orchestrator.logged == []
    error = orchestrator.serve(ValueError("a bug, not the user's"), VIDEO=b"x")
    assert error.message == "internal error in the vsal model (see the server log): ValueError"
    ((level, text),) = orchestrator.logged
    assert level == "error" and text.count("Traceback") == 1 and "a bug, not the user's" in text
    orchestrator.logged.clear()
    error = orchestrator.serve(orchestrator.module.Stopped("cancelled by its client after 3 decoder steps"))
    assert error.code == "CANCELLED"
    assert orchestrator.logged == [("info", "vsal: request 3 cancelled by its client after 3 decoder steps")]
    assert list(tmp_path.iterdir()) == []  # each request's uploads are removed


# --- stopping: a member that SIGKILL cannot end --------------------------------------------------


@pytest.fixture
def short_waits(monkeypatch):
    from vsal.runtime.serving import serve

    monkeypatch.setattr(serve, "STUB_EXIT_S", 0.0)
    monkeypatch.setattr(serve, "KILLED_EXIT_S", 0.2)
    return serve


def test_end_group_kills_what_outlives_the_grace_period(short_waits):
    member = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert short_waits._end_group(member.pid) == []
        assert member.wait(5) == -signal.SIGKILL
    finally:
        member.kill()


def test_stop_returns_and_names_a_member_that_sigkill_does_not_end(
    short_waits, monkeypatch, tmp_path, capsys
):
    """A process in uninterruptible sleep ignores SIGKILL: stop() still returns, and says so."""
    stuck = dead_pid()  # stands for it: reported as a member however often it is killed
    members_of = short_waits._group_members
    monkeypatch.setattr(short_waits, "_group_members", lambda group: [*members_of(group), stuck])
    server = short_waits.Server(tmp_path / "package", quiet=True)
    server.workdir = tmp_path / "work"
    server.workdir.mkdir()
    server.process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    triton = server.process
    server.stop()
    assert triton.poll() is not None and server.process is None and not (tmp_path / "work").exists()
    notice = capsys.readouterr().err.strip()
    assert notice == (
        f"vsal: processes {stuck} of the Triton server did not end 0 s after SIGKILL "
        "(stuck in the kernel): left running"
    )


# --- DLPack transfers: a consumed capsule renamed, any other left to numpy ----------------------


class DLManagedTensor(ctypes.Structure):
    """DLPack's DLManagedTensor (dlpack.h): what a consumer frees through its deleter."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("code", ctypes.c_uint8),
        ("bits", ctypes.c_uint8),
        ("lanes", ctypes.c_uint16),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("byte_offset", ctypes.c_uint64),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.CFUNCTYPE(None, ctypes.c_void_p)),
    ]


def _capsule_api(name, *argtypes, restype):
    function = getattr(ctypes.pythonapi, name)
    function.argtypes, function.restype = list(argtypes), restype
    return function


_get_pointer = _capsule_api(
    "PyCapsule_GetPointer", ctypes.py_object, ctypes.c_char_p, restype=ctypes.c_void_p
)
_set_name = _capsule_api("PyCapsule_SetName", ctypes.py_object, ctypes.c_char_p, restype=ctypes.c_int)
_get_name = _capsule_api("PyCapsule_GetName", ctypes.py_object, restype=ctypes.c_char_p)
_TRITON_USED = b"used_dlpack"  # kept alive: a renamed capsule points at these bytes


@pytest.fixture
def dlpack(monkeypatch):
    """runtime/serving/triton_models/dlpack.py over a stand-in Tensor.from_dlpack that consumes the capsule
    as the Python backend does (renamed "used_dlpack", the data freed with the tensor) or copies it
    (the capsule left as it is); records the capsules' names after from_numpy and unraisable errors."""
    import types

    seen = types.SimpleNamespace(consume=True, capsules=[], tensors=[], unraisable=[])

    def from_dlpack(name, capsule):
        seen.capsules.append(capsule)
        if not seen.consume:
            return name
        managed = DLManagedTensor.from_address(_get_pointer(capsule, b"dltensor"))
        _set_name(capsule, _TRITON_USED)
        seen.tensors.append(lambda: managed.deleter(ctypes.addressof(managed)))  # frees the data
        return name

    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = types.SimpleNamespace(from_dlpack=from_dlpack)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "vsal.runtime.serving.triton_models.dlpack", raising=False)
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.unraisable.append(info))
    module = importlib.import_module("vsal.runtime.serving.triton_models.dlpack")  # anew, over the stand-in
    yield types.SimpleNamespace(module=module, seen=seen)
    sys.modules.pop("vsal.runtime.serving.triton_models.dlpack", None)  # bound to the stand-in


@pytest.mark.parametrize("consume", [True, False], ids=["consumed", "copied"])
def test_dlpack_capsules_free_their_array_whoever_owns_it(dlpack, consume):
    import gc
    import weakref

    import numpy as np

    dlpack.seen.consume = consume
    array = np.arange(1000, dtype=np.float32)
    alive = weakref.ref(array)
    dlpack.module.from_numpy("X", array)
    (capsule,) = dlpack.seen.capsules
    assert _get_name(capsule) == (b"used_dltensor" if consume else b"dltensor")
    del array, capsule
    dlpack.seen.capsules.clear()
    gc.collect()
    assert (alive() is not None) == consume  # a consumed array lives as long as its tensor
    for release in dlpack.seen.tensors:
        release()
    gc.collect()
    assert alive() is None and dlpack.seen.unraisable == []


# --- what `vsal serve` and the client refuse before a server starts ------------------------------


@pytest.mark.parametrize("port", [0, -1, 65536, 99999999999, "8001"])
def test_server_refuses_a_port_number_no_server_can_listen_on(tiny_package, port):
    from vsal.runtime.serving.serve import ServeError, Server

    with pytest.raises(ServeError, match=r"^--port .*: expected a port number from 1 to 65535$"):
        Server(tiny_package, port=port, quiet=True).start()


def test_server_refuses_a_port_another_program_listens_on(tiny_package):
    from vsal.runtime.serving.serve import ServeError, Server

    with socket.socket() as other:  # on every address, as a system daemon listens
        other.bind(("0.0.0.0", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(
            ServeError, match=rf"^127\.0\.0\.1:{port}: the port is taken; choose another --port$"
        ):
            Server(tiny_package, port=port, quiet=True).start()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "65536"], "'--port': 65536 is not in the range 1<=x<=65535"),
        (["--port", "0"], "'--port': 0 is not in the range 1<=x<=65535"),
        (["--max-queue-delay-us", "-5"], "'--max-queue-delay-us': -5 is not in the range 0<=x<=10000000"),
    ],
)
def test_serve_refuses_out_of_range_options_before_starting(tiny_package, args, message):
    from click.testing import CliRunner
    from vsal.runtime.cli import cli

    result = CliRunner().invoke(cli, ["serve", str(tiny_package), *args])
    assert result.exit_code == 2 and message in result.output
    assert "starting" not in result.output


def test_remove_stale_workdirs_takes_only_our_folders_of_ended_servers(tmp_path):
    from vsal.runtime.serving.serve import WORKDIR_PREFIX, remove_stale_workdirs, workdir_prefix

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("a file a stale repository links to")
    folders = tmp_path / "tmp"
    folders.mkdir()
    ended = folders / f"{workdir_prefix(dead_pid())}abc"
    (ended / "repo").mkdir(parents=True)
    (ended / "repo" / "link").symlink_to(outside)
    (ended / "tritonserver.log").write_text("log")
    alive = folders / f"{workdir_prefix()}def"
    alive.mkdir()
    old_style = folders / f"{WORKDIR_PREFIX}k2x9q1ab"  # no pid in its name: whose it is is unknown
    old_style.mkdir()
    a_file = folders / f"{workdir_prefix(dead_pid())}file"
    a_file.write_text("not a folder")
    a_link = folders / f"{workdir_prefix(dead_pid())}link"
    a_link.symlink_to(outside)
    assert remove_stale_workdirs(folders) == [ended.name]
    assert sorted(p.name for p in folders.iterdir()) == sorted(
        p.name for p in (alive, old_style, a_file, a_link)
    )
    assert (outside / "keep.txt").exists()  # links are removed, never followed
    assert remove_stale_workdirs(tmp_path / "missing") == []


def test_a_workdir_whose_lock_is_held_is_kept_though_its_pid_looks_dead(tmp_path):
    """A server in another pid namespace sharing /tmp: its pid is not in our /proc, its lock is held."""
    from vsal.runtime.serving.serve import _hold_alive_lock, remove_stale_workdirs, workdir_prefix

    elsewhere = tmp_path / f"{workdir_prefix(dead_pid())}abc"
    elsewhere.mkdir()
    lock = _hold_alive_lock(elsewhere)
    assert remove_stale_workdirs(tmp_path) == [] and elsewhere.is_dir()
    lock.close()  # that server stopped without cleaning up: now it is stale
    assert remove_stale_workdirs(tmp_path) == [elsewhere.name] and not elsewhere.exists()


def test_start_removes_stale_workdirs_and_names_its_own_with_its_pid(
    tiny_package, tmp_path, monkeypatch, capsys
):
    """A stand-in for tritonserver records its command line and exits: no Triton is needed."""
    import tempfile

    from vsal.runtime.serving.serve import ServeError, Server, TritonInstall, free_port, workdir_prefix

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale, live = tmp_path / f"{workdir_prefix(dead_pid())}abc", tmp_path / f"{workdir_prefix()}def"
    (stale / "tmp").mkdir(parents=True)
    live.mkdir()
    record = tmp_path / "argv.txt"
    stand_in = tmp_path / "tritonserver"
    stand_in.write_text(f'#!/bin/sh\necho "$@" > {record}\nexit 1\n')
    stand_in.chmod(0o755)
    server = Server(tiny_package, port=free_port(), install=TritonInstall(stand_in, "a stand-in"))
    with pytest.raises(ServeError, match="stopped while starting"):
        server.start(timeout=60)
    assert "removed 1 temporary folders of servers that no longer run" in capsys.readouterr().err
    assert not stale.exists() and live.exists()
    (repository,) = re.findall(r"--model-repository=(\S+)", record.read_text())
    workdir = Path(repository).parent
    assert workdir.parent == tmp_path and workdir.name.startswith(workdir_prefix())
    assert not workdir.exists()  # removed at stop


@pytest.mark.parametrize(
    "url", ["", ":8001", " :8001", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:99999", "h:8o01"]
)
def test_client_refuses_a_server_address_that_is_not_host_port(url):
    from vsal.runtime.errors import ConfigError
    from vsal.runtime.serving.client import Client

    with pytest.raises(ConfigError, match=r"^--server .*: expected HOST:PORT with a port from 1 to 65535"):
        Client(url)


@pytest.mark.parametrize("url", ["127.0.0.1:8001", "localhost:1", "[::1]:65535"])
def test_client_takes_host_port(url):
    from vsal.runtime.serving.client import Client

    assert Client(url).url == url


@pytest.mark.parametrize("url", ["", "127.0.0.1:99999"])
def test_run_with_a_bad_server_address_says_one_line(url, tmp_path):
    out = subprocess.run(
        [*CLI, "run", "--server", url, "--audio", str(tmp_path / "a.wav"), "--prompt", "Hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"vsal: error: --server {url!r}: expected HOST:PORT with a port from 1 to 65535, as 127.0.0.1:8001"
    ]
