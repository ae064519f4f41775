"""A transformers Llama checkpoint folder as a package's LLM (`vsal-export export --llm DIR`).

The folder is what `LlamaForCausalLM.save_pretrained` writes: config.json, model.safetensors (or
shards listed in model.safetensors.index.json) and a tokenizer (tokenizer.model for sentencepiece,
or a Hugging Face tokenizer.json). `read_llm_folder` checks it all before any model is built and
says which file and key is wrong; `llm_filler` loads the weights into the package's `llm` part,
tensor by tensor, strictly (every key present, every shape right).

The other graphs keep the preset's weights: `with_llm` swaps the preset's LLM dims for the
folder's, so the mrc_qformer's projection (built for config.llm.hidden_size) feeds this LLM.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsal.export.config import LlmConfig, ModelConfig
from vsal.runtime.errors import ConfigError
from vsal.runtime.tokenizers import JSON_FILE, SPM_FILE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KB
LLAMA_DEFAULTS = {  # transformers' LlamaConfig defaults, for keys a config.json may leave out
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class LlmFolder:
    """A checked Llama checkpoint folder."""

    path: Path
    config: LlmConfig
    weights: tuple[Path, ...]  # the safetensors files holding the tensors
    tokenizer: Path  # tokenizer.model (preferred, as the release loads Vicuna's) or tokenizer.json


def read_llm_folder(path: str | Path) -> LlmFolder:
    """The folder's LlmConfig, weight files and tokenizer; ConfigError naming the file and key when
    it is not a Llama checkpoint vsal can export."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--llm {folder}: not a folder (give a transformers Llama checkpoint folder)")
    config_path = folder / CONFIG_FILE
    config = llm_config_of(_read_json(config_path), config_path)
    weights = _weight_files(folder)
    tokenizer = _tokenizer_file(folder)
    _check_tokenizer_fits(tokenizer, config)
    return LlmFolder(folder, config, weights, tokenizer)


def with_llm(config: ModelConfig, llm: LlmConfig) -> ModelConfig:
    """The preset's parts around another LLM: the MRC Q-Former projects to `llm.hidden_size`."""
    return dataclasses.replace(config, llm=llm)


def llm_config_of(hf: dict[str, Any], source: Path) -> LlmConfig:
    """The LlmConfig of a transformers Llama config.json; ConfigError for what vsal's decoder
    (LlamaForCausalLM built from LlmConfig) would compute differently."""

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {problem}")

    if hf.get("model_type") != "llama":
        raise fail(
            "model_type", f"is {hf.get('model_type')!r}, expected 'llama' (a LlamaForCausalLM checkpoint)"
        )
    for key in REQUIRED_KEYS:
        if key not in hf:
            raise fail(key, "missing (a Llama config.json has it)")
    values: dict[str, Any] = {key: hf[key] for key in REQUIRED_KEYS}
    values["num_key_value_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    for key, default in LLAMA_DEFAULTS.items():
        value = hf.get(key)
        values[key] = default if value is None else value
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type != "default":
        raise fail("rope_parameters", f"rope_type {rope_type!r}: vsal's decoder has the default rotary only")
    if "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    eos = values["eos_token_id"]
    if isinstance(eos, list):  # several stop tokens (LLaMA-3): the manifest holds one
        if not eos:
            raise fail("eos_token_id", "an empty list")
        values["eos_token_id"] = eos[0]
    pad = hf.get("pad_token_id")
    values["pad_token_id"] = values["eos_token_id"] if pad is None else pad
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise fail(key, "true: vsal's decoder has no attention or MLP biases")
    for key in (*REQUIRED_KEYS, "num_key_value_heads", "max_position_embeddings"):
        if not _positive_int(values[key]):
            raise fail(key, f"{values[key]!r} is not a positive integer")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if not _int(values[key]) or not 0 <= values[key] < values["vocab_size"]:
            raise fail(key, f"{values[key]!r} is not a token id below vocab_size {values['vocab_size']}")
    for key in ("rms_norm_eps", "rope_theta"):
        if not isinstance(values[key], (int, float)) or not math.isfinite(values[key]) or values[key] <= 0:
            raise fail(key, f"{values[key]!r} is not a positive number")
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    if values["hidden_size"] % heads:
        raise fail("hidden_size", f"{values['hidden_size']} is not a multiple of num_attention_heads {heads}")
    if heads % kv_heads:
        raise fail("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != values["hidden_size"] // heads:
        raise fail(
            "head_dim",
            f"{head_dim}, not hidden_size / num_attention_heads = {values['hidden_size'] // heads}: "
            "vsal's decoder derives head_dim",
        )
    values["rms_norm_eps"] = float(values["rms_norm_eps"])
    values["rope_theta"] = float(values["rope_theta"])
    values["tie_word_embeddings"] = bool(values["tie_word_embeddings"])
    return LlmConfig(**values)


def llm_filler(folder: LlmFolder) -> Callable[[str, Any], None]:
    """An ExportSource fill that loads the folder's tensors into the `llm` part (other parts keep
    their preset weights), strictly; a tied LM head comes from the embedding table."""

    def fill(name: str, module) -> None:
        if name == "llm":
            load_llm_weights(folder, module.model)

    return fill


def load_llm_weights(folder: LlmFolder, model) -> None:
    """Copy every tensor of the folder's safetensors into `model` (a LlamaForCausalLM), cast to its
    dtype; CheckpointError naming the file and key for a missing, unexpected or misshapen one."""
    import torch
    from safetensors import safe_open
    from vsal.export.weights.checkpoints import CheckpointError, _derived

    params = model.state_dict()
    expected = {k for k in params if not _derived(k)}
    if folder.config.tie_word_embeddings:
        expected.discard("lm_head.weight")  # the embedding table; save_pretrained leaves it out
    seen: set[str] = set()
    with torch.no_grad():
        for path in folder.weights:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key == "lm_head.weight" and folder.config.tie_word_embeddings:
                        continue  # a tied head saved anyway: the embedding table is the one used
                    if key not in expected:
                        raise CheckpointError(f"{path}: {key}: not a tensor of a Llama model of this config")
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(params[key].shape):
                        raise CheckpointError(
                            f"{path}: {key} has shape {tuple(tensor.shape)}, expected "
                            f"{tuple(params[key].shape)} (from {folder.path / CONFIG_FILE})"
                        )
                    params[key].copy_(tensor.to(params[key].dtype))
                    seen.add(key)
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(
            f"{folder.path}: the safetensors lack {len(missing)} tensors, e.g. {', '.join(missing[:3])}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: missing (a transformers checkpoint folder has a config.json)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, too large for a config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return data


def _weight_files(folder: Path) -> tuple[Path, ...]:
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX
    if single.is_file():
        return (single,)
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index}: weight_map: missing or empty")
        shards = []
        for name in sorted(set(weight_map.values())):
            shard = folder / str(name)
            if Path(str(name)).name != name or not shard.is_file():
                raise ConfigError(f"{index}: weight_map names {name!r}, not a file in {folder}")
            shards.append(shard)
        return tuple(shards)
    raise ConfigError(
        f"{folder}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (only safetensors are read: save the model "
        "with save_pretrained, which writes them)"
    )


def _tokenizer_file(folder: Path) -> Path:
    for name in (SPM_FILE, JSON_FILE):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"{folder}: no {SPM_FILE} or {JSON_FILE} (save the tokenizer with save_pretrained)")


def _check_tokenizer_fits(path: Path, config: LlmConfig) -> None:
    """The runtime reads the tokenizer, and every id it gives must index the embedding table."""
    from vsal.runtime.tokenizers import LlamaTokenizer, TokenizerFileError

    try:
        size = LlamaTokenizer(path).vocab_size
    except TokenizerFileError as exc:
        raise ConfigError(str(exc)) from None
    if size > config.vocab_size:
        raise ConfigError(
            f"{path}: {size} tokens, more than config.json's vocab_size {config.vocab_size} "
            "(a tokenizer of another model?)"
        )


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _int(value) and value > 0
