"""The manifest's schema: the type of every field, checked before the dataclasses are built, so a
wrong type is a PackageError naming manifest.json and the field, never a TypeError deep in the
runtime. Torch-free.

A spec is a type (or tuple of types), COUNT (an integer > 0), ANY, a list or dict of one spec (the
items, the values), or a Record. `check_types(value, spec, path)` applies one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsal.runtime.errors import PackageError


@dataclass(frozen=True)
class Record:
    required: dict[str, Any]
    optional: dict[str, Any] = field(default_factory=dict)
    rest: Any = None  # the spec of any other key; None: other keys are refused (another format)


COUNT = "a positive integer"  # a size or a divisor: 0 would divide by zero, < 0 index backwards
ANY = "anything"  # not read by vsal

_GRAPH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")  # graph names become folder names (Triton models)
_PRECISION_KEY = re.compile(r"[a-z0-9]+\Z")
_TENSOR = Record({"name": str, "dtype": str, "shape": [(int, str)]})
_VARIANT = Record(
    {"precision": str, "file": str, "sha256": str},
    {"external_data": {"": str}, "accuracy": dict, "notes": str, "inputs": [_TENSOR], "outputs": [_TENSOR]},
)
_ENGINE = Record(
    {"file": str},
    {"tensorrt": str, "compute_capability": str, "precision": str, "build_seconds": (int, float)},
)
_PROFILE = {"": Record({"min": int, "opt": int, "max": int})}
_GRAPH = Record(
    {"file": str, "sha256": str, "inputs": [_TENSOR], "outputs": [_TENSOR], "profile": _PROFILE},
    {
        "axis_multiples": {"": int},
        "precision": str,
        "external_data": {"": str},
        "engines": [_ENGINE],
        "variants": {"precision": _VARIANT},
        "fused": {"precision": _VARIANT},
    },
)
_FILE = Record({"file": str, "sha256": str})
_KV_CACHE = Record(
    {"layers": COUNT, "kv_heads": COUNT, "head_dim": COUNT, "dtype": str, "past": str, "present": str},
    {"kinds": [str]},
)
_NUMBER = (int, float)
_PREPROCESSING = Record(
    {
        **dict.fromkeys(
            (
                "image_size",
                "sample_rate",
                "whisper_n_mels",
                "whisper_n_fft",
                "whisper_hop",
                "whisper_n_frames",
                "beats_n_mels",
            ),
            COUNT,
        ),
        "clip_mean": [_NUMBER],
        "clip_std": [_NUMBER],
        "min_audio_seconds": _NUMBER,
        "max_audio_seconds": _NUMBER,
    }
)
DERIVED = ("kv_cache", "preprocessing")  # optional: derived from config when absent
MANIFEST = Record(
    {
        "preset": str,
        "random_weights": bool,
        "config": dict,
        "graphs": {"graph": _GRAPH},
        "embeddings": _FILE,
        "llm_tokenizer": _FILE,
        "instruction_tokenizer": _FILE,
        "special_tokens": Record({"bos": int, "eos": int}, rest=int),  # the pipeline reads bos and eos
        "prompt": Record({"before": str, "after": str}, rest=str),
        "decoding": dict,
        "limits": {"": int},
    },
    {
        "format_version": int,
        "vsal_version": str,
        "opset": int,
        "kv_cache": _KV_CACHE,
        "preprocessing": _PREPROCESSING,
        "weight_sources": {"": str},
    },
)
_KEYS = {"": None, "graph": _GRAPH_KEY, "precision": _PRECISION_KEY}


def _counts(*keys: str) -> Record:
    return Record(dict.fromkeys(keys, COUNT), rest=ANY)


# What the runtime (pipeline, bench) reads of config: ModelConfig.to_dict() holds more.
RUNTIME_CONFIG = Record(
    {
        "alignment": _counts(
            "fps",
            "max_clips",
            "tokens_per_frame",
            "audio_frames_per_slot",
            "audio_slots",
            "high_window",
            "sample_rate",
        ),
        "frame_qformer": _counts("hidden_size", "vocab_size"),  # vocab: the instruction's ids
        "mrc_qformer": _counts("num_query_tokens"),
        "llm": _counts(
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ),
        "vision": Record(
            {
                **dict.fromkeys(("img_size", "patch_size", "embed_dim", "depth"), COUNT),
                "mlp_ratio": (int, float),
            },
            rest=ANY,
        ),
        "whisper": _counts(
            "max_source_positions", "d_model", "num_mel_bins", "encoder_layers", "encoder_ffn_dim"
        ),
        "beats": _counts(
            "input_patch_size",
            "embed_dim",
            "encoder_embed_dim",
            "encoder_layers",
            "encoder_ffn_embed_dim",
            "conv_pos",
            "conv_pos_groups",
        ),
    },
    rest=ANY,
)


def check_types(value: Any, spec: Any, path: Path, where: str = "") -> None:
    """PackageError naming manifest.json and the field when `value` does not follow `spec`."""
    if spec is ANY:
        return
    if isinstance(spec, Record):
        _check_record(value, spec, path, where)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            _wrong(path, where, "a list", value)
        for i, item in enumerate(value):
            check_types(item, spec[0], path, f"{where}[{i}]")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            _wrong(path, where, "an object", value)
        ((key_kind, item_spec),) = spec.items()
        pattern = _KEYS[key_kind]
        for key, item in value.items():
            if pattern is not None and not pattern.match(key):
                raise PackageError(
                    f"{path}: {where} has a key {key!r}; {key_kind} names are {pattern.pattern[:-2]}"
                )
            check_types(item, item_spec, path, f"{where}.{key}")
    elif spec is COUNT:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            _wrong(path, where, COUNT, value)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            _wrong(path, where, " or ".join(_TYPE_NAMES[t] for t in types), value)


def _check_record(value: Any, spec: Record, path: Path, where: str) -> None:
    if not isinstance(value, dict):
        _wrong(path, where or "the top level", "an object", value)
    missing = [k for k in spec.required if k not in value]
    if missing:
        raise PackageError(f"{path}: {where or 'the manifest'} lacks {', '.join(missing)}")
    if spec.rest is None:
        unknown = sorted(set(value) - set(spec.required) - set(spec.optional))
        if unknown:
            raise PackageError(
                f"{path}: {where or 'the manifest'} has unknown fields {unknown} (another vsal's format?)"
            )
    for key, item in value.items():
        item_spec = spec.required.get(key, spec.optional.get(key, spec.rest))
        check_types(item, item_spec, path, f"{where}.{key}" if where else key)


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "an object",
}


def _wrong(path: Path, where: str, expected: str, value: Any) -> None:
    shown = json.dumps(value)[:40] if not isinstance(value, dict | list) else type(value).__name__
    raise PackageError(f"{path}: {where} must be {expected}, got {shown}")
