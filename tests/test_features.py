"""Kaldi fbank for BEATs: matches Kaldi's own implementation where it accepts the settings."""

from __future__ import annotations

import numpy as np
import pytest
from vsal.runtime.features import BEATS_FBANK_MEAN, BEATS_FBANK_STD, beats_fbank, kaldi_fbank, kaldi_mel_banks


@pytest.mark.parametrize("bins", [23, 80])
def test_matches_kaldi_native_fbank(bins):
    knf = pytest.importorskip("kaldi_native_fbank")
    wave = (np.random.RandomState(0).randn(24000) * 3000).astype(np.float32)
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = bins
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.use_energy = False
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, wave.tolist())
    fb.input_finished()
    expected = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
    got = kaldi_fbank(wave, n_mels=bins)
    assert got.shape == expected.shape == (1 + (24000 - 400) // 160, bins)
    np.testing.assert_allclose(got, expected, atol=5e-4)


def test_beats_fbank_frames_scaling_and_empty_low_filters():
    wave = np.random.RandomState(1).uniform(-0.5, 0.5, 30 * 16000).astype(np.float32)
    fb = beats_fbank(wave)
    assert fb.shape == (2998, 128) and fb.dtype == np.float32  # 30 s -> 187 patches of 16 -> 1496 tokens
    raw = kaldi_fbank(wave * 2**15)
    np.testing.assert_allclose(fb, (raw - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD), rtol=1e-6)
    # 128 bins over a 512-point FFT: the lowest filters catch no FFT bin and floor at log(eps), as torchaudio.
    empty = np.where(kaldi_mel_banks(128, 16000).sum(axis=1) == 0)[0]
    assert len(empty) > 0 and np.allclose(raw[:, empty], np.log(np.finfo(np.float32).eps))
    assert np.isfinite(fb).all()


def test_too_short_audio_gives_no_frames():
    assert beats_fbank(np.zeros(399, dtype=np.float32)).shape == (0, 128)
