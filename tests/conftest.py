"""Shared fixtures: the tiny preset, built once per session with seeded random weights."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny_config():
    from vsal.export import presets

    return presets.get("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from vsal.export import build_model

    torch.manual_seed(0)
    return build_model(tiny_config)
