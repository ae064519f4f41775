"""Calibration data from real media: each graph's inputs, as the runtime feeds them.

`collect` runs the torch-free pipeline (fp32 graphs) over media files and records what every graph
receives: frames through the vision encoder, the frame Q-Former with its instruction, Whisper,
BEATs and the MRC Q-Former. The llm_decoder needs no activation calibration (its int8 form is
weight-only). Per-graph sets are stored as npz files in the package's `calibration/` folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from vsal.runtime.errors import ConfigError, MediaError
from vsal.runtime.media import probe_media
from vsal.runtime.prompt import DecodingOptions

MEDIA_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".wav", ".flac", ".mp3", ".m4a", ".ogg"}
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".ogg"}
CALIBRATION_GRAPHS = ("vision_encoder", "frame_qformer", "whisper_encoder", "beats_encoder", "mrc_qformer")
MIN_CLIPS = 2  # one to calibrate, one held out to check accuracy
PROMPTS = ("What happens in the video?", "What can be heard, and who is speaking?")
Feeds = dict[str, np.ndarray]


def media_files(
    folder: str | os.PathLike,
    max_clips: int | None = None,
    on_skip: Callable[[Path, str], None] | None = None,
) -> list[Path]:
    """The readable media files of a folder, sorted, at most `max_clips`; MediaError when fewer
    than MIN_CLIPS are. A file FFmpeg cannot open (probed, not decoded) is skipped and passed to
    `on_skip` with the reason (default: a note on stderr), so no clip is dropped unsaid."""
    if max_clips is not None and max_clips < MIN_CLIPS:
        raise ConfigError(f"--max-clips {max_clips}: give at least {MIN_CLIPS}")
    folder = Path(folder)
    if not folder.is_dir():
        raise MediaError(f"{folder}: not a folder of media files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in MEDIA_SUFFIXES and p.is_file())
    if not files:
        raise MediaError(f"{folder}: no media files ({', '.join(sorted(MEDIA_SUFFIXES))})")
    on_skip = on_skip or _note_skipped
    usable = []
    for path in files:
        if len(usable) == max_clips:
            break
        problem = _media_problem(path)
        if problem is None:
            usable.append(path)
        else:
            on_skip(path, problem)
    if len(usable) < MIN_CLIPS:
        raise MediaError(
            f"{folder}: {len(usable)} readable media file(s) of {len(files)}; calibration needs at "
            f"least {MIN_CLIPS} (calibration and held-out clips must differ): add media files"
        )
    return usable


def _media_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a clip (without the path), or None."""
    try:
        probe_media(path)
    except MediaError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def _note_skipped(path: Path, problem: str) -> None:
    print(f"vsal-export: note: skipped {path}: {problem}", file=sys.stderr, flush=True)


def collect(
    package: str | os.PathLike, clips: Iterable[Path], progress: bool = True, label: str = "calibration clips"
) -> dict[str, list[Feeds]]:
    """Run the fp32 pipeline over `clips` and return every feed each encoder-side graph received."""
    from tqdm import tqdm
    from vsal.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(package, verbose=False, precision="fp32")
    recorded: dict[str, list[Feeds]] = {name: [] for name in CALIBRATION_GRAPHS}

    def record(name: str, feeds: Feeds) -> None:
        if name in recorded:
            recorded[name].append({k: np.array(v, copy=True) for k, v in feeds.items()})

    pipeline.observe_feeds(record)
    options = DecodingOptions(num_beams=1, max_new_tokens=1)
    clips = list(clips)
    for clip in tqdm(clips, desc=label, unit="clip", disable=not progress):
        kind = "audio" if clip.suffix.lower() in AUDIO_SUFFIXES else "video"
        for prompt in PROMPTS:
            pipeline.ask(prompt, options=options, **{kind: clip})
    return recorded


def save_calibration(folder: str | os.PathLike, recorded: dict[str, list[Feeds]]) -> dict[str, Path]:
    """One npz per graph (`<graph>.npz`, arrays `<i>/<input>`), written under temporary names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, feeds in recorded.items():
        arrays = {f"{i}/{key}": value for i, f in enumerate(feeds) for key, value in f.items()}
        path = folder / f"{name}.npz"
        tmp = folder / f".{name}.partial.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        paths[name] = path
    return paths


def load_calibration(path: str | os.PathLike) -> list[Feeds]:
    with np.load(path) as data:
        feeds: dict[int, Feeds] = {}
        for key in data.files:
            index, name = key.split("/", 1)
            feeds.setdefault(int(index), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


def synthetic_media(folder: str | os.PathLike, count: int = 6) -> list[Path]:
    """Generated clips (moving square + tone sweep, varied lengths, sizes and audio) for a package
    with random weights or when no media is given; real media calibrates better, and build says so."""
    from vsal.runtime.synthetic import write_clip, write_tone

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(count):
        if i % 3 == 2:
            clips.append(write_tone(folder / f"tone{i}.wav", seconds=3.0 + 2 * i, rate=16000))
        else:
            size = ((160, 120), (320, 180), (96, 96))[i % 3]
            clips.append(
                write_clip(
                    folder / f"clip{i}.mp4",
                    seconds=2.0 + 1.5 * i,
                    size=size,
                    audio_rate=None if i % 4 == 3 else 22050,
                )
            )
    return clips
