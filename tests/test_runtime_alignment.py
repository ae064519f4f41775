"""The numpy alignment equals the torch oracle in every case the release distinguishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vsal.export.models.alignment import align_streams as torch_align
from vsal.runtime.alignment import align_streams


@pytest.mark.parametrize(
    "frames,audio", [(20, True), (20, False), (0, True), (62, True), (120, False), (7, True)]
)
def test_numpy_alignment_matches_torch(tiny_config, frames, audio):
    width = tiny_config.frame_qformer.hidden_size
    rng = np.random.default_rng(frames)
    video = rng.standard_normal((2, frames * 32, width)).astype(np.float32) if frames else None
    sound = rng.standard_normal((2, 1500, 2 * width)).astype(np.float32) if audio else None
    got, mask = align_streams(video, sound, width=width)
    want, want_mask = torch_align(
        None if video is None else torch.from_numpy(video),
        None if sound is None else torch.from_numpy(sound),
        tiny_config,
    )
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(mask, want_mask.numpy())
