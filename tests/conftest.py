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

    return build_model(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tokenizer_assets():
    """The LLaMA-2 sentencepiece model and bert-base-uncased vocab (downloaded once, then cached)."""
    from vsal.export.assets import ensure_tokenizer_assets

    return ensure_tokenizer_assets(quiet=True)


@pytest.fixture(scope="session")
def clip_10s(tmp_path_factory):
    """A 10 s, 25 fps, 320x240 clip with a stereo 44.1 kHz tone sweep."""
    from vsal.runtime.synthetic import write_clip

    return write_clip(tmp_path_factory.mktemp("media") / "clip10.mp4", seconds=10.0)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tokenizer_assets):
    """The tiny preset exported as a model package (all six graphs), once per session."""
    from vsal.export import presets
    from vsal.export.package import ExportSource, TokenizerFiles, export_package

    folder = tmp_path_factory.mktemp("package") / "tiny"
    export_package(
        ExportSource(presets.get("tiny"), random_weights=True),
        folder,
        TokenizerFiles(tokenizer_assets.llama_dir, tokenizer_assets.bert_vocab),
        progress=False,
    )
    return folder
