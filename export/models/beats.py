"""BEATs audio-event encoder as video-SALMONN runs it at inference, plus its projection.

`BEATs` re-implements the released backbone (microsoft/unilm `beats`, as vendored by
video-SALMONN) for eval mode: no dropout, no layer drop, no predictor head. Parameter names equal
the release's state dict keys (its `predictor.*` keys excepted), so a checkpoint's "model" loads
with `strict=True` once those are dropped.

`BeatsEncoder` is the graph the deployment exports: fbank -> BEATs -> zero pad (or truncate) the
token sequence to the Whisper length (1500) -> `beats_pre_qformer_proj`.

Everything is written for torch.onnx's dynamo exporter with dynamic batch and fbank length: no
Python loops over dynamic sizes, no data-dependent control flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vsal.export.config import BeatsConfig, ModelConfig

# The release divides q by 32 before q @ k^T and multiplies the max-subtracted scores back by 32
# (fp16 overflow guard). The gate of the relative position bias undoes the division again.
_ATTN_ALPHA = 32.0


def _magnitude_bucket(distance: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket of a non-negative distance (one direction of T5-style buckets).

    distance: int64 [...] >= 0; num_buckets: buckets for this direction (half of the total).
    Distances below num_buckets // 2 get their own bucket; larger ones are log-spaced up to
    max_distance, then saturate at num_buckets - 1. The float math is float32, as the release's.
    """
    max_exact = num_buckets // 2
    # clamp(min=1) only keeps log() away from 0; those entries take the exact branch below.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return torch.where(distance < max_exact, distance, large)


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional relative position bucket, as the release's `_relative_positions_bucket`.

    relative_position: int64 [...] = key position - query position. Returns int64 [...] in
    [0, num_buckets): keys at or before the query use [0, num_buckets // 2), keys after it the
    upper half.
    """
    half = num_buckets // 2
    direction = (relative_position > 0).to(torch.long) * half
    return direction + _magnitude_bucket(relative_position.abs(), half, max_distance)


class _WeightNormConv1d(nn.Module):
    """Grouped Conv1d under weight norm over dim 2 (the kernel axis), as `nn.utils.weight_norm`.

    Keeps the checkpoint's `weight_g` [1, 1, K] and `weight_v` [C, C/groups, K] and computes
    weight = v * (g / ||v||), the norm over dims 0 and 1, in forward: plain ops the exporter folds.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.padding = kernel_size // 2
        std = math.sqrt(4.0 / (kernel_size * channels))  # the release's init, for random weights
        weight_v = torch.randn(channels, channels // groups, kernel_size) * std
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(weight_v, dim=(0, 1), keepdim=True))
        self.weight_v = nn.Parameter(weight_v)
        self.bias = nn.Parameter(torch.zeros(channels))

    def weight(self) -> Tensor:
        """The effective conv weight [C, C/groups, K]."""
        norm = torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T] -> [B, C, T + 1 - K % 2] (padding K // 2 each side)."""
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class _SamePad(nn.Module):
    """Drop the conv's extra last frame when the kernel is even, so the output length is T."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T + remove] -> [B, C, T]."""
        return x[:, :, : x.shape[2] - self.remove] if self.remove else x


class BeatsAttention(nn.Module):
    """Self-attention with the gated relative position bias (`gru_rel_pos`), release numerics."""

    def __init__(self, embed_dim: int, num_heads: int, gru_rel_pos: bool) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"encoder_embed_dim {embed_dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        # `relative_attention_bias` (nn.Embedding [num_buckets, H]) is attached by the encoder:
        # the release shares layer 0's table with every layer.

    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, C] -> [B, H, T, d]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, position_bias: Tensor | None) -> Tensor:
        """x [B, T, C], position_bias [H, T, T] or None -> [B, T, C]."""
        # Release order: q * scaling, then * 1/alpha (two roundings, kept for fp16 parity).
        q = self._heads(self.q_proj(x) * self.scaling * (1.0 / _ATTN_ALPHA))
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))

        scores = q @ k.transpose(-1, -2)  # [B, H, T, T]
        # Release oddity: subtract the row max, then scale back by alpha, before adding the bias.
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * _ATTN_ALPHA

        if position_bias is not None:
            if self.gru_rel_pos:
                # The gate reads the unscaled query, recovered as q * alpha / scaling (release).
                query = q * _ATTN_ALPHA / self.scaling
                gates = torch.sigmoid(self.grep_linear(query).unflatten(-1, (2, 4)).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)  # [B, H, T, 1] each
                position_bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * position_bias
            scores = scores + position_bias

        probs = torch.softmax(scores, dim=-1)
        out = (probs @ v).transpose(1, 2).flatten(2)  # [B, T, C]
        return self.out_proj(out)


class BeatsLayer(nn.Module):
    """Post-LN transformer layer with deep norm (residual scaled by alpha before each LayerNorm)."""

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = BeatsAttention(dim, cfg.encoder_attention_heads, cfg.gru_rel_pos)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.deep_norm_alpha = (2 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0

    def forward(self, x: Tensor, position_bias: Tensor | None) -> Tensor:
        """x [B, T, C] -> [B, T, C]."""
        x = self.self_attn_layer_norm(x * self.deep_norm_alpha + self.self_attn(x, position_bias))
        # Exact GELU computed in fp32 whatever the model dtype, as the release's `gelu`.
        hidden = F.gelu(self.fc1(x).float()).type_as(x)
        return self.final_layer_norm(x * self.deep_norm_alpha + self.fc2(hidden))


class BeatsTransformer(nn.Module):
    """Convolutional positional embedding, LayerNorm, then the layers (layer_norm_first=False)."""

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        # Same structure as the release (weight-normed conv, SamePad, GELU) so keys are pos_conv.0.*
        self.pos_conv = nn.Sequential(
            _WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), _SamePad(cfg.conv_pos), nn.GELU()
        )
        self.layers = nn.ModuleList(BeatsLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)

        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        self.relative_position_embedding = cfg.relative_position_embedding
        if cfg.relative_position_embedding:
            table = nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads)
            nn.init.xavier_normal_(table.weight)
            # One table, registered in every layer as the release does: its state dict carries
            # encoder.layers.N.self_attn.relative_attention_bias.weight for every N.
            for layer in self.layers:
                layer.self_attn.relative_attention_bias = table
            # Bucket of every distance 0..max_distance (farther ones all saturate at the last
            # bucket): the graph gathers from it instead of evaluating log() on positions, so a
            # reduced-precision build cannot move a distance into another bucket.
            distances = torch.arange(cfg.max_distance + 1, device="cpu")
            self.register_buffer(
                "bucket_table",
                _magnitude_bucket(distances, cfg.num_buckets // 2, cfg.max_distance),
                persistent=False,
            )

    def position_bias(self, length: Tensor | int) -> Tensor:
        """Relative position bias [H, T, T] for T = length, built with tensor ops only."""
        positions = torch.arange(length, device=self.bucket_table.device)
        relative = positions[None, :] - positions[:, None]  # key - query
        distance = relative.abs().clamp(max=self.max_distance)
        # index_select on the flattened distances exports as a plain Gather (indexing: GatherND).
        magnitude = self.bucket_table.index_select(0, distance.flatten()).view(distance.shape)
        bucket = (relative > 0).to(torch.long) * (self.num_buckets // 2) + magnitude
        return self.layers[0].self_attn.relative_attention_bias(bucket).permute(2, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, C] -> [B, T, C]."""
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.layer_norm(x)  # layer_norm_first=False: normalise before the layers, not after
        bias = self.position_bias(x.shape[1]) if self.relative_position_embedding else None
        for layer in self.layers:  # a fixed number of layers, unrolled in the graph
            x = layer(x, bias)
        return x


class BEATs(nn.Module):
    """The BEATs backbone, inference only.

    No padding mask: video-SALMONN feeds one clip per batch row, for which the release's mask
    (`arange >= length`) is all False and changes nothing; batching clips of different lengths
    with padding is not supported.
    """

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        if cfg.layer_norm_first:
            raise ValueError("only layer_norm_first=False (the released BEATs) is implemented")
        if cfg.activation_fn != "gelu":
            raise ValueError(f"only activation_fn='gelu' is implemented, got {cfg.activation_fn!r}")
        if cfg.n_mels % cfg.input_patch_size:
            raise ValueError(f"n_mels {cfg.n_mels} is not a multiple of the patch {cfg.input_patch_size}")
        self.cfg = cfg
        patch = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, patch, stride=patch, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        # As the release: no projection when the patch and encoder widths agree.
        width = cfg.encoder_embed_dim
        self.post_extract_proj = nn.Linear(cfg.embed_dim, width) if cfg.embed_dim != width else None
        self.encoder = BeatsTransformer(cfg)

    def num_tokens(self, num_frames: int) -> int:
        """Output length for an fbank of num_frames frames (30 s: 2998 frames -> 1496 tokens)."""
        patch = self.cfg.input_patch_size
        return (num_frames // patch) * (self.cfg.n_mels // patch)

    def patch_tokens(self, fbank: Tensor) -> Tensor:
        """fbank [B, F, n_mels] -> patch embeddings [B, (F//16)*(n_mels//16), embed_dim].

        Time-major: token t * 8 + f is the patch at time block t, mel block f (the release's
        reshape of [B, C, F//16, 8] to [B, C, -1], then transpose). Trailing F % 16 frames drop.
        """
        return self.patch_embedding(fbank.unsqueeze(1)).flatten(2).transpose(1, 2)

    def forward(self, fbank: Tensor) -> Tensor:
        """fbank [B, F, n_mels] (normalised Kaldi fbank, F >= 16) -> [B, (F//16)*8, encoder_embed_dim]."""
        x = self.layer_norm(self.patch_tokens(fbank))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x)


class BeatsEncoder(nn.Module):
    """Exported graph `beats`: input `fbank` [B, F, 128] -> output `audio_tokens` [B, 1500, hidden]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_frames = config.alignment.audio_frames
        self.beats = BEATs(config.beats)
        width = config.beats.encoder_embed_dim
        self.beats_pre_qformer_proj = nn.Linear(width, config.frame_qformer.hidden_size)

    def forward(self, fbank: Tensor) -> Tensor:
        """fbank [B, F, 128] -> audio_tokens [B, 1500, frame_qformer.hidden_size].

        The BEATs tokens are zero-padded to the Whisper length BEFORE the projection, so padded
        positions carry the projection bias (as the release). Longer sequences are truncated (the
        release never sees one: 30 s gives 1496 tokens).
        """
        feats = self.beats(fbank)
        zeros = feats.new_zeros(feats.shape[0], self.num_frames, feats.shape[2])
        # Concatenate-then-slice pads and truncates alike, with no shape-dependent branch.
        feats = torch.cat([feats, zeros], dim=1)[:, : self.num_frames]
        return self.beats_pre_qformer_proj(feats)
