"""Calibration data from real media: each graph's inputs, as the runtime feeds them.

`collect` runs the torch-free pipeline (fp32 graphs) over media files and records what every graph
receives: frames through the vision encoder, the frame Q-Former with its instruction, Whisper,
BEATs and the MRC Q-Former. The llm_decoder needs no activation calibration (its int8 form is
weight-only).

`vsal-export calibrate` stores the sets in the package's `calibration/` folder (one npz per graph)
with an index of what they were recorded on: the sha256 of the exported graphs and the instruction
tokenizer (the inputs are a function of those, the clips and the preprocessing code) and the vsal
version. `build` reads them back while that still matches, instead of running the clips again.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path

import numpy as np
from vsal.runtime.errors import ConfigError, MediaError, PackageError
from vsal.runtime.graphs import CALIBRATED_GRAPHS
from vsal.runtime.manifest import CALIBRATION_DIR, Manifest
from vsal.runtime.media import probe_media
from vsal.runtime.package_lock import replacing, write_json_durable
from vsal.runtime.package_paths import confined, package_folder, read_json
from vsal.runtime.precisions import EXPORTED
from vsal.runtime.prompt import DecodingOptions

MEDIA_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".wav", ".flac", ".mp3", ".m4a", ".ogg"}
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".ogg"}
STORE_INDEX = f"{CALIBRATION_DIR}/inputs.json"  # what the stored sets were recorded on
MAX_INDEX_BYTES = 64 << 10  # 64 KiB: a few dozen file names and digests
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
    package: str | os.PathLike,
    clips: Iterable[Path],
    progress: bool = True,
    label: str = "calibration clips",
    verify: bool = True,
) -> dict[str, list[Feeds]]:
    """Run the fp32 pipeline over `clips` and return every feed each encoder-side graph received.
    verify=False: the caller has checked the package's sha256 already (the build, under its lock)."""
    from tqdm import tqdm
    from vsal.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(package, verbose=False, precision=EXPORTED, verify=verify)
    recorded: dict[str, list[Feeds]] = {name: [] for name in CALIBRATED_GRAPHS}

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


def recorded_on(manifest: Manifest) -> dict[str, str]:
    """What recorded inputs depend on: the exported graphs (with their weights) and the instruction
    tokenizer, file -> sha256 as the manifest gives them (a verified package matches them), and the
    vsal version (its preprocessing). Variants are not in it: a build adds those."""
    files = {}
    for info in manifest.graphs.values():
        files[info.file] = info.sha256
        files.update(info.external_data)
    files[manifest.instruction_tokenizer.file] = manifest.instruction_tokenizer.sha256
    return {"vsal": version("vsal"), **files}


def save_calibration(
    package: str | os.PathLike, manifest: Manifest, recorded: dict[str, list[Feeds]]
) -> dict[str, Path]:
    """One npz per graph (`calibration/<graph>.npz`, arrays `<i>/<input>`), then the index naming
    what they were recorded on. The old index goes first and the new one comes last, each write
    atomic: a crash in between leaves sets without an index, which no build trusts. The caller
    holds the package lock and has checked the folder (package_update.written_folder)."""
    package = Path(package)
    index = package / STORE_INDEX
    index.unlink(missing_ok=True)
    paths = {}
    for name, feeds in recorded.items():
        arrays = {f"{i}/{key}": value for i, f in enumerate(feeds) for key, value in f.items()}
        path = package / CALIBRATION_DIR / f"{name}.npz"
        with replacing(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        paths[name] = path
    write_json_durable(
        index,
        {"recorded_on": recorded_on(manifest), "feeds": {name: len(f) for name, f in recorded.items()}},
    )
    return paths


def load_calibration(
    package: str | os.PathLike, manifest: Manifest, graphs: Iterable[str]
) -> tuple[dict[str, list[Feeds]] | None, str]:
    """(the stored inputs of `graphs`, a note saying where they came from), or (None, why not):
    no sets stored, or recorded on other graphs (re-exported since) or by another vsal. A store
    that is there but broken (an index or set that is not what save_calibration writes, inputs
    that are not the graph's) is a PackageError."""
    package = Path(package)
    index_path = package / STORE_INDEX
    if package_folder(package, CALIBRATION_DIR, "calibration folder") is None:
        return None, "no stored calibration inputs"
    real = confined(package, STORE_INDEX, "the calibration index", named_in=index_path)
    if not real.is_file():
        return None, "no stored calibration inputs"
    index = read_json(real, MAX_INDEX_BYTES, 'it holds {"recorded_on": {...}, "feeds": {...}}')
    stored, counts = index.get("recorded_on"), index.get("feeds")
    if not isinstance(stored, dict) or not isinstance(counts, dict):
        raise PackageError(
            f'{index_path}: expected "recorded_on" and "feeds" objects; run `vsal-export calibrate` again'
        )
    if stored != recorded_on(manifest):
        return None, (
            f"{package / CALIBRATION_DIR}: its inputs were recorded on other graphs or by another vsal "
            "(re-exported since `vsal-export calibrate`?): recorded again from its clips"
        )
    inputs = {}
    for name in graphs:
        if name not in counts:
            return (
                None,
                f"{package / CALIBRATION_DIR}: no stored inputs of {name}: recorded again from its clips",
            )
        count = counts[name]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise PackageError(
                f"{index_path}: feeds.{name} is {count!r}, not a count; run `vsal-export calibrate` again"
            )
        inputs[name] = _read_set(package, manifest, name, count)
    return (
        inputs,
        f"calibration inputs from {package / CALIBRATION_DIR} (recorded by `vsal-export calibrate`)",
    )


def _read_set(package: Path, manifest: Manifest, name: str, count: int) -> list[Feeds]:
    """The npz set of graph `name`: exactly `count` feeds, each of the graph's inputs with the
    manifest's dtype and rank; never unpickled."""
    rel = f"{CALIBRATION_DIR}/{name}.npz"
    shown = package / rel
    path = confined(
        package, rel, f"{name}'s calibration inputs", must_exist=True, named_in=package / STORE_INDEX
    )
    declared = {t.name: t for t in manifest.graphs[name].inputs}
    feeds: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise PackageError(
            f"{shown}: not a calibration set ({exc}); run `vsal-export calibrate` again"
        ) from None
    for key, value in arrays.items():
        index, _, tensor = key.partition("/")
        if not index.isdigit() or int(index) >= count or tensor not in declared:
            raise PackageError(f"{shown}: array {key!r} is not <feed>/<input> of {name}'s {count} feeds")
        feeds[int(index)][tensor] = value
    for i, feed in enumerate(feeds):
        for tensor, info in declared.items():
            value = feed.get(tensor)
            if value is None or value.dtype != np.dtype(info.dtype) or value.ndim != len(info.shape):
                got = "missing" if value is None else f"{value.dtype} of rank {value.ndim}"
                raise PackageError(
                    f"{shown}: feed {i} {tensor} is {got}, {name} takes {info.dtype} of rank "
                    f"{len(info.shape)}; run `vsal-export calibrate` again"
                )
    return feeds


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
