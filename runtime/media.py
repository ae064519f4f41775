"""Media decoding with the release's sampling, torch-free (PyAV, which bundles FFmpeg).

Video: the release cuts the whole duration into 1-second clips (pytorchvideo's UniformClipSampler
with backpad_last: the last clip is moved back to end at the video's end, so it may overlap the one
before), takes frames with start <= pts < end from each, keeps the first and last of them
(UniformTemporalSubsample(2) = linspace(0, n-1, 2)) and stops at 60 clips.
Audio: the first channel, resampled to 16 kHz, as float32 in [-1, 1]; the encoders read only its
first 30 s (Whisper's window, BEATs' truncation).

Decoding streams and stops at what the release samples: a frame is converted to an array only once
it is known to be sampled, video decoding ends after the last sampled clip and audio decoding after
its first 30 s, so a 4-hour file costs what its first minute does. The samples are a prefix of the
file (clips start at 0 and follow each other), so there is nothing to seek past.

Files are checked before FFmpeg sees them: only a readable regular file is opened (none of /proc
or /sys), and it is opened without blocking (a FIFO or a device never reaches FFmpeg, which would
wait on it or read it forever).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from vsal.runtime.errors import MediaError
from vsal.runtime.package_paths import file_problem
from vsal.runtime.preprocess import MAX_AUDIO_SECONDS  # what the encoders read: nothing after it is decoded

CLIP_SECONDS = 1  # the release's clip_duration
FRAMES_PER_CLIP = 2  # sample_per_clip: 2 fps
# Largest decoded frame accepted: DCI 8K. One such frame is 53 MB as yuv420 and 106 MB as RGB, and
# FFmpeg's frame threads hold one each; a 16k x 16k frame would need 4x that per thread.
MAX_FRAME_PIXELS = 8192 * 4320


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


# --- the file itself ---------------------------------------------------------------------------

_EXPECTED = "a media file"  # what file_problem's messages say was expected


# Characters that would break a message's line or drive the terminal (C0, DEL, C1, U+2028/9), and
# surrogates (undecodable bytes of a file name): a name holding any is shown as its repr().
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Kernel file systems: their files are no media, and their sizes are made up (0 for
# /proc/self/environ, 4096 for most of /sys), so "empty" would be wrong about them.
_KERNEL_FOLDERS = ("/proc", "/sys")


def _error(path: Path, text: str) -> MediaError:
    """The MediaError "PATH: text", on one line whatever the name (or a link's target) holds."""
    name = str(path)
    if _UNPRINTABLE.search(name):
        name = repr(name)
    return MediaError(f"{name}: {_UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)}")


def _checked_stat(path: Path) -> os.stat_result:
    problem = file_problem(path, what=_EXPECTED)
    if problem is not None:
        raise _error(path, problem)
    try:
        info = os.stat(path)  # the identity _open_regular checks the opened file against
    except OSError as exc:  # removed or replaced since the check
        raise _error(path, file_problem(path, what=_EXPECTED, error=exc)) from None
    if _on_kernel_file_system(path, info):
        raise _error(path, "is a /proc or /sys file, not a media file: give a regular file")
    if info.st_size == 0:
        raise _error(path, "the file is empty (0 bytes)")
    return info


def _on_kernel_file_system(path: Path, info: os.stat_result) -> bool:
    """Under /proc or /sys once links are resolved, or on the same device as either where it is
    mounted (it may be mounted elsewhere too). /proc/self/fd/N naming a regular file resolves to
    that file, so it is not refused."""
    real = os.path.realpath(path)
    for folder in _KERNEL_FOLDERS:
        if real == folder or real.startswith(folder + "/"):
            return True
        try:  # only a mounted one: /proc as a plain folder of / (a chroot) shares the root's device
            if os.path.ismount(folder) and os.stat(folder).st_dev == info.st_dev:
                return True
        except OSError:  # no such file system here
            continue
    return False


def _open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file at `path`, checked before and after opening.

    Only a regular file is opened (opening a device may act on it), with O_NONBLOCK so that a file
    swapped for a FIFO in between cannot block; fstat then confirms it is the file that was checked.
    """
    before = _checked_stat(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:  # refused although the mode allows it (ACLs, an LSM), or swapped
        raise _error(path, file_problem(path, what=_EXPECTED, error=exc)) from None
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(after.st_mode):
        os.close(fd)
        raise _error(path, "the file was replaced while being opened; give a file that stays put")
    return fd


def stat_media_file(path: str | os.PathLike) -> os.stat_result:
    """The stat of `path` when it names a readable, non-empty regular file (not opened); else a
    MediaError saying what it is: missing, a dangling symlink, a symlink loop, a FIFO, a device, a
    directory, unreadable."""
    return _checked_stat(Path(path))


def check_media_file(path: str | os.PathLike) -> Path:
    """`path` when it names a readable, non-empty regular file, proven by opening it (never a FIFO
    or a device); else a MediaError saying what it is. For callers that read the bytes themselves."""
    path = Path(path)
    os.close(_open_regular(path))
    return path


@contextmanager
def _open(path: Path) -> Iterator:
    """The PyAV container of the checked file; FFmpeg reads through our descriptor, never the path."""
    import av

    with os.fdopen(_open_regular(path), "rb") as file:
        try:
            container = av.open(file)
        except (av.error.FFmpegError, UnicodeDecodeError) as exc:
            raise _error(path, f"not a media file FFmpeg can read, or truncated ({_reason(exc)})") from None
        with container:
            yield container


def _reason(exc: Exception) -> str:
    """FFmpeg's words without its file name, which is our descriptor's number here."""
    return getattr(exc, "strerror", None) or str(exc)


def _stream_duration(path: Path, container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    raise _error(
        path, f"the {stream.type} stream declares no duration; remux it (ffmpeg -i IN -c copy OUT.mp4)"
    )


def _check_frame_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise _error(
            path,
            f"video frames of {width}x{height} are larger than the {MAX_FRAME_PIXELS:,} pixels (8192x4320) "
            "this runtime decodes, and the model sees them at 224x224: scale the video down first",
        )


def _video_stream(path: Path, container):
    if not container.streams.video:
        raise _error(path, "no video stream")
    stream = container.streams.video[0]
    _check_frame_size(path, stream.codec_context.width, stream.codec_context.height)
    return stream


def _audio_stream(path: Path, container):
    if not container.streams.audio:
        raise _error(path, "no audio stream")
    return container.streams.audio[0]


def _demux_only(container, stream) -> None:
    """Tell the demuxer to skip the other streams' packets rather than read and drop them."""
    import av

    for other in container.streams:
        if other.index != stream.index:
            other.discard = av.stream.Discard.all


def has_audio(path: str | os.PathLike) -> bool:
    path = Path(path)
    with _open(path) as container:
        return bool(container.streams.audio)


def streams(video: str | os.PathLike | None, audio: str | os.PathLike | None) -> tuple:
    """(video, audio) as the release reads them: with no audio file, a video's own audio track
    (the video file again) when it has one. MediaError when neither is given."""
    if video is None and audio is None:
        raise MediaError("give a video file, an audio file or both")
    if audio is None and has_audio(video):
        audio = video
    return video, audio


# --- video -------------------------------------------------------------------------------------


def sample_video_frames(path: str | os.PathLike, max_clips: int = 60) -> Generator[np.ndarray, None, int]:
    """Yield the release's sampled frames in order, each RGB uint8 [H, W, 3] at native size.

    At most 2 * max_clips frames; a clip with a single decodable frame yields it twice (as
    linspace(0, 0, 2) does), a clip with none is an error (the release raises "No clip found").
    Decoding stops at the first frame past the last clip; the generator returns how many frames it
    decoded (`count = yield from sample_video_frames(...)`).
    """
    import av

    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(path, container)
        _demux_only(container, stream)
        stream.thread_type = "AUTO"
        duration = _stream_duration(path, container, stream)
        clips = clip_timepoints(duration, max_clips)
        start_time = stream.start_time or 0
        time_base = stream.time_base
        first: list = [None] * len(clips)
        last: list = [None] * len(clips)
        emitted = decoded = 0
        try:
            for frame in container.decode(stream):
                decoded += 1
                if frame.pts is None:
                    continue
                _check_frame_size(path, frame.width, frame.height)  # the bitstream may change size
                t = Fraction(frame.pts - start_time) * time_base
                for i, clip in enumerate(clips):
                    if clip.start <= t < clip.end:
                        if first[i] is None:
                            first[i] = frame.to_ndarray(format="rgb24")
                        last[i] = frame
                # Clips are ordered by start; emit those that can no longer grow.
                while emitted < len(clips) and t >= clips[emitted].end:
                    yield from _emit(path, emitted, duration, first, last)
                    emitted += 1
                if emitted == len(clips):
                    break  # every sampled clip is out: the rest of the file is never decoded
        except av.error.FFmpegError as exc:
            raise _error(path, f"the video stream is corrupt or truncated ({_reason(exc)})") from None
        while emitted < len(clips):
            yield from _emit(path, emitted, duration, first, last)
            emitted += 1
    return decoded


def _emit(path: Path, index: int, duration: float, first: list, last: list) -> Iterator[np.ndarray]:
    if first[index] is None:
        raise _error(
            path,
            f"no decodable frame in second {index} of the video, which declares {duration:.2f} s: "
            "the file is truncated or corrupt",
        )
    yield first[index]
    yield last[index].to_ndarray(format="rgb24")
    first[index] = last[index] = None


# --- audio -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedAudio:
    waveform: np.ndarray  # float32 [samples] in [-1, 1]: the first channel at the asked rate
    frames_decoded: int  # audio frames FFmpeg decoded (a few thousand samples each)
    complete: bool  # True: the stream ended before max_seconds; False: decoding stopped there


def decode_audio(
    path: str | os.PathLike, sample_rate: int = 16000, max_seconds: float | None = MAX_AUDIO_SECONDS
) -> DecodedAudio:
    """The first audio channel resampled to `sample_rate`, up to `max_seconds` (None: all of it).

    Stops decoding once the resampler has produced max_seconds of output. The resampler is not
    flushed then, so the samples equal the first max_seconds of a whole-file decode, bit for bit.
    """
    import av

    path = Path(path)
    limit = None if max_seconds is None else int(round(max_seconds * sample_rate))
    chunks: list[np.ndarray] = []
    kept = decoded = 0
    with _open(path) as container:
        stream = _audio_stream(path, container)
        _demux_only(container, stream)
        resampler = None
        try:
            for frame in container.decode(stream):
                decoded += 1
                if resampler is None:
                    # Keep the channel layout so channel 0 stays the first channel (no downmix).
                    # Interleaved ("flt"), not planar: PyAV counts a planar frame's planes by
                    # walking its pointer array up to a NULL, which runs past the array from 8
                    # channels up (9 planes for 8, then a read of freed memory: a segfault).
                    resampler = av.AudioResampler(format="flt", layout=frame.layout, rate=sample_rate)
                for out in resampler.resample(frame):
                    chunks.append(_first_channel(out))
                    kept += chunks[-1].shape[0]
                if limit is not None and kept >= limit:
                    return DecodedAudio(_joined(chunks, limit), decoded, complete=False)
            if resampler is not None:
                chunks.extend(_first_channel(out) for out in resampler.resample(None))
        except av.error.FFmpegError as exc:
            raise _error(path, f"the audio stream is corrupt or truncated ({_reason(exc)})") from None
    if not chunks:
        raise _error(path, "the audio stream holds no decodable samples")
    return DecodedAudio(_joined(chunks, limit), decoded, complete=True)


def _first_channel(frame) -> np.ndarray:
    """Channel 0 of an interleaved float32 frame, copied so the other channels can be freed."""
    interleaved = np.frombuffer(frame.planes[0], np.float32, count=frame.samples * frame.layout.nb_channels)
    return interleaved[:: frame.layout.nb_channels].copy()


def _joined(chunks: list[np.ndarray], limit: int | None) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(chunks)[:limit], dtype=np.float32)


def load_audio(
    path: str | os.PathLike, sample_rate: int = 16000, max_seconds: float | None = MAX_AUDIO_SECONDS
) -> np.ndarray:
    """float32 [samples] in [-1, 1]: the first channel at `sample_rate`, its first `max_seconds`."""
    return decode_audio(path, sample_rate, max_seconds).waveform


# --- facts without decoding --------------------------------------------------------------------


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
    """Stream facts of a media file, without decoding it; refuses what decoding would refuse up front."""
    path = Path(path)
    with _open(path) as container:
        video = _video_stream(path, container) if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None and audio is None:
            raise _error(path, "no video or audio stream")
        video_seconds = _stream_duration(path, container, video) if video is not None else None
        audio_seconds = _stream_duration(path, container, audio) if audio is not None else None
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
