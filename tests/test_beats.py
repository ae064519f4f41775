"""BEATs backbone and BeatsEncoder (tiny preset, CPU).

Parity with the release (model/beats/{BEATs,backbone}.py of bytedance/SALMONN videosalmonn),
measured once with a local copy of it (not available to CI): release BEATs with random weights,
every parameter perturbed, state dict minus `predictor.*` loaded here with strict=True, fbank fed
to extract_features(feature_only=True) with the all-False one-clip padding mask, fp32 eval, CPU:
  preset  B  F     tokens  max abs err  rel l2 err
  tiny    1  998   496     1.3e-06      1.8e-07
  tiny    1  2998  1496    1.7e-06      1.8e-07
  tiny    2  998   496     1.7e-06      1.8e-07
  tiny    2  517   256     1.2e-06      1.8e-07
  13b     1  998   496     5.0e-06      1.1e-06
  13b     1  2998  1496    4.9e-06      8.8e-07   (30 s -> 1496 tokens)
  13b     2  998   496     5.5e-06      1.0e-06
  13b     2  517   256     5.8e-06      1.2e-06
BeatsEncoder vs release pad-to-1500 + beats_pre_qformer_proj: 13b F=998 2.3e-06, F=2998 2.6e-06.
"""

from __future__ import annotations

import math

import pytest
import torch
from vsal.export import presets
from vsal.export.models.beats import BEATs, BeatsEncoder, relative_position_bucket

# State dict keys of the release's BEATs for a 2-layer config, `predictor.*` removed. The shared
# relative_attention_bias table appears under every layer, as in the release's checkpoints.
RELEASE_KEYS_2_LAYERS = [
    "post_extract_proj.weight",
    "post_extract_proj.bias",
    "patch_embedding.weight",
    "encoder.pos_conv.0.bias",
    "encoder.pos_conv.0.weight_g",
    "encoder.pos_conv.0.weight_v",
    "encoder.layers.0.self_attn.grep_a",
    "encoder.layers.0.self_attn.relative_attention_bias.weight",
    "encoder.layers.0.self_attn.k_proj.weight",
    "encoder.layers.0.self_attn.k_proj.bias",
    "encoder.layers.0.self_attn.v_proj.weight",
    "encoder.layers.0.self_attn.v_proj.bias",
    "encoder.layers.0.self_attn.q_proj.weight",
    "encoder.layers.0.self_attn.q_proj.bias",
    "encoder.layers.0.self_attn.out_proj.weight",
    "encoder.layers.0.self_attn.out_proj.bias",
    "encoder.layers.0.self_attn.grep_linear.weight",
    "encoder.layers.0.self_attn.grep_linear.bias",
    "encoder.layers.0.self_attn_layer_norm.weight",
    "encoder.layers.0.self_attn_layer_norm.bias",
    "encoder.layers.0.fc1.weight",
    "encoder.layers.0.fc1.bias",
    "encoder.layers.0.fc2.weight",
    "encoder.layers.0.fc2.bias",
    "encoder.layers.0.final_layer_norm.weight",
    "encoder.layers.0.final_layer_norm.bias",
    "encoder.layers.1.self_attn.grep_a",
    "encoder.layers.1.self_attn.k_proj.weight",
    "encoder.layers.1.self_attn.k_proj.bias",
    "encoder.layers.1.self_attn.v_proj.weight",
    "encoder.layers.1.self_attn.v_proj.bias",
    "encoder.layers.1.self_attn.q_proj.weight",
    "encoder.layers.1.self_attn.q_proj.bias",
    "encoder.layers.1.self_attn.out_proj.weight",
    "encoder.layers.1.self_attn.out_proj.bias",
    "encoder.layers.1.self_attn.grep_linear.weight",
    "encoder.layers.1.self_attn.grep_linear.bias",
    "encoder.layers.1.self_attn.relative_attention_bias.weight",
    "encoder.layers.1.self_attn_layer_norm.weight",
    "encoder.layers.1.self_attn_layer_norm.bias",
    "encoder.layers.1.fc1.weight",
    "encoder.layers.1.fc1.bias",
    "encoder.layers.1.fc2.weight",
    "encoder.layers.1.fc2.bias",
    "encoder.layers.1.final_layer_norm.weight",
    "encoder.layers.1.final_layer_norm.bias",
    "encoder.layer_norm.weight",
    "encoder.layer_norm.bias",
    "layer_norm.weight",
    "layer_norm.bias",
]

# (relative position = key - query, bucket), computed with the release's _relative_positions_bucket.
BUCKETS_320_800 = [
    (-5000, 159), (-800, 159), (-799, 159), (-400, 135), (-200, 111), (-100, 87), (-80, 80), (-79, 79),
    (-1, 1), (0, 0), (1, 161), (79, 239), (80, 240), (100, 247), (400, 295), (799, 319), (800, 319),
    (5000, 319),
]  # fmt: skip
BUCKETS_32_128 = [
    (-200, 15), (-127, 15), (-64, 14), (-20, 10), (-9, 8), (-8, 8), (-7, 7), (-1, 1), (0, 0), (1, 17),
    (7, 23), (8, 24), (20, 26), (127, 31), (128, 31), (200, 31),
]  # fmt: skip


# Release output (tiny preset, fp32) for the deterministic weights and fbank of
# `test_matches_release_golden_values`: out[0, ::9, ::7], recorded with the release's own BEATs.
RELEASE_GOLDEN = [
    [-0.826780, 0.019896, -1.436960, -0.532171, 1.422274],
    [-0.833600, 0.015235, -1.422009, -0.541464, 1.425641],
    [-0.827165, 0.017544, -1.428320, -0.534860, 1.426170],
    [-0.286337, 0.116996, -1.067757, -0.526986, 1.340351],
    [-0.816088, 0.020797, -1.454839, -0.525270, 1.424770],
    [-0.292930, 0.117690, -1.063513, -0.520004, 1.340491],
]
RELEASE_GOLDEN_ABS_MEAN = 0.854753


@pytest.fixture(scope="module")
def config():
    return presets.get("tiny")


@pytest.fixture(scope="module")
def encoder(config):
    torch.manual_seed(0)
    model = BeatsEncoder(config).eval()
    with torch.no_grad():  # move every parameter off its trivial init (LayerNorm 1/0, zero biases)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_output_shapes(encoder, config):
    hidden = config.frame_qformer.hidden_size
    for frames, tokens in [(998, 496), (47, 16), (2998, 1496)]:
        fbank = torch.randn(2, frames, 128)
        with torch.no_grad():
            assert encoder.beats(fbank).shape == (2, tokens, config.beats.encoder_embed_dim)
            assert encoder(fbank).shape == (2, config.alignment.audio_frames, hidden)
        assert encoder.beats.num_tokens(frames) == tokens


def test_patch_tokens_are_time_major(encoder):
    beats = encoder.beats
    fbank = torch.randn(2, 50, 128)  # 3 time blocks; the last 2 frames are dropped
    weight = beats.patch_embedding.weight[:, 0]  # [C, 16, 16]
    expected = torch.stack(
        [
            torch.einsum("btm,ctm->bc", fbank[:, 16 * t : 16 * t + 16, 16 * f : 16 * f + 16], weight)
            for t in range(3)
            for f in range(8)
        ],
        dim=1,
    )
    with torch.no_grad():
        got = beats.patch_tokens(fbank)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_padding_positions_carry_projection_bias(encoder):
    fbank = torch.randn(1, 998, 128)
    with torch.no_grad():
        out = encoder(fbank)
        tokens = encoder.beats_pre_qformer_proj(encoder.beats(fbank))
    proj_bias = encoder.beats_pre_qformer_proj.bias
    assert proj_bias.abs().min() > 0
    torch.testing.assert_close(out[:, :496], tokens)
    assert torch.equal(out[0, 496:], proj_bias.expand(1500 - 496, -1))


def test_long_input_is_truncated(encoder):
    fbank = torch.randn(1, 3200, 128)  # 200 * 8 = 1600 tokens
    with torch.no_grad():
        out = encoder(fbank)
        tokens = encoder.beats_pre_qformer_proj(encoder.beats(fbank))
    assert out.shape[1] == 1500
    torch.testing.assert_close(out, tokens[:, :1500])


@pytest.mark.parametrize(
    ("num_buckets", "max_distance", "table"), [(320, 800, BUCKETS_320_800), (32, 128, BUCKETS_32_128)]
)
def test_relative_position_bucket(num_buckets, max_distance, table):
    relative = torch.tensor([r for r, _ in table])
    expected = torch.tensor([b for _, b in table])
    assert torch.equal(relative_position_bucket(relative, num_buckets, max_distance), expected)


def test_position_bias_uses_buckets_of_key_minus_query(encoder, config):
    transformer = encoder.beats.encoder
    length = 900  # beyond max_distance: the table lookup must saturate like the formula
    positions = torch.arange(length)
    relative = positions[None, :] - positions[:, None]
    bucket = relative_position_bucket(relative, config.beats.num_buckets, config.beats.max_distance)
    table = transformer.layers[0].self_attn.relative_attention_bias.weight
    with torch.no_grad():
        bias = transformer.position_bias(length)
    assert bias.shape == (config.beats.encoder_attention_heads, length, length)
    assert torch.equal(bias, table[bucket].permute(2, 0, 1))


def test_state_dict_keys_match_release(config):
    keys = list(BEATs(config.beats).state_dict())
    assert sorted(keys) == sorted(RELEASE_KEYS_2_LAYERS)
    assert len(keys) == len(RELEASE_KEYS_2_LAYERS)


def test_relative_attention_bias_is_shared(encoder):
    tables = [layer.self_attn.relative_attention_bias for layer in encoder.beats.encoder.layers]
    assert all(table is tables[0] for table in tables)


def test_deep_norm_alpha(encoder, config):
    for layer in encoder.beats.encoder.layers:
        assert layer.deep_norm_alpha == pytest.approx((2 * config.beats.encoder_layers) ** 0.25)


def test_weight_norm_matches_torch(encoder):
    conv = encoder.beats.encoder.pos_conv[0]
    expected = torch._weight_norm(conv.weight_v, conv.weight_g, 2)
    torch.testing.assert_close(conv.weight(), expected)


def test_state_dict_round_trip(encoder, config):
    other = BeatsEncoder(config).eval()
    fbank = torch.randn(2, 300, 128)
    with torch.no_grad():
        assert not torch.allclose(other(fbank), encoder(fbank))
        other.load_state_dict(encoder.state_dict(), strict=True)
        assert torch.equal(other(fbank), encoder(fbank))
        # weight norm: scaling weight_v leaves the effective conv weight unchanged
        other.beats.encoder.pos_conv[0].weight_v.mul_(3.0)
        torch.testing.assert_close(other(fbank), encoder(fbank), atol=1e-5, rtol=1e-5)


def test_no_nan_on_loud_input(encoder):
    fbank = torch.randn(2, 998, 128) * 100
    with torch.no_grad():
        assert torch.isfinite(encoder(fbank)).all()


def test_unsupported_config_raises(config):
    import dataclasses

    with pytest.raises(ValueError, match="layer_norm_first"):
        BEATs(dataclasses.replace(config.beats, layer_norm_first=True, deep_norm=False))


def _deterministic_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights from sin(), key by key in sorted order: reproducible without a random generator."""
    state = {}
    for j, (key, value) in enumerate(sorted(model.state_dict().items())):
        t = torch.sin(torch.arange(value.numel(), dtype=torch.float64) * 0.37 + j).view(value.shape)
        t = t * (3.0 / math.sqrt(value.shape[-1]) if value.dim() >= 2 else 0.3)
        state[key] = (t + 1.0 if key.endswith("norm.weight") else t).float()
    return state


def test_matches_release_golden_values(config):
    beats = BEATs(config.beats).eval()
    beats.load_state_dict(_deterministic_state(beats), strict=True)
    frame = torch.arange(100, dtype=torch.float64)[:, None]
    mel = torch.arange(128, dtype=torch.float64)[None, :]
    fbank = (torch.sin(frame * 0.13 + mel * 0.07) + 0.5 * torch.cos(frame * mel * 0.011)).float()[None]
    with torch.no_grad():
        out = beats(fbank)
    assert out.shape == (1, 48, config.beats.encoder_embed_dim)
    torch.testing.assert_close(out[0, ::9, ::7], torch.tensor(RELEASE_GOLDEN), atol=2e-5, rtol=0)
    assert out.abs().mean().item() == pytest.approx(RELEASE_GOLDEN_ABS_MEAN, abs=1e-5)
