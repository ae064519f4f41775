"""Instruction-aware InstructBLIP Q-Former, applied to every video frame.

transformers' `InstructBlipQFormerModel` computes LAVIS's Q-Former: BERT layers whose first
`num_query_tokens` positions are learned queries and the rest the instruction's WordPiece tokens;
the embedding LayerNorm is applied to queries and text alike; cross-attention to the frame's image
tokens every `cross_attention_freq` layers, for the queries only; queries use
`intermediate_query`/`output_query`, text uses `intermediate`/`output`. The release keeps the first
32 positions (the queries) as the frame's tokens. tests/test_frame_qformer.py checks this against an
independent reading of LAVIS's computation.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel
from vsal.export.config import QFormerConfig


class FrameQFormer(nn.Module):
    """image_embeds [N, P, encoder_width], instruction_ids/mask [1, L] -> frame_tokens [N, Q, hidden].

    The same instruction is shared by every frame of a clip, so it comes in once ([1, L]) and is
    broadcast to the N frames inside the graph, as the release repeats it per frame.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        hf_config = InstructBlipQFormerConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            max_position_embeddings=config.max_position_embeddings,
            layer_norm_eps=config.layer_norm_eps,
            pad_token_id=config.pad_token_id,
            cross_attention_frequency=config.cross_attention_freq,
            encoder_hidden_size=config.encoder_width,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        hf_config._attn_implementation = "eager"
        self.qformer = InstructBlipQFormerModel(hf_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        nn.init.normal_(self.query_tokens, std=0.02)

    def forward(
        self,
        image_embeds: torch.Tensor,
        instruction_ids: torch.Tensor,
        instruction_mask: torch.Tensor,
    ) -> torch.Tensor:
        frames = image_embeds.shape[0]
        num_queries = self.query_tokens.shape[1]
        queries = self.query_tokens.expand(frames, -1, -1)
        ids = instruction_ids.expand(frames, -1)
        query_mask = torch.ones(frames, num_queries, dtype=instruction_mask.dtype, device=ids.device)
        mask = torch.cat([query_mask, instruction_mask.expand(frames, -1)], dim=1)
        out = self.qformer(
            input_ids=ids,
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
        ).last_hidden_state
        return out[:, :num_queries, :]
