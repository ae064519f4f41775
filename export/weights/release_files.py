"""The six files video-SALMONN is released as, read lazily in the release's key layout.

Layout of a checkpoint folder (names as the release's README and config use them):
  eva_vit_g.pth                         LAVIS EVA-ViT-g -> visual_encoder.*
  instruct_blip_vicuna13b_trimmed.pth   LAVIS InstructBLIP ("model") -> ln_vision, Qformer, query_tokens
  BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt   BEATs ("cfg", "model") -> beats.*
  whisper-large-v2/                     HF folder -> speech_encoder.* (encoder only)
  vicuna-13b-v1.5/                      HF folder -> llama_model.base_model.model.*
  pytorch_model_4_5001.pt               video-SALMONN delta (projections, MRC Q-Former, LoRA)

Files are opened with torch.load(weights_only=True, mmap=True) or safetensors: no pickled code is
ever run, and tensors are paged in one at a time as they are copied, never a whole part at once.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from vsal.export.config import BeatsConfig, ModelConfig
from vsal.export.weights.checkpoints import CheckpointError, LoadReport, ReleaseLoader


def _whisper_key(key: str) -> str | None:
    """HF Whisper keys -> the release's speech_encoder.*; the decoder is not part of video-SALMONN."""
    m = re.match(r"^(?:model\.)?encoder\.(.+)$", key)
    return f"speech_encoder.{m[1]}" if m else None


@dataclass(frozen=True)
class ReleaseSource:
    name: str  # file or folder name inside the checkpoint folder
    what: str  # for messages
    rename: Callable[[str], str | None]  # file key -> release key (None: not used by video-SALMONN)
    inner_key: str | None = None  # the state dict sits under this key of the loaded object
    has_beats_cfg: bool = False


VICUNA_FOLDER = "vicuna-13b-v1.5"  # the LLM's Hugging Face folder (weights and tokenizer.model)
DELTA_FILE = "pytorch_model_4_5001.pt"  # video-SALMONN's own tensors and LoRA, read over the rest

RELEASE_SOURCES = (
    ReleaseSource("eva_vit_g.pth", "EVA-ViT-g (LAVIS)", lambda k: "visual_encoder." + k),
    ReleaseSource(
        "instruct_blip_vicuna13b_trimmed.pth", "InstructBLIP Vicuna-13B (LAVIS)", lambda k: k, "model"
    ),
    ReleaseSource(
        "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
        "BEATs iter3+ AS2M",
        lambda k: "beats." + k,
        "model",
        has_beats_cfg=True,
    ),
    ReleaseSource("whisper-large-v2", "Whisper large-v2 (HF folder)", _whisper_key),
    ReleaseSource(
        VICUNA_FOLDER, "Vicuna-13B v1.5 (HF folder)", lambda k: "llama_model.base_model.model." + k
    ),
    ReleaseSource(DELTA_FILE, "video-SALMONN delta", lambda k: k),
)


def check_release_dir(folder: str | Path) -> list[Path]:
    """The paths of the six sources; CheckpointError lists every one that is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected the six released checkpoint files)")
    paths = [folder / s.name for s in RELEASE_SOURCES]
    missing = [f"{s.name} ({s.what})" for s, p in zip(RELEASE_SOURCES, paths, strict=True) if not p.exists()]
    if missing:
        raise CheckpointError(f"{folder}: missing " + ", ".join(missing))
    return paths


def _torch_load(path: Path):
    """torch.load that never runs pickled code; memory-mapped where the file format allows."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) file
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: not loadable without running pickled code, which vsal refuses "
            f"({str(exc).splitlines()[0]}); re-save it as a plain state dict or safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read it as a torch checkpoint ({exc})") from None


def hf_weight_files(folder: Path) -> list[Path]:
    """A Hugging Face folder's weight files: its safetensors shards, else its pytorch_model*.bin."""
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weights in this folder")
    return shards


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _hf_folder_tensors(
    folder: Path, wanted: Callable[[str], bool], meta: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(file key, tensor) of the keys `wanted` accepts; no other tensor's data is read, and none
    at all when `meta` (shapes and dtypes from the safetensors headers)."""
    for shard in hf_weight_files(folder):
        if shard.suffix != ".safetensors":
            yield from ((k, t) for k, t in _torch_load(shard).items() if wanted(k))
            continue
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            for key in filter(wanted, f.keys()):
                if not meta:
                    yield key, f.get_tensor(key)
                    continue
                entry = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(entry.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{shard}: {key} is {entry.get_dtype()}, which torch cannot hold")
                yield key, torch.empty(entry.get_shape(), dtype=dtype, device="meta")


def read_source(
    path: Path,
    source: ReleaseSource,
    config: ModelConfig,
    wanted: Callable[[str | None], bool] | None = None,
    meta: bool = False,
) -> Iterator[tuple[str, str | None, torch.Tensor]]:
    """Yield (file key, release key or None if unused, tensor) for one released file or folder;
    with `wanted` (release key or None -> bool), only the entries it accepts; with `meta`, tensors
    on the meta device (shapes and dtypes: no tensor data is read)."""

    def accepted(key: str) -> bool:
        return wanted is None or wanted(source.rename(key))

    if path.is_dir():
        items = _hf_folder_tensors(path, accepted, meta)
    else:
        loaded = _torch_load(path)
        if source.has_beats_cfg:
            _check_beats_cfg(path, loaded, config)
        if source.inner_key is not None:
            if not isinstance(loaded, dict) or source.inner_key not in loaded:
                raise CheckpointError(f"{path}: expected a dict with a {source.inner_key!r} entry")
            loaded = loaded[source.inner_key]
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(loaded).__name__}")
        items = ((k, t) for k, t in loaded.items() if accepted(k))  # memory-mapped: unread until used
    for key, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if meta and not tensor.is_meta:
            tensor = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        yield key, source.rename(key), tensor


def _check_beats_cfg(path: Path, loaded, config: ModelConfig) -> None:
    cfg = loaded.get("cfg") if isinstance(loaded, dict) else None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: no BEATs 'cfg' dict in this checkpoint")
    found = BeatsConfig.from_checkpoint_cfg(cfg)
    differ = [
        f"{name}={getattr(found, name)!r} (model expects {getattr(config.beats, name)!r})"
        for name in cfg
        if hasattr(found, name) and getattr(found, name) != getattr(config.beats, name)
    ]
    if differ:
        raise CheckpointError(f"{path}: BEATs config differs from the model's: " + ", ".join(differ))


def iter_release_files(folder: str | Path, config: ModelConfig, progress: bool = False):
    """Yield (source, file key, release key or None, tensor) over all six sources, in order."""
    from tqdm import tqdm

    paths = check_release_dir(folder)
    pairs = list(zip(RELEASE_SOURCES, paths, strict=True))
    for source, path in tqdm(pairs, desc="checkpoint files", unit="file", disable=not progress):
        for key, release_key, tensor in read_source(path, source, config):
            yield source, key, release_key, tensor


def load_release_files(folder: str | Path, config: ModelConfig, progress: bool = False):
    """Build a VideoSalmonn for `config` and fill it from the six released files (LoRA merged)."""
    from vsal.export import build_model

    model = build_model(config)
    loader = ReleaseLoader(model)
    for source, key, release_key, tensor in iter_release_files(folder, config, progress):
        if release_key is None:
            loader.report.ignored.append(f"{source.name}:{key}")
        else:
            loader.load({release_key: tensor}, source=source.name)
    report: LoadReport = loader.finish()
    return model, report
