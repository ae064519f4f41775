"""The torch-free runtime against the PyTorch reference pipeline, caching, streaming, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vsal.runtime.backends import BackendError
from vsal.runtime.errors import MediaError
from vsal.runtime.manifest import PackageError
from vsal.runtime.media import probe_media
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.prompt import DecodingOptions
from vsal.runtime.synthetic import write_clip, write_tone

GREEDY = DecodingOptions(num_beams=1, max_new_tokens=8)
BEAMS = DecodingOptions(num_beams=3, max_new_tokens=6)


@pytest.fixture(scope="module")
def pipeline(tiny_package):
    return Pipeline.load(tiny_package, verbose=False)


@pytest.fixture(scope="module")
def reference(tiny_model, tokenizer_assets):
    from vsal.export.reference import ReferencePipeline

    return ReferencePipeline(tiny_model, tokenizer_assets.llama_dir, tokenizer_assets.bert_vocab.parent)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime-media")
    return {
        "video+audio": {"video": write_clip(folder / "av.mp4", seconds=6.0, size=(160, 120))},
        "video-only": {"video": write_clip(folder / "v.mp4", seconds=4.0, size=(96, 64), audio_rate=None)},
        "audio-only": {"audio": write_tone(folder / "a.wav", seconds=5.0, rate=48000, channels=6)},
    }


@pytest.mark.parametrize("case", ["video+audio", "video-only", "audio-only"])
@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_runtime_answers_like_the_reference(pipeline, reference, media, case, options):
    prompt = "What is happening here?"
    got = pipeline.ask(prompt, options=options, **media[case])
    want = reference.ask(prompt, options=options, **media[case])
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    assert got.av_tokens == want.av_tokens == 180


def test_clip_tokens_match_the_reference(pipeline, reference, media):
    import torch

    prompt = "Describe the sound."
    features, _ = pipeline.encode_media(**media["video+audio"], audio=None)
    got = pipeline.av_tokens(features, prompt, {})
    want = reference.av_tokens(reference.prepare(**media["video+audio"]), prompt)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    embeds = pipeline.inputs_embeds(got, prompt)
    ref_embeds = reference.inputs_embeds(torch.from_numpy(got), prompt).numpy()
    np.testing.assert_array_equal(embeds, ref_embeds)


def test_second_question_reuses_the_encoders(tiny_package, media):
    fresh = Pipeline.load(tiny_package, verbose=False)
    first = fresh.ask("What is it?", options=GREEDY, **media["video+audio"])
    second = fresh.ask("Where is it?", options=GREEDY, **media["video+audio"])
    assert not first.media_cached and second.media_cached
    assert "vision_encoder" in first.timings and "vision_encoder" not in second.timings
    assert "frame_qformer" in second.timings  # the instruction changed: the Q-Former runs again


def test_hooks_observe_feeds_clear_the_cache_and_name_the_backends(tiny_package, media):
    fresh = Pipeline.load(tiny_package, verbose=False)
    seen = []
    fresh.observe_feeds(lambda name, feeds: seen.append((name, {k: v.shape for k, v in feeds.items()})))
    fresh.ask("What is it?", options=GREEDY, **media["audio-only"])
    names = [name for name, _ in seen]
    assert names == [
        "whisper_encoder",
        "beats_encoder",
        "mrc_qformer",
    ]  # the decoder's steps are not fed here
    assert seen[0][1] == {"input_features": (1, 80, 3000)}
    assert set(fresh.loaded_backends) == {"whisper_encoder", "beats_encoder", "mrc_qformer", "llm_decoder"}
    again = fresh.ask("Where is it?", options=GREEDY, **media["audio-only"])
    assert again.media_cached and [name for name, _ in seen].count("whisper_encoder") == 1
    fresh.clear_cache()
    assert not fresh.ask("Where is it?", options=GREEDY, **media["audio-only"]).media_cached
    assert [name for name, _ in seen].count("whisper_encoder") == 2


def test_stream_pieces_make_the_answer(pipeline, media):
    pieces = list(pipeline.stream("What is it?", options=GREEDY, **media["video-only"]))
    answer = pipeline.ask("What is it?", options=GREEDY, **media["video-only"])
    assert "".join(pieces) == answer.text and len(pieces) >= 1


def test_sampling_is_seeded(pipeline, media):
    options = DecodingOptions(num_beams=1, sample=True, seed=7, top_p=0.9, max_new_tokens=6)
    a = pipeline.ask("Hi?", options=options, **media["audio-only"])
    b = pipeline.ask("Hi?", options=options, **media["audio-only"])
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "garbage"])
def test_bad_media_is_one_clear_error(pipeline, tmp_path, kind):
    path = tmp_path / "clip.mp4"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"not a video at all" * 50)
    with pytest.raises(MediaError, match=str(path)):
        pipeline.ask("What?", video=path, options=GREEDY)


def test_audio_file_given_as_video_is_explained(pipeline, media):
    with pytest.raises(MediaError, match="no video stream"):
        pipeline.ask("What?", video=media["audio-only"]["audio"], options=GREEDY)


def test_empty_prompt_is_refused(pipeline, media):
    with pytest.raises(ValueError, match="prompt is empty"):
        pipeline.ask("  ", options=GREEDY, **media["video-only"])


def test_feeds_are_checked_against_the_manifest(pipeline):
    backend = pipeline.backend("mrc_qformer")
    width = pipeline.manifest.graphs["mrc_qformer"].inputs[0].shape[2]
    with pytest.raises(BackendError, match="axis S = 15 is outside .* in steps of 10"):
        backend.run(
            {
                "av_features": np.zeros((1, 15 * 32, width), np.float32),
                "slot_mask": np.ones((1, 15), np.float32),
            }
        )
    with pytest.raises(BackendError, match="slot_mask is float64, expected float32"):
        backend.run({"av_features": np.zeros((1, 320, width), np.float32), "slot_mask": np.ones((1, 10))})


def test_damaged_packages_are_refused(tiny_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package, copy)
    (copy / "graphs" / "beats_encoder.onnx").write_bytes(b"broken")
    with pytest.raises(PackageError, match="beats_encoder.onnx: sha256 differs"):
        Pipeline.load(copy, verbose=False)
    (copy / "manifest.json").unlink()
    with pytest.raises(PackageError, match="no manifest.json"):
        Pipeline.load(copy, verbose=False)


def _vsal(*args):
    exe = Path(sys.executable).parent / "vsal"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_vsal_run_json_and_errors(tiny_package, media, tmp_path):
    out = _vsal(
        "run",
        tiny_package,
        "--video",
        media["video+audio"]["video"],
        "--prompt",
        "What?",
        "--beams",
        "1",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"answer", "token_ids", "av_tokens", "timings", "backends"}
    assert set(result["backends"]) >= {"vision_encoder", "llm_decoder"}
    bad = _vsal("run", tiny_package, "--video", tmp_path / "nope.mp4", "--prompt", "What?")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"vsal: error: {tmp_path / 'nope.mp4'}: no such file"
    bad = _vsal("run", tmp_path, "--audio", media["audio-only"]["audio"], "--prompt", "What?")
    assert bad.returncode == 1 and "no manifest.json" in bad.stderr


def test_long_video_is_truncated_with_a_notice(tiny_package, tmp_path, capsys):
    clip = write_clip(tmp_path / "long.mp4", seconds=62.0, fps=2, size=(64, 48), audio_rate=None)
    pipeline = Pipeline.load(tiny_package, verbose=True)
    answer = pipeline.ask("What?", video=clip, options=DecodingOptions(num_beams=1, max_new_tokens=2))
    assert answer.av_tokens == 360  # 60 clips x 2 frames -> 120 slots -> 360 tokens
    assert "only its first 60 s" in capsys.readouterr().err


# `python -c VSAL_WITHOUT_TORCH ARGS...` is `vsal ARGS...` where importing torch or transformers fails.
VSAL_WITHOUT_TORCH = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'transformers'):\n"
    "            raise ImportError(f'{name} is blocked in this test')\n"
    "sys.meta_path.insert(0, Block())\n"
    "from vsal.runtime.cli import main\n"
    "sys.argv = ['vsal'] + sys.argv[1:]\n"
    "main()\n"
)


def test_vsal_run_needs_neither_torch_nor_transformers(tiny_package, media):
    """As on a Jetson image: importing torch or transformers fails, and `vsal run` still answers."""
    code = VSAL_WITHOUT_TORCH
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "run",
            str(tiny_package),
            "--video",
            str(media["video+audio"]["video"]),
            "--prompt",
            "What?",
            "--beams",
            "1",
            "--max-new-tokens",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 3


def _write_frames(path, frames, rates, size, rotate=None):
    """A video whose frame k lasts rates[k] seconds (variable frame rate), optionally rotated."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=1000)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.time_base = __import__("fractions").Fraction(1, 1000)
        if rotate is not None:
            stream.metadata["rotate"] = str(rotate)
        t = 0.0
        for k in range(frames):
            img = np.full((size[1], size[0], 3), (k * 7) % 255, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = int(t * 1000)
            frame.time_base = stream.time_base
            out.mux(stream.encode(frame))
            t += rates[k % len(rates)]
        out.mux(stream.encode(None))
    return path


@pytest.mark.parametrize(
    "kind",
    ["short", "variable frame rate", "huge frames", "rotated", "8 kHz audio", "6-channel 48 kHz audio"],
)
def test_awkward_but_valid_media_runs(pipeline, tmp_path, kind):
    options = DecodingOptions(num_beams=1, max_new_tokens=2)
    if kind == "short":
        inputs = {
            "video": write_clip(tmp_path / "s.mp4", seconds=0.4, fps=10, size=(64, 48), audio_rate=None)
        }
        expected_frames = 2  # one back-padded clip
    elif kind == "variable frame rate":
        inputs = {"video": _write_frames(tmp_path / "vfr.mkv", 40, (0.02, 0.15, 0.05), (64, 48))}
        expected_frames = None
    elif kind == "huge frames":
        inputs = {
            "video": write_clip(tmp_path / "big.mp4", seconds=1.0, fps=2, size=(3840, 2160), audio_rate=None)
        }
        expected_frames = 2
    elif kind == "rotated":
        inputs = {"video": _write_frames(tmp_path / "rot.mp4", 8, (0.25,), (64, 48), rotate=90)}
        expected_frames = None
    elif kind == "8 kHz audio":
        inputs = {"audio": write_tone(tmp_path / "8k.wav", seconds=2.0, rate=8000)}
        expected_frames = 0
    else:
        inputs = {"audio": write_tone(tmp_path / "6ch.wav", seconds=2.0, rate=48000, channels=6)}
        expected_frames = 0
    answer = pipeline.ask("What?", options=options, **inputs)
    assert answer.av_tokens >= 180 and len(answer.token_ids) >= 1
    features, _ = pipeline.encode_media(inputs.get("video"), inputs.get("audio"))
    if "video" in inputs:
        assert features.frames == 2 * probe_media(inputs["video"]).clips
    if expected_frames is not None:
        assert features.frames == expected_frames


def test_package_of_another_format_is_refused(tiny_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="format_version 99, this vsal reads 1"):
        Pipeline.load(copy, verbose=False)


def test_attention_mask_length_must_be_past_plus_new(pipeline):
    backend = pipeline.backend("llm_decoder")
    llm = pipeline.llm
    heads, dim = llm["num_key_value_heads"], llm["hidden_size"] // llm["num_attention_heads"]
    feeds = {
        "inputs_embeds": np.zeros((1, 2, llm["hidden_size"]), np.float32),
        "attention_mask": np.ones((1, 4), np.int64),  # P + T = 3 + 2 = 5, not 4
        "position_ids": np.array([[3, 4]], np.int64),
    }
    for i in range(llm["num_hidden_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, heads, 3, dim), np.float32)
    with pytest.raises(BackendError, match=r"attention_mask dimension 1 is 4, expected P\+T = 5"):
        backend.run(feeds)
