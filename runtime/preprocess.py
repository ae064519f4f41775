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

The sizes and statistics are the package's (`Preprocessing`, the manifest's "preprocessing", read
by `Manifest.preprocessing_constants()`); the module constants are the released model's, the
defaults of every function.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

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
BEATS_N_MELS = 128  # fbank bins of the released BEATs


@dataclass(frozen=True)
class Preprocessing:
    """What the encoders expect of the media: the manifest's "preprocessing", written at export
    from the ModelConfig. ValueError names a field out of its bounds."""

    image_size: int = IMAGE_SIZE  # px, square frames into vision_encoder
    clip_mean: tuple[float, float, float] = CLIP_MEAN  # RGB, on [0, 1] pixels
    clip_std: tuple[float, float, float] = CLIP_STD
    sample_rate: int = SAMPLE_RATE  # Hz; the features are written for 16 kHz
    whisper_n_mels: int = WHISPER_N_MELS
    whisper_n_fft: int = WHISPER_N_FFT  # samples per STFT window
    whisper_hop: int = WHISPER_HOP  # samples between frames
    whisper_n_frames: int = WHISPER_SAMPLES // WHISPER_HOP  # log-mel frames of one window (3000)
    beats_n_mels: int = BEATS_N_MELS
    min_audio_seconds: float = MIN_AUDIO_SECONDS  # shorter audio is zero-padded
    max_audio_seconds: float = MAX_AUDIO_SECONDS  # Whisper's window; BEATs reads no further

    def __post_init__(self) -> None:
        problems = [f"{name} {why}" for name, why in self._problems()]
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> Iterator[tuple[str, str]]:
        for name, (low, high) in _BOUNDS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                yield name, f"is {value}, not within {low} to {high}"
        if any(not 0.0 <= m <= 1.0 for m in self.clip_mean) or len(self.clip_mean) != 3:
            yield "clip_mean", f"is {list(self.clip_mean)}, not 3 values within 0 to 1"
        if any(not 0.0 < s <= 10.0 for s in self.clip_std) or len(self.clip_std) != 3:
            yield "clip_std", f"is {list(self.clip_std)}, not 3 values within 0 (excluded) to 10"
        if self.sample_rate != SAMPLE_RATE:
            yield "sample_rate", f"is {self.sample_rate} Hz; vsal's audio features read {SAMPLE_RATE} Hz"
        if self.whisper_hop > self.whisper_n_fft:
            yield "whisper_hop", f"is {self.whisper_hop}, more than whisper_n_fft {self.whisper_n_fft}"
        if self.min_audio_seconds > self.max_audio_seconds:
            yield "min_audio_seconds", f"is more than max_audio_seconds {self.max_audio_seconds}"
        stft = self.whisper_n_frames * max(self.whisper_n_fft, self.whisper_n_mels)
        if stft > _MAX_LOG_MEL:
            yield (
                "whisper_n_frames",
                f"x max(whisper_n_fft, whisper_n_mels) is {stft}, more than {_MAX_LOG_MEL} (log-mel arrays)",
            )
        if self.whisper_n_frames * self.whisper_hop != round(self.max_audio_seconds * self.sample_rate):
            yield (
                "whisper_n_frames",
                (
                    f"x whisper_hop is {self.whisper_n_frames * self.whisper_hop} samples, not "
                    f"max_audio_seconds x sample_rate (Whisper's window)"
                ),
            )

    @property
    def whisper_samples(self) -> int:
        """Samples of Whisper's window (480000: 30 s at 16 kHz)."""
        return self.whisper_n_frames * self.whisper_hop

    @classmethod
    def of_config(cls, config: Mapping[str, Any]) -> Preprocessing:
        """From a ModelConfig.to_dict() (at export, and for a package written before the manifest
        carried these); CLIP's statistics and Whisper's STFT are the released model's."""
        align, whisper = config["alignment"], config["whisper"]
        return cls(
            image_size=config["vision"]["img_size"],
            sample_rate=align.get("sample_rate", SAMPLE_RATE),
            whisper_n_mels=whisper["num_mel_bins"],
            whisper_n_frames=2 * whisper["max_source_positions"],  # the stride-2 conv halves them
            beats_n_mels=config["beats"].get("n_mels", BEATS_N_MELS),
            min_audio_seconds=align.get("min_audio_seconds", MIN_AUDIO_SECONDS),
            max_audio_seconds=align.get("max_audio_seconds", MAX_AUDIO_SECONDS),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        data = dict(data)
        for key in ("clip_mean", "clip_std"):
            data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"clip_mean": list(self.clip_mean), "clip_std": list(self.clip_std)}

    def frame(self, frame: np.ndarray) -> np.ndarray:
        """RGB uint8 [H, W, 3] -> float32 [3, image_size, image_size] (`preprocess_frame`)."""
        return preprocess_frame(frame, self.image_size, self.clip_mean, self.clip_std)

    def audio(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """16 kHz float32 [samples] -> (Whisper log-mel, BEATs fbank) (`audio_inputs`)."""
        return audio_inputs(waveform, self)


# Bounds of the sizes (inclusive), far above the released model's, so a hostile manifest cannot make
# the runtime allocate gigabytes per frame or per audio track.
_BOUNDS = {
    "image_size": (1, 4096),
    "sample_rate": (1, 192000),
    "whisper_n_mels": (1, 512),
    "whisper_n_fft": (2, 8192),
    "whisper_hop": (1, 8192),
    "whisper_n_frames": (1, 1 << 20),
    "beats_n_mels": (1, 512),
    "min_audio_seconds": (0.0, 3600.0),
    "max_audio_seconds": (0.1, MAX_AUDIO_SECONDS),  # the media decoding reads no further
}
_MAX_LOG_MEL = 1 << 24  # float64 elements of one STFT array (134 MB); the released 3000 x 400 is 1.2M
RELEASED = Preprocessing()  # the released model's constants


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


@lru_cache(maxsize=4)
def _clip_affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(gain, offset) [3, 1, 1] with (x / 255 - mean) / std = x * gain + offset for 0..255 pixels."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    gain = 1.0 / (255.0 * std)
    offset = -mean / std
    return gain.astype(np.float32)[:, None, None], offset.astype(np.float32)[:, None, None]


def preprocess_frame(
    frame: np.ndarray,
    size: int = IMAGE_SIZE,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, size, size]: bicubic resize as torch, then normalisation by
    the RGB `mean` and `std` (CLIP's).

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
    gain, offset = _clip_affine(tuple(mean), tuple(std))
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
def whisper_mel_filters(n_mels: int = WHISPER_N_MELS, n_fft: int = WHISPER_N_FFT) -> np.ndarray:
    """Slaney-normalised triangular mel filters over 0..8 kHz, float64 [n_mels, n_fft // 2 + 1].

    transformers' mel_filter_bank(norm="slaney", mel_scale="slaney"), which is librosa's.
    """
    n_bins = n_fft // 2 + 1
    edges = _mel_to_hz_slaney(np.linspace(0.0, _hz_to_mel_slaney(WHISPER_FMAX), n_mels + 2))  # Hz
    bins = np.linspace(0, SAMPLE_RATE // 2, n_bins)  # Hz
    widths = np.diff(edges)
    rising = (bins[None, :] - edges[:-2, None]) / widths[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    filters = triangles * (2.0 / (edges[2:] - edges[:-2]))[:, None]  # constant energy per filter
    filters.flags.writeable = False  # cached: shared by every caller
    return filters


@lru_cache(maxsize=2)
def _hann_window(n_fft: int) -> np.ndarray:
    n = np.arange(n_fft)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann, as torch.hann_window


def whisper_log_mel(
    waveform: np.ndarray,
    n_mels: int = WHISPER_N_MELS,
    n_samples: int = WHISPER_SAMPLES,
    n_fft: int = WHISPER_N_FFT,
    hop: int = WHISPER_HOP,
) -> np.ndarray:
    """float32 [samples] at 16 kHz -> Whisper's log-mel float32 [n_mels, n_samples // hop] (3000 for 30 s).

    As WhisperFeatureExtractor: zero-pad or truncate to n_samples, centred STFT (reflect padding),
    power spectrum, last frame dropped, slaney mel filters, log10 floored at 1e-10, clamped to
    8 below the maximum, then (x + 4) / 4.
    """
    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform [samples], got shape {wave.shape}")
    wave = wave[:n_samples].astype(np.float64)  # float64 spectra: well inside torch's float32 rounding
    wave = np.pad(wave, (0, n_samples - wave.shape[0]))
    wave = np.pad(wave, n_fft // 2, mode="reflect")
    n_frames = n_samples // hop  # the STFT gives one more; Whisper drops it
    frames = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[::hop][:n_frames]
    power = np.abs(np.fft.rfft(frames * _hann_window(n_fft), axis=1)) ** 2  # [frames, n_fft // 2 + 1]
    mel = whisper_mel_filters(n_mels, n_fft) @ power.T  # [n_mels, frames]
    log_spec = np.log10(np.maximum(mel, LOG_FLOOR))
    log_spec = np.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def beats_input(
    waveform: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float = MAX_AUDIO_SECONDS,
    n_mels: int = BEATS_N_MELS,
) -> np.ndarray:
    """float32 [samples] -> BEATs' normalised fbank float32 [frames, n_mels] of the first
    `max_seconds` (not padded)."""
    wave = np.asarray(waveform, dtype=np.float32)[: int(max_seconds * sample_rate)]
    return beats_fbank(wave, sample_rate, n_mels)


def audio_inputs(waveform: np.ndarray, pre: Preprocessing = RELEASED) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz float32 [samples] -> (Whisper log-mel [n_mels, 3000], BEATs fbank [frames, 128]),
    the sizes `pre`'s.

    The release's order: pad to 3 s first, then both encoders read the padded waveform.
    """
    wave = pad_audio(waveform, pre.min_audio_seconds, pre.sample_rate)
    log_mel = whisper_log_mel(
        wave, pre.whisper_n_mels, pre.whisper_samples, pre.whisper_n_fft, pre.whisper_hop
    )
    fbank = beats_input(wave, pre.sample_rate, pre.max_audio_seconds, pre.beats_n_mels)
    return log_mel, fbank
