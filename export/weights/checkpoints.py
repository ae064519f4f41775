"""Checkpoint loading: the release's key layout -> vsal's modules.

The release's `OpenLLAMAPEFTModel` state dict names every part with a prefix (reference page,
section 6). `ReleaseLoader` maps each key to the vsal parameter it feeds, merges LoRA adapters
into the LLM's base weights, and keeps a report: vsal keys never filled (missing), release keys it
does not understand (unexpected) and keys the release carries but inference never reads (ignored).
All shape mismatches are collected and raised together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from vsal.export.weights.lora import merge_lora
from vsal.runtime.errors import VsalError


class CheckpointError(VsalError, ValueError):
    """A checkpoint that cannot be loaded: names the file or key and what is wrong."""


@dataclass(frozen=True)
class Target:
    """Where one release tensor goes: a vsal state-dict key, optionally a third of a fused qkv bias."""

    key: str
    third: int | None = None  # 0 = q, 2 = v: EVA stores q_bias/v_bias, HF fuses them with a zero k bias


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    lora_merged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors, merged LoRA into {len(self.lora_merged)}, "
            f"ignored {len(self.ignored)} unused, {len(self.unexpected)} unexpected, "
            f"{len(self.missing)} missing"
        ]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
                lines.append(f"  {title}: {shown}")
        return "\n".join(lines)


# Keys the release carries that inference never reads, with the reason.
_IGNORED = [
    (re.compile(r"^beats\.predictor\."), "BEATs' AudioSet classifier head; features only"),
    (re.compile(r"^(Qformer|video_Qformer|joint_Qformer|low_Qformer)\.cls\."), "Q-Former LM head"),
    (re.compile(r"^low_Qformer\."), "unused in the released config (ext_same_qformer)"),
    (re.compile(r"\.position_ids$"), "buffer rebuilt by the module"),
    (re.compile(r"rotary_emb\.inv_freq$"), "buffer rebuilt by the module"),
    (re.compile(r"^llm_proj\."), "InstructBLIP's own projection into Vicuna; video-SALMONN does not use it"),
    (
        re.compile(r"^(video|joint)_Qformer\.bert\.embeddings\.(word|position)_embeddings\."),
        "the release sets the MRC Q-Former's text embeddings to None",
    ),
    (
        re.compile(r"^(video|joint)_Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\."),
        "the release removes the MRC Q-Former's text FFN",
    ),
]

# Aliases: the release registers shared modules twice (ext_same_qformer); both names hold one tensor.
_ALIASES = [
    ("joint_Qformer.", "video_Qformer."),
    ("joint_frame_position_embedding.", "video_frame_position_embedding."),
    ("ln_joint.", "ln_video."),
    ("joint_query_tokens", "video_query_tokens"),
    ("llama_proj_joint.", "llama_proj."),
]


def _rules(pairs: list[tuple[str, str]], inverse: bool = False) -> list[tuple[re.Pattern, str]]:
    """Rename rules from (release, vsal) name pieces, one way or the other: "^" and "$" anchor a
    piece, "{}" stands for a number carried over."""
    rules = []
    for source, target in (pair[::-1] if inverse else pair for pair in pairs):
        body = re.escape(source.strip("^$")).replace(r"\{\}", r"(\d+)")
        pattern = ("^" if source.startswith("^") else "") + body + ("$" if source.endswith("$") else "")
        first, *rest = target.strip("^$").split("{}")
        replacement = first + "".join(f"\\g<{i}>{piece}" for i, piece in enumerate(rest, 1))
        rules.append((re.compile(pattern), replacement))
    return rules


# LAVIS BERT names <-> transformers InstructBLIP Q-Former names.
_BERT_NAMES = [
    ("^embeddings.LayerNorm.", "^embeddings.layernorm."),
    (".attention.self.", ".attention.attention."),
    (".crossattention.self.", ".crossattention.attention."),
]
_BERT_RENAMES, _BERT_INVERSE = _rules(_BERT_NAMES), _rules(_BERT_NAMES, inverse=True)

# LAVIS EVA-ViT names <-> transformers InstructBLIP vision names (fused-bias thirds handled apart).
_EVA_NAMES = [
    ("^cls_token$", "^embeddings.class_embedding$"),
    ("^pos_embed$", "^embeddings.position_embedding$"),
    ("^patch_embed.proj.", "^embeddings.patch_embedding."),
    ("^blocks.{}.norm1.", "^encoder.layers.{}.layer_norm1."),
    ("^blocks.{}.norm2.", "^encoder.layers.{}.layer_norm2."),
    ("^blocks.{}.attn.qkv.weight$", "^encoder.layers.{}.self_attn.qkv.weight$"),
    ("^blocks.{}.attn.proj.", "^encoder.layers.{}.self_attn.projection."),
    ("^blocks.{}.mlp.fc{}.", "^encoder.layers.{}.mlp.fc{}."),
]
_EVA_RENAMES, _EVA_INVERSE = _rules(_EVA_NAMES), _rules(_EVA_NAMES, inverse=True)
_EVA_BIAS = re.compile(r"^blocks\.(\d+)\.attn\.(q|v)_bias$")

_LORA = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[AB])\.[^.]+\.weight$")
_LLM_PREFIXES = ("llama_model.base_model.model.", "llama_model.")

_MRC_TOP = (
    "ln_video.",
    "video_frame_position_embedding.",
    "video_query_tokens",
    "low_query_tokens",
    "llama_proj.",
)


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        name = pattern.sub(repl, name)
    return name


class ReleaseLoader:
    """Feeds release-layout tensors into a `VideoSalmonn`, one state dict (or file) at a time."""

    def __init__(self, model):
        self.model = model
        self.depth = model.config.vision.depth
        self.params = model.state_dict(keep_vars=True)
        self.report = LoadReport()
        self._filled: set[str] = set()
        self._sources: dict[str, str] = {}  # vsal key -> release key that filled it (for alias checks)
        self._lora: dict[str, dict[str, torch.Tensor]] = {}  # vsal weight key -> {"A": .., "B": ..}
        self._errors: list[str] = []

    def target(self, key: str) -> Target | None:
        """The vsal destination of a release key, or None when it is not understood."""
        for alias, primary in _ALIASES:
            if key.startswith(alias):
                key = primary + key[len(alias) :]
        if key.startswith("visual_encoder."):
            rest = key[len("visual_encoder.") :]
            m = _EVA_BIAS.match(rest)
            if m:
                return Target(
                    f"vision_encoder.model.encoder.layers.{m[1]}.self_attn.qkv.bias", 0 if m[2] == "q" else 2
                )
            return Target("vision_encoder.model." + _rename(rest, _EVA_RENAMES))
        if key.startswith("ln_vision."):
            return Target("vision_encoder.model.post_layernorm." + key[len("ln_vision.") :])
        if key == "query_tokens":
            return Target("frame_qformer.query_tokens")
        if key.startswith("Qformer.bert."):
            return Target("frame_qformer.qformer." + _rename(key[len("Qformer.bert.") :], _BERT_RENAMES))
        if key.startswith("speech_encoder."):
            return Target("whisper_encoder.encoder." + key[len("speech_encoder.") :])
        if key.startswith("speech_pre_qformer_proj."):
            return Target("whisper_encoder." + key)
        if key.startswith("beats."):
            return Target("beats_encoder." + key)
        if key.startswith("beats_pre_qformer_proj."):
            return Target("beats_encoder." + key)
        if key.startswith("video_Qformer.bert."):
            return Target("mrc_qformer.qformer." + key[len("video_Qformer.bert.") :])
        if key.startswith(_MRC_TOP):
            return Target("mrc_qformer." + key)
        for prefix in _LLM_PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix) :].replace(".base_layer.", ".")  # newer peft names the base weight so
                return Target("llm.model." + rest)
        return None

    def _ignored(self, key: str) -> bool:
        if any(p.search(key) for p, _ in _IGNORED):
            return True
        m = re.match(r"^visual_encoder\.blocks\.(\d+)\.", key)
        return bool(m and int(m[1]) >= self.depth)  # LAVIS loads EVA-CLIP's 40 blocks into 39

    def load(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Copy every understood tensor of `state_dict` (from `source`, for messages) into the model."""
        for key, tensor in state_dict.items():
            lora = _LORA.match(key)
            if lora:
                dest = self.target(lora["base"] + ".weight")
                if dest is None or dest.key not in self.params:
                    self.report.unexpected.append(key)
                    continue
                self._lora.setdefault(dest.key, {})[lora["ab"]] = tensor
                continue
            if self._ignored(key):
                self.report.ignored.append(key)
                continue
            dest = self.target(key)
            if dest is None or dest.key not in self.params:
                self.report.unexpected.append(key)
                continue
            self._assign(key, dest, tensor, source)

    def _assign(self, key: str, dest: Target, tensor: torch.Tensor, source: str) -> None:
        param = self.params[dest.key]
        with torch.no_grad():
            if dest.third is not None:
                width = param.shape[0] // 3
                if tensor.shape != (width,):
                    self._errors.append(
                        f"{source}: {key} has shape {tuple(tensor.shape)}, expected ({width},)"
                    )
                    return
                if dest.key not in self._filled:
                    param.zero_()  # the k third of the fused bias stays zero: EVA has no k bias
                param[dest.third * width : (dest.third + 1) * width].copy_(tensor)
            else:
                if tensor.shape != param.shape:
                    self._errors.append(
                        f"{source}: {key} has shape {tuple(tensor.shape)}, but {dest.key} "
                        f"expects {tuple(param.shape)}"
                    )
                    return
                earlier = self._sources.get(dest.key)
                if earlier is not None and earlier != key and not torch.equal(param, tensor.to(param.dtype)):
                    self._errors.append(f"{source}: {key} and {earlier} both feed {dest.key} but differ")
                    return
                param.copy_(tensor)
        self._sources.setdefault(dest.key, key)
        if dest.key not in self._filled:
            self._filled.add(dest.key)
            self.report.loaded.append(dest.key)

    def finish(self) -> LoadReport:
        """Merge the collected LoRA pairs, then raise on errors or return the report."""
        scale = self.model.config.lora.scale
        for dest, pair in sorted(self._lora.items()):
            if set(pair) != {"A", "B"}:
                self._errors.append(f"LoRA for {dest} has only lora_{''.join(pair)}")
                continue
            if dest not in self._filled:
                self._errors.append(f"LoRA for {dest} arrived but its base weight was never loaded")
                continue
            param = self.params[dest]
            try:
                merged = merge_lora(param.detach(), pair["A"], pair["B"], scale)
            except ValueError as exc:
                self._errors.append(f"LoRA for {dest}: {exc}")
                continue
            with torch.no_grad():
                param.copy_(merged)
            self.report.lora_merged.append(dest)
        if self._errors:
            raise CheckpointError(
                f"{len(self._errors)} checkpoint problem(s):\n  " + "\n  ".join(self._errors)
            )
        self.report.missing = sorted(k for k in self.params if k not in self._filled and not _derived(k))
        return self.report


def _derived(key: str) -> bool:
    """Buffers a module rebuilds itself, never stored in a checkpoint."""
    return key.endswith(("position_ids", "rotary_emb.inv_freq"))


_QKV_BIAS = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")


def to_release_layout(model) -> dict[str, torch.Tensor]:
    """The model's weights under the release's OpenLLAMAPEFTModel key names (LoRA already merged).

    The inverse of `ReleaseLoader`: feeds the release's own code, or round-trips through vsal.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if _derived(key):
            continue
        if key.startswith("vision_encoder.model.post_layernorm."):
            out["ln_vision." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("vision_encoder.model."):
            rest = key[len("vision_encoder.model.") :]
            m = _QKV_BIAS.match(rest)
            if m:
                q, _, v = tensor.chunk(3)
                out[f"visual_encoder.blocks.{m[1]}.attn.q_bias"] = q
                out[f"visual_encoder.blocks.{m[1]}.attn.v_bias"] = v
            else:
                out["visual_encoder." + _rename(rest, _EVA_INVERSE)] = tensor
        elif key == "frame_qformer.query_tokens":
            out["query_tokens"] = tensor
        elif key.startswith("frame_qformer.qformer."):
            out["Qformer.bert." + _rename(key[len("frame_qformer.qformer.") :], _BERT_INVERSE)] = tensor
        elif key.startswith("whisper_encoder.encoder."):
            out["speech_encoder." + key[len("whisper_encoder.encoder.") :]] = tensor
        elif key.startswith(("whisper_encoder.", "beats_encoder.")):
            out[key.split(".", 1)[1]] = tensor
        elif key.startswith("mrc_qformer.qformer."):
            out["video_Qformer.bert." + key[len("mrc_qformer.qformer.") :]] = tensor
        elif key.startswith("mrc_qformer."):
            out[key[len("mrc_qformer.") :]] = tensor
        elif key.startswith("llm.model."):
            out["llama_model.base_model.model." + key[len("llm.model.") :]] = tensor
        else:
            raise CheckpointError(f"no release name for vsal key {key}")
    return out
