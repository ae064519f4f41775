"""The transformers InstructBLIP parts against an independent reading of LAVIS's computation."""

from __future__ import annotations

import pytest
import torch
from vsal.export.weights.checkpoints import to_release_layout

from tests.lavis_reading import eva_vit_forward, instructblip_qformer_forward


@pytest.fixture(scope="module")
def release_sd(tiny_model):
    # Perturb the zero-initialised biases and norms so that every tensor matters in the comparison.
    torch.manual_seed(1)
    sd = {k: v.clone() for k, v in to_release_layout(tiny_model).items()}
    for key, value in sd.items():
        if key.startswith(("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens")):
            value.add_(torch.randn_like(value) * 0.05)
    return sd


@pytest.fixture(scope="module")
def loaded(tiny_config, release_sd):
    from vsal.export import build_model

    model = build_model(tiny_config)
    model.load_release_state_dict(release_sd)
    return model


@pytest.mark.parametrize("frames", [1, 3])
def test_vision_encoder_matches_lavis_eva_vit(tiny_config, release_sd, loaded, frames):
    pixels = torch.randn(frames, 3, 224, 224)
    vc = tiny_config.vision
    expected = eva_vit_forward(release_sd, pixels, vc.depth, vc.num_heads)
    with torch.no_grad():
        got = loaded.vision_encoder(pixels)
    assert got.shape == (frames, vc.num_tokens, vc.embed_dim) == (frames, 257, vc.embed_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_vision_ln_uses_torch_default_eps(loaded):
    assert loaded.vision_encoder.model.post_layernorm.eps == 1e-5


@pytest.mark.parametrize("frames,length", [(1, 5), (4, 12)])
def test_frame_qformer_matches_lavis(tiny_config, release_sd, loaded, frames, length):
    qc = tiny_config.frame_qformer
    image_embeds = torch.randn(frames, 257, qc.encoder_width)
    ids = torch.randint(0, qc.vocab_size, (1, length))
    mask = torch.ones(1, length, dtype=torch.long)
    expected = instructblip_qformer_forward(
        release_sd,
        image_embeds,
        ids.expand(frames, -1),
        mask.expand(frames, -1),
        qc.num_hidden_layers,
        qc.num_attention_heads,
        qc.cross_attention_freq,
    )
    with torch.no_grad():
        got = loaded.frame_qformer(image_embeds, ids, mask)
    assert got.shape == (frames, 32, qc.hidden_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_frame_qformer_reads_the_instruction(loaded, tiny_config):
    image_embeds = torch.randn(2, 257, tiny_config.frame_qformer.encoder_width)
    mask = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        a = loaded.frame_qformer(image_embeds, torch.tensor([[101, 2054, 2003, 2056, 1029, 102]]), mask)
        b = loaded.frame_qformer(image_embeds, torch.tensor([[101, 2054, 2003, 2464, 1029, 102]]), mask)
    assert not torch.allclose(a, b)
