"""Temporal alignment in numpy: the runtime's twin of vsal.export.models.alignment (the oracle).

Video tokens (32 per frame, one frame per 0.5 s) and audio frames (25 per 0.5 s) are cut into
0.5 s slots, concatenated on features (video first), and padded to whole windows of 10 slots. The
release's oddities are kept (see the torch module's docstring): audio always spans 60 slots, absent
modalities are zeros of the right size, and only the padding up to a window is masked.
"""

from __future__ import annotations

import numpy as np


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def align_streams(
    video_tokens: np.ndarray | None,
    audio_tokens: np.ndarray | None,
    *,
    width: int,
    tokens_per_frame: int = 32,
    audio_frames_per_slot: int = 25,
    audio_slots: int = 60,
    window: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """video_tokens [B, T*32, W] | None, audio_tokens [B, A*25, 2W] | None
    -> av_features [B, S*32, 3W], slot_mask [B, S] float32 (1 real, 0 window padding)."""
    if video_tokens is None and audio_tokens is None:
        raise ValueError("align_streams needs video tokens, audio tokens or both")
    ref = video_tokens if video_tokens is not None else audio_tokens
    batch, dtype = ref.shape[0], ref.dtype
    if video_tokens is None:
        video = np.zeros((batch, audio_slots, tokens_per_frame, width), dtype)
    else:
        video = video_tokens.reshape(batch, -1, tokens_per_frame, video_tokens.shape[-1])
    if audio_tokens is None:
        audio = np.zeros((batch, audio_slots, audio_frames_per_slot, 2 * width), dtype)
    else:
        audio = audio_tokens.reshape(batch, -1, audio_frames_per_slot, audio_tokens.shape[-1])
    slots = max(video.shape[1], audio.shape[1])
    padded = round_up(slots, window)
    out = np.zeros((batch, padded, tokens_per_frame, video.shape[-1] + audio.shape[-1]), dtype)
    out[:, : video.shape[1], :, : video.shape[-1]] = video
    out[:, : audio.shape[1], : audio.shape[2], video.shape[-1] :] = audio
    mask = np.zeros((batch, padded), np.float32)
    mask[:, :slots] = 1.0  # every slot up to max(T, 60) counts as real (release: new_ones)
    return out.reshape(batch, padded * tokens_per_frame, -1), mask
