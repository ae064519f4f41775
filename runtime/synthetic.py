"""Generated media for demos and tests: a moving square over a gradient and a tone sweep."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_clip(
    path: str | os.PathLike,
    seconds: float = 10.0,
    fps: int = 25,
    size: tuple[int, int] = (320, 240),
    audio_rate: int | None = 44100,
    audio_channels: int = 2,
    codec: str = "mpeg4",
) -> Path:
    """Write a video (and audio, unless audio_rate is None) clip; returns the path.

    The file is written under a temporary name and renamed when complete.
    """
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    width, height = size
    n_frames = round(seconds * fps)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    with av.open(str(tmp), mode="w") as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if audio_rate:
            layout = "stereo" if audio_channels == 2 else "mono"
            audio = container.add_stream("aac", rate=audio_rate, layout=layout)
        for i in range(n_frames):
            img = np.broadcast_to(ramp * (0.3 + 0.7 * i / max(n_frames - 1, 1)), (height, width, 3)).copy()
            x = int((width - 40) * i / max(n_frames - 1, 1))
            img[height // 3 : height // 3 + 40, x : x + 40] = (255, 40, 40)
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio_rate:
            t = np.arange(round(seconds * audio_rate)) / audio_rate
            tone = 0.3 * np.sin(2 * np.pi * (220 + 200 * t) * t).astype(np.float32)
            planes = np.stack([tone] * audio_channels)
            block = 1024
            for start in range(0, planes.shape[1], block):
                chunk = np.ascontiguousarray(planes[:, start : start + block])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
                frame.sample_rate = audio_rate
                container.mux(audio.encode(frame))
            container.mux(audio.encode(None))
    os.replace(tmp, path)
    return path


def write_tone(path: str | os.PathLike, seconds: float = 4.0, rate: int = 16000, channels: int = 1) -> Path:
    """Write an audio-only PCM file with a 300 Hz tone on the first channel (silence on the others)."""
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    t = np.arange(int(rate * seconds)) / rate
    planes = np.zeros((channels, t.shape[0]), dtype=np.float32)
    planes[0] = 0.3 * np.sin(2 * np.pi * 300 * t)
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")
    with av.open(str(tmp), "w", format=path.suffix.lstrip(".") or "wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    os.replace(tmp, path)
    return path
