"""An independent reading of LAVIS's EVA-ViT-g and BLIP-2 Q-Former forward passes.

Written from the release's eva_vit.py and Qformer.py (functional, on release-layout state dicts),
so the transformers-based parts vsal uses can be checked against the computation the release does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps)


def _lin(x, sd, prefix):
    return F.linear(x, sd[prefix + "weight"], sd[prefix + "bias"])


def eva_vit_forward(sd, pixels, depth, heads, ln_vision_eps=1e-5):
    """LAVIS VisionTransformer.forward_features + ln_vision; sd in release layout."""
    w = sd["visual_encoder.patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd["visual_encoder.patch_embed.proj.bias"], stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual_encoder.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd["visual_encoder.pos_embed"]
    for i in range(depth):
        p = f"visual_encoder.blocks.{i}."
        h = _ln(x, sd, p + "norm1.", 1e-6)
        bias = torch.cat(
            [sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.v_bias"]), sd[p + "attn.v_bias"]]
        )
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], bias)
        b, n, c = h.shape
        qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + _lin(h, sd, p + "attn.proj.")
        h = _ln(x, sd, p + "norm2.", 1e-6)
        x = x + _lin(F.gelu(_lin(h, sd, p + "mlp.fc1.")), sd, p + "mlp.fc2.")
    return _ln(x, sd, "ln_vision.", ln_vision_eps)


def _bert_attention(x, kv, mask, sd, p, heads, eps):
    b, n, c = x.shape
    d = c // heads
    q = _lin(x, sd, p + "self.query.").view(b, n, heads, d).transpose(1, 2)
    k = _lin(kv, sd, p + "self.key.").view(b, kv.shape[1], heads, d).transpose(1, 2)
    v = _lin(kv, sd, p + "self.value.").view(b, kv.shape[1], heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / d**0.5
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0  # LAVIS's extended mask
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return _ln(_lin(ctx, sd, p + "output.dense.") + x, sd, p + "output.LayerNorm.", eps)


def _bert_ffn(x, sd, p, suffix, eps):
    h = F.gelu(_lin(x, sd, f"{p}intermediate{suffix}.dense."))
    return _ln(_lin(h, sd, f"{p}output{suffix}.dense.") + x, sd, f"{p}output{suffix}.LayerNorm.", eps)


def instructblip_qformer_forward(sd, image_embeds, ids, mask, layers, heads, cross_freq, eps=1e-12):
    """LAVIS Qformer.bert(input_ids, attention_mask, query_embeds, encoder_hidden_states)[:, :Q]."""
    p = "Qformer.bert."
    queries = sd["query_tokens"].expand(image_embeds.shape[0], -1, -1)
    n_q = queries.shape[1]
    text = sd[p + "embeddings.word_embeddings.weight"][ids]
    text = text + sd[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _ln(torch.cat([queries, text], dim=1), sd, p + "embeddings.LayerNorm.", eps)
    full_mask = torch.cat([torch.ones(ids.shape[0], n_q), mask.float()], dim=1)
    for i in range(layers):
        lp = f"{p}encoder.layer.{i}."
        x = _bert_attention(x, x, full_mask, sd, lp + "attention.", heads, eps)
        query, rest = x[:, :n_q], x[:, n_q:]
        if i % cross_freq == 0:
            query = _bert_attention(query, image_embeds, None, sd, lp + "crossattention.", heads, eps)
        query = _bert_ffn(query, sd, lp, "_query", eps)
        rest = _bert_ffn(rest, sd, lp, "", eps)
        x = torch.cat([query, rest], dim=1)
    return x[:, :n_q]
