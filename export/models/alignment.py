"""Temporal fine-grained alignment: the release's `sequence_align_v2` plus its padding to windows.

Video tokens (32 per frame, one frame per 0.5 s) and audio frames (25 per 0.5 s) are cut into
0.5 s slots and concatenated on features, video first. The result feeds `MrcQFormer`.

Release oddities kept on purpose (a deployed model must be the same model):
  * The audio stream is always 60 slots (Whisper's 30 s window, 1500 frames). A video-only clip
    still gets those 60 slots with the audio multiplied by 0 (`mask_audio = [1, 0]`), so a 10 s
    video yields 60 slots, not 20.
  * Audio-only input uses a zero video of 60 slots (`mask_audio = [0, 1]`).
  * The slot mask is 1 for every slot up to max(T, 60), including slots that are pure zero
    padding of the shorter stream: the release builds it as `new_ones` and ignores the video mask
    it is given. Only the padding up to a multiple of the high window (10) is masked, which only
    happens when T > 60 and T is not a multiple of 10.
"""

from __future__ import annotations

import torch
from torch import Tensor
from vsal.export.config import ModelConfig


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def slot_count(num_frames: int, has_audio: bool, config: ModelConfig) -> tuple[int, int]:
    """(slots the release counts as real, slots after padding to the high window) for a clip of
    `num_frames` video frames (0: audio-only).

    `has_audio` does not change the count: absent audio is still 60 zero slots (release oddity).
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if num_frames == 0 and not has_audio:
        raise ValueError("a clip needs video frames or audio")
    align = config.alignment
    real = max(num_frames, align.audio_slots)
    return real, _round_up(real, align.high_window)


def llm_token_count(num_frames: int, has_audio: bool, config: ModelConfig) -> int:
    """How many LLM input tokens the MRC Q-Former produces for the clip (3 per padded slot)."""
    return slot_count(num_frames, has_audio, config)[1] * config.llm_tokens_per_slot


def align_streams(
    video_tokens: Tensor | None, audio_tokens: Tensor | None, config: ModelConfig
) -> tuple[Tensor, Tensor]:
    """Align video and audio on 0.5 s slots and pad to whole high-resolution windows.

    video_tokens  [B, T*32, W] frame Q-Former tokens, or None (audio-only)
    audio_tokens  [B, A*25, 2W] concat(Whisper proj, BEATs proj) (A = 60 from 1500 frames), or
                  None (video-only)
    returns       av_features [B, S*32, 3W] (video | whisper | beats per token) and slot_mask [B, S]
                  (features' dtype, 1 real, 0 padding), S = round_up(max(T, A), 10)
    """
    if video_tokens is None and audio_tokens is None:
        raise ValueError("align_streams needs video tokens, audio tokens or both")
    align = config.alignment
    vt, at = align.tokens_per_frame, align.audio_frames_per_slot
    width = config.frame_qformer.hidden_size
    ref = video_tokens if video_tokens is not None else audio_tokens
    batch, dtype, device = ref.shape[0], ref.dtype, ref.device

    if video_tokens is None:
        # Release audio-only path: zero video of audio_frames // 25 slots (60).
        video = torch.zeros(batch, align.audio_slots, vt, width, dtype=dtype, device=device)
    else:
        if video_tokens.shape[1] % vt:
            raise ValueError(f"video tokens {video_tokens.shape[1]} are not a multiple of {vt} per frame")
        video = video_tokens.reshape(batch, -1, vt, video_tokens.shape[-1])
    if audio_tokens is None:
        # Release video-only path: the (always 60-slot) audio is multiplied by 0.
        audio = torch.zeros(batch, align.audio_slots, at, 2 * width, dtype=dtype, device=device)
    else:
        if audio_tokens.shape[0] != batch:
            raise ValueError(f"batch sizes differ: video {batch}, audio {audio_tokens.shape[0]}")
        if audio_tokens.shape[1] % at:
            raise ValueError(f"audio frames {audio_tokens.shape[1]} are not a multiple of {at} per slot")
        audio = audio_tokens.reshape(batch, -1, at, audio_tokens.shape[-1])

    # Pad the shorter stream with zero slots, then each audio slot from 25 to 32 tokens.
    slots = max(video.shape[1], audio.shape[1])
    video = _pad_dim(video, 1, slots)
    audio = _pad_dim(_pad_dim(audio, 1, slots), 2, vt)
    features = torch.cat([video, audio], dim=-1)  # [B, slots, 32, 3W], video first

    # Every slot so far counts as real (release: `new_ones`), then zero slots up to whole windows.
    padded = _round_up(slots, align.high_window)
    features = _pad_dim(features, 1, padded)
    mask = torch.zeros(batch, padded, dtype=dtype, device=device)
    mask[:, :slots] = 1
    return features.reshape(batch, padded * vt, features.shape[-1]), mask


def _pad_dim(x: Tensor, dim: int, size: int) -> Tensor:
    """Zero-pad `x` at the end of `dim` up to `size`."""
    missing = size - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
