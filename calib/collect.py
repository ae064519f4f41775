"""Calibration data from real media: each graph's inputs, as the runtime feeds them.

`collect` runs the torch-free pipeline (fp32 graphs) over media files and records what every graph
receives: frames through the vision encoder, the frame Q-Former with its instruction, Whisper,
BEATs and the MRC Q-Former, and the llm_decoder's prefill (the prompt with the clip's tokens, with an
empty past): its int8 form is weight-only, but int4's clipping search weighs each block by the
activations it multiplies (vsal.transforms.int4).

`vsal-export calibrate` stores the sets in the package's `calibration/` folder (one npz per graph)
with an index of what they were recorded on: the sha256 of the exported graphs and the instruction
tokenizer, a digest of the manifest's settings the runtime reads (config, preprocessing constants,
special tokens), the vsal version (its preprocessing code) and the clips (path, size, mtime).
`build` reads them back while all of that still matches, instead of running the clips again; the
sets are read bounded (uncompressed members, sizes checked before numpy allocates, never unpickled).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path

import numpy as np
from vsal.runtime.backends.base import Runner
from vsal.runtime.errors import ConfigError, MediaError, PackageError
from vsal.runtime.graphs import CALIBRATED_GRAPHS, DECODER, KVLayout
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
STORED_GRAPHS = (*CALIBRATED_GRAPHS, DECODER)  # what `vsal-export calibrate` records
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
    graphs: Iterable[str] = CALIBRATED_GRAPHS,
) -> dict[str, list[Feeds]]:
    """Run the fp32 pipeline over `clips` and return every feed each of `graphs` received (the
    decoder: its prefill, one per question). verify=False: the caller has checked the package's
    sha256 already (the build, under its lock)."""
    from tqdm import tqdm
    from vsal.runtime.pipeline import Pipeline

    recorded: dict[str, list[Feeds]] = {name: [] for name in graphs}

    def record(name: str, feeds: Feeds) -> None:
        if name in recorded:
            recorded[name].append({k: np.array(v, copy=True) for k, v in feeds.items()})

    def backends(name, info, file, precision):
        if name == DECODER:  # recorded or not, the answer is never needed
            return PrefillRecorder(name, info, precision, record)
        return None  # the pipeline's own

    pipeline = Pipeline.load(
        package, verbose=False, precision=EXPORTED, verify=verify, backend_factory=backends
    )
    pipeline.observe_feeds(record)
    options = DecodingOptions(num_beams=1, max_new_tokens=1)
    clips = list(clips)
    try:
        for clip in tqdm(clips, desc=label, unit="clip", disable=not progress):
            kind = "audio" if clip.suffix.lower() in AUDIO_SUFFIXES else "video"
            for prompt in PROMPTS:
                try:
                    pipeline.ask(prompt, options=options, **{kind: clip})
                except PrefillRecorded:
                    pass  # the question's prefill is recorded; its answer is not needed
    finally:
        pipeline.close()  # its sessions now, not at some later collection (13b: 8 GB of encoders)
    return recorded


class PrefillRecorded(Exception):
    """Raised by PrefillRecorder's step once a question's prefill feeds are recorded."""


class PrefillRecorder(Runner):
    """The llm_decoder's stand-in while calibrating: its step records each prefill's feeds (empty
    pasts) and ends the question there. The decoder graph never loads, so calibration costs no
    decoder run, and the 13B decoder (26 GB) need not fit beside the encoders."""

    def __init__(self, name: str, info, precision: str, record: Callable[[str, Feeds], None]):
        super().__init__(name, info, precision, "prefill recorder (calibration)")
        self.record = record

    def input_names(self) -> list[str]:
        return [t.name for t in self.info.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.info.outputs]

    def _run(self, feeds, outputs):
        raise PrefillRecorded  # only the step runs

    def decoder_step(self, layout: KVLayout):
        layout = self.info.kv_layout(layout)

        def step(inputs_embeds, attention_mask, position_ids, cache):
            empty = np.zeros(layout.shape(inputs_embeds.shape[0], 0), layout.dtype)
            feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
            feeds["position_ids"] = position_ids
            self.record(DECODER, feeds | dict.fromkeys(layout.past_names(), empty))
            raise PrefillRecorded

        return step


def recorded_on(manifest: Manifest, clips: Iterable[Path]) -> dict[str, object]:
    """What recorded inputs depend on: the exported graphs (with their weights) and the instruction
    tokenizer, file -> sha256 as the manifest gives them (a verified package matches them); the
    manifest's settings the pipeline reads; the vsal version (its preprocessing code); and the
    clips, by [resolved path, size, mtime_ns] (a clip replaced under its name is another clip);
    the last two as digests, so the index stays small.
    Variants and engines are not in it: a build adds those."""
    files = {}
    for info in manifest.graphs.values():
        files[info.file] = info.sha256
        files.update(info.external_data)
    files[manifest.instruction_tokenizer.file] = manifest.instruction_tokenizer.sha256
    settings = {
        "config": manifest.config,
        "preprocessing": manifest.preprocessing,  # empty in older packages: config gives it
        "special_tokens": manifest.special_tokens,
    }
    stamps = [[os.path.realpath(c), os.stat(c).st_size, os.stat(c).st_mtime_ns] for c in clips]
    return {"vsal": version("vsal"), **files, "settings": _digest(settings), "clips": _digest(stamps)}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def save_calibration(
    package: str | os.PathLike, manifest: Manifest, recorded: dict[str, list[Feeds]], clips: Iterable[Path]
) -> dict[str, Path]:
    """One npz per graph (`calibration/<graph>.npz`, arrays `<i>/<input>`), then the index naming
    what they were recorded on (`recorded_on(manifest, clips)`, `clips` the calibration clips).
    The old index goes first and the new one comes last, each write atomic: a crash in between
    leaves sets without an index, which no build trusts. The caller holds the package lock and has
    checked the folder (package_update.written_folder)."""
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
        {
            "recorded_on": recorded_on(manifest, clips),
            "feeds": {name: len(f) for name, f in recorded.items()},
        },
    )
    return paths


def load_calibration(
    package: str | os.PathLike, manifest: Manifest, graphs: Iterable[str], clips: Iterable[Path]
) -> tuple[dict[str, list[Feeds]] | None, str]:
    """(the stored inputs of `graphs`, a note saying where they came from), or (None, why not):
    no sets stored, or recorded on other graphs (re-exported since), other settings, other clips
    (`clips`: the build's calibration clips) or by another vsal. A store that is there but broken
    (an index or set that is not what save_calibration writes, inputs that are not the graph's) is
    a PackageError."""
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
    if stored != recorded_on(manifest, clips):
        return None, (
            f"{package / CALIBRATION_DIR}: its inputs were recorded on other graphs or by another vsal, "
            "or on other clips or settings (re-exported since `vsal-export calibrate`, or a clip "
            "changed?): recorded again from its clips"
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
    manifest's dtype and rank. Read bounded: every member stored uncompressed (as np.savez writes
    them: no zip bomb) with a header no larger than the bytes it holds, checked before numpy
    allocates anything, and the feeds counted before `count` sizes anything; never unpickled."""
    rel = f"{CALIBRATION_DIR}/{name}.npz"
    shown = package / rel
    path = confined(
        package, rel, f"{name}'s calibration inputs", must_exist=True, named_in=package / STORE_INDEX
    )
    declared = {t.name: t for t in manifest.graphs[name].inputs}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                _check_member(archive, member)
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise PackageError(
            f"{shown}: not a calibration set ({exc}); run `vsal-export calibrate` again"
        ) from None
    for key in arrays:
        index, _, tensor = key.partition("/")
        # one spelling per feed ("01" is not "1"), ASCII digits only (int("²") fails)
        canonical = index.isascii() and index.isdigit() and index == str(int(index))
        if not canonical or int(index) >= count or tensor not in declared:
            raise PackageError(f"{shown}: array {key!r} is not <feed>/<input> of {name}'s {count} feeds")

    def refused(i: int, tensor: str, got: str) -> PackageError:
        info = declared[tensor]
        return PackageError(
            f"{shown}: feed {i} {tensor} is {got}, {name} takes {info.dtype} of rank "
            f"{len(info.shape)}; run `vsal-export calibrate` again"
        )

    if len(arrays) != count * len(declared):  # fewer: the first gap is within len(arrays) + 1 steps
        gap = next((i, t) for i in range(count) for t in declared if f"{i}/{t}" not in arrays)
        raise refused(*gap, "missing")
    feeds: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for key, value in arrays.items():
        index, _, tensor = key.partition("/")
        feeds[int(index)][tensor] = value
    for i, feed in enumerate(feeds):
        for tensor, info in declared.items():
            value = feed[tensor]
            if value.dtype != np.dtype(info.dtype) or value.ndim != len(info.shape):
                raise refused(i, tensor, f"{value.dtype} of rank {value.ndim}")
    return feeds


def _check_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """One .npy member: stored, not compressed, and its header's shape no larger than its bytes
    (ValueError saying which)."""
    if not member.filename.endswith(".npy") or member.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"member {member.filename!r} is not an uncompressed .npy array")
    with archive.open(member) as f:
        major, _ = np.lib.format.read_magic(f)
        if major not in (1, 2):
            raise ValueError(f"member {member.filename!r}: .npy format {major} (np.savez writes 1 or 2)")
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(f)
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python ints: no overflow
    if dtype.hasobject or size > member.file_size:
        raise ValueError(
            f"member {member.filename!r} declares {dtype} {list(shape)} ({size} bytes) in "
            f"{member.file_size} bytes"
        )


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
