"""Audio features, torch-free: the Kaldi fbank BEATs reads.

The release computes it with torchaudio.compliance.kaldi.fbank on waveform * 2**15 (128 mel bins,
25 ms frames, 10 ms shift, povey window, pre-emphasis 0.97, DC removal, no dither, snip_edges,
power spectrum, log floored at float32 eps) and normalises with BEATs' AudioSet statistics.
Written out in numpy because kaldi-native-fbank refuses 128 bins over a 512-point FFT (its
narrowest low-frequency filters catch no FFT bin), which torchaudio, and so the release, accepts.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

BEATS_FBANK_MEAN = 15.41663  # BEATs' AudioSet fbank statistics
BEATS_FBANK_STD = 6.55582
FRAME_LENGTH = 400  # samples: 25 ms at 16 kHz
FRAME_SHIFT = 160  # samples: 10 ms at 16 kHz
N_FFT = 512  # frame length rounded up to a power of two
LOW_FREQ = 20.0  # Hz, Kaldi's default lower mel edge
PREEMPHASIS = 0.97
_EPS = np.finfo(np.float32).eps


def _mel(freq: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + freq / 700.0)


@lru_cache(maxsize=4)
def kaldi_mel_banks(n_mels: int, sample_rate: int) -> np.ndarray:
    """Kaldi's triangular mel filters in the mel domain, [n_mels, N_FFT // 2 + 1] float32."""
    nyquist = sample_rate / 2
    mel_low, mel_high = _mel(np.float64(LOW_FREQ)), _mel(np.float64(nyquist))
    delta = (mel_high - mel_low) / (n_mels + 1)
    left = mel_low + delta * np.arange(n_mels)[:, None]
    center, right = left + delta, left + 2 * delta
    bins = _mel(sample_rate / N_FFT * np.arange(N_FFT // 2))[None, :]
    up = (bins - left) / (center - left)
    down = (right - bins) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1))).astype(np.float32)  # the Nyquist bin gets no weight


@lru_cache(maxsize=1)
def _povey_window() -> np.ndarray:
    n = np.arange(FRAME_LENGTH)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / (FRAME_LENGTH - 1))  # symmetric Hann
    return (hann**0.85).astype(np.float32)


def kaldi_fbank(waveform: np.ndarray, sample_rate: int = 16000, n_mels: int = 128) -> np.ndarray:
    """Kaldi log-mel fbank of `waveform` (already in 16-bit sample units), float32 [frames, n_mels]."""
    if sample_rate != 16000:
        raise ValueError(f"the fbank frame sizes assume 16 kHz audio, got {sample_rate} Hz")
    x = np.asarray(waveform, dtype=np.float32)
    if x.shape[0] < FRAME_LENGTH:
        return np.zeros((0, n_mels), dtype=np.float32)
    count = 1 + (x.shape[0] - FRAME_LENGTH) // FRAME_SHIFT
    frames = np.lib.stride_tricks.sliding_window_view(x, FRAME_LENGTH)[::FRAME_SHIFT][:count]
    frames = frames - frames.mean(axis=1, keepdims=True)
    # Pre-emphasis; the first sample is its own predecessor (Kaldi replicates it).
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - PREEMPHASIS * previous) * _povey_window()
    power = np.abs(np.fft.rfft(frames, n=N_FFT, axis=1)).astype(np.float32) ** 2
    mel = power @ kaldi_mel_banks(n_mels, sample_rate).T
    return np.log(np.maximum(mel, _EPS)).astype(np.float32)


def beats_fbank(waveform: np.ndarray, sample_rate: int = 16000, n_mels: int = 128) -> np.ndarray:
    """waveform float32 [samples] in [-1, 1] -> BEATs' normalised fbank float32 [frames, n_mels]."""
    fbank = kaldi_fbank(np.asarray(waveform, dtype=np.float32) * 2**15, sample_rate, n_mels)
    return (fbank - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
