"""Writes a folder shaped like the six released checkpoint files, from a vsal model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file
from vsal.export.weights.checkpoints import to_release_layout

LLM = "llama_model.base_model.model."


def _strip(sd, prefix):
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def write_release_dir(
    model, folder: Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> Path:
    """`lora` maps an LLM projection's release base key (…q_proj) to (A, B); the base weights
    written to the Vicuna folder are the model's, so the expected merged weight is W + B A."""
    cfg = model.config
    sd = {k: v.clone().contiguous() for k, v in to_release_layout(model).items()}
    folder.mkdir(parents=True, exist_ok=True)

    eva = _strip(sd, "visual_encoder.")
    eva[f"blocks.{cfg.vision.depth}.norm1.weight"] = torch.ones(cfg.vision.embed_dim)  # EVA-CLIP's 40th block
    torch.save(eva, folder / "eva_vit_g.pth")

    blip = {
        k: v for k, v in sd.items() if k.startswith(("ln_vision.", "Qformer.bert.")) or k == "query_tokens"
    }
    blip["llm_proj.weight"] = torch.zeros(4, cfg.frame_qformer.hidden_size)
    torch.save({"model": blip}, folder / "instruct_blip_vicuna13b_trimmed.pth")

    beats = _strip(sd, "beats.")
    beats["predictor.weight"] = torch.zeros(cfg.beats.predictor_class, cfg.beats.encoder_embed_dim)
    beats_cfg = dataclasses.asdict(cfg.beats) | {"dropout": 0.1, "layer_wise_gradient_decay_ratio": 0.6}
    torch.save({"cfg": beats_cfg, "model": beats}, folder / "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt")

    whisper = {"model.encoder." + k: v for k, v in _strip(sd, "speech_encoder.").items()}
    whisper["model.decoder.embed_tokens.weight"] = torch.zeros(8, cfg.whisper.d_model)
    (folder / "whisper-large-v2").mkdir(exist_ok=True)
    save_file(whisper, str(folder / "whisper-large-v2" / "model.safetensors"))

    (folder / "vicuna-13b-v1.5").mkdir(exist_ok=True)
    save_file(_strip(sd, LLM), str(folder / "vicuna-13b-v1.5" / "model.safetensors"))

    delta = {
        k: v
        for k, v in sd.items()
        if k.startswith(
            (
                "speech_pre_qformer_proj.",
                "beats_pre_qformer_proj.",
                "ln_video.",
                "video_frame_position_embedding.",
                "video_Qformer.",
                "video_query_tokens",
                "low_query_tokens",
                "llama_proj.",
            )
        )
    }
    delta["ln_joint.weight"] = delta["ln_video.weight"]  # ext_same_qformer aliases
    delta["joint_query_tokens"] = delta["video_query_tokens"]
    for base, (a, b) in (lora or {}).items():
        delta[f"{base}.lora_A.default.weight"] = a
        delta[f"{base}.lora_B.default.weight"] = b
    torch.save(delta, folder / "pytorch_model_4_5001.pt")
    return folder
