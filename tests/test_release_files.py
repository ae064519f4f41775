"""The six released files: lazy loading, LoRA merging across files, streaming consolidation."""

from __future__ import annotations

import pytest
import torch
from vsal.export.weights.checkpoints import CheckpointError
from vsal.export.weights.consolidated import (
    convert_release_files,
    load_consolidated,
    read_consolidated_config,
)
from vsal.export.weights.release_files import load_release_files

from tests.release_fixture import LLM, write_release_dir


@pytest.fixture(scope="module")
def lora(tiny_config):
    gen = torch.Generator().manual_seed(3)
    h, r = tiny_config.llm.hidden_size, tiny_config.lora.r
    return {
        f"{LLM}model.layers.{i}.self_attn.{p}": (
            torch.randn(r, h, generator=gen) * 0.1,
            torch.randn(h, r, generator=gen) * 0.1,
        )
        for i in range(tiny_config.llm.num_hidden_layers)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory, tiny_model, lora):
    return write_release_dir(tiny_model, tmp_path_factory.mktemp("release"), lora)


def _expected_state(tiny_model, lora, scale):
    expected = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for base, (a, b) in lora.items():
        key = "llm.model." + base[len(LLM) :] + ".weight"
        expected[key] = expected[key] + (b @ a) * scale
    return expected


def test_load_release_files(release_dir, tiny_model, tiny_config, lora):
    model, report = load_release_files(release_dir, tiny_config)
    assert report.missing == [] and report.unexpected == []
    assert len(report.lora_merged) == len(lora)
    assert any("model.decoder" in k for k in report.ignored)  # Whisper's decoder is not loaded
    expected = _expected_state(tiny_model, lora, tiny_config.lora.scale)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_convert_streams_one_consolidated_file(release_dir, tmp_path, tiny_model, tiny_config, lora):
    out = tmp_path / "tiny.safetensors"
    report = convert_release_files(release_dir, out, tiny_config)
    assert len(report.lora_merged) == len(lora) and report.unexpected == []
    assert read_consolidated_config(out) == tiny_config
    model = load_consolidated(out)
    expected = _expected_state(tiny_model, lora, tiny_config.lora.scale)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert not list(tmp_path.glob(".*partial"))


def test_missing_release_files_are_listed(tmp_path, tiny_config):
    (tmp_path / "eva_vit_g.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="missing instruct_blip_vicuna13b_trimmed.pth") as info:
        load_release_files(tmp_path, tiny_config)
    assert "vicuna-13b-v1.5" in str(info.value) and "eva_vit_g.pth" not in str(info.value).split("missing")[1]


def test_beats_cfg_mismatch_is_named(release_dir, tmp_path, tiny_config):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(release_dir, bad)
    path = bad / "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["cfg"]["encoder_layers"] = 7
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="encoder_layers=7"):
        load_release_files(bad, tiny_config)


def test_pickled_code_is_refused(release_dir, tmp_path, tiny_config):
    import pickle
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(release_dir, bad)
    with open(bad / "eva_vit_g.pth", "wb") as f:
        pickle.dump({"x": CheckpointError("not a tensor")}, f)
    with pytest.raises(CheckpointError, match="pickled code"):
        load_release_files(bad, tiny_config)


def test_shape_mismatch_aborts_before_writing(release_dir, tmp_path, tiny_config):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(release_dir, bad)
    delta = torch.load(bad / "pytorch_model_4_5001.pt", weights_only=True)
    delta["llama_proj.weight"] = torch.zeros(2, 2)
    torch.save(delta, bad / "pytorch_model_4_5001.pt")
    out = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError, match=r"llama_proj.weight: checkpoint shape \(2, 2\)"):
        convert_release_files(bad, out, tiny_config)
    assert not out.exists()
