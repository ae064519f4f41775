"""The model package: self-describing, validated, written all or nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from vsal.export import presets
from vsal.export.onnx_export import ExportError
from vsal.export.package import ExportSource, TokenizerFiles, export_package
from vsal.runtime.manifest import load_manifest, verify_files
from vsal.runtime.preprocess import Preprocessing


def test_package_is_complete_and_self_describing(tiny_package, tiny_model, tiny_config):
    manifest = load_manifest(tiny_package)
    assert manifest.random_weights and manifest.preset == "tiny"
    assert set(manifest.graphs) == {
        "vision_encoder",
        "frame_qformer",
        "whisper_encoder",
        "beats_encoder",
        "mrc_qformer",
        "llm_decoder",
    }
    assert verify_files(manifest, tiny_package) == []
    assert manifest.special_tokens == {"bos": 1, "eos": 2, "pad": 0, "instruction_bos": 30522}
    assert manifest.prompt["before"] == "USER: <Img>" and "{prompt}" in manifest.prompt["after"]
    assert manifest.decoding["num_beams"] == 5 and manifest.decoding["repetition_penalty"] == 1.5
    mrc = manifest.graphs["mrc_qformer"]
    assert mrc.axis_multiples == {"S": 10} and mrc.profile["S"] == {"min": 10, "opt": 60, "max": 120}
    assert [t.shape for t in mrc.outputs] == [["B", "3*S", tiny_config.llm.hidden_size]]
    table = np.load(tiny_package / manifest.embeddings.file)
    np.testing.assert_array_equal(table, tiny_model.llm.model.get_input_embeddings().weight.detach().numpy())
    validation = json.loads((tiny_package / "validation.json").read_text())
    for name, report in validation.items():
        assert len(report["cases"]) >= 2, name
        assert all(e < 1e-4 for c in report["cases"] for e in c["max_abs_error"].values()), name
    assert not list(tiny_package.parent.glob("*.partial-*"))


def test_manifest_carries_the_kv_layout_and_the_preprocessing(tiny_package, tiny_config):
    """Written from the config at export; the decoder's past/present and the encoders' media inputs
    are those the layout and the preprocessing give."""
    manifest = load_manifest(tiny_package)
    layout = manifest.kv_layout()
    assert manifest.kv_cache == tiny_config.llm.kv_layout().to_dict()
    assert manifest.kv_cache["past"] == "past_key_values.{layer}.{kind}" and layout.layers == 2
    decoder = manifest.graphs["llm_decoder"]
    assert [t.name for t in decoder.inputs[3:]] == layout.past_names()
    assert [t.name for t in decoder.outputs[1:]] == layout.present_names()
    pre = manifest.preprocessing_constants()
    assert pre == Preprocessing() and manifest.preprocessing == pre.to_dict()  # tiny keeps the media sizes
    assert manifest.graphs["vision_encoder"].inputs[0].shape[2:] == [pre.image_size] * 2
    assert manifest.graphs["whisper_encoder"].inputs[0].shape[1:] == [
        pre.whisper_n_mels,
        pre.whisper_n_frames,
    ]
    assert manifest.graphs["beats_encoder"].inputs[0].shape[2] == pre.beats_n_mels


def test_a_changed_file_is_detected(tiny_package, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_package, copy)
    with open(copy / "graphs" / "mrc_qformer.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    assert any("sha256 differs" in p for p in verify_files(load_manifest(copy), copy))


def test_existing_output_is_not_replaced_without_overwrite(tiny_package, tokenizer_assets, tmp_path):
    tokenizers = TokenizerFiles(tokenizer_assets.llama_dir, tokenizer_assets.bert_vocab)
    with pytest.raises(ExportError, match="use --overwrite"):
        export_package(ExportSource(presets.get("tiny"), True), tiny_package, tokenizers, progress=False)
    (tmp_path / "notes").mkdir()
    with pytest.raises(ExportError, match="not a vsal package"):
        export_package(
            ExportSource(presets.get("tiny"), True), tmp_path / "notes", tokenizers, progress=False
        )


def test_a_failing_export_leaves_nothing(tokenizer_assets, tmp_path, monkeypatch):
    import vsal.export.package as package

    def broken(*args, **kwargs):
        raise ExportError("simulated failure")

    monkeypatch.setattr(package, "export_graph", broken)
    tokenizers = TokenizerFiles(tokenizer_assets.llama_dir, tokenizer_assets.bert_vocab)
    with pytest.raises(ExportError, match="simulated"):
        export_package(ExportSource(presets.get("tiny"), True), tmp_path / "out", tokenizers, progress=False)
    assert list(tmp_path.iterdir()) == []
