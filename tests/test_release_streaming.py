"""`vsal-export export --checkpoint-dir`: the released files read as they lie, never consolidated.
The LLM streams from the Vicuna folder with the LoRA merged per tensor, the encoders fill from
their own files, and both give what the consolidated checkpoint gives, bit for bit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.torch import load_file, save_file
from vsal.export import package
from vsal.export.cli import cli
from vsal.export.models.video_salmonn import PARTS, build_part
from vsal.export.package import consolidated_filler, streamed_llm_weights
from vsal.export.streaming import consolidated_weights
from vsal.export.weights.checkpoints import CheckpointError
from vsal.export.weights.consolidated import convert_release_files
from vsal.export.weights.release_files import DELTA_FILE, VICUNA_FOLDER
from vsal.export.weights.release_stream import ReleaseLlmWeights, release_part_filler

from tests.release_fixture import LLM, write_release_dir

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
GRAPHS = "mrc_qformer,llm_decoder"  # one encoder filled from its files, and the streamed decoder


@pytest.fixture(scope="module")
def lora(tiny_config):
    gen = torch.Generator().manual_seed(7)
    h, r = tiny_config.llm.hidden_size, tiny_config.lora.r
    return {
        f"{LLM}model.layers.{i}.self_attn.{p}": (
            torch.randn(r, h, generator=gen) * 0.1,
            torch.randn(h, r, generator=gen) * 0.1,
        )
        for i in range(tiny_config.llm.num_hidden_layers)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }


def _release_dir(tiny_model, lora, folder: Path, vicuna_format: str) -> Path:
    """The fake release with Vicuna in float16, as released: one safetensors file, or two
    pytorch_model-*.bin shards (torch.save, read back with mmap)."""
    write_release_dir(tiny_model, folder, lora)
    vicuna = folder / VICUNA_FOLDER
    tensors = {k: v.half() for k, v in load_file(vicuna / "model.safetensors").items()}
    (vicuna / "model.safetensors").unlink()
    if vicuna_format == "safetensors":
        save_file(tensors, str(vicuna / "model.safetensors"))
    else:
        keys = list(tensors)
        for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), 1):
            torch.save({k: tensors[k] for k in part}, vicuna / f"pytorch_model-0000{i}-of-00002.bin")
    return folder


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def release(request, tmp_path_factory, tiny_model, lora):
    folder = tmp_path_factory.mktemp(f"release-{request.param}")
    return _release_dir(tiny_model, lora, folder / "ckpt", request.param)


@pytest.fixture(scope="module")
def consolidated(release, tiny_config):
    path = release.parent / "consolidated.safetensors"
    convert_release_files(release, path, tiny_config)
    return path


def test_the_streamed_llm_is_the_consolidated_checkpoints_bit_for_bit(release, consolidated, tiny_config):
    streamed, reference = ReleaseLlmWeights(release, tiny_config), consolidated_weights(consolidated)
    assert sorted(streamed.names()) == sorted(reference.names())
    for name in reference.names():
        assert streamed.info(name) == reference.info(name), name
        got, want = streamed.tensor(name), reference.tensor(name)
        assert got.dtype == want.dtype == np.float16, name  # the checkpoint's own dtype, kept
        np.testing.assert_array_equal(got, want, err_msg=name)
    raw = load_file(consolidated)  # the merge happened: q_proj is not Vicuna's any more
    vicuna_q = _vicuna_tensor(release, Q_PROJ)
    assert not torch.equal(raw["llm.model." + Q_PROJ], vicuna_q)


def _vicuna_tensor(release: Path, name: str) -> torch.Tensor:
    for path in sorted((release / VICUNA_FOLDER).iterdir()):
        tensors = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        if name in tensors:
            return tensors[name]
    raise KeyError(name)


def test_every_part_fills_as_from_the_consolidated_checkpoint(release, consolidated, tiny_config):
    fill, reference = release_part_filler(release, tiny_config), consolidated_filler(consolidated)
    for name in PARTS:
        got, want = build_part(tiny_config, name, seed=1), build_part(tiny_config, name, seed=2)
        fill(name, got)
        reference(name, want)
        want_state = want.state_dict()
        for key, value in got.state_dict().items():
            assert torch.equal(value, want_state[key]), f"{name}.{key}"


def test_a_lora_pair_that_does_not_fit_is_named_before_anything_is_read(
    tmp_path, tiny_model, tiny_config, lora
):
    folder = _release_dir(tiny_model, lora, tmp_path / "ckpt", "safetensors")
    delta = torch.load(folder / DELTA_FILE, weights_only=True)
    key = f"{LLM}model.layers.1.self_attn.v_proj.lora_B.default.weight"
    delta[key] = torch.zeros(3, tiny_config.lora.r)
    torch.save(delta, folder / DELTA_FILE)
    with pytest.raises(CheckpointError, match=r"LoRA for llm.model.model.layers.1.self_attn.v_proj.weight"):
        ReleaseLlmWeights(folder, tiny_config)


def test_a_legacy_bin_shard_is_refused_by_name(tmp_path, tiny_model, tiny_config, lora):
    folder = _release_dir(tiny_model, lora, tmp_path / "ckpt", "bin")
    shard = folder / VICUNA_FOLDER / "pytorch_model-00002-of-00002.bin"
    torch.save(torch.load(shard, weights_only=True), shard, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002.bin: a legacy \(pre-zip\)"):
        ReleaseLlmWeights(folder, tiny_config)


# --- the command line: streamed, and nothing written but the package ------------------------------


_written: list[str] | None = None  # paths opened for writing while a test records them


def _record_writes(event: str, args) -> None:
    if _written is None or event != "open":
        return
    path, mode, flags = args
    if isinstance(path, int):
        return  # an open file descriptor: its path was recorded when it was opened
    writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))
    if writing:
        _written.append(os.path.abspath(os.fsdecode(path)))


sys.addaudithook(_record_writes)  # a hook stays for the process: it records only while _written is set


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model, lora, tokenizer_assets):
    """`vsal-export export --checkpoint-dir` at the tiny preset with the streaming threshold
    lowered so the tiny LLM streams as 13B's does; every file opened for writing is recorded."""
    global _written
    root = tmp_path_factory.mktemp("cli")
    folder = _release_dir(tiny_model, lora, root / "ckpt", "safetensors")
    output = root / "pkg"
    writes: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(package, "STREAM_LLM_BYTES", 1)
        _written = writes
        try:
            result = CliRunner().invoke(
                cli,
                [
                    "export",
                    *("--preset", "tiny", "--checkpoint-dir", str(folder), "--output", str(output)),
                    *("--graphs", GRAPHS, "--no-slim"),
                ],
                catch_exceptions=False,
            )
        finally:
            _written = None
    assert result.exit_code == 0, result.output
    return output, folder, writes


def test_the_llm_is_streamed_from_the_release_with_its_lora_merged(
    exported, tiny_model, tiny_config, lora, monkeypatch
):
    output, folder, _ = exported
    assert streamed_llm_weights(tiny_config, release_dir=folder) is None  # tiny: built, as before
    monkeypatch.setattr(package, "STREAM_LLM_BYTES", 1)
    assert isinstance(streamed_llm_weights(tiny_config, release_dir=folder), ReleaseLlmWeights)
    report = json.loads((output / "validation.json").read_text())["llm_decoder"]
    assert report["streamed"] and len(report["cases"]) >= 3
    graph = onnx.load(output / "graphs" / "llm_decoder.onnx").graph
    weights = {t.name: t for t in graph.initializer}
    stored = numpy_helper.to_array(weights[Q_PROJ + ".T"])  # [in, out], as the checkpoint's float16
    a, b = lora[f"{LLM}model.layers.0.self_attn.q_proj"]
    base = tiny_model.state_dict()["llm.model." + Q_PROJ].half()
    merged = (base.float() + (b @ a) * tiny_config.lora.scale).half()
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, merged.numpy().T)


def test_nothing_but_the_package_is_written(exported):
    output, _, writes = exported
    assert writes, "the audit hook saw no writes: it recorded nothing"
    # the package is written to `<output>.partial-<pid>` and renamed
    outside = [p for p in writes if not Path(p).is_relative_to(output.parent) or _not_package(p, output)]
    assert outside == []
    assert not list(output.parent.glob("*.safetensors"))


def _not_package(path: str, output: Path) -> bool:
    top = Path(path).relative_to(output.parent).parts[0]
    return top != output.name and not top.startswith(f"{output.name}.partial-")
