"""The pipeline's hooks: one stopwatch and its observers, the backend factory, the step wrapper, the
streams a media file gives, and the same stage names in the PyTorch reference."""

from __future__ import annotations

import json

import pytest
from vsal.runtime import media
from vsal.runtime.backends import Runner, open_backend
from vsal.runtime.errors import MediaError
from vsal.runtime.observe import Stopwatch, check_observer
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.prompt import DecodingOptions
from vsal.runtime.synthetic import write_clip, write_tone

GREEDY = DecodingOptions(num_beams=1, max_new_tokens=4)
RUNTIME_STAGES = {
    "decode_video+preprocess",
    "vision_encoder",
    "decode_audio+features",
    "whisper_encoder",
    "beats_encoder",
    "frame_qformer",
    "alignment",
    "mrc_qformer",
    "time_to_first_token",
    "generate",
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("observe")
    return {
        "av": write_clip(folder / "av.mp4", seconds=3.0, size=(96, 64)),
        "silent": write_clip(folder / "v.mp4", seconds=3.0, size=(96, 64), audio_rate=None),
        "tone": write_tone(folder / "a.wav", seconds=3.0),
    }


class StageLog:
    """An observer of stages alone: every piece, in order."""

    def __init__(self):
        self.pieces: list[tuple[str, float]] = []

    def stage(self, name, seconds):
        self.pieces.append((name, seconds))

    def sums(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, seconds in self.pieces:
            out[name] = out.get(name, 0.0) + seconds
        return out


def test_stopwatch_sums_pieces_tells_observers_and_starts_afresh():
    log = StageLog()
    timings = {"earlier": 1.0}
    watch = Stopwatch([log], timings)
    for _ in range(3):
        with watch("vision_encoder"):
            pass
    watch.stage("generate", 0.5)
    assert list(timings) == ["earlier", "vision_encoder", "generate"] and timings["generate"] == 0.5
    assert [name for name, _ in log.pieces] == ["vision_encoder"] * 3 + ["generate"]
    assert timings["vision_encoder"] == pytest.approx(sum(s for _, s in log.pieces[:3]))
    outer = Stopwatch()
    inner = Stopwatch([outer])  # a stopwatch is an observer too
    inner.stage("alignment", 0.25)
    assert outer.take() == {"alignment": 0.25} and outer.seconds == {}


def test_an_object_that_is_no_observer_is_refused():
    with pytest.raises(TypeError, match="not an observer"):
        check_observer(object())


def test_streams_give_a_videos_own_audio_track(clips):
    assert media.streams(clips["av"], None) == (clips["av"], clips["av"])
    assert media.streams(clips["silent"], None) == (clips["silent"], None)
    assert media.streams(clips["silent"], clips["tone"]) == (clips["silent"], clips["tone"])
    assert media.streams(None, clips["tone"]) == (None, clips["tone"])
    with pytest.raises(MediaError, match="give a video file, an audio file or both"):
        media.streams(None, None)


def test_observers_see_every_stage_of_the_answer(tiny_package, clips):
    log = StageLog()
    seen_feeds = []

    class Feeds:
        def feeds(self, graph, feeds):
            seen_feeds.append(graph)

    pipeline = Pipeline.load(tiny_package, verbose=False, observers=[log, Feeds()])
    first = pipeline.ask("What is it?", video=clips["av"], options=GREEDY)
    assert set(first.timings) == RUNTIME_STAGES
    assert log.sums() == first.timings  # the same pieces, summed the same way
    assert seen_feeds[:1] == ["vision_encoder"] and "llm_decoder" not in seen_feeds
    log.pieces.clear()
    second = pipeline.ask("Where is it?", video=clips["av"], options=GREEDY)
    assert second.media_cached
    assert set(log.sums()) == {"frame_qformer", "alignment", "mrc_qformer", "time_to_first_token", "generate"}
    assert log.sums() == second.timings


def test_answer_to_dict_is_what_run_json_prints(tiny_package, clips):
    pipeline = Pipeline.load(tiny_package, verbose=False)
    answer = pipeline.ask("What is it?", audio=clips["tone"], options=GREEDY)
    data = json.loads(json.dumps(answer.to_dict()))
    assert set(data) == {"answer", "token_ids", "av_tokens", "timings", "backends"}
    assert data["token_ids"] == answer.token_ids and data["av_tokens"] == answer.av_tokens
    assert data["timings"] == {k: round(v, 4) for k, v in answer.timings.items()}
    assert pipeline.default_options().eos_token_id == pipeline.manifest.special_tokens["eos"]


class CountingRunner(Runner):
    """A runner around another, counting its calls (what a test's backend factory hands back)."""

    def __init__(self, inner: Runner):
        super().__init__(inner.name, inner.info, inner.precision, f"counted {inner.description}")
        self.inner = inner
        self.calls = 0

    def input_names(self):
        return self.inner.input_names()

    def output_names(self):
        return self.inner.output_names()

    def _run(self, feeds, outputs):
        self.calls += 1
        return self.inner.run(feeds, outputs)


def test_backend_factory_and_step_wrapper_are_used(tiny_package, clips):
    asked = []
    counted = {}

    def factory(name, info, file, precision):
        asked.append((name, file, precision))
        if name != "mrc_qformer":
            return None  # the pipeline's own backend
        inner = open_backend("onnxruntime", tiny_package, name, info, precision, provider="cpu")
        counted[name] = CountingRunner(inner)
        return counted[name]

    steps = []

    def wrapper(step):
        def counted_step(*args):
            steps.append(len(args))
            return step(*args)

        return counted_step

    pipeline = Pipeline.load(
        tiny_package, verbose=False, provider="cpu", backend_factory=factory, step_wrapper=wrapper
    )
    answer = pipeline.ask("What is it?", audio=clips["tone"], options=GREEDY)
    assert [name for name, _, _ in asked] == [
        "whisper_encoder",
        "beats_encoder",
        "mrc_qformer",
        "llm_decoder",
    ]
    assert all(file.endswith(".onnx") and precision == "fp32" for _, file, precision in asked)
    assert counted["mrc_qformer"].calls == 1
    assert answer.backends["mrc_qformer"].startswith("counted ")
    assert len(steps) >= 1  # every decoder step of the request went through the wrapper


def test_media_cache_size_zero_encodes_every_question(tiny_package, clips):
    pipeline = Pipeline.load(tiny_package, verbose=False, media_cache_size=0)
    pipeline.ask("What is it?", audio=clips["tone"], options=GREEDY)
    assert not pipeline.ask("What is it?", audio=clips["tone"], options=GREEDY).media_cached


def test_the_reference_times_the_same_stages(tiny_model, tokenizer_assets, clips):
    from vsal.export.reference import ReferencePipeline

    log = StageLog()
    reference = ReferencePipeline(
        tiny_model, tokenizer_assets.llama_dir, tokenizer_assets.bert_vocab.parent, observers=[log]
    )
    fixed = DecodingOptions(num_beams=1, max_new_tokens=4, eos_token_id=None)
    answer = reference.ask("What is it?", video=clips["av"], options=fixed)
    assert set(answer.timings) == RUNTIME_STAGES | {"prompt_embeddings"}
    assert log.sums() == answer.timings
    assert len(answer.token_ids) == 4  # eos_token_id None: a fixed length
    assert answer.timings["time_to_first_token"] <= answer.timings["generate"]
