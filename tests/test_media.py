"""Media decoding: the release's clip sampling, first-channel audio, clear errors."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
from fractions import Fraction

import numpy as np
import pytest
from vsal.runtime import media
from vsal.runtime.errors import MediaError
from vsal.runtime.media import (
    check_media_file,
    clip_timepoints,
    decode_audio,
    load_audio,
    probe_media,
    sample_video_frames,
)
from vsal.runtime.preprocess import WHISPER_SAMPLES, audio_inputs
from vsal.runtime.synthetic import write_clip, write_tone


@pytest.mark.parametrize(
    "duration,count,last",
    [
        (10.0, 10, (9, 10)),
        (10.5, 11, (Fraction(19, 2), Fraction(21, 2))),
        (0.6, 1, (0, 1)),
        (75.0, 60, (59, 60)),
    ],
)
def test_clip_timepoints_follow_the_backpadded_uniform_sampler(duration, count, last):
    clips = clip_timepoints(duration, max_clips=60)
    assert len(clips) == count
    assert (clips[-1].start, clips[-1].end) == last
    assert all(c.end - c.start == 1 for c in clips)


def _square_x(frame: np.ndarray) -> int:
    row = frame[frame.shape[0] // 3 + 20]
    red = np.where((row[:, 0] > 200) & (row[:, 1] < 120))[0]
    return int(red[0])


def test_sampled_frames_are_first_and_last_of_each_second(clip_10s):
    frames = list(sample_video_frames(clip_10s))
    assert len(frames) == 20 and frames[0].shape == (240, 320, 3)
    n, fps, width = 250, 25, 320
    for k in range(10):
        for j, index in enumerate((fps * k, fps * k + fps - 1)):
            expected = int((width - 40) * index / (n - 1))
            assert abs(_square_x(frames[2 * k + j]) - expected) <= 2, (k, j)


def test_long_video_stops_at_60_clips(tmp_path):
    clip = write_clip(tmp_path / "long.mp4", seconds=61.5, fps=4, size=(64, 48), audio_rate=None)
    assert len(list(sample_video_frames(clip))) == 120
    assert probe_media(clip).truncated


def test_short_video_repeats_nothing_it_lacks(tmp_path):
    clip = write_clip(tmp_path / "short.mp4", seconds=0.6, fps=10, size=(64, 48), audio_rate=None)
    frames = list(sample_video_frames(clip))
    assert len(frames) == 2  # one back-padded clip: its first and last frame


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "garbage", "truncated"])
def test_bad_files_raise_one_clear_error(tmp_path, clip_10s, kind):
    path = tmp_path / "bad.mp4"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a video" * 100)
    elif kind == "truncated":
        data = clip_10s.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    with pytest.raises(MediaError, match=str(path)):
        list(sample_video_frames(path))


def test_audio_only_file_has_no_video(tmp_path):
    tone = write_tone(tmp_path / "tone.wav", seconds=4.0)
    with pytest.raises(MediaError, match="no video stream"):
        list(sample_video_frames(tone))
    info = probe_media(tone)
    assert info.video_seconds is None and abs(info.audio_seconds - 4.0) < 0.01


def test_audio_is_first_channel_at_16k(tmp_path):
    audio = load_audio(write_tone(tmp_path / "lr.wav", seconds=2.0, rate=48000, channels=2))
    assert audio.dtype == np.float32
    assert abs(audio.shape[0] - 32000) <= 64
    assert 0.27 < np.abs(audio[1000:-1000]).max() < 0.33  # the first channel, not a downmix (0.15)


# --- decoding stops at what the release samples ---------------------------------------------------


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """64 s at 4 fps, 64x48, with a 16 kHz mono AAC track: past both the 60 s and the 30 s cut."""
    folder = tmp_path_factory.mktemp("long")
    return write_clip(
        folder / "long.mp4", seconds=64, fps=4, size=(64, 48), audio_rate=16000, audio_channels=1
    )


def _frames_and_count(path, max_clips=60):
    frames = []
    generator = sample_video_frames(path, max_clips)
    while True:
        try:
            frames.append(next(generator))
        except StopIteration as stop:
            return frames, stop.value


def _release_frames_by_hand(path, seconds: int) -> list[np.ndarray]:
    """Every frame decoded, then the first and last of each second [k, k + 1) for k < seconds."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        timed = [(f.pts * stream.time_base, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    picked = []
    for k in range(seconds):
        inside = [img for t, img in timed if k <= t < k + 1]
        picked += [inside[0], inside[-1]]
    return picked


def test_video_decoding_stops_after_the_last_sampled_clip(long_clip):
    frames, decoded = _frames_and_count(long_clip)
    assert decoded == 60 * 4 + 1  # up to the first frame at t = 60 s, not the 256 in the file
    expected = _release_frames_by_hand(long_clip, 60)
    assert len(frames) == len(expected) == 120
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected, strict=True))


def test_a_video_s_audio_track_stops_at_30s(long_clip):
    whole = decode_audio(long_clip, max_seconds=None)
    first = decode_audio(long_clip)
    assert whole.complete and not first.complete
    assert first.frames_decoded < whole.frames_decoded * 0.6  # 30 of 64 s
    assert np.array_equal(first.waveform, whole.waveform[:WHISPER_SAMPLES])


def test_long_audio_gives_the_features_of_its_first_30s(tmp_path):
    long = write_tone(tmp_path / "long.wav", seconds=45.0)
    head = write_tone(tmp_path / "head.wav", seconds=30.0)  # the same samples, cut at 30 s
    decoded = decode_audio(long)
    assert not decoded.complete and decoded.waveform.shape == (WHISPER_SAMPLES,)
    assert decoded.frames_decoded < decode_audio(long, max_seconds=None).frames_decoded
    for ours, reference in zip(audio_inputs(decoded.waveform), audio_inputs(load_audio(head)), strict=True):
        assert np.array_equal(ours, reference)


def test_resampled_audio_stops_early_bit_for_bit(tmp_path):
    # The resampler is not flushed at the cut: its first 30 s equal those of a whole-file decode.
    tone = write_tone(tmp_path / "lr.wav", seconds=40.0, rate=44100, channels=2)
    whole = decode_audio(tone, max_seconds=None)
    first = decode_audio(tone)
    assert first.frames_decoded < whole.frames_decoded
    assert np.array_equal(first.waveform, whole.waveform[:WHISPER_SAMPLES])


def test_short_audio_is_decoded_whole(tmp_path):
    decoded = decode_audio(write_tone(tmp_path / "short.wav", seconds=2.0))
    assert decoded.complete and decoded.waveform.shape == (32000,)


# --- files that are not media files ----------------------------------------------------------------

READERS = {
    "video": lambda p: list(sample_video_frames(p)),
    "audio": load_audio,
    "probe": probe_media,
    "check": check_media_file,
}


@pytest.fixture(params=sorted(READERS))
def read(request):
    return READERS[request.param]


@pytest.fixture
def fifo(tmp_path):
    """A FIFO with no writer. Should a reader block opening it, a watchdog opens the write end after
    a few seconds so the test fails on its message instead of hanging."""
    path = tmp_path / "pipe.mp4"
    os.mkfifo(path)
    done = threading.Event()

    def unblock():
        if not done.wait(5):
            try:  # non-blocking: with no reader waiting this fails (ENXIO) instead of waiting itself
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    watchdog = threading.Thread(target=unblock, daemon=True)
    watchdog.start()
    yield path
    done.set()
    watchdog.join()


def test_a_fifo_is_named_and_never_opened(fifo, read):
    with pytest.raises(
        MediaError,
        match=rf"^{re.escape(str(fifo))}: is a FIFO \(named pipe\), not a media file: give a regular file$",
    ):
        read(fifo)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_named(read):
    with pytest.raises(MediaError, match=r"^/dev/zero: is a character device, not a media file"):
        read("/dev/zero")


def _symlink_loop(tmp_path):
    (tmp_path / "a.mp4").symlink_to(tmp_path / "b.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "a.mp4")
    return tmp_path / "a.mp4"


def _self_loop(tmp_path):
    path = tmp_path / "self.mp4"
    path.symlink_to(path)
    return path


def _dangling(tmp_path):
    path = tmp_path / "dangling.mp4"
    path.symlink_to(tmp_path / "gone.mp4")
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (_symlink_loop, "a symlink loop"),
        (_self_loop, "a symlink loop"),
        (_dangling, r"a dangling symlink \(its target .*gone.mp4 does not exist\)"),
        (lambda tmp: tmp / "missing.mp4", "no such file$"),
        (lambda tmp: tmp / "missing" / "x.mp4", "no such file$"),
    ],
    ids=["loop", "self-loop", "dangling", "missing", "missing-folder"],
)
def test_links_and_missing_paths_get_their_own_messages(tmp_path, read, make, message):
    path = make(tmp_path)
    with pytest.raises(MediaError, match=rf"^{re.escape(str(path))}: {message}"):
        read(path)


def test_a_file_under_a_file_is_missing(tmp_path, read):
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(MediaError, match=r"plain/x.mp4: no such file \(a part of the path is not a folder\)"):
        read(tmp_path / "plain" / "x.mp4")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000")
def test_an_unreadable_file_is_permission_denied(clip_10s, tmp_path, read):
    path = tmp_path / "locked.mp4"
    path.write_bytes(clip_10s.read_bytes())
    path.chmod(0)
    with pytest.raises(MediaError, match=rf"^{re.escape(str(path))}: permission denied"):
        read(path)


def test_a_mode_that_denies_reading_is_named_before_opening(clip_10s, monkeypatch, read):
    # What a user other than root sees for mode 000: stat works, access(R_OK) says no.
    real_access, real_open = os.access, os.open

    def denied(path, mode, *args, **kwargs):
        return os.fspath(path) != str(clip_10s) and real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(media.os, "access", denied)

    def no_open(path, flags, *args, **kwargs):
        assert os.fspath(path) != str(clip_10s), "opened a file already known to be unreadable"
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(media.os, "open", no_open)
    message = rf"^{re.escape(str(clip_10s))}: permission denied: this user cannot read the file"
    with pytest.raises(MediaError, match=message):
        read(clip_10s)


def test_a_socket_is_named(tmp_path, read):
    import socket

    path = tmp_path / "s.mp4"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(
            MediaError, match=rf"^{re.escape(str(path))}: is a socket, not a media file: give a regular file$"
        ):
            read(path)


def test_a_refused_open_is_permission_denied(clip_10s, monkeypatch, read):
    # Tests run as root here, whom mode 000 does not stop: the kernel's refusal is simulated.
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if os.fspath(path) == str(clip_10s):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(media.os, "open", refusing)
    with pytest.raises(MediaError, match=rf"^{re.escape(str(clip_10s))}: permission denied"):
        read(clip_10s)


def test_a_file_swapped_after_the_check_is_refused(clip_10s, tmp_path, monkeypatch):
    other = tmp_path / "other.mp4"
    other.write_bytes(b"x")
    real_open = os.open
    monkeypatch.setattr(media.os, "open", lambda path, flags, *a: real_open(other, flags, *a))
    with pytest.raises(MediaError, match="replaced while being opened"):
        probe_media(clip_10s)


def test_a_video_without_audio_has_no_audio_stream(tmp_path):
    clip = write_clip(tmp_path / "mute.mp4", seconds=1.0, fps=4, size=(64, 48), audio_rate=None)
    with pytest.raises(MediaError, match=rf"^{re.escape(str(clip))}: no audio stream$"):
        load_audio(clip)


def test_absurd_frame_sizes_are_refused_before_decoding(clip_10s, monkeypatch):
    monkeypatch.setattr(media, "MAX_FRAME_PIXELS", 320 * 240 - 1)
    for read in (probe_media, lambda p: next(sample_video_frames(p))):
        with pytest.raises(MediaError, match=r"frames of 320x240 are larger than the 76,799 pixels"):
            read(clip_10s)
    assert load_audio(clip_10s).shape[0] >= 10 * 16000  # its audio track is still usable


def test_garbage_and_truncated_files_say_so(tmp_path, clip_10s):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"\x00\x01 not media " * 500)
    with pytest.raises(MediaError, match=rf"^{re.escape(str(garbage))}: not a media file FFmpeg can read"):
        load_audio(garbage)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip_10s.read_bytes()[:-20000])  # the index (moov) is at the end: lost
    with pytest.raises(
        MediaError, match=rf"^{re.escape(str(cut))}: not a media file FFmpeg can read, or truncated \(\w"
    ):
        probe_media(cut)


# --- many channels, kernel files, names that are not one line ----------------------------------------


def _write_wav(path, samples: np.ndarray, rate: int):
    """16-bit PCM wav of int16 samples [n, channels]."""
    import wave

    with wave.open(str(path), "wb") as out:
        out.setnchannels(samples.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype("<i2").tobytes())
    return path


def _channels(n: int, channels: int) -> np.ndarray:
    """int16 [n, channels], each channel its own noise (channel 0 is told from the others)."""
    return np.random.default_rng(channels).integers(-20000, 20000, (n, channels), dtype=np.int16)


def _decoded_in_a_child(path, tmp_path) -> np.ndarray:
    """decode_audio's waveform, decoded in a child process: should PyAV crash (it read past a
    frame's planes from 8 channels up), the test fails on the exit code instead of killing pytest."""
    out = tmp_path / "waveform.npy"
    code = (
        "import sys, numpy as np; from vsal.runtime.media import decode_audio; "
        "np.save(sys.argv[2], decode_audio(sys.argv[1], max_seconds=None).waveform)"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(path), str(out)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    return np.load(out)


@pytest.mark.parametrize("channels", [2, 8, 9, 16])
def test_audio_of_any_channel_count_is_its_first_channel(tmp_path, channels):
    samples = _channels(16000, channels)
    wav = _write_wav(tmp_path / f"ch{channels}.wav", samples, 16000)
    waveform = _decoded_in_a_child(wav, tmp_path)
    assert np.array_equal(waveform, samples[:, 0].astype(np.float32) / 32768)


def test_resampled_many_channel_audio_is_its_first_channel_resampled(tmp_path):
    samples = _channels(48000, 8)
    waveform = _decoded_in_a_child(_write_wav(tmp_path / "ch8.wav", samples, 48000), tmp_path)
    mono = decode_audio(_write_wav(tmp_path / "mono.wav", samples[:, :1], 48000), max_seconds=None)
    assert waveform.shape == (16000,) and np.array_equal(waveform, mono.waveform)


# /proc/self/environ has st_size 0 but holds text; /sys files claim 4096 bytes whatever they hold.
KERNEL_FILES = [
    p
    for p in ("/proc/self/environ", "/proc/self/status", "/sys/devices/system/cpu/online")
    if os.path.isfile(p)
]


@pytest.mark.skipif(not KERNEL_FILES, reason="needs procfs or sysfs")
@pytest.mark.parametrize("path", KERNEL_FILES)
def test_a_proc_or_sys_file_is_named_not_called_empty(read, path):
    with pytest.raises(MediaError, match=rf"^{re.escape(path)}: is a /proc or /sys file, not a media file"):
        read(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="needs procfs")
def test_a_link_to_a_proc_file_is_refused_and_a_regular_file_through_proc_is_not(tmp_path, clip_10s):
    link = tmp_path / "env.mp4"
    link.symlink_to("/proc/self/environ")
    with pytest.raises(MediaError, match=rf"^{re.escape(str(link))}: is a /proc or /sys file"):
        probe_media(link)
    with open(clip_10s, "rb") as opened:  # /proc/self/fd/N resolves to the file itself
        assert probe_media(f"/proc/self/fd/{opened.fileno()}").clips == 10


@pytest.mark.parametrize("name", ["new\nline.mp4", "cr\r.mp4", "esc\x1b[2J.mp4", "sep\u2028.mp4"])
def test_a_name_that_would_break_the_line_is_shown_escaped(tmp_path, read, name):
    path = tmp_path / name
    with pytest.raises(MediaError) as caught:
        read(path)
    assert str(caught.value) == f"{str(path)!r}: no such file"
    assert len(str(caught.value).splitlines()) == 1 and "\x1b" not in str(caught.value)


def test_a_link_target_that_would_break_the_line_is_escaped(tmp_path, read):
    path = tmp_path / "link.mp4"
    path.symlink_to(tmp_path / "gone\n.mp4")
    with pytest.raises(MediaError) as caught:
        read(path)
    assert (
        str(caught.value) == f"{path}: a dangling symlink (its target {tmp_path}/gone\\n.mp4 does not exist)"
    )


def test_a_printable_name_is_shown_as_it_is(tmp_path, read):
    path = tmp_path / "uni ñ 日本.mp4"
    with pytest.raises(MediaError, match=rf"^{re.escape(str(path))}: no such file$"):
        read(path)
