"""Multi-resolution causal Q-Former (MRC): aligned audio-visual slots -> LLM input tokens.

What the release computes at inference (`sequence_align_v2` with `early_align`, `alignmode: 2`,
`groupsize: 10`, `low_groupsize: 1`, `ext_same_qformer: True`, `causal_attention: true`):

  * One BERT Q-Former (`video_Qformer.bert`, also reachable as `joint_Qformer`) with no text
    path: the learned queries go through the embeddings LayerNorm only, then each layer runs
        1. causal encoder attention: a full BERT attention block of width `encoder_width` over the
           window's encoder states, with a block mask over 32-token slots (slot i sees slots
           j >= i). Every layer applies it to the ORIGINAL window states (the result is not
           carried to the next layer) and only uses the block mask, never the padding mask;
        2. query self-attention (its mask is all ones: an additive zero);
        3. cross-attention of the queries to the layer's causal-attention output, with the padding
           mask;
        4. the query feed-forward (`intermediate_query`, `output_query`).
  * Two resolutions share that Q-Former and differ only in windows and queries:
        high  windows of 10 slots (320 tokens), `video_query_tokens` (30 queries)
        low   windows of 1 slot   (32 tokens),  `low_query_tokens`   (3 queries)
    each window's input is `ln_video(window) + video_frame_position_embedding(0..L-1)`, positions
    counted in tokens within the window.
  * high [B*S/10, 30, D] and low [B*S, 3, D] both reshape to [B, 3S, D]; the release concatenates
    them low first, then `llama_proj` maps [B, 3S, 2D] to the LLM width.

Masks are additive, (1 - m) * finfo(dtype).min, like the release's `invert_attention_mask`. A
window that is all padding then attends (almost) uniformly to its zero slots: its outputs are not
dropped and reach the LLM, as in the release. Scores are clamped at finfo.min after adding the mask
so that fp16 overflow to -inf can never turn such a row into NaN (a no-op in fp32).

Written for torch.onnx's dynamo exporter with dynamic B and S (S a multiple of 10): windows come
from reshapes, the slot block mask from arange/comparisons on the static window length, no Python
loop depends on B or S.

State dict: release key (prefix stripped) -> key here
    video_Qformer.bert.embeddings.LayerNorm.{weight,bias}   -> qformer.embeddings.LayerNorm.*
    video_Qformer.bert.encoder.layer.N.<rest>               -> qformer.encoder.layer.N.<rest>
        <rest> = attention.self.{query,key,value}.*, attention.output.{dense,LayerNorm}.*,
                 crossattention.self.{query,key,value}.*, crossattention.output.{dense,LayerNorm}.*,
                 intermediate_query.dense.*, output_query.{dense,LayerNorm}.*,
                 encoder_causal_attention.self.{query,key,value}.*,
                 encoder_causal_attention.output.{dense,LayerNorm}.*
    video_query_tokens                                      -> video_query_tokens   [1, 30, D]
    low_query_tokens                                        -> low_query_tokens     [1, 3, D]
    ln_video.*                                              -> ln_video.*
    video_frame_position_embedding.weight                   -> video_frame_position_embedding.weight
    llama_proj.*                                            -> llama_proj.*
Aliases of the same tensors the release may also store: joint_Qformer.bert.* (= video_Qformer.bert.*),
joint_query_tokens, ln_joint, joint_frame_position_embedding, llama_proj_joint, and the speech_*
aliases (speech_Qformer, speech_query_tokens, ln_speech, llama_proj_speech). Not used at inference
and dropped: video_Qformer.bert.embeddings.position_ids (a buffer; the word/position embeddings are
None), low_Qformer.* (built but unused with ext_same_qformer), video_Qformer.cls.*.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from vsal.export.config import ModelConfig, QFormerConfig

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),  # BERT's "gelu" is the exact erf form
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
}


def additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """1 -> 0, 0 -> finfo(dtype).min: the release's `invert_attention_mask` arithmetic."""
    return (1.0 - keep.to(dtype)) * torch.finfo(dtype).min


def slot_causal_mask(num_slots: int, tokens_per_slot: int, device: torch.device | None = None) -> Tensor:
    """[L, L] bool, L = num_slots * tokens_per_slot: token i may attend token j iff slot(j) >= slot(i).

    The release builds triu(ones(S, S)) kron ones(32, 32); comparing slot indices gives the same
    matrix without kron (which the ONNX exporter does not handle well).
    """
    slot = torch.arange(num_slots * tokens_per_slot, device=device) // tokens_per_slot
    return slot[None, :] >= slot[:, None]


class BertSelfAttention(nn.Module):
    """Multi-head attention projections: query from `width_q`, key/value from `width_kv`."""

    def __init__(self, width_q: int, width_kv: int, num_heads: int, head_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        inner = num_heads * head_size
        self.query = nn.Linear(width_q, inner)
        self.key = nn.Linear(width_kv, inner)
        self.value = nn.Linear(width_kv, inner)

    def _heads(self, x: Tensor) -> Tensor:
        """[N, L, H*d] -> [N, H, L, d]"""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """x [N, Lq, width_q], context [N, Lk, width_kv], additive mask broadcastable to
        [N, H, Lq, Lk] -> [N, Lq, H*d]."""
        q = self._heads(self.query(x))
        k = self._heads(self.key(context))
        v = self._heads(self.value(context))
        # Same order as the release: q.k^T first, then divide by sqrt(d).
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        if mask is not None:
            # fp16: score + finfo.min can overflow to -inf; clamping keeps a fully masked row finite
            # (uniform) instead of NaN. In fp32 the sum never leaves the range: a no-op.
            scores = torch.clamp(scores + mask, min=torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2)
        return out.reshape(out.shape[0], out.shape[1], self.num_heads * self.head_size)


class BertSelfOutput(nn.Module):
    """dense, then LayerNorm(dense + residual)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    """A BERT attention block; `width` is both the query and the output width."""

    def __init__(self, width: int, kv_width: int, num_heads: int, eps: float):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"attention width {width} is not a multiple of {num_heads} heads")
        self.self = BertSelfAttention(width, kv_width, num_heads, width // num_heads)
        self.output = BertSelfOutput(width, eps)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        try:
            self.intermediate_act_fn = _ACTIVATIONS[config.hidden_act]()
        except KeyError:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}") from None

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class QFormerLayer(nn.Module):
    """One layer of the release's causal-encoder Q-Former, query path only."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        d, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
        self.attention = BertAttention(d, d, heads, eps)
        self.crossattention = BertAttention(d, config.encoder_width, heads, eps)
        self.intermediate_query = BertIntermediate(config)
        self.output_query = BertOutput(config)
        # Width encoder_width, same head count: 12 heads x 192 at the released size.
        self.encoder_causal_attention = BertAttention(config.encoder_width, config.encoder_width, heads, eps)

    def forward(
        self, queries: Tensor, encoder_states: Tensor, causal_mask: Tensor, cross_mask: Tensor
    ) -> Tensor:
        """queries [N, Q, D], encoder_states [N, L, E] (the original window states), causal_mask
        [1, 1, L, L] and cross_mask [N, 1, 1, L] additive -> [N, Q, D]."""
        encoder_states = self.encoder_causal_attention(encoder_states, encoder_states, causal_mask)
        # The release's query self-attention mask is ones -> additive zero: no mask.
        x = self.attention(queries, queries, None)
        x = self.crossattention(x, encoder_states, cross_mask)
        return self.output_query(self.intermediate_query(x), x)


class QueryEmbeddings(nn.Module):
    """The BERT embeddings with no text: only the LayerNorm, applied to the query tokens."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, queries: Tensor) -> Tensor:
        return self.LayerNorm(queries)


class QFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config) for _ in range(config.num_hidden_layers))


class CausalQFormer(nn.Module):
    """The shared Q-Former (release: `video_Qformer.bert`)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        if config.cross_attention_freq != 1:
            raise ValueError("the MRC Q-Former has cross-attention in every layer (cross_attention_freq=1)")
        self.embeddings = QueryEmbeddings(config)
        self.encoder = QFormerEncoder(config)

    def forward(
        self, queries: Tensor, encoder_states: Tensor, causal_mask: Tensor, cross_mask: Tensor
    ) -> Tensor:
        """queries [1, Q, D] (expanded to the N windows here), encoder_states [N, L, E] -> [N, Q, D]."""
        # Expand first, as the release does: the same values as normalising once, but later GEMMs on
        # a contiguous [N, Q, D] round exactly like the release's (bitwise parity in fp32).
        x = self.embeddings(queries.expand(encoder_states.shape[0], -1, -1))
        for layer in self.encoder.layer:  # fixed depth: unrolled at export
            x = layer(x, encoder_states, causal_mask, cross_mask)
        return x


class MrcQFormer(nn.Module):
    """av_features [B, S*32, av_width], slot_mask [B, S] (1 real, 0 padding; any dtype)
    -> llm_tokens [B, 3*S, llm.hidden_size]. S must be a multiple of the high window (10)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        qcfg, align = config.mrc_qformer, config.alignment
        if qcfg.encoder_width != config.av_width:
            raise ValueError(f"mrc_qformer.encoder_width {qcfg.encoder_width} != av_width {config.av_width}")
        self.tokens_per_slot = align.tokens_per_frame
        self.high_window = align.high_window
        self.low_window = align.low_window
        d, e = qcfg.hidden_size, qcfg.encoder_width

        self.qformer = CausalQFormer(qcfg)
        self.video_query_tokens = nn.Parameter(torch.zeros(1, qcfg.num_query_tokens, d))
        self.low_query_tokens = nn.Parameter(torch.zeros(1, config.low_query_tokens, d))
        self.ln_video = nn.LayerNorm(e)  # torch default eps 1e-5, as in the release
        self.video_frame_position_embedding = nn.Embedding(4096, e)
        self.llama_proj = nn.Linear(2 * d, config.llm.hidden_size)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """BERT-style random init (what the release starts from); real weights are loaded over it."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.video_query_tokens, std=std)
        nn.init.normal_(self.low_query_tokens, std=std)

    def _resolution(self, slots: Tensor, slot_mask: Tensor, window: int, queries: Tensor) -> Tensor:
        """slots [B, S, 32, E], slot_mask [B, S] -> [B, S/window * Q, D] for windows of `window` slots."""
        e = slots.shape[-1]
        length = window * self.tokens_per_slot  # static: 320 or 32
        states = slots.reshape(-1, length, e)  # [B*S/window, L, E], batch-major like the release's view
        token_mask = slot_mask[:, :, None].expand(-1, -1, self.tokens_per_slot).reshape(-1, length)

        positions = torch.arange(length, device=slots.device)
        states = self.ln_video(states) + self.video_frame_position_embedding(positions)

        dtype = states.dtype
        causal = additive_mask(slot_causal_mask(window, self.tokens_per_slot, slots.device), dtype)[
            None, None
        ]
        cross = additive_mask(token_mask, dtype)[:, None, None, :]
        out = self.qformer(queries, states, causal, cross)  # [B*S/window, Q, D]
        return out.reshape(slots.shape[0], -1, out.shape[-1])

    def forward(self, av_features: Tensor, slot_mask: Tensor) -> Tensor:
        batch, e = av_features.shape[0], av_features.shape[-1]
        slots = av_features.reshape(batch, -1, self.tokens_per_slot, e)  # [B, S, 32, E]
        mask = slot_mask.to(av_features.dtype)
        low = self._resolution(slots, mask, self.low_window, self.low_query_tokens)  # [B, 3S, D]
        high = self._resolution(slots, mask, self.high_window, self.video_query_tokens)  # [B, 3S, D]
        # Release order: low resolution first.
        return self.llama_proj(torch.cat([low, high], dim=-1))
