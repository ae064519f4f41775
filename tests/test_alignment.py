"""align_streams and the token-count helpers against the release's sequence_align_v2 rules."""

from __future__ import annotations

import pytest
import torch
from vsal.export import presets
from vsal.export.models.alignment import align_streams, llm_token_count, slot_count
from vsal.export.models.mrc_qformer import MrcQFormer

CONFIG = presets.get("tiny")
W = CONFIG.frame_qformer.hidden_size  # video token width; audio is 2W, aligned 3W


def _video(batch: int, frames: int) -> torch.Tensor:
    return torch.randn(batch, frames * 32, W)


def _audio(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1500, 2 * W)


@pytest.mark.parametrize(
    "frames,has_audio,slots,tokens",
    [
        (20, True, (60, 60), 180),  # 10 s clip with audio
        (20, False, (60, 60), 180),  # 10 s video-only: audio is 60 zero slots, still 60 slots
        (0, True, (60, 60), 180),  # audio-only: 60 zero video slots
        (120, True, (120, 120), 360),  # 60 s
        (62, True, (62, 70), 210),  # 31 s: padded to a whole 10-slot window
    ],
)
def test_token_counts(frames: int, has_audio: bool, slots: tuple[int, int], tokens: int) -> None:
    assert slot_count(frames, has_audio, CONFIG) == slots
    assert llm_token_count(frames, has_audio, CONFIG) == tokens


def test_no_input_is_an_error() -> None:
    with pytest.raises(ValueError):
        slot_count(0, False, CONFIG)
    with pytest.raises(ValueError):
        align_streams(None, None, CONFIG)


def test_video_with_audio_layout() -> None:
    video, audio = _video(2, 20), _audio(2)
    feats, mask = align_streams(video, audio, CONFIG)
    assert feats.shape == (2, 60 * 32, 3 * W)
    assert mask.shape == (2, 60)
    # Release: every slot up to max(T, 60) is real, also the 40 zero video slots.
    assert torch.equal(mask, torch.ones(2, 60))
    slots = feats.reshape(2, 60, 32, 3 * W)
    assert torch.equal(slots[:, :20, :, :W], video.reshape(2, 20, 32, W))  # video first
    assert not slots[:, 20:, :, :W].any()  # video padded with zero slots
    assert torch.equal(slots[:, :, :25, W:], audio.reshape(2, 60, 25, 2 * W))
    assert not slots[:, :, 25:, W:].any()  # each audio slot padded from 25 to 32 tokens


def test_video_only_has_zero_audio_of_60_slots() -> None:
    video = _video(1, 20)
    feats, mask = align_streams(video, None, CONFIG)
    assert feats.shape == (1, 60 * 32, 3 * W)
    assert torch.equal(mask, torch.ones(1, 60))
    slots = feats.reshape(1, 60, 32, 3 * W)
    assert not slots[..., W:].any()
    assert torch.equal(slots[:, :20, :, :W], video.reshape(1, 20, 32, W))


def test_audio_only_has_zero_video_of_60_slots() -> None:
    audio = _audio(1)
    feats, mask = align_streams(None, audio, CONFIG)
    assert feats.shape == (1, 60 * 32, 3 * W)
    assert torch.equal(mask, torch.ones(1, 60))
    slots = feats.reshape(1, 60, 32, 3 * W)
    assert not slots[..., :W].any()
    assert torch.equal(slots[:, :, :25, W:], audio.reshape(1, 60, 25, 2 * W))


def test_long_video_pads_to_whole_window_and_masks_only_that() -> None:
    video, audio = _video(1, 62), _audio(1)
    feats, mask = align_streams(video, audio, CONFIG)
    assert feats.shape == (1, 70 * 32, 3 * W)
    assert mask[0].tolist() == [1.0] * 62 + [0.0] * 8
    slots = feats.reshape(1, 70, 32, 3 * W)
    assert not slots[:, 62:].any()  # window padding is zeros
    assert not slots[:, 60:62, :, W:].any()  # audio (60 slots) padded to the video's 62
    assert torch.equal(slots[:, :62, :, :W], video.reshape(1, 62, 32, W))


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError):
        align_streams(torch.randn(1, 33, W), None, CONFIG)
    with pytest.raises(ValueError):
        align_streams(_video(1, 20), _audio(2), CONFIG)


def test_aligned_streams_feed_the_mrc_qformer() -> None:
    torch.manual_seed(0)
    model = MrcQFormer(CONFIG).eval()
    feats, mask = align_streams(_video(1, 62), _audio(1), CONFIG)
    with torch.no_grad():
        out = model(feats, mask)
    assert out.shape == (1, llm_token_count(62, True, CONFIG), CONFIG.llm.hidden_size)
    assert torch.isfinite(out).all()
