"""Torch-free preprocessing against the torch/transformers code the release runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vsal.runtime.features import beats_fbank
from vsal.runtime.preprocess import (
    Preprocessing,
    audio_inputs,
    beats_input,
    bicubic_matrix,
    bicubic_taps,
    frames_to_pixels,
    pad_audio,
    preprocess_frame,
    whisper_log_mel,
    whisper_mel_filters,
)

SR = 16000


def torch_bicubic(image: np.ndarray, size: int = 224) -> np.ndarray:
    """[C, H, W] float32 -> [C, size, size] with the release's F.interpolate call."""
    x = torch.from_numpy(image)[None]
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[0].numpy()


# --- frames --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width",
    [(1080, 1920), (90, 160), (240, 320), (224, 224), (3, 500), (1, 1)],
    ids=["down-1080p", "up-160x90", "320x240", "same", "thin", "single-pixel"],
)
def test_bicubic_matrices_match_torch(height, width):
    image = np.random.default_rng(height * width).random((3, height, width), dtype=np.float32)
    expected = torch_bicubic(image)
    got = bicubic_matrix(height, 224) @ image @ bicubic_matrix(width, 224).T
    assert got.shape == (3, 224, 224)
    assert np.abs(got - expected).max() <= 1e-5


def test_bicubic_taps_are_torch_kernel():
    taps, weights = bicubic_taps(90, 224)
    assert taps.shape == weights.shape == (224, 4)
    assert taps.min() == 0 and taps.max() == 89  # clamped at both edges
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)  # cubic convolution keeps constants
    # Same size: src = dst exactly, so each output copies its pixel.
    np.testing.assert_array_equal(bicubic_matrix(7, 7), np.eye(7, dtype=np.float32))
    # Downscaling takes 4 taps, no antialias filter: a 1-pixel-wide line between taps vanishes.
    taps, _ = bicubic_taps(1080, 224)
    missed = np.setdiff1d(np.arange(1080), taps)
    assert len(missed) > 0 and not bicubic_matrix(1080, 224)[:, missed].any()


@pytest.mark.parametrize("height, width", [(1080, 1920), (90, 160), (240, 320), (37, 53)])
def test_preprocess_frame_matches_reference(height, width):
    from vsal.export.reference import preprocess_frame as reference_frame

    frame = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    got = preprocess_frame(frame)
    expected = reference_frame(frame).numpy()
    assert got.shape == (3, 224, 224) and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.abs(got - expected).max() <= 1e-5


def test_preprocess_frame_keeps_bicubic_overshoot():
    # A hard black/white edge rings below 0 and above 1 before normalisation, as in the release.
    frame = np.zeros((90, 160, 3), dtype=np.uint8)
    frame[:, 80:] = 255
    x = torch.from_numpy(frame).permute(2, 0, 1).float()[None] / 255
    resized = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)[0]
    assert resized.min() < 0 and resized.max() > 1
    from vsal.export.reference import preprocess_frame as reference_frame

    np.testing.assert_allclose(preprocess_frame(frame), reference_frame(frame).numpy(), atol=1e-5)


def test_preprocess_frame_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        preprocess_frame(np.zeros((10, 10), dtype=np.uint8))


def test_frames_to_pixels_reads_a_frame_stream():
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (120, 200, 3), dtype=np.uint8) for _ in range(3)]
    pixels = frames_to_pixels((frame for frame in frames), size=64)
    assert pixels.shape == (3, 3, 64, 64) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[1], preprocess_frame(frames[1], size=64))
    assert frames_to_pixels(iter(()), size=64).shape == (0, 3, 64, 64)


# --- audio ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper_extractor():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor(feature_size=80)


def reference_log_mel(extractor, wave: np.ndarray) -> np.ndarray:
    out = extractor(wave, sampling_rate=SR, return_tensors="np", max_length=30 * SR)
    return out["input_features"][0]


def test_mel_filters_match_transformers():
    from transformers.audio_utils import mel_filter_bank

    expected = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=80,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SR,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(whisper_mel_filters(80), expected.T, rtol=1e-12, atol=1e-15)


def _clips() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(10 * SR) / SR
    return {
        "random-30s": rng.uniform(-1, 1, 30 * SR),
        "silence": np.zeros(30 * SR),
        "clip-3s": rng.normal(0, 0.1, 3 * SR),
        "clip-40s-truncated": rng.normal(0, 0.1, 40 * SR),
        "tone-10s": 0.5 * np.sin(2 * np.pi * 440 * t),
        "odd-length": rng.normal(0, 0.3, 12345),
    }


@pytest.mark.parametrize("name", list(_clips()))
def test_whisper_log_mel_matches_transformers(whisper_extractor, name):
    wave = _clips()[name].astype(np.float32)
    got = whisper_log_mel(wave)
    expected = reference_log_mel(whisper_extractor, wave)
    assert got.shape == expected.shape == (80, 3000) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4


def test_whisper_log_mel_truncates_to_30s():
    rng = np.random.default_rng(1)
    wave = rng.normal(0, 0.1, 40 * SR).astype(np.float32)
    np.testing.assert_array_equal(whisper_log_mel(wave), whisper_log_mel(wave[: 30 * SR]))
    assert np.all(whisper_log_mel(np.zeros(SR, np.float32)) == -1.5)  # log10(1e-10) = -10 -> (-10 + 4) / 4
    with pytest.raises(ValueError, match="mono"):
        whisper_log_mel(np.zeros((2, SR), np.float32))


def test_pad_audio():
    short = np.ones(SR, dtype=np.float64)
    padded = pad_audio(short)
    assert padded.shape == (3 * SR,) and padded.dtype == np.float32
    assert np.all(padded[:SR] == 1) and not padded[SR:].any()
    long = np.ones(5 * SR, dtype=np.float32)
    assert pad_audio(long).shape == (5 * SR,)
    assert pad_audio(np.zeros(0, np.float32), min_seconds=1.0, sample_rate=8000).shape == (8000,)


def test_beats_input_truncates_but_does_not_pad():
    rng = np.random.default_rng(2)
    long = rng.uniform(-0.5, 0.5, 40 * SR).astype(np.float32)
    fbank = beats_input(long)
    assert fbank.shape == (2998, 128)
    np.testing.assert_array_equal(fbank, beats_fbank(long[: 30 * SR]))
    assert beats_input(long[:SR]).shape == (1 + (SR - 400) // 160, 128)


def test_audio_inputs_pad_to_3s_first(whisper_extractor):
    wave = np.random.default_rng(4).normal(0, 0.2, SR).astype(np.float32)
    log_mel, fbank = audio_inputs(wave)
    padded = np.pad(wave, (0, 2 * SR))
    assert np.abs(log_mel - reference_log_mel(whisper_extractor, padded)).max() <= 1e-4
    assert fbank.shape == (1 + (3 * SR - 400) // 160, 128)
    np.testing.assert_array_equal(fbank, beats_fbank(padded))


def test_preprocessing_follows_the_package_constants():
    """The manifest's sizes and statistics reach the arrays; the released ones are the defaults."""
    frame = np.random.default_rng(5).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    released = Preprocessing()
    np.testing.assert_array_equal(released.frame(frame), preprocess_frame(frame))
    small = Preprocessing(image_size=64, clip_mean=(0.5, 0.5, 0.5), clip_std=(0.25, 0.25, 0.25))
    pixels = small.frame(frame)
    resized = torch_bicubic(frame.transpose(2, 0, 1).astype(np.float32) / 255, 64)
    np.testing.assert_allclose(pixels, (resized - 0.5) / 0.25, atol=1e-4)
    wave = np.random.default_rng(6).normal(0, 0.2, SR).astype(np.float32)
    for got, want in zip(released.audio(wave), audio_inputs(wave), strict=True):
        np.testing.assert_array_equal(got, want)
    short = Preprocessing(
        whisper_n_mels=40,
        whisper_n_frames=1000,
        beats_n_mels=64,
        min_audio_seconds=1.0,
        max_audio_seconds=10.0,
    )
    log_mel, fbank = short.audio(wave[: SR // 2])
    assert log_mel.shape == (40, 1000) and fbank.shape == (1 + (SR - 400) // 160, 64)  # padded to 1 s
    with pytest.raises(ValueError, match="image_size is 0"):
        Preprocessing(image_size=0)
    # a hostile package's sizes stay bounded: no window past what the media decodes, no huge STFT
    with pytest.raises(ValueError, match="max_audio_seconds is 3600"):
        Preprocessing(max_audio_seconds=3600.0, whisper_n_frames=360000)
    with pytest.raises(ValueError, match=r"whisper_n_frames x max\(whisper_n_fft, whisper_n_mels\)"):
        Preprocessing(whisper_n_fft=8192)


def test_runtime_module_does_not_import_torch():
    code = (
        "import sys, vsal.runtime.preprocess; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
