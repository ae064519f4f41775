"""The six released files read for an export as they lie, never consolidated (`vsal-export export
--checkpoint-dir`): nothing is written but the package.

  release_part_filler  fills one built part at a time with its tensors from the files that feed it
                       (the encoders; the LLM too where it is small enough to be built)
  ReleaseLlmWeights    the LLM as a WeightSource (vsal.export.streaming) for the streamed decoder:
                       each tensor read from the Vicuna folder when asked for, the delta's LoRA
                       merged into it as it is read

Both follow `vsal-export convert` key for key (vsal.export.weights.consolidated: the same renames,
the delta read over the rest, the same LoRA merge in fp32 cast back to the base weight's dtype), so
an export from the folder and one from its consolidated checkpoint get the same tensors, bit for bit.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from vsal.export.config import ModelConfig
from vsal.export.weights.checkpoints import CheckpointError, ReleaseLoader, _derived
from vsal.export.weights.consolidated import _consolidate, _meta_model, _read_delta, plan_release_files
from vsal.export.weights.lora import merge_lora
from vsal.export.weights.release_files import (
    DELTA_FILE,
    RELEASE_SOURCES,
    VICUNA_FOLDER,
    _torch_load,
    check_release_dir,
    hf_weight_files,
)

LLM_KEYS = "llm.model."  # vsal keys of the LlamaForCausalLM: the rest of the key is transformers' name


def _is_llm(key: str) -> bool:
    return key.startswith(LLM_KEYS)


def release_part_filler(folder: str | Path, config: ModelConfig) -> Callable[[str, nn.Module], None]:
    """An ExportSource fill: one part's tensors straight from the released files, strictly (every
    key, every shape), cast to the part's dtype. Every part is planned first from the files'
    metadata (shapes, LoRA pairs, missing keys), so a bad folder fails before the export starts."""
    folder = Path(folder)
    model = _meta_model(config)  # the loaders' key map; no memory
    plan_release_files(folder, config, model=model)

    def fill(name: str, module: nn.Module) -> None:
        prefix = name + "."
        loader = ReleaseLoader(model)
        params = module.state_dict()
        filled: set[str] = set()
        tensors = _consolidate(folder, config, loader, meta=False, keep=lambda key: key.startswith(prefix))
        with torch.no_grad():
            for key, tensor in tensors:
                rest = key[len(prefix) :]
                if rest in filled:
                    continue  # the first copy is the one `convert` writes
                filled.add(rest)
                got, want = tuple(tensor.shape), tuple(params[rest].shape)
                if got != want:
                    loader._errors.append(f"{key}: checkpoint shape {got}, model expects {want}")
                    continue
                params[rest].copy_(tensor.to(params[rest].dtype))
        missing = sorted(k for k in params if k not in filled and not _derived(k))
        if missing:
            loader._errors.append(f"part {name}: {len(missing)} tensors not found: {', '.join(missing[:8])}")
        if loader._errors:
            raise CheckpointError(
                f"{folder}: {len(loader._errors)} checkpoint problem(s):\n  " + "\n  ".join(loader._errors)
            )

    return fill


class ReleaseLlmWeights:
    """The release's LLM by transformers' LlamaForCausalLM names, one tensor at a time (a
    WeightSource): read from the Vicuna folder when asked for (safetensors memory-mapped, or
    torch.load(mmap=True) of pytorch_model*.bin), the delta's LoRA pair merged into it; a tensor
    the delta carries replaces the base's. Names, shapes and LoRA pairs are all checked when it is
    made, from the files' metadata."""

    def __init__(self, folder: str | Path, config: ModelConfig):
        folder = Path(folder)
        model = _meta_model(config)
        plan, _ = plan_release_files(folder, config, keep=_is_llm, model=model)
        self._info = {k[len(LLM_KEYS) :]: (shape, _numpy_dtype(dtype, k, folder)) for k, dtype, shape in plan}
        self._scale = config.lora.scale
        paths = dict(zip((s.name for s in RELEASE_SOURCES), check_release_dir(folder), strict=True))
        sources = {s.name: s for s in RELEASE_SOURCES}
        loader = ReleaseLoader(model)
        self._delta, self._lora = _read_delta(
            paths[DELTA_FILE], sources[DELTA_FILE], config, loader, meta=False, keep=_is_llm
        )
        self._readers = _folder_readers(paths[VICUNA_FOLDER])
        self._base: dict[str, str] = {}  # LLM name -> the Vicuna folder's key that holds it
        for file_key in self._readers:
            release_key = sources[VICUNA_FOLDER].rename(file_key)
            dest = None if loader._ignored(release_key) else loader.target(release_key)
            if dest is not None and _is_llm(dest.key) and dest.key not in self._delta:
                self._base.setdefault(dest.key[len(LLM_KEYS) :], file_key)
        unread = [n for n in self._info if n not in self._base and LLM_KEYS + n not in self._delta]
        if unread:
            raise CheckpointError(f"internal: {folder}: planned LLM tensors with no file: {unread[:5]}")

    def names(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        return self._info[name]

    def tensor(self, name: str) -> np.ndarray:
        key = LLM_KEYS + name
        if key in self._delta:
            return _as_numpy(self._delta[key], f"{DELTA_FILE}: {key}")
        values = self._readers[self._base[name]]()
        pair = self._lora.get(key)
        if pair is None:
            return values
        base = torch.from_numpy(np.array(values))  # a writable copy of this one tensor
        return merge_lora(base, pair["A"], pair["B"], self._scale).numpy()


def _folder_readers(folder: Path) -> dict[str, Callable[[], np.ndarray]]:
    """The folder's tensors by key, each read when called (the first shard holding a key wins, as
    `convert` reads them). Each read maps its file anew and the mapping lives as long as the array
    does: only the tensor being written is resident, never a whole 10 GB shard."""
    from vsal.export.streaming import SafetensorsWeights

    readers: dict[str, Callable[[], np.ndarray]] = {}
    for shard in hf_weight_files(folder):
        if shard.suffix == ".safetensors":
            weights = SafetensorsWeights([shard])
            for key in weights.names():
                readers.setdefault(key, partial(weights.tensor, key))
            continue
        if not zipfile.is_zipfile(shard):
            raise CheckpointError(
                f"{shard}: a legacy (pre-zip) torch file, which cannot be memory-mapped a tensor at a "
                "time; save it again with torch.save or as safetensors"
            )
        for key in _torch_load(shard):
            readers.setdefault(key, partial(_read_bin, shard, key))
    return readers


def _read_bin(shard: Path, key: str) -> np.ndarray:
    return _as_numpy(_torch_load(shard)[key], f"{shard}: {key}")  # mmap: the other tensors are unread


def _as_numpy(tensor: torch.Tensor, where: str) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{where} is a {type(tensor).__name__}, not a tensor")
    return tensor.detach().numpy()  # a view of the memory-mapped file, not a copy


def _numpy_dtype(dtype: torch.dtype, key: str, folder: Path) -> np.dtype:
    try:
        return np.dtype(str(dtype).removeprefix("torch."))
    except TypeError:
        raise CheckpointError(
            f"{folder}: {key} is {dtype}; the streamed decoder export reads float16, float32 or "
            "float64 weights (convert the checkpoint to float16 first)"
        ) from None
