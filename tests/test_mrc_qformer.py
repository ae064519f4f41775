"""MrcQFormer (tiny preset): key names, shapes, causal slot mask, padding, fp16 safety."""

from __future__ import annotations

import pytest
import torch
from vsal.export import presets
from vsal.export.models.mrc_qformer import MrcQFormer, additive_mask, slot_causal_mask

CONFIG = presets.get("tiny")
D = CONFIG.mrc_qformer.hidden_size  # 32
E = CONFIG.av_width  # 96

# The release's keys with `video_Qformer.bert.` -> `qformer.`; per layer N of the 2 layers.
LAYER_KEYS = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "crossattention.self.query.weight",
    "crossattention.self.query.bias",
    "crossattention.self.key.weight",
    "crossattention.self.key.bias",
    "crossattention.self.value.weight",
    "crossattention.self.value.bias",
    "crossattention.output.dense.weight",
    "crossattention.output.dense.bias",
    "crossattention.output.LayerNorm.weight",
    "crossattention.output.LayerNorm.bias",
    "intermediate_query.dense.weight",
    "intermediate_query.dense.bias",
    "output_query.dense.weight",
    "output_query.dense.bias",
    "output_query.LayerNorm.weight",
    "output_query.LayerNorm.bias",
    "encoder_causal_attention.self.query.weight",
    "encoder_causal_attention.self.query.bias",
    "encoder_causal_attention.self.key.weight",
    "encoder_causal_attention.self.key.bias",
    "encoder_causal_attention.self.value.weight",
    "encoder_causal_attention.self.value.bias",
    "encoder_causal_attention.output.dense.weight",
    "encoder_causal_attention.output.dense.bias",
    "encoder_causal_attention.output.LayerNorm.weight",
    "encoder_causal_attention.output.LayerNorm.bias",
]
TOP_KEYS = [
    "video_query_tokens",
    "low_query_tokens",
    "qformer.embeddings.LayerNorm.weight",
    "qformer.embeddings.LayerNorm.bias",
    "ln_video.weight",
    "ln_video.bias",
    "video_frame_position_embedding.weight",
    "llama_proj.weight",
    "llama_proj.bias",
]


@pytest.fixture(scope="module")
def model() -> MrcQFormer:
    torch.manual_seed(0)
    return MrcQFormer(CONFIG).eval()


def test_state_dict_keys_match_release_names(model: MrcQFormer) -> None:
    expected = set(TOP_KEYS) | {f"qformer.encoder.layer.{n}.{k}" for n in range(2) for k in LAYER_KEYS}
    assert set(model.state_dict()) == expected
    sd = model.state_dict()
    assert sd["video_query_tokens"].shape == (1, 30, D)
    assert sd["low_query_tokens"].shape == (1, 3, D)
    assert sd["video_frame_position_embedding.weight"].shape == (4096, E)
    assert sd["llama_proj.weight"].shape == (CONFIG.llm.hidden_size, 2 * D)
    assert sd["qformer.encoder.layer.0.crossattention.self.key.weight"].shape == (D, E)
    assert sd["qformer.encoder.layer.1.encoder_causal_attention.self.query.weight"].shape == (E, E)
    assert sd["qformer.encoder.layer.1.encoder_causal_attention.output.LayerNorm.weight"].shape == (E,)


@pytest.mark.parametrize("batch,slots", [(1, 10), (2, 30)])
def test_output_shape(model: MrcQFormer, batch: int, slots: int) -> None:
    with torch.no_grad():
        out = model(torch.randn(batch, slots * 32, E), torch.ones(batch, slots))
    assert out.shape == (batch, 3 * slots, CONFIG.llm.hidden_size)
    assert torch.isfinite(out).all()


def test_slot_causal_mask_is_release_block_mask() -> None:
    release = torch.kron(torch.triu(torch.ones(10, 10)), torch.ones(32, 32))
    assert torch.equal(slot_causal_mask(10, 32).float(), release)
    assert slot_causal_mask(1, 32).all()  # a 1-slot (low) window is not masked at all


def _with_slot_perturbed(model: MrcQFormer, module, slots: int, k: int, capture) -> list[torch.Tensor]:
    """What `capture(args, out)` takes from `module` (None: skip) when the model runs on random
    `slots` slots, then on the same with slot k perturbed: [before, after]."""
    captured: list[torch.Tensor] = []

    def hook(m, args, out):
        taken = capture(args, out)
        if taken is not None:
            captured.append(taken)

    handle = module.register_forward_hook(hook)
    x = torch.randn(1, slots * 32, E)
    xp = x.clone()
    xp[:, k * 32 : (k + 1) * 32] += torch.randn(1, 32, E)
    try:
        with torch.no_grad():
            model(x, torch.ones(1, slots))
            model(xp, torch.ones(1, slots))
    finally:
        handle.remove()
    return captured


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("k", [0, 4, 9])
def test_causal_attention_slot_i_sees_slots_from_i_on(model: MrcQFormer, k: int, layer: int) -> None:
    """Perturbing slot k of a 10-slot window changes the causal encoder attention output (as the
    model's forward computes it, in every layer) of slots <= k only."""
    attn = model.qformer.encoder.layer[layer].encoder_causal_attention
    before, after = _with_slot_perturbed(
        model, attn, 10, k, lambda args, out: out if out.shape[1] == 320 else None
    )
    diff = (after - before).abs().amax(-1).reshape(10, 32).amax(-1)
    changed = [i for i in range(10) if diff[i] > 1e-6]
    assert changed == list(range(k + 1))


def test_causal_attention_block(model: MrcQFormer) -> None:
    """The attention block alone with the release's mask arithmetic: slot 9 is seen by every slot."""
    attn = model.qformer.encoder.layer[0].encoder_causal_attention
    bias = additive_mask(slot_causal_mask(10, 32), torch.float32)[None, None]
    x = torch.randn(2, 320, E)
    xp = x.clone()
    xp[:, 9 * 32 :] += torch.randn(2, 32, E)
    with torch.no_grad():
        diff = (attn(xp, xp, bias) - attn(x, x, bias)).abs().amax(-1).reshape(2, 10, 32).amax(-1)
    assert (diff > 1e-6).all()


def test_low_first_and_window_layout(model: MrcQFormer) -> None:
    """llama_proj input = [low | high]: perturbing slot k moves the low half only at its 3 tokens,
    the high half at the 30 tokens of its 10-slot window."""
    k = 13
    before, after = _with_slot_perturbed(model, model.llama_proj, 20, k, lambda args, out: args[0])
    diff = (after - before).abs()[0]  # [60, 2D]
    low_changed = (diff[:, :D].amax(-1) > 1e-6).nonzero().flatten().tolist()
    high_changed = (diff[:, D:].amax(-1) > 1e-6).nonzero().flatten().tolist()
    assert low_changed == [3 * k, 3 * k + 1, 3 * k + 2]
    assert high_changed == list(range(30, 60))


def test_padding_mask_reaches_cross_attention(model: MrcQFormer) -> None:
    x = torch.randn(1, 20 * 32, E)
    mask = torch.ones(1, 20)
    masked = mask.clone()
    masked[0, 15:] = 0
    with torch.no_grad():
        a, b = model(x, mask), model(x, masked)
    assert torch.equal(a[:, :30], b[:, :30])  # first window untouched
    assert not torch.allclose(a[:, 30:], b[:, 30:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_padded_window_is_finite_and_kept(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    model = MrcQFormer(CONFIG).eval().to(dtype)
    x = torch.randn(2, 20 * 32, E)
    mask = torch.ones(2, 20)
    mask[0, 10:] = 0  # item 0: second window all padding (zero features, as alignment gives)
    x[0, 320:] = 0
    with torch.no_grad():
        out = model(x.to(dtype), mask.to(dtype)).float()
    assert out.shape == (2, 60, CONFIG.llm.hidden_size)
    assert torch.isfinite(out).all()
    assert out[0, 30:].abs().amax() > 1e-3  # reaches the LLM, not zeroed or dropped
    if dtype == torch.float16:
        with torch.no_grad():
            ref = MrcQFormer(CONFIG).eval()
            ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
            assert (out - ref(x, mask)).abs().amax() < 2e-2


def test_fp16_overflowing_mask_does_not_make_nan() -> None:
    """Scores far below zero + finfo(fp16).min overflow to -inf; a fully masked row must stay finite."""
    torch.manual_seed(2)
    model = MrcQFormer(CONFIG).eval()
    with torch.no_grad():
        for layer in model.qformer.encoder.layer:
            layer.crossattention.self.query.bias.fill_(-30.0)
            layer.crossattention.self.key.bias.fill_(30.0)
    model = model.half()
    mask = torch.zeros(1, 10, dtype=torch.float16)
    with torch.no_grad():
        out = model(torch.zeros(1, 320, E, dtype=torch.float16), mask)
    assert torch.isfinite(out).all()
