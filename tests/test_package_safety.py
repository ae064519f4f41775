"""Hostile model packages: every file a manifest names stays inside the package, the manifest is
bounded and typed, graphs and embeddings are what the manifest says, writers write only inside their
output. Each case edits a copy of the tiny package; every refusal is one PackageError naming the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from vsal.runtime.errors import PackageError
from vsal.runtime.graphs import KVLayout
from vsal.runtime.manifest import load_manifest, save_manifest, sha256_file, verify_files
from vsal.runtime.package_paths import MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, place_file
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.serving.triton_repo import RepoOptions, RepositoryError, parse_gpus, write_repository

BIN = Path(sys.executable).parent


@pytest.fixture
def pkg(tiny_package, tmp_path):
    """A private copy of the tiny package, to break."""
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package, copy, symlinks=True)
    return copy


def _data(pkg: Path) -> dict:
    return json.loads((pkg / "manifest.json").read_text())


def _save(pkg: Path, data: dict) -> None:
    (pkg / "manifest.json").write_text(json.dumps(data))


def _set(pkg: Path, keys: str, value) -> None:
    """Set a manifest field by dotted path ("graphs.beats_encoder.file")."""
    data = _data(pkg)
    *parents, last = keys.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    _save(pkg, data)


def _refused(pkg: Path, match: str) -> str:
    """load_manifest (so every reader) and Pipeline.load without sha256 both refuse; the message."""
    with pytest.raises(PackageError, match=match) as caught:
        load_manifest(pkg)
    with pytest.raises(PackageError, match=match):
        Pipeline.load(pkg, verbose=False, verify=False)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300, env=env
    )


# --- confinement ------------------------------------------------------------------------------------


def test_absolute_path_is_refused(pkg):
    _set(pkg, "graphs.vision_encoder.file", "/etc/passwd")
    message = _refused(pkg, "absolute path")
    assert "graphs.vision_encoder.file '/etc/passwd'" in message and "manifest.json" in message


@pytest.mark.parametrize(
    ("field", "value", "label"),
    [
        ("external_data", {"../x.data": "0" * 64}, r"graphs.llm_decoder.external_data\['../x.data'\]"),
        ("engines", [{"file": "/etc/passwd"}], r"graphs.llm_decoder.engines\[0\].file"),
        (
            "variants",
            {"fp16": {"precision": "fp16", "file": "../../x.onnx", "sha256": "0" * 64}},
            "graphs.llm_decoder.variants.fp16.file",
        ),
        (
            "variants",
            {
                "int8": {
                    "precision": "int8",
                    "file": "graphs/llm_decoder.onnx",
                    "sha256": "0" * 64,
                    "external_data": {"/etc/shadow": "0" * 64},
                }
            },
            r"graphs.llm_decoder.variants.int8.external_data\['/etc/shadow'\]",
        ),
    ],
)
def test_every_named_file_is_confined(pkg, field, value, label):
    _set(pkg, f"graphs.llm_decoder.{field}", value)
    _refused(pkg, f"manifest.json: {label} .* (is an absolute path|leaves the package folder)")


def test_engine_cache_is_confined(pkg, tmp_path):
    (pkg / "engines").mkdir()
    (pkg / "engines" / "llm_decoder.fp32.x.engine").symlink_to("/etc/passwd")
    _refused(pkg, "llm_decoder.fp32.x.engine: engine cache resolves to /etc/passwd, outside the package")
    shutil.rmtree(pkg / "engines")
    (tmp_path / "cache").mkdir()
    (pkg / "engines").symlink_to(tmp_path / "cache")
    _refused(pkg, "engines: the engine cache must be a folder inside the package")


@pytest.mark.parametrize("name", ["../outside.npy", "tokenizer/../../outside.npy", "../../../../etc/passwd"])
def test_dotdot_is_refused(pkg, name):
    shutil.copy(pkg / "embeddings.npy", pkg.parent / "outside.npy")
    _set(pkg, "embeddings.file", name)
    assert "embeddings.file" in _refused(pkg, r"leaves the package folder \(\.\.\)")


def test_symlink_out_of_the_package_is_refused(pkg, tmp_path):
    # Same bytes, so the sha256 matches: only confinement can refuse it.
    outside = tmp_path / "elsewhere.onnx"
    graph = pkg / "graphs" / "beats_encoder.onnx"
    shutil.move(graph, outside)
    graph.symlink_to(outside)
    _refused(pkg, "graphs.beats_encoder.file resolves to .*elsewhere.onnx, outside the package folder")


def test_symlinked_folder_out_of_the_package_is_refused(pkg, tmp_path):
    shutil.move(pkg / "tokenizer", tmp_path / "tokenizer")
    (pkg / "tokenizer").symlink_to(tmp_path / "tokenizer")
    _refused(pkg, "llm_tokenizer.file resolves to .*tokenizer.model, outside the package folder")


def test_symlink_inside_the_package_is_fine(pkg):
    graph = pkg / "graphs" / "beats_encoder.onnx"
    shutil.move(graph, pkg / "graphs" / "real.onnx")
    graph.symlink_to("real.onnx")
    assert verify_files(load_manifest(pkg), pkg) == []


def test_symlink_to_etc_passwd_is_refused(pkg):
    (pkg / "graphs" / "vision_encoder.onnx").unlink()
    (pkg / "graphs" / "vision_encoder.onnx").symlink_to("/etc/passwd")
    _refused(pkg, "resolves to /etc/passwd, outside the package folder")


@pytest.mark.parametrize("kind", ["fifo", "symlink out"])
def test_hostile_manifest_file_is_refused_before_it_is_read(pkg, kind):
    manifest = pkg / "manifest.json"
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
        _refused(pkg, "manifest.json: manifest.json is a FIFO")
    else:
        manifest.symlink_to("/etc/passwd")
        _refused(pkg, "manifest.json: manifest.json resolves to /etc/passwd, outside the package folder")


def test_fifo_graph_is_refused_without_opening_it(pkg):
    graph = pkg / "graphs" / "vision_encoder.onnx"
    graph.unlink()
    os.mkfifo(graph)  # opening it would block forever
    _refused(pkg, "vision_encoder.onnx: graphs.vision_encoder.file is a FIFO")


def test_directory_and_symlink_loop_are_named(pkg):
    graph = pkg / "graphs" / "vision_encoder.onnx"
    graph.unlink()
    graph.mkdir()
    _refused(pkg, "is a directory; a package's files must be regular files")
    graph.rmdir()
    graph.symlink_to(graph.name)
    _refused(pkg, "vision_encoder.onnx: graphs.vision_encoder.file is a symlink loop")


def test_graph_weights_outside_the_package_are_refused(pkg):
    """The ONNX file names its external weights itself: those locations are confined too."""
    path = pkg / "graphs" / "vision_encoder.onnx"
    model = onnx.load(str(path))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    onnx.save_model(model, path)
    _set(pkg, "graphs.vision_encoder.sha256", sha256_file(path))  # an attacker updates it too
    _refused(
        pkg,
        r"vision_encoder.onnx: its weights location \(for graphs.vision_encoder\) '/etc/passwd' is an abs",
    )


# --- manifest.json bounds and types -----------------------------------------------------------------


def test_deeply_nested_manifest_is_one_error(pkg):
    data, deep = _data(pkg), 0
    (pkg / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)  # past Python's recursion limit
    _refused(pkg, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    for _ in range(MAX_JSON_DEPTH):
        deep = {"a": deep}
    data["config"]["deep"] = deep  # within the decoder's limit, past ours
    _save(pkg, data)
    _refused(pkg, "nested deeper")


def test_oversized_manifest_is_refused_before_parsing(pkg):
    data = _data(pkg)
    data["vsal_version"] = "x" * MAX_MANIFEST_BYTES
    _save(pkg, data)
    _refused(pkg, "manifest.json: larger than 4 MiB")


@pytest.mark.parametrize(
    ("keys", "value", "match"),
    [
        ("graphs.vision_encoder.inputs", "pixel_values", "graphs.vision_encoder.inputs must be a list"),
        ("graphs.vision_encoder.file", 7, "graphs.vision_encoder.file must be a string, got 7"),
        ("graphs.vision_encoder.profile.N.max", "120", r"profile.N.max must be an integer, got \"120\""),
        ("graphs.vision_encoder.inputs.0.shape", ["N", 3.5], r"shape\[1\] must be an integer or a string"),
        ("special_tokens.bos", True, "special_tokens.bos must be an integer, got true"),
        ("embeddings", [], "embeddings must be an object, got list"),
        ("graphs.vision_encoder.variants", {"fp16": {"file": "x"}}, "variants.fp16 lacks precision, sha256"),
        ("graphs.vision_encoder.surprise", 1, r"graphs.vision_encoder has unknown fields \['surprise'\]"),
    ],
)
def test_wrong_types_name_the_field(pkg, keys, value, match):
    if keys.endswith("inputs.0.shape"):
        data = _data(pkg)
        data["graphs"]["vision_encoder"]["inputs"][0]["shape"] = value
        _save(pkg, data)
    else:
        _set(pkg, keys, value)
    assert "manifest.json" in _refused(pkg, match)


def test_graph_names_cannot_be_paths(pkg):
    data = _data(pkg)
    data["graphs"]["../../escape"] = data["graphs"].pop("beats_encoder")
    _save(pkg, data)
    _refused(pkg, r"graphs has a key '../../escape'; graph names are")


@pytest.mark.parametrize(
    ("text", "kind"), [("[1, 2]", "an array"), ("null", "null"), ('"x"', "a string"), ("7", "a number")]
)
def test_manifest_that_is_not_an_object(pkg, text, kind):
    (pkg / "manifest.json").write_text(text)
    _refused(pkg, rf"manifest.json: holds JSON {kind}, expected an object \{{\.\.\.\}}$")


# --- graphs and embeddings are what the manifest says -----------------------------------------------


def test_swapped_graph_is_refused_at_load_naming_the_file(pkg):
    whisper = pkg / "graphs" / "whisper_encoder.onnx"
    shutil.copy(pkg / "graphs" / "beats_encoder.onnx", whisper)
    with pytest.raises(PackageError, match="whisper_encoder.onnx: sha256 differs"):
        load_manifest(pkg)  # a plain swap: the sha256 tells
    _set(pkg, "graphs.whisper_encoder.sha256", sha256_file(whisper))  # a crafted one: the interface tells
    message = _refused(pkg, r"whisper_encoder.onnx: its inputs are \['fbank'\], the manifest declares")
    assert "graphs.whisper_encoder in manifest.json describes another graph" in message


def test_dtype_and_rank_are_checked(pkg):
    data = _data(pkg)
    data["graphs"]["beats_encoder"]["inputs"][0]["dtype"] = "float16"
    _save(pkg, data)
    _refused(pkg, "beats_encoder.onnx: input fbank is float32, the manifest declares float16")
    data["graphs"]["beats_encoder"]["inputs"][0]["dtype"] = "float32"
    data["graphs"]["beats_encoder"]["outputs"][0]["shape"].append(1)
    _save(pkg, data)
    _refused(pkg, "output audio_tokens has rank 3, the manifest declares 4")


def test_swapped_variant_is_refused(pkg):
    variant = pkg / "graphs" / "whisper_encoder.fp16.onnx"
    shutil.copy(pkg / "graphs" / "beats_encoder.onnx", variant)
    _set(
        pkg,
        "graphs.whisper_encoder.variants",
        {
            "fp16": {
                "precision": "fp16",
                "file": "graphs/whisper_encoder.fp16.onnx",
                "sha256": sha256_file(variant),
            }
        },
    )
    _refused(pkg, "whisper_encoder.fp16.onnx: its inputs are .*graphs.whisper_encoder.variants.fp16 in")


def test_garbage_graph_with_matching_sha256_is_refused(pkg):
    graph = pkg / "graphs" / "vision_encoder.onnx"
    graph.write_bytes(b"broken" * 10)  # a field whose length runs past the end
    _set(pkg, "graphs.vision_encoder.sha256", sha256_file(graph))
    _refused(pkg, "vision_encoder.onnx: not an ONNX graph")


class _Payload:
    """Unpickling this creates a marker file: proof that pickled code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_embeddings_never_run(pkg, tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "pickle-ran"
    table = pkg / "embeddings.npy"
    np.save(table, np.array([payload], dtype=object), allow_pickle=True)
    _set(pkg, "embeddings.sha256", sha256_file(table))
    with pytest.raises(PackageError, match="embeddings.npy: not a plain .npy array"):
        Pipeline.load(pkg, verbose=False)
    assert not payload.marker.exists()


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((100, 64), np.float32), r"float32 \[100, 64\], expected float32 \[32000, 64\]"),
        (np.zeros((32000, 64), np.float64), r"float64 \[32000, 64\], expected float32"),
        (np.zeros(32000 * 64, np.float32), r"float32 \[2048000\], expected"),
    ],
)
def test_wrong_embeddings_are_one_error(pkg, array, match):
    table = pkg / "embeddings.npy"
    np.save(table, array)
    _set(pkg, "embeddings.sha256", sha256_file(table))
    with pytest.raises(PackageError, match=f"embeddings.npy: {match}"):
        Pipeline.load(pkg, verbose=False)


# --- the Triton repository writer -------------------------------------------------------------------


def test_writer_refuses_a_package_that_points_outside(pkg, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    _set(pkg, "llm_tokenizer.file", "../../victim.txt")
    with pytest.raises(PackageError, match="leaves the package folder"):
        write_repository(pkg, tmp_path / "out" / "repo")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "out").exists()


def test_writer_replaces_planted_symlinks_never_follows_them(tiny_package, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    out = tmp_path / "repo"
    out.with_name("repo.partial").symlink_to(victim)  # where the writer works
    write_repository(tiny_package, out)
    assert not out.is_symlink() and (out / "vsal" / "config.pbtxt").is_file()
    out2 = tmp_path / "repo2"
    out2.symlink_to(victim)
    write_repository(tiny_package, out2, overwrite=True)  # replaces the link, not the victim's files
    assert not out2.is_symlink() and (out2 / "vsal" / "config.pbtxt").is_file()
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert (victim / "keep.txt").read_text() == "precious"


def test_place_file_writes_only_inside_its_output(tiny_package, tmp_path):
    src, digest = tiny_package / "embeddings.npy", load_manifest(tiny_package).embeddings.sha256
    root, victim = tmp_path / "root", tmp_path / "victim"
    root.mkdir()
    victim.mkdir()
    (victim / "x.npy").write_text("precious")
    (root / "sub").symlink_to(victim)
    with pytest.raises(PackageError, match="would be written outside the output folder"):
        place_file(src, root / "sub" / "x.npy", digest, root)
    with pytest.raises(PackageError, match="would be written outside the output folder"):
        place_file(src, root / "sub" / "new" / "x.npy", digest, root)
    assert not (victim / "new").exists()
    (root / "planted.npy").symlink_to(victim / "x.npy")
    place_file(src, root / "planted.npy", digest, root)
    assert not (root / "planted.npy").is_symlink() and sha256_file(root / "planted.npy") == digest
    assert (victim / "x.npy").read_text() == "precious"
    with pytest.raises(PackageError, match="sha256 differs from the manifest"):
        place_file(src, root / "other.npy", "0" * 64, root)
    assert not (root / "other.npy").exists()


@pytest.mark.parametrize("link", [True, False])
def test_repository_links_point_only_at_package_files(pkg, tmp_path, link):
    """`vsal serve` links (link=True): every link lies in the repository and points at a package file,
    or (the orchestrator's package) at the package folder; the orchestrator can load what it gets."""
    options = RepoOptions(flavor="python", link=link, decoder="orchestrator")
    repo = write_repository(pkg, tmp_path / "repo", options)
    links = [p for p in repo.rglob("*") if p.is_symlink()]
    assert bool(links) == link
    files = {(pkg / name).resolve() for name in load_manifest(pkg).files()}
    for path in links:
        assert path.resolve() in files or path.resolve() == pkg.resolve()
    orchestrator_package = repo / "vsal" / "1" / "package"
    assert orchestrator_package.is_symlink() == link
    Pipeline.load(orchestrator_package, verbose=False, verify=False)  # what the orchestrator does


def test_writer_checks_sha256_of_what_it_copies(pkg, tmp_path):
    (pkg / "tokenizer" / "instruction" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(PackageError, match="vocab.txt: sha256 differs from the manifest"):
        write_repository(pkg, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and not (tmp_path / "repo.partial").exists()


def _fake_fp16_variants(pkg: Path, graphs) -> None:
    """fp16 variants as `vsal-export build` records them (same I/O: keep_io_types), bytes of fp32."""
    data = _data(pkg)
    for name in graphs:
        info = data["graphs"][name]
        file = f"graphs/{name}.fp16.onnx"
        shutil.copy(pkg / info["file"], pkg / file)
        info["variants"] = {"fp16": {"precision": "fp16", "file": file, "sha256": info["sha256"]}}
    _save(pkg, data)


def _triton(pkg, out, precision, *extra):
    return _cli(
        "vsal-export", "triton", str(pkg), "--output", str(out), "--flavor", "onnxruntime",
        "--precision", precision, *extra,
    )  # fmt: skip


def test_triton_fp16_ships_the_fp16_files_and_says_which_lack_them(pkg, tmp_path):
    names = list(_data(pkg)["graphs"])
    _fake_fp16_variants(pkg, names[1:])
    out = tmp_path / "repo"
    done = _triton(pkg, out, "fp16")
    assert done.returncode == 0, done.stderr
    shipped = sorted(p.name for p in out.rglob("*.onnx"))
    assert shipped == sorted([f"{names[0]}.onnx", *(f"{n}.fp16.onnx" for n in names[1:])])
    assert f"vsal: note: {names[0]}: no fp16 variant in the package, ships its fp32 graph" in done.stderr
    assert done.stderr.count("no fp16 variant") == 1
    done = _triton(pkg, out, "int8", "--overwrite")
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert "no graph has its int8 variant; build them first" in done.stderr


# --- the command lines: exit 1 and one line ---------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "check", "triton"])
def test_hostile_package_is_one_line_from_every_cli(pkg, tmp_path, command):
    graph = pkg / "graphs" / "vision_encoder.onnx"
    graph.unlink()
    os.mkfifo(graph)
    args = {
        "run": ("vsal", "run", str(pkg), "--prompt", "hi", "--audio", str(tmp_path / "a.wav")),
        "check": ("vsal-export", "check", str(pkg)),
        "triton": ("vsal-export", "triton", str(pkg), "--output", str(tmp_path / "repo")),
    }[command]
    done = _cli(*args)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].endswith(
        f"{graph}: graphs.vision_encoder.file is a FIFO; a package's files must be regular files"
    )


def test_header_reader_finds_weights_in_subgraphs_and_matches_onnx(tmp_path):
    """The wire-format reader sees what onnx.load sees: inputs less initializers, outputs, and the
    external-data locations of tensors nested in a subgraph's Constant."""
    from onnx import TensorProto, helper
    from vsal.runtime.graph_header import read_graph_header

    hidden = helper.make_tensor("c", TensorProto.FLOAT, [1], [0.0])
    hidden.ClearField("float_data")
    hidden.data_location = TensorProto.EXTERNAL
    entry = hidden.external_data.add()
    entry.key, entry.value = "location", "../../deep.bin"
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=hidden)],
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["z"])],
        "else",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])],
    )
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph), path)
    header = read_graph_header(path)
    assert [(t.name, t.dtype, t.rank) for t in header.inputs] == [("cond", "bool", 0)]
    assert [(t.name, t.dtype, t.rank) for t in header.outputs] == [("out", "float32", 1)]
    assert header.external_locations == {"../../deep.bin"}


# --- folders the writers use, external data through symlinks ------------------------------------------


def _move_graphs(pkg: Path, to: str) -> None:
    """Put the graph files in another folder of the package and say so in the manifest."""
    shutil.move(pkg / "graphs", pkg / to)
    data = _data(pkg)
    for info in data["graphs"].values():
        info["file"] = info["file"].replace("graphs/", f"{to}/", 1)
    _save(pkg, data)


@pytest.mark.parametrize(
    ("folder", "role"), [("graphs", "graph folder"), ("calibration", "calibration folder")]
)
def test_written_folders_must_not_be_symlinks(pkg, tmp_path, folder, role):
    """A build globs, writes and removes files in graphs/ and calibration/: a link there would let it
    delete the victim's files, so the package is refused at load (the build's first step)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "beats_encoder.int8.onnx").write_text("precious")  # named like a leftover variant
    if folder == "graphs":
        _move_graphs(pkg, "g")
    (pkg / folder).symlink_to(victim)
    _refused(pkg, f"{folder}: the {role} must be a folder inside the package, not a symlink")
    (pkg / folder).unlink()
    (pkg / folder).write_text("a file")
    _refused(pkg, f"{folder}: the {role} must be a folder inside the package, not a regular file")
    assert [p.name for p in victim.iterdir()] == ["beats_encoder.int8.onnx"]


def _external_beats(pkg: Path, file: str, location: str) -> None:
    """Make the beats graph (at package path `file`) keep one weight in `location`; update its sha256."""
    path = pkg / file
    model = onnx.load(str(pkg / "graphs" / "beats_encoder.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    onnx.save_model(model, path)
    _set(pkg, "graphs.beats_encoder.file", file)
    _set(pkg, "graphs.beats_encoder.sha256", sha256_file(path))


def test_weights_location_through_a_symlink_then_dotdot_is_refused(pkg, tmp_path):
    """`graphs/sub/root -> ../..`: textually graphs/sub/root/graphs/../../../w.data is graphs/w.data,
    but the kernel resolves the link first and lands two folders above the package."""
    (pkg / "graphs" / "sub").mkdir()
    (pkg / "graphs" / "sub" / "root").symlink_to("../..")
    (tmp_path / "w.data").write_bytes(b"\0" * 64)
    _external_beats(pkg, "graphs/sub/root/graphs/beats_encoder.onnx", "../../../w.data")
    _refused(pkg, r"its weights location \(for graphs.beats_encoder\) '../../../w.data' leaves the package")


def test_weights_location_resolving_outside_is_refused(pkg, tmp_path):
    (tmp_path / "out").mkdir()
    (pkg / "graphs" / "out").symlink_to(tmp_path / "out")
    _external_beats(pkg, "graphs/beats_encoder.onnx", "out/w.data")
    _refused(
        pkg, r"its weights location \(for graphs.beats_encoder\) 'out/w.data' resolves to .*out/w.data, outs"
    )


def test_weights_location_through_an_inner_symlink_is_fine(pkg):
    (pkg / "weights").mkdir()
    (pkg / "graphs" / "w").symlink_to("../weights")
    _external_beats(pkg, "graphs/beats_encoder.onnx", "w/beats.data")
    load_manifest(pkg)  # the file is missing (verify_files says so), but it would lie inside


# --- fields the runtime reads -----------------------------------------------------------------------


def _drop(pkg: Path, keys: str) -> None:
    data = _data(pkg)
    *parents, last = keys.split(".")
    node = data
    for key in parents:
        node = node[key]
    del node[last]
    _save(pkg, data)


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ("special_tokens.bos", "manifest.json: special_tokens lacks bos"),
        ("prompt.after", "manifest.json: prompt lacks after"),
        ("graphs.llm_decoder.profile.T.opt", "manifest.json: graphs.llm_decoder.profile.T lacks opt"),
    ],
)
def test_missing_fields_every_reader_needs(pkg, keys, match):
    _drop(pkg, keys)
    _refused(pkg, match)


@pytest.mark.parametrize(
    ("keys", "value", "match"),
    [
        ("kv_cache.past", "past.{layer}", r"kv_cache: past is 'past.\{layer\}': .* it has \['layer'\]"),
        ("kv_cache.present", "p.{layer}.{kind}.{0}", r"kv_cache: present .* it has \['0', 'kind', 'layer'\]"),
        ("kv_cache.present", "p.{layer!r}.{kind}", r"kv_cache: present .* no other field"),
        ("kv_cache.present", "past_key_values.{layer}.{kind}", "past and present are the same template"),
        ("kv_cache.kinds", ["key", "key"], r"kv_cache: kinds is \['key', 'key'\], not distinct names"),
        ("kv_cache.dtype", "int8", "kv_cache: dtype is 'int8', not one of float32, float16"),
        ("kv_cache.layers", 0, "kv_cache.layers must be a positive integer, got 0"),
        ("kv_cache.layers", 4096, "kv_cache: layers is 4096, not an integer from 1 to 1024"),
        ("kv_cache.layers", 3, "kv_cache.layers is 3, config.llm gives 2"),
        ("kv_cache.head_dim", 8, "kv_cache.head_dim is 8, config.llm gives 16"),
        ("kv_cache.present", "present_{layer}_{kind}", "graphs.llm_decoder.outputs lacks present_0_key"),
        (
            "kv_cache.dtype",
            "float16",
            r"graphs.llm_decoder.inputs: past_key_values.0.key is float32 .*float16",
        ),
        (
            "preprocessing.image_size",
            "224",
            r"preprocessing.image_size must be a positive integer, got \"224\"",
        ),
        ("preprocessing.image_size", 10**6, "preprocessing: image_size is 1000000, not within 1 to 4096"),
        (
            "preprocessing.image_size",
            64,
            r"preprocessing.image_size is 64, graphs.vision_encoder.inputs\[0\]",
        ),
        ("preprocessing.whisper_n_mels", 128, r"preprocessing.whisper_n_mels is 128, .*has 80 on axis 1"),
        ("preprocessing.beats_n_mels", 80, "preprocessing.beats_n_mels is 80"),
        (
            "preprocessing.sample_rate",
            8000,
            "preprocessing: sample_rate is 8000 Hz; vsal's audio features read",
        ),
        (
            "preprocessing.clip_std",
            [0.2, 0.0, 0.2],
            r"preprocessing: clip_std is \[0.2, 0.0, 0.2\], not 3 values",
        ),
        ("preprocessing.clip_mean", [0.5, 0.5], "preprocessing: clip_mean is .* not 3 values"),
        ("preprocessing.whisper_hop", 320, "preprocessing: whisper_n_frames x whisper_hop is 960000 samples"),
        ("preprocessing.min_audio_seconds", 60, "preprocessing: min_audio_seconds is more than max_audio"),
        ("preprocessing.extra", 1, r"preprocessing has unknown fields \['extra'\]"),
    ],
)
def test_kv_cache_and_preprocessing_are_checked_at_load(pkg, keys, value, match):
    _set(pkg, keys, value)
    _refused(pkg, match)


def test_a_package_written_before_kv_cache_and_preprocessing_derives_them(pkg):
    """Without the keys the layout and the constants come from config, as the runtime did before;
    saving the manifest (a build does) leaves the package as it was written."""
    written = load_manifest(pkg)
    _drop(pkg, "kv_cache")
    _drop(pkg, "preprocessing")
    manifest = load_manifest(pkg)
    assert manifest.kv_layout() == written.kv_layout() == KVLayout.of_llm(manifest.config["llm"])
    assert manifest.preprocessing_constants() == written.preprocessing_constants()
    save_manifest(manifest, pkg)
    assert not {"kv_cache", "preprocessing"} & set(_data(pkg))
    Pipeline.load(pkg, verbose=False, verify=False)


@pytest.mark.parametrize(
    ("after", "shown"),
    [
        ("{x}", "{x}"),
        ("{prompt.__class__}", "{prompt.__class__}"),
        ("{prompt!r} and {prompt:>9}", "{prompt!r}, {prompt:>9}"),
        ("{prompt} {prompt}", "{prompt}, {prompt}"),
        ("no question here", "none"),
    ],
)
def test_prompt_template_holds_only_the_question(pkg, after, shown):
    _set(pkg, "prompt.after", after)
    message = _refused(
        pkg, r"manifest.json: prompt.after must hold \{prompt\} \(where the question goes\) once"
    )
    assert message.endswith(f"it has {shown}")


def test_prompt_template_that_does_not_parse(pkg):
    _set(pkg, "prompt.after", "</Img> {prompt")
    _refused(pkg, r"manifest.json: prompt.after is not a template \(.*\); literal braces are written \{\{")
    _set(pkg, "prompt.after", "{{literal}} {prompt}\nASSISTANT:")
    load_manifest(pkg)


def test_decoding_defaults_are_checked_at_load(pkg):
    _set(pkg, "decoding.num_beams", 0)
    _refused(pkg, "manifest.json: decoding: .*num_beams must be >= 1, got 0")


def _not_runnable(pkg: Path, match: str) -> str:
    """load_manifest reads it (`vsal-export check` reports such things itself), Pipeline.load refuses."""
    load_manifest(pkg)
    with pytest.raises(PackageError, match=match) as caught:
        Pipeline.load(pkg, verbose=False, verify=False)
    message = str(caught.value)
    assert "\n" not in message and "manifest.json" in message
    return message


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ("graphs.llm_decoder.profile.P", "graphs.llm_decoder.profile lacks P"),
        ("graphs.vision_encoder.profile.N", "graphs.vision_encoder.profile lacks N"),
        ("config.mrc_qformer", "config lacks mrc_qformer"),
        ("config.alignment.high_window", "config.alignment lacks high_window"),
        ("config.beats.conv_pos", "config.beats lacks conv_pos"),  # `vsal bench` reads it
    ],
)
def test_missing_fields_the_runtime_reads(pkg, keys, match):
    _drop(pkg, keys)
    _not_runnable(pkg, match)


@pytest.mark.parametrize(
    ("keys", "value", "match"),
    [
        (
            "graphs.llm_decoder.profile.T",
            {"min": 1, "opt": 2048, "max": 1024},
            r"profile.T needs 0 <= min <= opt",
        ),
        ("graphs.llm_decoder.profile.P", {"min": -1, "opt": 0, "max": 8}, r"got -1, 0, 8"),
        ("graphs.mrc_qformer.axis_multiples.S", 0, "axis_multiples.S must be a positive integer, got 0"),
        ("config.alignment.high_window", 0, "config.alignment.high_window must be a positive integer, got 0"),
        ("config.frame_qformer.hidden_size", "32", r"hidden_size must be a positive integer, got \"32\""),
        ("special_tokens.bos", 32000, r"special_tokens.bos is 32000, outside the vocabulary .* 32000"),
        ("special_tokens.eos", -1, "special_tokens.eos is -1, outside the vocabulary"),
    ],
)
def test_values_the_runtime_cannot_use(pkg, keys, value, match):
    _set(pkg, keys, value)
    _not_runnable(pkg, match)


@pytest.mark.parametrize("expr", ["T-1", "T**2", "f(T)", "(T", "T+" * 40 + "T"])
def test_shape_expressions_the_runtime_cannot_evaluate(pkg, expr):
    data = _data(pkg)
    data["graphs"]["llm_decoder"]["inputs"][0]["shape"][1] = expr
    _save(pkg, data)
    _not_runnable(pkg, r"graphs.llm_decoder.inputs\[0\].shape has .*, not a shape expression")


def test_a_package_the_runtime_cannot_run_is_one_line_from_vsal_run(pkg, clip_10s):
    _drop(pkg, "graphs.llm_decoder.profile.B")
    done = _cli("vsal", "run", str(pkg), "--prompt", "hi", "--video", str(clip_10s))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "graphs.llm_decoder.profile lacks B (axes the "
            "graph's tensors or the runtime use): re-export the package"
        )
    )


# --- values no reader may take on trust -------------------------------------------------------------


def _replace_text(pkg: Path, old: str, new: str) -> None:
    """Edit manifest.json as text: for JSON that json.dumps would never write."""
    text = (pkg / "manifest.json").read_text()
    assert old in text
    (pkg / "manifest.json").write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ('"max_frames": 120', '"max_frames": 1' + "0" * 5000, "an integer of 5001 digits; .* at most 64"),
        ('"graphs": {', '"graphs": {}, "graphs": {', "the key 'graphs' appears twice in one object"),
        ('"preset": "tiny"', '"preset": "\\ud800"', r"preset is '\\ud800', not Unicode text"),
        ('"llm": {', '"ll\\udc80m": {}, "llm": {', r"config has a key 'll\\udc80m' that is not Unicode text"),
    ],
)
def test_json_no_reader_could_use_is_one_error(pkg, old, new, match):
    _save(pkg, _data(pkg))  # json.dumps layout: one space after each colon
    _replace_text(pkg, old, new)
    _refused(pkg, f"manifest.json: .*{match}")


def test_prompt_text_with_a_lone_surrogate_or_control_character_is_refused(pkg):
    _save(pkg, _data(pkg))
    _replace_text(pkg, '"before": "USER: <Img>"', '"before": "USER: \\ud800<Img>"')
    _refused(pkg, r"prompt.before is 'USER: \\ud800<Img>', not Unicode text")
    _set(pkg, "prompt.before", "USER: \x1b[2J<Img>")
    _refused(pkg, r"prompt.before holds the control character '\\x1b' \(U\+001B\)")
    _set(pkg, "prompt.before", "USER:\t<Img>\n")  # tabs and newlines are text
    load_manifest(pkg)


@pytest.mark.parametrize("name", ["embeddings.npy/", "graphs//vision_encoder.onnx"])
def test_file_names_with_empty_parts_are_refused(pkg, name):
    field = "embeddings.file" if name.startswith("emb") else "graphs.vision_encoder.file"
    _set(pkg, field, name)
    _refused(pkg, f"{field} '{name}' has an empty part")


def test_embeddings_file_that_is_not_npy_says_so(pkg):
    _set(pkg, "embeddings.file", "manifest.json")
    _refused(pkg, "manifest.json: not a .npy file")


def _npy_with_header(pkg: Path, header: str, data: bytes) -> None:
    header = header + " " * (-(len(header) + 13) % 64) + "\n"
    raw = b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header.encode() + data
    (pkg / "embeddings.npy").write_bytes(raw)


def test_embeddings_header_is_checked_against_the_file_size(pkg):
    table = np.load(pkg / "embeddings.npy")
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (32000, 64), }"
    _npy_with_header(pkg, header + " " * 60000, table.tobytes())  # numpy refuses such headers
    message = _refused(pkg, r"embeddings.npy: not a plain .npy array \(Header info length")
    assert "allow_pickle" not in message
    for data in (table.tobytes()[:4096], table.tobytes() + b"\0" * 100):
        _npy_with_header(pkg, header, data)
        _refused(pkg, r"embeddings.npy: \d+ bytes, its header says float32 \[32000, 64\]")


@pytest.mark.parametrize(
    ("key", "value"), [("vocab_size", 400_000_000), ("vocab_size", 32000 * 10**6), ("hidden_size", 1 << 17)]
)
def test_embedding_sizes_past_any_llm_are_refused_before_any_read(pkg, key, value):
    with open(pkg / "embeddings.npy", "r+b") as f:
        f.truncate(1 << 34)  # sparse: a hash of it would take minutes
    _set(pkg, f"config.llm.{key}", value)
    _refused(pkg, f"config.llm.{key} is {value}, more than any LLM vsal runs")


@pytest.mark.parametrize("dim", [-224, 0, 10**12])
def test_static_dims_must_be_positive_and_bounded(pkg, dim):
    data = _data(pkg)
    data["graphs"]["vision_encoder"]["inputs"][0]["shape"][2] = dim
    _save(pkg, data)
    _refused(pkg, rf"graphs.vision_encoder.inputs\[0\].shape\[2\] is {dim}; a fixed size must be 1 to")


def test_static_dims_are_checked_against_the_graph(pkg):
    data = _data(pkg)
    data["graphs"]["vision_encoder"]["inputs"][0]["shape"][2] = 225
    _save(pkg, data)
    _refused(pkg, "vision_encoder.onnx: input pixel_values has size 224 on axis 2, the manifest declares 225")


@pytest.mark.parametrize(
    ("axis", "bounds", "match"),
    [
        ("B", {"min": 0, "opt": 0, "max": 0}, "B max is 0; a decoder takes 1 to 64 beams"),
        ("B", {"min": 1, "opt": 1, "max": 10**6}, "B max is 1000000; a decoder takes 1 to 64"),
        ("P", {"min": 0, "opt": 512, "max": 10**12}, r"P max \+ 1 is 1000000000001 .* at most 4096"),
        ("T", {"min": 1, "opt": 256, "max": 2000}, r"T max 2000; .* T max at most P max \+ 1"),
    ],
)
def test_decoder_profile_past_the_model_is_the_package_fault(pkg, axis, bounds, match):
    _set(pkg, f"graphs.llm_decoder.profile.{axis}", bounds)
    _not_runnable(pkg, f"graphs.llm_decoder.profile.*{match}")


def test_oversized_tokenizer_files_are_refused_before_reading(pkg):
    for name, size in (("llm/tokenizer.model", 3 << 30), ("instruction/vocab.txt", 17 << 20)):
        keep = pkg / "tokenizer" / (name + ".orig")
        os.replace(pkg / "tokenizer" / name, keep)
        with open(pkg / "tokenizer" / name, "wb") as f:
            f.truncate(size)  # sparse
        with pytest.raises(PackageError, match=f"{name}: {size} bytes, more than a tokenizer file holds"):
            Pipeline.load(pkg, verbose=False, verify=False)
        os.replace(keep, pkg / "tokenizer" / name)


def test_vocab_past_the_qformer_vocabulary_is_refused_naming_vocab_txt(pkg):
    vocab = pkg / "tokenizer" / "instruction" / "vocab.txt"
    vocab.write_text(vocab.read_text() + "".join(f"extra{i}\n" for i in range(10)))
    with pytest.raises(PackageError, match=r"vocab.txt: gives ids up to \d+ .* vocabulary of 30523"):
        Pipeline.load(pkg, verbose=False, verify=False)


# --- where the Triton repository writer may write -------------------------------------------------


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under folder: a file's bytes, a link's target, or "dir" (links never followed)."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            entries[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = path.read_bytes().hex()
    return entries


@pytest.fixture
def user_folder(pkg):
    """The folder holding the package, with a file of the user's beside it."""
    (pkg.parent / "notes.txt").write_text("precious")
    return pkg.parent


_AT_THE_PACKAGE = [  # (output relative to the package's folder, what the refusal says)
    ("pkg", "is the package"),
    ("pkg/repo", "lies inside the package"),
    ("pkg/graphs", "lies inside the package"),
    ("pkg/manifest.json", "lies inside the package"),
    ("pkg/manifest.json/repo", "lies inside the package"),
    ("pkg/graphs/..", "is the package"),
    (".", "contains the package"),
]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(("output", "problem"), _AT_THE_PACKAGE)
def test_writer_never_writes_at_inside_or_above_the_package(user_folder, output, problem, overwrite):
    before = _tree(user_folder)
    with pytest.raises(RepositoryError, match=f": {problem} .*choose another --output"):
        write_repository(user_folder / "pkg", user_folder / output, overwrite=overwrite)
    assert _tree(user_folder) == before


@pytest.mark.parametrize(
    ("target", "output", "problem"),
    [
        ("pkg", "link", "is the package"),  # a symlink at the output, to the package
        (".", "link", "contains the package"),  # ... to the folder above it
        ("pkg", "link/repo", "lies inside the package"),  # a symlinked parent
    ],
)
def test_writer_compares_real_paths_through_symlinks(user_folder, target, output, problem):
    (user_folder / "link").symlink_to(user_folder / target)
    before = _tree(user_folder)
    with pytest.raises(RepositoryError, match=rf"\(resolves to .*\): {problem} "):
        write_repository(user_folder / "pkg", user_folder / output, overwrite=True)
    assert _tree(user_folder) == before
    linked_package = user_folder / "link"  # the package named through a link, the output real
    if target == "pkg":
        with pytest.raises(RepositoryError, match="lies inside the package"):
            write_repository(linked_package, user_folder / "pkg" / "graphs", overwrite=True)
        assert _tree(user_folder) == before


@pytest.mark.parametrize("make", ["folder", "file"])
def test_overwrite_replaces_only_a_repository_written_by_the_writer(user_folder, tmp_path_factory, make):
    out = tmp_path_factory.mktemp("elsewhere") / "thesis"
    if make == "folder":
        out.mkdir()
        (out / "chapter1.txt").write_text("precious")
    else:
        out.write_text("precious")
    before = _tree(out.parent)
    for overwrite in (False, True):
        with pytest.raises(RepositoryError, match="exists and is not a Triton repository written by"):
            write_repository(user_folder / "pkg", out, overwrite=overwrite)
    assert _tree(out.parent) == before
    repo = out.with_name("repo")
    write_repository(user_folder / "pkg", repo)
    (repo / "vsal" / "stale.txt").write_text("old")
    assert write_repository(user_folder / "pkg", repo, overwrite=True) == repo  # a repository: replaced
    assert (repo / "vsal" / "config.pbtxt").is_file() and not (repo / "vsal" / "stale.txt").exists()
    assert sorted(p.name for p in repo.parent.iterdir()) == sorted(["repo", out.name])  # no temporaries


def test_writer_never_touches_a_folder_named_like_its_temporary(pkg, tmp_path_factory):
    """OUTPUT.partial is the user's; the writer's own temporaries are unique, and only those of a dead
    writer are removed."""
    parent = tmp_path_factory.mktemp("out")
    (parent / "repo.partial").mkdir()
    (parent / "repo.partial" / "thesis.txt").write_text("precious")
    dead = parent / ".repo.partial-999999999-00ff"  # a writer that died: no such pid
    alive = parent / f".repo.partial-{os.getppid()}-00ff"  # a writer still running
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "half.pbtxt").write_text("half")
    with pytest.raises(RepositoryError, match="no fp32 TensorRT engine"):
        write_repository(pkg, parent / "repo", RepoOptions(flavor="tensorrt"))
    write_repository(pkg, parent / "repo")
    assert (parent / "repo.partial" / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in parent.iterdir()) == sorted(["repo", "repo.partial", alive.name])
    assert (alive / "half.pbtxt").read_text() == "half"


def test_a_failed_write_leaves_no_folders_it_created(pkg, tmp_path_factory):
    parent = tmp_path_factory.mktemp("out")
    with pytest.raises(RepositoryError, match="no fp32 TensorRT engine"):
        write_repository(pkg, parent / "a" / "b" / "repo", RepoOptions(flavor="tensorrt"))
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (RepoOptions(instances=0), "--instances: expected a count from 1 to 64, got 0"),
        (RepoOptions(instances=65), "--instances: expected a count from 1 to 64, got 65"),
        (RepoOptions(instances=10**8), "--instances: expected a count from 1 to 64, got 100000000"),
        (RepoOptions(orchestrator_instances=65), "--orchestrator-instances: expected a count from 1 to 64"),
        (RepoOptions(orchestrator_threads=0), "orchestrator_threads: expected a count from 1 to 1024"),
        (RepoOptions(gpus=(-1,)), "--gpus: expected distinct GPU ids >= 0, got -1"),
        (RepoOptions(gpus=(0, 0)), "--gpus: expected distinct GPU ids >= 0, got 0,0"),
    ],
)
def test_repository_options_out_of_range(pkg, tmp_path, options, match):
    with pytest.raises(RepositoryError, match=match):
        write_repository(pkg, tmp_path / "repo", options)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("text", ["a,b", "-1", "", "0,,1", "1.5", "\u00b2"])
def test_gpu_ids_must_be_comma_separated_non_negative_integers(text):
    with pytest.raises(RepositoryError, match="expected comma-separated GPU ids such as 0,1"):
        parse_gpus(text)


def test_gpu_ids_parse():
    assert parse_gpus("0, 1,3") == (0, 1, 3)


def _triton_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    command = [str(BIN / "vsal-export"), "triton", *args, "--flavor", "onnxruntime"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.mark.parametrize("output", [".", "./"])
def test_triton_cli_refuses_the_current_folder_in_one_line(user_folder, tmp_path_factory, output):
    before = _tree(user_folder)
    done = _triton_cli(user_folder, "pkg", "--output", output, "--overwrite")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("vsal-export: error: .: contains the package pkg; ")  # "./" is "."
    empty = tmp_path_factory.mktemp("cwd")  # the current folder, not above the package
    done = _triton_cli(empty, str(user_folder / "pkg"), "--output", output, "--overwrite")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("vsal-export: error: .: is the current folder or contains it; ")
    assert _tree(user_folder) == before and list(empty.iterdir()) == []


def test_triton_cli_bad_gpus_and_instances(pkg, tmp_path):
    done = _triton_cli(tmp_path, str(pkg), "--output", "repo", "--gpus", "a,b")
    assert (
        done.returncode == 2 and "Invalid value for '--gpus': expected comma-separated GPU ids" in done.stderr
    )
    done = _triton_cli(tmp_path, str(pkg), "--output", "repo", "--instances", "100000000")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("vsal-export: error: --instances: expected a count from 1 to 64")
    assert not (tmp_path / "repo").exists()


# --- a variant's own interface (the fp16 decoder's float16 KV cache) ----------------------------------


def _kv_variant(pkg: Path, half: list[str] | None = None, declared: dict[str, str] | None = None) -> None:
    """A decoder fp16 variant whose graph has `half` float16 at the boundary (None: the fp32 graph's
    bytes), recorded with its own interface: `declared` dtypes (default: those of `half`)."""
    from vsal.transforms.fp16 import float16_boundary

    data = _data(pkg)
    info = data["graphs"]["llm_decoder"]
    file = "graphs/llm_decoder.fp16.onnx"
    shutil.copy(pkg / info["file"], pkg / file)
    if half:
        float16_boundary(pkg / file, half)
    dtypes = declared if declared is not None else dict.fromkeys(half or [], "float16")
    variant = {"precision": "fp16", "file": file, "sha256": sha256_file(pkg / file)}
    for kind in ("inputs", "outputs"):
        variant[kind] = [{**t, "dtype": dtypes.get(t["name"], t["dtype"])} for t in info[kind]]
    info["variants"] = {"fp16": variant}
    _save(pkg, data)


def _kv_names(pkg: Path) -> tuple[list[str], list[str]]:
    layout = load_manifest(pkg).kv_layout()
    return layout.past_names(), layout.present_names()


def test_a_variant_declaring_float16_kv_over_a_float32_graph_is_refused(pkg):
    past, present = _kv_names(pkg)
    _kv_variant(pkg, None, dict.fromkeys(past + present, "float16"))
    _refused(
        pkg, "llm_decoder.fp16.onnx: input past_key_values.0.key is float32, the manifest declares float16"
    )


def test_a_variant_whose_past_and_present_differ_in_dtype_is_refused(pkg):
    past, _ = _kv_names(pkg)
    _kv_variant(pkg, past)  # the header agrees: float16 past, float32 present
    _refused(
        pkg, r"variants.fp16.outputs: present.0.key is float32 .*kv_cache gives float16.*rebuild the variant"
    )


def test_a_variant_interface_may_change_only_float_types(pkg):
    _kv_variant(pkg, None, {"attention_mask": "float16"})
    _refused(pkg, "attention_mask is float16, the graph's is int64; a variant may only change a float type")
    data = _data(pkg)
    data["graphs"]["llm_decoder"]["variants"]["fp16"]["inputs"][0]["shape"] = ["B", "T", 7]
    _save(pkg, data)
    _refused(pkg, r"variants.fp16.inputs names .* not the graph's .* with their shapes")


def test_a_variant_with_float16_kv_loads_and_its_runner_keeps_it(pkg):
    past, present = _kv_names(pkg)
    _kv_variant(pkg, past + present)
    manifest = load_manifest(pkg)
    assert "inputs" in _data(pkg)["graphs"]["llm_decoder"]["variants"]["fp16"]
    pipeline = Pipeline.load(pkg, verbose=False, precision="fp16", exact_precision=True)
    step = pipeline.decoder_step()
    assert step.layout.dtype == "float16" and manifest.kv_layout().dtype == "float32"
    save_manifest(manifest, pkg)  # written back as read: the variant keeps its own interface
    assert load_manifest(pkg).graphs["llm_decoder"].interface("fp16").kv_layout(step.layout) == step.layout
