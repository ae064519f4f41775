"""Media decoding: the release's clip sampling, first-channel audio, clear errors."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from vsal.runtime.errors import MediaError
from vsal.runtime.media import clip_timepoints, load_audio, probe_media, sample_video_frames
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
