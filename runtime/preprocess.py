"""Encoder inputs from decoded media, torch-free: the release's frame and audio preprocessing.

Frames: the release resizes each [0, 1] float frame with torch's
F.interpolate(mode="bicubic", align_corners=False) (no antialias, also when downscaling) and
normalises with CLIP's statistics. Reproduced here with torch's per-axis bicubic weights (4 taps
per output pixel; `bicubic_matrix` gives the same as a dense matrix), exact to float rounding.

cv2.resize(INTER_CUBIC) is close but NOT a substitute (measured on random [0, 1] float32 images
against torch 2.13 CPU): it has the same kernel (A = -0.75), the same half-pixel source positions
and the same replicated edge, so borders agree, but its coordinate rounding differs and the
output is off by up to 1.5e-4 everywhere (1920x1080 -> 224; 1.2e-5 for 160x90 -> 224), ~6e-4
after CLIP normalisation. On uint8 input it is much worse (fixed-point weights, output rounded
and clipped to 0..255, losing the bicubic overshoot): 0.2 off. The taps here agree with torch to
1e-6.

Audio: zero-padded to the release's 3 s minimum; Whisper's log-mel as transformers'
WhisperFeatureExtractor computes it; BEATs' Kaldi fbank over the waveform truncated to 30 s.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from vsal.runtime.features import beats_fbank

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's RGB statistics on [0, 1] pixels
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224  # px, EVA-ViT-g's input
CUBIC_A = -0.75  # PyTorch's (and OpenCV's) cubic convolution coefficient

SAMPLE_RATE = 16000  # Hz
MIN_AUDIO_SECONDS = 3.0  # the release zero-pads shorter audio
MAX_AUDIO_SECONDS = 30.0  # Whisper's window; BEATs' input is truncated to it (not padded)
WHISPER_SAMPLES = int(MAX_AUDIO_SECONDS * SAMPLE_RATE)  # 480000
WHISPER_N_FFT = 400  # samples: 25 ms window
WHISPER_HOP = 160  # samples: 10 ms -> 100 frames per second
WHISPER_N_MELS = 80  # large-v2
WHISPER_FMAX = 8000.0  # Hz
LOG_FLOOR = 1e-10  # mel power floor before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip's maximum


# --- frames ------------------------------------------------------------------------------------


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution weights of the taps at offsets -1, 0, 1, 2 for fractions t: [n, 4]."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


@lru_cache(maxsize=16)
def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Torch's bicubic resize along one axis as 4 taps per output: (indices int64, weights float32) [out, 4].

    As PyTorch's upsample_bicubic2d with align_corners=False: source position
    src = (dst + 0.5) * (in / out) - 0.5, taps at floor(src) - 1 .. floor(src) + 2, tap indices
    clamped to the edge (so the edge pixel is repeated), no antialias filter when downscaling.
    Torch computes src in float32, and its x86 CPU kernel (measured: torch 2.13) rounds it once, as
    a fused multiply-add does: emulated here by rounding the exact float64 value. Rounding twice
    (multiply, then subtract) moves src by 1 ulp (6e-5 at src ~ 1000) and the output by up to 6e-5.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centre = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * centre.astype(np.float64) - 0.5).astype(np.float32)  # exact, then rounded
    base = np.floor(src)
    weights = _cubic_weights((src - base).astype(np.float64)).astype(np.float32)
    taps = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    taps.flags.writeable = weights.flags.writeable = False  # cached: shared by every caller
    return taps, weights


@lru_cache(maxsize=16)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The same resize as a dense [out_size, in_size] float32 matrix: resized = matrix @ x along the axis."""
    taps, weights = bicubic_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    # Clamped taps may land on the same pixel: their weights add up.
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    matrix.flags.writeable = False
    return matrix


@lru_cache(maxsize=1)
def _clip_affine() -> tuple[np.ndarray, np.ndarray]:
    """(gain, offset) [3, 1, 1] with (x / 255 - mean) / std = x * gain + offset for 0..255 pixels."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float64)
    std = np.asarray(CLIP_STD, dtype=np.float64)
    gain = 1.0 / (255.0 * std)
    offset = -mean / std
    return gain.astype(np.float32)[:, None, None], offset.astype(np.float32)[:, None, None]


def preprocess_frame(frame: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, size, size]: bicubic resize as torch, then CLIP normalisation.

    Separable: rows first, then columns, each a 4-tap weighted sum over gathered lines. That is
    bicubic_matrix applied as a matmul without the zeros: a dense [224, 1080] @ [1080, 5760]
    product costs ~3 GFLOP per 1080p frame (~180 ms on 2 cores), the taps ~0.03 GFLOP (~6 ms). Only the
    gathered rows become float32, never the whole frame. The resize is linear, so it runs on
    0..255 values and the /255 folds into the normalisation; values may overshoot the pixel range
    before normalising, as in the release.
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB frame [H, W, 3], got shape {frame.shape}")
    height, width = frame.shape[:2]
    row_taps, row_weights = bicubic_taps(height, size)
    col_taps, col_weights = bicubic_taps(width, size)
    rows = np.zeros((size, width, 3), dtype=np.float32)
    for k in range(4):  # uint8 rows * float32 weights -> float32
        rows += row_weights[:, k, None, None] * frame[row_taps[:, k]]
    # Gathering along the first axis is several times faster than along the second: transpose once.
    columns = np.ascontiguousarray(rows.transpose(1, 0, 2))  # [W, size, 3]
    resized = np.zeros((size, size, 3), dtype=np.float32)  # [x, y, channel]
    for k in range(4):
        resized += col_weights[:, k, None, None] * columns[col_taps[:, k]]
    pixels = np.ascontiguousarray(resized.transpose(2, 1, 0))  # [channel, y, x]
    gain, offset = _clip_affine()
    pixels *= gain
    pixels += offset
    return pixels


def frames_to_pixels(frames: Iterable[np.ndarray], size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 frames [H, W, 3] (any iterable, consumed one at a time) -> float32 [N, 3, size, size]."""
    pixels = [preprocess_frame(frame, size) for frame in frames]
    if not pixels:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return np.stack(pixels)


# --- audio -------------------------------------------------------------------------------------


def pad_audio(
    waveform: np.ndarray, min_seconds: float = MIN_AUDIO_SECONDS, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """float32 [samples] -> float32 [max(samples, min_seconds * sample_rate)], zeros appended."""
    wave = np.asarray(waveform, dtype=np.float32)
    minimum = int(min_seconds * sample_rate)
    if wave.shape[0] < minimum:
        wave = np.pad(wave, (0, minimum - wave.shape[0]))
    return wave


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    logstep = 27.0 / np.log(6.4)
    return np.where(freq >= 1000.0, 15.0 + np.log(np.maximum(freq, 1e-12) / 1000.0) * logstep, freq * 3 / 200)


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(logstep * (mels - 15.0)), mels * 200 / 3)


@lru_cache(maxsize=4)
def whisper_mel_filters(n_mels: int = WHISPER_N_MELS) -> np.ndarray:
    """Slaney-normalised triangular mel filters over 0..8 kHz, float64 [n_mels, WHISPER_N_FFT // 2 + 1].

    transformers' mel_filter_bank(norm="slaney", mel_scale="slaney"), which is librosa's.
    """
    n_bins = WHISPER_N_FFT // 2 + 1
    edges = _mel_to_hz_slaney(np.linspace(0.0, _hz_to_mel_slaney(WHISPER_FMAX), n_mels + 2))  # Hz
    bins = np.linspace(0, SAMPLE_RATE // 2, n_bins)  # Hz
    widths = np.diff(edges)
    rising = (bins[None, :] - edges[:-2, None]) / widths[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    filters = triangles * (2.0 / (edges[2:] - edges[:-2]))[:, None]  # constant energy per filter
    filters.flags.writeable = False  # cached: shared by every caller
    return filters


@lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    n = np.arange(WHISPER_N_FFT)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / WHISPER_N_FFT)  # periodic Hann, as torch.hann_window


def whisper_log_mel(
    waveform: np.ndarray, n_mels: int = WHISPER_N_MELS, n_samples: int = WHISPER_SAMPLES
) -> np.ndarray:
    """float32 [samples] at 16 kHz -> Whisper's log-mel float32 [n_mels, n_samples // 160] (3000 for 30 s).

    As WhisperFeatureExtractor: zero-pad or truncate to n_samples, centred STFT (reflect padding),
    power spectrum, last frame dropped, slaney mel filters, log10 floored at 1e-10, clamped to
    8 below the maximum, then (x + 4) / 4.
    """
    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform [samples], got shape {wave.shape}")
    wave = wave[:n_samples].astype(np.float64)  # float64 spectra: well inside torch's float32 rounding
    wave = np.pad(wave, (0, n_samples - wave.shape[0]))
    wave = np.pad(wave, WHISPER_N_FFT // 2, mode="reflect")
    n_frames = n_samples // WHISPER_HOP  # the STFT gives one more; Whisper drops it
    frames = np.lib.stride_tricks.sliding_window_view(wave, WHISPER_N_FFT)[::WHISPER_HOP][:n_frames]
    power = np.abs(np.fft.rfft(frames * _hann_window(), axis=1)) ** 2  # [frames, 201]
    mel = whisper_mel_filters(n_mels) @ power.T  # [n_mels, frames]
    log_spec = np.log10(np.maximum(mel, LOG_FLOOR))
    log_spec = np.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def beats_input(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 [samples] -> BEATs' normalised fbank float32 [frames, 128] of the first 30 s (not padded)."""
    wave = np.asarray(waveform, dtype=np.float32)[: int(MAX_AUDIO_SECONDS * sample_rate)]
    return beats_fbank(wave, sample_rate)


def audio_inputs(waveform: np.ndarray, n_mels: int = WHISPER_N_MELS) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz float32 [samples] -> (Whisper log-mel [n_mels, 3000], BEATs fbank [frames, 128]).

    The release's order: pad to 3 s first, then both encoders read the padded waveform.
    """
    wave = pad_audio(waveform)
    return whisper_log_mel(wave, n_mels), beats_input(wave)
