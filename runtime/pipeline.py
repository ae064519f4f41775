"""The runtime pipeline: a model package + a clip + a prompt -> an answer, without torch.

  media  -> frames (2 fps) and 16 kHz audio             runtime.media
         -> pixels, Whisper log-mel, BEATs fbank         runtime.preprocess
         -> vision_encoder, whisper_encoder, beats_encoder   (cached per media file)
  prompt -> instruction -> frame_qformer                 (depends on the prompt)
         -> alignment -> mrc_qformer -> LLM tokens       runtime.alignment
         -> [bos] "USER: <Img>" tokens "</Img> {prompt}\\nASSISTANT:" -> llm_decoder  runtime.generation

A request is checked first (`check_request`: the prompt is text; beams, input and context fit the
decoder's profile), before any media is decoded. Everything comes from the package's manifest;
each graph runs on the backend chosen for it, which is printed once. The instruction-independent
encoder outputs are cached per media file (path, size, mtime), so a second question about the
same clip skips decoding and the three encoders.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from vsal.runtime import media, precisions
from vsal.runtime.alignment import align_streams, round_up
from vsal.runtime.backends import Backend, OnnxRuntimeBackend, choose_provider
from vsal.runtime.errors import ConfigError, MediaError
from vsal.runtime.generation import GraphDecoderStep, beam_search, generate_tokens, stream_text
from vsal.runtime.limits import DecoderLimits
from vsal.runtime.manifest import Manifest, PackageError, check_runnable, load_manifest, verify_files
from vsal.runtime.ort_decoder import BoundDecoderStep
from vsal.runtime.preprocess import audio_inputs, preprocess_frame
from vsal.runtime.prompt import DecodingOptions, check_prompt, cut_answer
from vsal.runtime.tensorrt_engines import ENGINE_DIR
from vsal.runtime.tokenizers import InstructionTokenizer, LlamaTokenizer

REQUIRED_GRAPHS = (
    "vision_encoder",
    "frame_qformer",
    "whisper_encoder",
    "beats_encoder",
    "mrc_qformer",
    "llm_decoder",
)
ENGINES = ("onnxruntime", "tensorrt")
MEDIA_CACHE_SIZE = 4  # clips whose encoder outputs are kept


def check_required_graphs(manifest: Manifest, folder: Path) -> None:
    """PackageError when the package lacks one of the graphs the runtime runs."""
    missing = [g for g in REQUIRED_GRAPHS if g not in manifest.graphs]
    if missing:
        raise PackageError(f"{folder}: the package lacks graphs {missing} (export them all to run it)")


def load_tokenizers(manifest: Manifest, folder: Path) -> tuple[LlamaTokenizer, InstructionTokenizer]:
    """The package's two tokenizers, checked (size caps, a vocab.txt within the Q-Former's ids)."""
    llama = LlamaTokenizer(folder / manifest.llm_tokenizer.file)
    instruction = InstructionTokenizer(
        folder / manifest.instruction_tokenizer.file,
        model_vocab=manifest.config["frame_qformer"]["vocab_size"],
    )
    return llama, instruction


FeedObserver = Callable[[str, dict[str, np.ndarray]], None]  # (graph name, feeds)


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    av_tokens: int  # LLM tokens that carry the clip
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    backends: dict[str, str] = field(default_factory=dict)  # graph -> what ran it
    media_cached: bool = False  # encoder outputs came from the cache


@dataclass
class MediaFeatures:
    """Instruction-independent encoder outputs of one clip."""

    image_embeds: np.ndarray | None  # [N, 257, D] vision_encoder output
    audio_tokens: np.ndarray | None  # [1, 1500, 2W] concat(Whisper proj, BEATs proj)
    frames: int
    timings: dict[str, float]


class Pipeline:
    """Load once, ask many times: `Pipeline.load(folder).ask("What is said?", video="talk.mp4")`."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        provider: str,
        threads: int = 0,
        verbose: bool = True,
        precision: str | None = None,
        engine: str = "onnxruntime",
    ):
        if engine not in ENGINES:
            raise ConfigError(f"unknown backend {engine!r}; choose {' or '.join(ENGINES)}")
        self.folder = folder
        self.engine = engine  # "onnxruntime" (its execution providers) or "tensorrt" (native engines)
        self.manifest = manifest
        self.provider = provider
        self.precision = precision  # None: per graph, the best this machine runs
        self.exact_precision = False  # run fp16 graphs even on the CPU (the build's accuracy check)
        self.threads = threads
        self.verbose = verbose
        cfg = manifest.config
        self.width = cfg["frame_qformer"]["hidden_size"]
        self.alignment = cfg["alignment"]
        self.llm = cfg["llm"]
        self.llama, self.instruction = load_tokenizers(manifest, folder)
        self.embeddings = manifest.load_embeddings(folder)  # [V, H], checked, never unpickled
        self.limits = DecoderLimits.of(manifest.graphs["llm_decoder"])
        self._backends: dict[str, Backend] = {}
        self._media_cache: OrderedDict[tuple, MediaFeatures] = OrderedDict()
        self._feed_observers: list[FeedObserver] = []

    # --- hooks for tools (bench, calibration, scripts): nothing outside reaches into the pipeline ---

    def observe_feeds(self, observer: FeedObserver) -> None:
        """Call observer(graph name, feeds) before every graph run by `encode_media` and `av_tokens`
        (the decoder's steps excepted): shapes for the bench's FLOPs, inputs for calibration."""
        self._feed_observers.append(observer)

    def clear_cache(self) -> None:
        """Forget the encoded clips: the next question decodes and encodes its media again."""
        self._media_cache.clear()

    @property
    def loaded_backends(self) -> dict[str, Backend]:
        """The backends loaded so far, by graph name (they load lazily, at a graph's first run)."""
        return dict(self._backends)

    def decoder_step(self) -> BoundDecoderStep | GraphDecoderStep:
        """A fresh decoder step over the llm_decoder graph (see `_step`)."""
        return self._step()

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        provider: str | None = None,
        threads: int = 0,
        verbose: bool = True,
        verify: bool = True,
        precision: str | None = None,
        exact_precision: bool = False,
        engine: str = "onnxruntime",
    ) -> Pipeline:
        """Read and check a package (sha256 of every file unless verify=False); backends load lazily.

        precision None picks per graph what the machine runs best: fp16 on a GPU provider, int8 on
        the CPU when the package has it built, else fp32; "fp32" | "fp16" | "int8" asks for one (a
        graph without that variant runs fp32; fp16 on the CPU runs fp32 unless exact_precision, which
        the build's accuracy check uses). Every choice is printed.

        engine "tensorrt" runs every graph as a native TensorRT engine (from the package's engine
        cache, built from the ONNX when missing or foreign); "onnxruntime" uses its providers.
        """
        if precision is not None:
            precisions.get(precision)  # a ConfigError naming the choices
        folder = Path(folder)
        manifest = load_manifest(folder)
        check_required_graphs(manifest, folder)
        check_runnable(manifest, folder)
        if verify:
            problems = verify_files(manifest, folder)
            if problems:
                raise PackageError("; ".join(problems))
        provider = "cuda" if engine == "tensorrt" else choose_provider(provider)
        pipeline = cls(folder, manifest, provider, threads, verbose, precision, engine)
        pipeline.exact_precision = exact_precision
        if manifest.random_weights and verbose:
            preset = manifest.preset
            print(
                f"vsal: note: {folder} has seeded random weights ({preset} preset): answers are meaningless",
                file=sys.stderr,
            )
        return pipeline

    # --- backends ---------------------------------------------------------------------------------

    def _precision_for(self, name: str) -> tuple[str, str, str | None]:
        """(file, precision) this graph runs at here, and why when it is not what was asked."""
        info = self.manifest.graphs[name]
        device = "gpu" if self.provider in ("cuda", "tensorrt") else "cpu"
        chosen, why = precisions.choose(info.variants, self.precision, device, self.exact_precision)
        file, got = info.file_for(chosen)
        return file, got, why

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            file, precision, why = self._precision_for(name)
            backend = self._make_backend(name, file, precision)
            if self.verbose:
                note = f" ({why})" if why else ""
                print(f"vsal: {name}: {backend.description}{note}", file=sys.stderr, flush=True)
            self._backends[name] = backend
        return self._backends[name]

    def _make_backend(self, name: str, file: str, precision: str) -> Backend:
        info = self.manifest.graphs[name]
        if self.engine == "tensorrt":
            from vsal.runtime.tensorrt_backend import TensorRTBackend

            return TensorRTBackend.for_graph(self.folder, name, info, precision, progress=self.verbose)
        engines = self.folder / ENGINE_DIR
        return OnnxRuntimeBackend(
            name, self.folder / file, info, self.provider, self.threads, precision, engines
        )

    def _run(self, name: str, **feeds: np.ndarray) -> np.ndarray:
        for observer in self._feed_observers:
            observer(name, feeds)
        backend = self.backend(name)
        return backend.run(feeds, [backend.output_names()[0]])[backend.output_names()[0]]

    def _chunks(self, name: str, axis: str) -> int:
        """How many items to feed at once: the profile's opt size (what an engine is tuned for)."""
        return self.manifest.graphs[name].profile[axis]["opt"]

    # --- media -> encoder outputs (cached) ----------------------------------------------------------

    def encode_media(
        self, video: str | os.PathLike | None, audio: str | os.PathLike | None
    ) -> tuple[MediaFeatures, bool]:
        if video is None and audio is None:
            raise MediaError("give a video file, an audio file or both")
        key = (_file_key(video), _file_key(audio))
        if key in self._media_cache:
            self._media_cache.move_to_end(key)
            return self._media_cache[key], True
        timings: dict[str, float] = {}
        image_embeds, frames = None, 0
        if video is not None:
            image_embeds, frames = self._encode_frames(video, timings)
            if audio is None and media.has_audio(video):
                audio = video
        audio_tokens = self._encode_audio(audio, timings) if audio is not None else None
        features = MediaFeatures(image_embeds, audio_tokens, frames, timings)
        self._media_cache[key] = features
        if len(self._media_cache) > MEDIA_CACHE_SIZE:
            self._media_cache.popitem(last=False)
        return features, False

    def _encode_frames(self, video, timings: dict[str, float]) -> tuple[np.ndarray, int]:
        info = media.probe_media(video, self.alignment["max_clips"])
        if info.video_seconds is None:
            raise MediaError(f"{video}: no video stream (give it as --audio)")
        if info.truncated and self.verbose:
            print(
                f"vsal: note: {video} lasts {info.video_seconds:.1f} s; like the release, only its first "
                f"{self.alignment['max_clips']} s of video are used",
                file=sys.stderr,
            )
        chunk = self._chunks("vision_encoder", "N")
        outputs, batch = [], []
        decode_s = vision_s = 0.0
        start = time.perf_counter()
        for frame in media.sample_video_frames(video, self.alignment["max_clips"]):
            batch.append(preprocess_frame(frame))
            if len(batch) == chunk:
                decode_s += time.perf_counter() - start
                t = time.perf_counter()
                outputs.append(self._run("vision_encoder", pixel_values=np.stack(batch)))
                vision_s += time.perf_counter() - t
                batch = []
                start = time.perf_counter()
        decode_s += time.perf_counter() - start
        if batch:
            t = time.perf_counter()
            outputs.append(self._run("vision_encoder", pixel_values=np.stack(batch)))
            vision_s += time.perf_counter() - t
        timings["decode_video+preprocess"] = decode_s
        timings["vision_encoder"] = vision_s
        embeds = np.concatenate(outputs)
        return embeds, embeds.shape[0]

    def _encode_audio(self, path, timings: dict[str, float]) -> np.ndarray:
        start = time.perf_counter()
        wave = media.load_audio(path, self.alignment["sample_rate"])
        log_mel, fbank = audio_inputs(wave)
        timings["decode_audio+features"] = time.perf_counter() - start
        start = time.perf_counter()
        speech = self._run("whisper_encoder", input_features=log_mel[None])
        timings["whisper_encoder"] = time.perf_counter() - start
        start = time.perf_counter()
        sound = self._run("beats_encoder", fbank=fbank[None])
        timings["beats_encoder"] = time.perf_counter() - start
        return np.concatenate([speech, sound], axis=-1)

    # --- prompt-dependent graphs ----------------------------------------------------------------------

    def av_tokens(self, features: MediaFeatures, prompt: str, timings: dict[str, float]) -> np.ndarray:
        """[1, 3S, H]: the clip as the LLM reads it."""
        video_tokens = None
        if features.image_embeds is not None:
            ids, mask = self.instruction.encode(prompt)
            start = time.perf_counter()
            chunk = self._chunks("frame_qformer", "N")
            parts = [
                self._run(
                    "frame_qformer",
                    image_embeds=features.image_embeds[i : i + chunk],
                    instruction_ids=ids,
                    instruction_mask=mask,
                )
                for i in range(0, features.image_embeds.shape[0], chunk)
            ]
            timings["frame_qformer"] = time.perf_counter() - start
            frame_tokens = np.concatenate(parts)  # [N, 32, W]
            video_tokens = frame_tokens.reshape(1, -1, frame_tokens.shape[-1])
        start = time.perf_counter()
        a = self.alignment
        av, slot_mask = align_streams(
            video_tokens,
            features.audio_tokens,
            width=self.width,
            tokens_per_frame=a["tokens_per_frame"],
            audio_frames_per_slot=a["audio_frames_per_slot"],
            audio_slots=a["audio_slots"],
            window=a["high_window"],
        )
        timings["alignment"] = time.perf_counter() - start
        start = time.perf_counter()
        out = self._run("mrc_qformer", av_features=av, slot_mask=slot_mask)
        timings["mrc_qformer"] = time.perf_counter() - start
        return out

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embeddings[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def text_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """The LLM input's text around the clip: [bos] + "USER: <Img>", "</Img> {prompt}\\nASSISTANT:"."""
        before = self.llama.encode(self.manifest.prompt["before"])
        after = self.llama.encode(self.manifest.prompt["after"].format(prompt=prompt))
        return [self.manifest.special_tokens["bos"], *before], after

    def inputs_embeds(self, av_tokens: np.ndarray, prompt: str) -> np.ndarray:
        """[1, P, H]: [bos] + "USER: <Img>" + clip tokens + "</Img> {prompt}\\nASSISTANT:"."""
        head, tail = self.text_ids(prompt)
        return np.concatenate([self.embed(np.array(head)), av_tokens[0], self.embed(np.array(tail))])[None]

    def av_token_count(self, frames: int) -> int:
        """LLM tokens of a clip with `frames` sampled video frames (0: audio only), known before any
        encoder runs: slots of 0.5 s, at least the audio's, in whole windows, so many tokens each."""
        a = self.alignment
        slots = round_up(max(frames, a["audio_slots"]), a["high_window"])
        per_slot = self.manifest.config["mrc_qformer"]["num_query_tokens"] // a["high_window"]
        return slots * per_slot

    # --- asking ---------------------------------------------------------------------------------------

    def _options(self, options: DecodingOptions | None) -> DecodingOptions:
        if options is None:
            defaults = {
                k: v for k, v in self.manifest.decoding.items() if k in DecodingOptions.__dataclass_fields__
            }
            options = DecodingOptions(**defaults)
        return replace(options, eos_token_id=self.manifest.special_tokens["eos"])

    def _step(self) -> BoundDecoderStep | GraphDecoderStep:
        """The decoder step. On ONNX Runtime, with IO binding: the KV cache stays inside it between
        tokens. Other backends take and return numpy arrays (the cache goes through the host)."""
        llm = self.llm
        backend = self.backend("llm_decoder")
        shape = (
            llm["num_hidden_layers"],
            llm["num_key_value_heads"],
            llm["hidden_size"] // llm["num_attention_heads"],
        )
        if isinstance(backend, OnnxRuntimeBackend):
            return BoundDecoderStep(backend, *shape)
        return GraphDecoderStep(backend.run, *shape)

    def check_request(self, prompt: str | bytes, options: DecodingOptions | None = None, video=None) -> str:
        """The prompt as text when the request fits the decoder, else a PromptError or LimitError.

        Reads no media beyond the video's header (its duration gives the clip's token count; audio
        always takes the same), so it runs before any decoding or encoder: `ask` and `stream` call
        it first."""
        prompt = check_prompt(prompt)
        self._check_fit(prompt, self._options(options), video)
        return prompt

    def check_options(self, options: DecodingOptions | None = None, video=None) -> None:
        """The options against the decoder's limits for the shortest question about this clip (a
        chat's options, before its first question)."""
        self._check_fit("", self._options(options), video)

    def _check_fit(self, prompt: str, options: DecodingOptions, video) -> None:
        self.limits.check_question_length(len(prompt))  # before the tokenizer reads a huge one
        head, tail = self.text_ids(prompt)
        self.limits.check(options, len(head) + len(tail), self.av_token_count(self._frames(video)))

    def _frames(self, video) -> int:
        """Video frames the release samples from this file: from the cache or the file's header."""
        if video is None:
            return 0
        key = _file_key(video)
        for (video_key, _), features in self._media_cache.items():
            if video_key == key:
                return features.frames
        info = media.probe_media(video, self.alignment["max_clips"])
        return self.alignment["fps"] * info.clips

    def _prepare(self, prompt, video, audio, options: DecodingOptions) -> tuple[np.ndarray, Answer]:
        prompt = self.check_request(prompt, options, video)
        features, cached = self.encode_media(video, audio)
        timings = {} if cached else dict(features.timings)
        av = self.av_tokens(features, prompt, timings)
        embeds = self.inputs_embeds(av, prompt)
        # The token count as the decoder will see it (the estimate above comes from the header).
        self.limits.check(options, embeds.shape[1] - av.shape[1], av.shape[1])
        answer = Answer("", [], av.shape[1], timings, media_cached=cached)
        return embeds, answer

    def stream(
        self, prompt: str | bytes, video=None, audio=None, options: DecodingOptions | None = None
    ) -> Iterator[str]:
        """Text pieces as tokens come (one beam); with beam search, the answer in one piece at the end."""
        options = self._options(options)
        embeds, answer = self._prepare(prompt, video, audio, options)
        step = self._step()
        if options.num_beams > 1:
            ids = beam_search(step, self.embed, embeds, options)
            yield cut_answer(self.llama.decode(ids))
            return
        yield from stream_text(generate_tokens(step, self.embed, embeds, options), self.llama)

    def ask(
        self,
        prompt: str | bytes,
        video=None,
        audio=None,
        options: DecodingOptions | None = None,
        on_text=None,
    ) -> Answer:
        """The whole answer; `on_text(piece)` is called as text arrives (one beam). The prompt is text
        or UTF-8 bytes (a server's request); it and the options are checked (`check_request`) before
        any media is decoded."""
        options = self._options(options)
        embeds, answer = self._prepare(prompt, video, audio, options)
        step = self._step()
        start = time.perf_counter()
        first = None
        if options.num_beams > 1:
            ids = beam_search(step, self.embed, embeds, options)
        else:
            ids = []

            def tokens():
                nonlocal first
                for token in generate_tokens(step, self.embed, embeds, options):
                    if first is None:
                        first = time.perf_counter() - start
                    ids.append(token)
                    yield token

            # Generation stops at eos, max_new_tokens or the release's "\n#" cut (nothing after the
            # cut is ever shown, so it is not computed; the text equals the release's).
            for piece in stream_text(tokens(), self.llama):
                if on_text is not None:
                    on_text(piece)
        total = time.perf_counter() - start
        answer.timings["time_to_first_token"] = first if first is not None else total
        answer.timings["generate"] = total
        answer.token_ids = list(ids)
        answer.text = cut_answer(self.llama.decode(ids))
        answer.backends = {name: b.description for name, b in self._backends.items()}
        return answer


def _file_key(path) -> tuple | None:
    if path is None:
        return None
    p = Path(path)
    st = media.stat_media_file(p)  # missing, a symlink loop, a FIFO, a device: each its own message
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)
