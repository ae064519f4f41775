"""Serving on Triton: repositories checked against Triton's own ModelConfig schema, and a real server
(the Triton bundled in nvidia-pytriton, Python backend) on loopback answering concurrent clients
exactly as the in-process runtime does, with the encoders' requests batched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from vsal.runtime.manifest import load_manifest  # noqa: E402
from vsal.runtime.prompt import DecodingOptions  # noqa: E402
from vsal.runtime.serving.triton_repo import (  # noqa: E402
    ORCHESTRATOR,
    RepoOptions,
    RepositoryError,
    batch_axis,
    write_repository,
)

GREEDY = DecodingOptions(num_beams=1, max_new_tokens=12)
CLIENTS = 8
TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    """Triton's own schema: an unknown field or a wrong value type fails here as it would in Triton."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def fake_engines(package: Path, folder: Path) -> Path:
    """A copy of the package with an engine cache entry per graph (as backends.tensorrt_engines writes)."""
    shutil.copytree(package, folder)
    manifest = load_manifest(folder)
    (folder / "engines").mkdir()
    for name, info in manifest.graphs.items():
        stem = folder / "engines" / f"{name}.fp32.{info.sha256[:16]}.trt10.13.0.sm90"
        stem.with_suffix(".engine").write_bytes(b"plan")
        key = {"graph": name, "precision": "fp32", "onnx_sha256": info.sha256, "tensorrt": "10.13.0"}
        stem.with_suffix(".json").write_text(json.dumps({"key": key | {"compute_capability": "9.0"}}))
    return folder


def test_decoder_in_the_orchestrator_config(tiny_package, tmp_path):
    repo = write_repository(
        tiny_package, tmp_path / "repo", RepoOptions(flavor="onnxruntime", decoder="orchestrator")
    )
    assert not (repo / "llm_decoder").exists()
    orchestrator = parse_config(repo / ORCHESTRATOR / "config.pbtxt")
    assert json.loads(orchestrator.parameters["local_graphs"].string_value) == ["llm_decoder"]
    assert orchestrator.instance_group[0].kind == orchestrator.instance_group[0].KIND_GPU
    info = load_manifest(tiny_package).graphs["llm_decoder"]
    assert (repo / ORCHESTRATOR / "1" / "package" / info.file).is_file()


@pytest.mark.parametrize("flavor", ["python", "onnxruntime", "tensorrt"])
def test_repository_configs_follow_tritons_schema_and_the_manifest(tiny_package, tmp_path, flavor):
    package = fake_engines(tiny_package, tmp_path / "pkg") if flavor == "tensorrt" else tiny_package
    repo = write_repository(package, tmp_path / "repo", RepoOptions(flavor=flavor, instances=2))
    manifest = load_manifest(tiny_package)
    assert sorted(p.name for p in repo.iterdir()) == sorted([*manifest.graphs, ORCHESTRATOR])
    platform = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx", "python": ""}[flavor]
    for name, info in manifest.graphs.items():
        config = parse_config(repo / name / "config.pbtxt")
        assert config.name == name and config.platform == platform
        assert config.backend == ("python" if flavor == "python" else "")
        axis = batch_axis(info)
        assert config.max_batch_size == (info.profile[axis]["max"] if axis else 0)
        for spec, tensor in zip(info.inputs, config.input, strict=True):
            assert tensor.name == spec.name
            assert model_config_pb2.DataType.Name(tensor.data_type) == TYPES[spec.dtype]
            want = [d if isinstance(d, int) else -1 for d in spec.shape][1 if axis else 0 :]
            assert list(tensor.dims) == want
        assert [t.name for t in config.output] == [t.name for t in info.outputs]
        assert config.HasField("dynamic_batching") == (name.endswith("_encoder") and axis is not None)
        group = config.instance_group[0]
        assert group.count == 2
        assert group.kind == (group.KIND_CPU if flavor == "python" else group.KIND_GPU)
        model_file = config.default_model_filename or info.file
        assert (repo / name / "1" / ("model.py" if flavor == "python" else model_file)).is_file()
    assert (
        manifest.graphs["vision_encoder"].profile["N"]["max"]
        == parse_config(repo / "vision_encoder" / "config.pbtxt").max_batch_size
    )
    assert parse_config(repo / "frame_qformer" / "config.pbtxt").max_batch_size == 0  # one prompt per call
    orchestrator = parse_config(repo / ORCHESTRATOR / "config.pbtxt")
    assert orchestrator.backend == "python" and orchestrator.model_transaction_policy.decoupled
    assert {t.name for t in orchestrator.input if not t.optional} == {"PROMPT"}
    assert json.loads(orchestrator.parameters["graph_models"].string_value) == {g: g for g in manifest.graphs}
    package_copy = repo / ORCHESTRATOR / "1" / "package"
    assert (package_copy / "manifest.json").is_file() and (package_copy / manifest.embeddings.file).is_file()


def test_repository_errors_are_one_line_and_leave_nothing_behind(tiny_package, tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(RepositoryError, match="no fp32 TensorRT engine of graph"):
        write_repository(tiny_package, out, RepoOptions(flavor="tensorrt"))
    assert not out.exists() and not out.with_name("repo.partial").exists()
    with pytest.raises(ValueError, match="not a model package folder"):
        write_repository(tmp_path / "missing", out)
    write_repository(tiny_package, out)
    with pytest.raises(RepositoryError, match="already exists"):
        write_repository(tiny_package, out)
    cli = [sys.executable, "-c", "from vsal.export.cli import main; main()", "triton", str(tiny_package)]
    done = subprocess.run([*cli, "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("vsal-export: error: ") and "already exists" in done.stderr


def test_client_without_a_server_is_one_clear_error(clip_10s):
    from vsal.runtime.serving.client import Client, ConnectionFailed
    from vsal.runtime.serving.serve import free_port

    client = Client(f"127.0.0.1:{free_port()}", timeout_s=30)
    with pytest.raises(ConnectionFailed, match="cannot reach the server"):
        client.ask("What happens?", video=clip_10s, options=GREEDY)
    with pytest.raises(ValueError, match="no such file"):  # checked before anything is sent
        client.ask("What happens?", video=clip_10s.with_name("missing.mp4"), options=GREEDY)


# --- a real server on loopback --------------------------------------------------------------------


def shm_regions() -> set[str]:
    from vsal.runtime.serving.serve import SHM_PREFIX

    shm = Path("/dev/shm")
    return {p.name for p in shm.glob(f"{SHM_PREFIX}*")} if shm.is_dir() else set()


@pytest.fixture(scope="module")
def server(tiny_package, tmp_path_factory):
    """`vsal serve` in a child process (its temporary files under its own TMPDIR), on a free port."""
    from vsal.runtime.serving.client import Client
    from vsal.runtime.serving.serve import ServeError, find_triton, free_port, libpython_dir

    try:
        find_triton()
        libpython_dir()
    except ServeError as exc:
        pytest.skip(f"no Triton server can run here: {exc}")
    tmp = tmp_path_factory.mktemp("serve-tmp")
    shm = shm_regions()
    port = free_port()
    cmd = [sys.executable, "-c", "from vsal.runtime.cli import main; main()", "serve", str(tiny_package)]
    cmd += ["--port", str(port), "--max-queue-delay-us", "300000"]  # batch whatever arrives within 0.3 s
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"TMPDIR": str(tmp)}
        )
    client = Client(f"127.0.0.1:{port}", timeout_s=120)
    deadline = time.monotonic() + 120
    while not client.ready():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"vsal serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"process": process, "client": client, "tmp": tmp, "log": log, "url": client.url, "shm": shm}
    if process.poll() is None:
        process.kill()
        process.wait()


def test_concurrent_clients_get_the_in_process_answers_with_batched_encoders(server, tiny_package, tmp_path):
    import tritonclient.grpc as grpcclient
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.serving.client import Client
    from vsal.runtime.synthetic import write_clip

    clips = [
        write_clip(tmp_path / f"clip{i}.mp4", seconds=10.0 - 0.5 * i, size=(160 + 16 * i, 120))
        for i in range(CLIENTS)
    ]
    pieces: dict[int, list[str]] = {i: [] for i in range(CLIENTS)}

    def ask(i):
        client = Client(server["url"], timeout_s=120)
        return client.ask("What happens?", video=clips[i], options=GREEDY, on_text=pieces[i].append)

    start = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(ask, range(CLIENTS)))
    assert time.monotonic() - start < 120
    pipeline = Pipeline.load(tiny_package, verbose=False)
    for i, (clip, answer) in enumerate(zip(clips, answers, strict=True)):
        local = pipeline.ask("What happens?", video=clip, options=GREEDY)
        assert answer.token_ids == local.token_ids, f"clip {i}"
        assert answer.text == local.text and "".join(pieces[i]) == local.text  # streamed as it came
        assert answer.av_tokens == local.av_tokens
        assert set(answer.backends) == set(local.backends)
        assert all(b.startswith("triton model") for b in answer.backends.values())
    stats = grpcclient.InferenceServerClient(server["url"]).get_inference_statistics(as_json=True)
    by_model = {m["name"]: m for m in stats["model_stats"]}
    requests = int(by_model["whisper_encoder"]["inference_stats"]["success"]["count"])
    executions = int(by_model["whisper_encoder"].get("execution_count", 0))
    assert requests == CLIENTS and executions < requests, (
        f"whisper_encoder not batched: {by_model['whisper_encoder']}"
    )


def test_bad_media_is_one_clear_line_naming_the_clients_file(server, tmp_path):
    from vsal.runtime.errors import PromptError
    from vsal.runtime.serving.client import ServerError

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ServerError, match=f"^{bad}: not a media file FFmpeg can read"):
        server["client"].ask("What happens?", video=bad, options=GREEDY)
    cli = [
        sys.executable,
        "-c",
        "from vsal.runtime.cli import main; main()",
        "run",
        "--server",
        server["url"],
    ]
    done = subprocess.run([*cli, "--video", str(bad), "--prompt", "What?"], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"vsal: error: {bad}: not a media file FFmpeg can read")
    assert done.stderr.strip().count("\n") == 0
    with pytest.raises(PromptError, match="the prompt is empty"):  # the client checks it as in-process
        server["client"].ask("", video=bad, options=GREEDY)


def test_beam_search_through_the_server_equals_in_process(server, tiny_package, clip_10s):
    from vsal.runtime.pipeline import Pipeline

    beams = DecodingOptions(num_beams=3, max_new_tokens=8)
    answer = server["client"].ask("Describe it.", video=clip_10s, options=beams)
    local = Pipeline.load(tiny_package, verbose=False).ask("Describe it.", video=clip_10s, options=beams)
    assert answer.token_ids == local.token_ids and answer.text == local.text


def test_decoder_inside_the_orchestrator_gives_the_same_answer(tiny_package, clip_10s):
    """--decoder orchestrator: the LLM runs in the orchestrator (KV cache kept by ONNX Runtime)."""
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.serving.client import Client
    from vsal.runtime.serving.serve import ServeError, Server, free_port

    options = RepoOptions(flavor="python", link=True, decoder="orchestrator")
    try:
        server = Server(tiny_package, port=free_port(), options=options, quiet=True).start()
    except ServeError as exc:
        if "shared libpython" in str(exc) or "could not download" in str(exc):
            pytest.skip(f"no Triton server can run here: {exc}")
        raise
    try:
        answer = Client(server.url, timeout_s=120).ask("What happens?", video=clip_10s, options=GREEDY)
    finally:
        server.stop()
    local = Pipeline.load(tiny_package, verbose=False).ask("What happens?", video=clip_10s, options=GREEDY)
    assert answer.token_ids == local.token_ids
    assert answer.backends["llm_decoder"].startswith("onnxruntime cpu")
    assert answer.backends["whisper_encoder"].startswith("triton model")


def test_server_stops_cleanly_on_sigint(server):
    process = server["process"]
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    left = [p.name for p in server["tmp"].iterdir() if p.name != ".ses"]  # .ses: ONNX Runtime's own
    assert left == []  # the temporary repository and backend folder are gone
    assert shm_regions() <= server["shm"]  # the Python backend's shared memory is released
    assert "stopping the server" in server["log"].read_text()
    port = server["url"].rsplit(":", 1)[1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):  # no tritonserver left on that port
        try:
            assert f"--grpc-port={port}".encode() not in cmdline.read_bytes()
        except OSError:  # a process that ended meanwhile
            continue
