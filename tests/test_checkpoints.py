"""Release-layout state dicts: loading, round trip, LoRA merging, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vsal.export import build_model
from vsal.export.weights.checkpoints import CheckpointError, to_release_layout

LLM = "llama_model.base_model.model.model.layers"


def _fresh(config):
    return build_model(config, seed=123)  # other weights than tiny_model's (seed 0)


def test_release_layout_round_trips(tiny_model, tiny_config):
    sd = to_release_layout(tiny_model)
    other = _fresh(tiny_config)
    report = other.load_release_state_dict(sd)
    assert report.missing == [] and report.unexpected == []
    for key, value in tiny_model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert to_release_layout(other).keys() == sd.keys()


def test_release_extras_are_ignored_or_reported(tiny_model, tiny_config):
    sd = dict(to_release_layout(tiny_model))
    depth = tiny_config.vision.depth
    sd[f"visual_encoder.blocks.{depth}.norm1.weight"] = torch.ones(3)  # EVA-CLIP's dropped last block
    sd["beats.predictor.weight"] = torch.zeros(527, 3)
    sd["low_Qformer.bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(2, 2)
    sd["Qformer.cls.predictions.bias"] = torch.zeros(4)
    sd["something_new.weight"] = torch.zeros(1)
    # ext_same_qformer: the shared MRC modules appear a second time under joint_* names.
    sd["joint_Qformer.bert.embeddings.LayerNorm.weight"] = sd[
        "video_Qformer.bert.embeddings.LayerNorm.weight"
    ]
    sd["ln_joint.weight"] = sd["ln_video.weight"]
    report = _fresh(tiny_config).load_release_state_dict(sd)
    assert report.unexpected == ["something_new.weight"]
    assert len(report.ignored) == 4
    assert report.missing == []


def test_conflicting_alias_is_an_error(tiny_model, tiny_config):
    sd = dict(to_release_layout(tiny_model))
    sd["ln_joint.weight"] = sd["ln_video.weight"] + 1
    with pytest.raises(CheckpointError, match="ln_joint.weight and ln_video.weight"):
        _fresh(tiny_config).load_release_state_dict(sd)


def test_shape_mismatches_are_collected_with_both_shapes(tiny_model, tiny_config):
    sd = dict(to_release_layout(tiny_model))
    sd["llama_proj.weight"] = torch.zeros(3, 3)
    sd["query_tokens"] = torch.zeros(1, 5, 7)
    with pytest.raises(CheckpointError) as info:
        _fresh(tiny_config).load_release_state_dict(sd)
    text = str(info.value)
    assert "2 checkpoint problem(s)" in text
    assert "llama_proj.weight has shape (3, 3)" in text and "query_tokens has shape (1, 5, 7)" in text
    expected = tuple(tiny_model.mrc_qformer.llama_proj.weight.shape)
    assert f"expects {expected}" in text


def test_missing_keys_are_reported(tiny_model, tiny_config):
    sd = dict(to_release_layout(tiny_model))
    del sd["speech_pre_qformer_proj.bias"]
    report = _fresh(tiny_config).load_release_state_dict(sd)
    assert report.missing == ["whisper_encoder.speech_pre_qformer_proj.bias"]


def _lora_factors(config, seed=7):
    gen = torch.Generator().manual_seed(seed)
    r = config.lora.r
    factors = {}
    kv = config.llm.num_key_value_heads * config.llm.head_dim
    outs = {"q_proj": config.llm.hidden_size, "k_proj": kv, "v_proj": kv, "o_proj": config.llm.hidden_size}
    for layer in range(config.llm.num_hidden_layers):
        for proj, out in outs.items():
            inp = config.llm.hidden_size
            factors[(layer, proj)] = (
                torch.randn(r, inp, generator=gen) * 0.05,
                torch.randn(out, r, generator=gen) * 0.05,
            )
    return factors


@pytest.mark.parametrize("peft_layout", ["0.5", "new"])
def test_merged_lora_equals_unmerged_forward(tiny_model, tiny_config, peft_layout):
    sd = dict(to_release_layout(tiny_model))
    factors = _lora_factors(tiny_config)
    for (layer, proj), (a, b) in factors.items():
        prefix = f"{LLM}.{layer}.self_attn.{proj}"
        if peft_layout == "new":
            sd[f"{prefix}.base_layer.weight"] = sd.pop(f"{prefix}.weight")
        sd[f"{prefix}.lora_A.default.weight"] = a
        sd[f"{prefix}.lora_B.default.weight"] = b
    merged = _fresh(tiny_config)
    report = merged.load_release_state_dict(sd)
    assert len(report.lora_merged) == 4 * tiny_config.llm.num_hidden_layers
    assert report.unexpected == [] and report.missing == []

    # Unmerged reference: the base model with peft's forward, y = W x + scale * B (A x).
    scale = tiny_config.lora.scale
    hooks = []
    for (layer, proj), (a, b) in factors.items():
        module = getattr(tiny_model.llm.model.model.layers[layer].self_attn, proj)
        hooks.append(
            module.register_forward_hook(
                lambda mod, args, out, a=a, b=b: out + scale * F.linear(F.linear(args[0], a), b)
            )
        )
    embeds = torch.randn(1, 6, tiny_config.llm.hidden_size)
    inputs = dict(attention_mask=torch.ones(1, 6, dtype=torch.long), position_ids=torch.arange(6)[None])
    try:
        with torch.no_grad():
            expected, _ = tiny_model.llm(embeds, **inputs)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        got, _ = merged.llm(embeds, **inputs)
        base, _ = tiny_model.llm(embeds, **inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapters do change the output


def test_half_a_lora_pair_is_an_error(tiny_model, tiny_config):
    sd = dict(to_release_layout(tiny_model))
    sd[f"{LLM}.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(32, tiny_config.llm.hidden_size)
    with pytest.raises(CheckpointError, match="only lora_A"):
        _fresh(tiny_config).load_release_state_dict(sd)
