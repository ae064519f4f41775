"""Media decoding with the release's sampling, torch-free (PyAV, which bundles FFmpeg).

Video: the release cuts the whole duration into 1-second clips (pytorchvideo's UniformClipSampler
with backpad_last: the last clip is moved back to end at the video's end, so it may overlap the one
before), takes frames with start <= pts < end from each, keeps the first and last of them
(UniformTemporalSubsample(2) = linspace(0, n-1, 2)) and stops at 60 clips.
Audio: the first channel, resampled to 16 kHz, as float32 in [-1, 1].

Decoding streams: a frame is converted to an array only once it is known to be sampled, so a long
high-resolution clip never sits in memory as full frames.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from vsal.runtime.errors import MediaError

CLIP_SECONDS = 1  # the release's clip_duration
FRAMES_PER_CLIP = 2  # sample_per_clip: 2 fps


@dataclass(frozen=True)
class Clip:
    start: Fraction
    end: Fraction


def clip_timepoints(duration: float, max_clips: int, clip_seconds: int = CLIP_SECONDS) -> list[Clip]:
    """The release's clips: [0,1), [1,2), ..., the last one back-padded to end at `duration`."""
    total = Fraction(duration).limit_denominator(1_000_000)
    length = Fraction(clip_seconds)

    def backpadded(start: Fraction) -> Clip:
        end = start + length
        start = max(Fraction(0), start - max(Fraction(0), end - total))
        return Clip(start, start + length)

    clips = [backpadded(Fraction(0))]
    while len(clips) < max_clips:
        following = backpadded(clips[-1].end)
        if following.end == clips[-1].end:  # the sampler's "last clip" test
            break
        clips.append(following)
    return clips


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if path.is_dir():
        raise MediaError(f"{path}: is a directory, expected a media file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: the file is empty (0 bytes)")
    return path


def _open(path: Path):
    import av

    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise MediaError(f"{path}: not a media file FFmpeg can read ({exc})") from None


def _stream_duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    raise MediaError(f"{container.name}: the video stream has no duration")


def has_audio(path: str | os.PathLike) -> bool:
    with _open(_check_file(path)) as container:
        return bool(container.streams.audio)


def sample_video_frames(path: str | os.PathLike, max_clips: int = 60) -> Iterator[np.ndarray]:
    """Yield the release's sampled frames in order, each RGB uint8 [H, W, 3] at native size.

    At most 2 * max_clips frames; a clip with a single decodable frame yields it twice (as
    linspace(0, 0, 2) does), a clip with none is an error (the release raises "No clip found").
    """
    import av

    path = _check_file(path)
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        clips = clip_timepoints(_stream_duration(container, stream), max_clips)
        start_time = stream.start_time or 0
        time_base = stream.time_base
        first: list = [None] * len(clips)
        last: list = [None] * len(clips)
        emitted = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = Fraction(frame.pts - start_time) * time_base
                for i, clip in enumerate(clips):
                    if clip.start <= t < clip.end:
                        if first[i] is None:
                            first[i] = frame.to_ndarray(format="rgb24")
                        last[i] = frame
                # Clips are ordered by start; emit those that can no longer grow.
                while emitted < len(clips) and t >= clips[emitted].end:
                    yield from _emit(path, emitted, first, last)
                    emitted += 1
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: the video stream is corrupt or truncated ({exc})") from None
        while emitted < len(clips):
            yield from _emit(path, emitted, first, last)
            emitted += 1


def _emit(path: Path, index: int, first: list, last: list) -> Iterator[np.ndarray]:
    if first[index] is None:
        raise MediaError(f"{path}: no decodable frame in second {index} of the video")
    yield first[index]
    yield last[index].to_ndarray(format="rgb24")
    first[index] = last[index] = None


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """The first audio channel resampled to `sample_rate`, float32 [samples] in [-1, 1]."""
    import av

    path = _check_file(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        resampler = None
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    # Keep the channel layout so channel 0 stays the first channel (no downmix).
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=sample_rate)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray()[0])
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray()[0])
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: the audio stream is corrupt or truncated ({exc})") from None
    if not chunks:
        raise MediaError(f"{path}: the audio stream holds no decodable samples")
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


@dataclass(frozen=True)
class MediaInfo:
    video_codec: str | None
    width: int | None
    height: int | None
    video_seconds: float | None
    clips: int  # 1-second clips the release samples (2 frames each)
    truncated: bool  # longer than max_clips seconds
    audio_codec: str | None
    sample_rate: int | None
    channels: int | None
    audio_seconds: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def probe_media(path: str | os.PathLike, max_clips: int = 60) -> MediaInfo:
    """Stream facts of a media file, without decoding it."""
    path = _check_file(path)
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None and audio is None:
            raise MediaError(f"{path}: no video or audio stream")
        video_seconds = _stream_duration(container, video) if video is not None else None
        audio_seconds = None
        if audio is not None:
            audio_seconds = _stream_duration(container, audio)
        clips = len(clip_timepoints(video_seconds, max_clips)) if video_seconds is not None else 0
        return MediaInfo(
            video_codec=video.codec_context.name if video is not None else None,
            width=video.codec_context.width if video is not None else None,
            height=video.codec_context.height if video is not None else None,
            video_seconds=video_seconds,
            clips=clips,
            truncated=video_seconds is not None and video_seconds > max_clips,
            audio_codec=audio.codec_context.name if audio is not None else None,
            sample_rate=audio.codec_context.sample_rate if audio is not None else None,
            channels=audio.codec_context.channels if audio is not None else None,
            audio_seconds=audio_seconds,
        )
