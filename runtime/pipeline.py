"""The runtime pipeline: a model package + a clip + a prompt -> an answer, without torch.

  media  -> frames (2 fps) and 16 kHz audio             runtime.media
         -> pixels, Whisper log-mel, BEATs fbank         runtime.preprocess
         -> vision_encoder, whisper_encoder, beats_encoder   (cached per media file)
  prompt -> instruction -> frame_qformer                 (depends on the prompt)
         -> alignment -> mrc_qformer -> LLM tokens       runtime.alignment
         -> [bos] "USER: <Img>" tokens "</Img> {prompt}\\nASSISTANT:" -> llm_decoder  runtime.generation

A request is checked first (`check_request`: the prompt is text; beams, input and context fit the
decoder's profile), before any media is decoded. Everything comes from the package's manifest.
One backend and provider run every graph (chosen at load: the one asked for, else the best this
machine has); each graph's precision is chosen for it, and what runs each graph is printed once.
The instruction-independent encoder outputs are cached per media file (path, size, mtime), so a
second question about the same clip skips decoding and the three encoders.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import numpy as np
from vsal.runtime import media, precisions
from vsal.runtime.alignment import align_streams, round_up
from vsal.runtime.backends import Runner, backend_provider, check_backend, open_backend
from vsal.runtime.errors import MediaError
from vsal.runtime.generation import DecoderStep, beam_search, generate_tokens, stream_text
from vsal.runtime.graphs import DECODER, REQUIRED_GRAPHS
from vsal.runtime.limits import DecoderLimits
from vsal.runtime.manifest import (
    GraphInfo,
    Manifest,
    PackageError,
    check_runnable,
    load_manifest,
    verify_files,
)
from vsal.runtime.observe import FeedTap, Observer, Stopwatch, check_observer, tell_feeds
from vsal.runtime.prompt import DecodingOptions, check_prompt, cut_answer
from vsal.runtime.tokenizers import InstructionTokenizer, LlamaTokenizer

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
# (graph, its manifest entry, the file to run, its precision) -> a backend, or None for the default
BackendFactory = Callable[[str, GraphInfo, str, str], "Runner | None"]
StepWrapper = Callable[[DecoderStep], DecoderStep]  # wraps each request's decoder step


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    av_tokens: int  # LLM tokens that carry the clip
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    backends: dict[str, str] = field(default_factory=dict)  # graph -> what ran it
    media_cached: bool = False  # encoder outputs came from the cache

    def to_dict(self) -> dict:
        """The answer as JSON-ready fields (`vsal run --json`, the Triton orchestrator's RESULT)."""
        return {
            "answer": self.text,
            "token_ids": list(self.token_ids),
            "av_tokens": self.av_tokens,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "backends": dict(self.backends),
        }


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
        observers: Iterable[Observer] = (),
        backend_factory: BackendFactory | None = None,
        step_wrapper: StepWrapper | None = None,
        media_cache_size: int = MEDIA_CACHE_SIZE,
        low_memory: bool = False,
        portable_decoder: bool = False,
    ):
        """`observers` are told each stage's time and each graph's feeds (vsal.runtime.observe);
        `backend_factory(name, info, file, precision)` opens a graph's backend (None from it: the
        pipeline's own, chosen by `engine` and `provider`); `step_wrapper(step)` wraps the decoder
        step of each request (a server's cancellation check); `media_cache_size` clips keep their
        encoder outputs (0: none, every question encodes its clip). `low_memory`: one stage's graphs
        in memory at a time: the encoders are freed once a question's clip is encoded, the decoder
        before the next clip's encoders load (13b on a 16 GB module: about 4 GB of int8 encoders and
        14 GB of int4 decoder session never at once; each question loads what it needs again), and
        ONNX Runtime's weight-only kernels run float32 activations, without an int8-packed second
        copy of the weights (backends.onnx_runtime.LOW_MEMORY_CONFIG). `portable_decoder`: ONNX
        Runtime runs the decoder's portable graph even where its fused variant is built."""
        check_backend(engine)  # a ConfigError naming the registered backends
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
        self.limits = DecoderLimits.of(manifest.graphs[DECODER])
        self.preprocessing = manifest.preprocessing_constants()  # image size, mel bins, ...
        self._backends: dict[str, Runner] = {}
        self._media_cache: OrderedDict[tuple, MediaFeatures] = OrderedDict()
        self._observers: list[Observer] = [check_observer(o) for o in observers]
        self._backend_factory = backend_factory
        self._step_wrapper = step_wrapper
        self._media_cache_size = media_cache_size
        self.low_memory = low_memory
        self.portable_decoder = portable_decoder
        self._ran: dict[str, str] = {}  # graph -> the backend that ran it (kept when freed)

    # --- hooks for tools (bench, calibration, serving, scripts): nothing outside reaches into it ---

    def observe(self, observer: Observer) -> None:
        """Tell `observer` each stage's seconds (`stage(name, seconds)`, a stage in pieces once per
        piece) and each graph's feeds before it runs (`feeds(graph, feeds)`, the decoder's steps
        excepted); either method may be left out."""
        self._observers.append(check_observer(observer))

    def observe_feeds(self, observer: FeedObserver) -> None:
        """Call observer(graph name, feeds) before every graph run by `encode_media` and `av_tokens`
        (the decoder's steps excepted): shapes for the bench's FLOPs, inputs for calibration."""
        self.observe(FeedTap(observer))

    def clear_cache(self) -> None:
        """Forget the encoded clips: the next question decodes and encodes its media again."""
        self._media_cache.clear()

    def close(self) -> None:
        """Free every loaded backend and the encoded clips; a later question loads them again."""
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
        self._media_cache.clear()

    @property
    def loaded_backends(self) -> dict[str, Runner]:
        """The backends loaded so far, by graph name (they load lazily, at a graph's first run)."""
        return dict(self._backends)

    def decoder_step(self, all_logits: bool = False) -> DecoderStep:
        """The llm_decoder backend's own decoder step (see `_step`); `all_logits`: logits at every
        position (a step may return the last position's only, all that generation reads)."""
        return self._step(all_logits)

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
        observers: Iterable[Observer] = (),
        backend_factory: BackendFactory | None = None,
        step_wrapper: StepWrapper | None = None,
        media_cache_size: int = MEDIA_CACHE_SIZE,
        low_memory: bool = False,
        portable_decoder: bool = False,
    ) -> Pipeline:
        """Read and check a package (sha256 of every file unless verify=False); backends load lazily.

        precision None picks per graph what the machine runs best: fp16 on a GPU provider, int8 on
        the CPU when the package has it built, else fp32; "fp32" | "fp16" | "int8" asks for one (a
        graph without that variant runs fp32; fp16 on the CPU runs fp32 unless exact_precision, which
        the build's accuracy check uses). Every choice is printed.

        engine "tensorrt" runs every graph as a native TensorRT engine (from the package's engine
        cache, built from the ONNX when missing or foreign); "onnxruntime" uses its providers.
        `observers`, `backend_factory`, `step_wrapper`, `media_cache_size`, `low_memory`,
        `portable_decoder`: see the constructor.
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
        provider = backend_provider(engine, provider)  # one provider for every graph of the package
        hooks = {
            "observers": observers,
            "backend_factory": backend_factory,
            "step_wrapper": step_wrapper,
            "media_cache_size": media_cache_size,
            "low_memory": low_memory,
            "portable_decoder": portable_decoder,
        }
        pipeline = cls(folder, manifest, provider, threads, verbose, precision, engine, **hooks)
        pipeline.exact_precision = exact_precision
        if manifest.random_weights and verbose:
            llm = manifest.weight_sources.get("llm", "")
            if llm and not llm.startswith("seeded random"):
                what = f"its LLM is from {llm}, its encoders seeded random ({manifest.preset} preset)"
                print(f"vsal: note: {folder}: {what}: answers about media are meaningless", file=sys.stderr)
            else:
                print(
                    f"vsal: note: {folder} has seeded random weights ({manifest.preset} preset): "
                    "answers are meaningless",
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

    def backend(self, name: str) -> Runner:
        if name not in self._backends:
            file, precision, why = self._precision_for(name)
            backend = None
            if self._backend_factory is not None:
                backend = self._backend_factory(name, self.manifest.graphs[name], file, precision)
            if backend is None:
                backend = self._make_backend(name, file, precision)
            if self.verbose:
                note = f" ({why})" if why else ""
                print(f"vsal: {name}: {backend.description}{note}", file=sys.stderr, flush=True)
            self._backends[name] = backend
            self._ran[name] = backend.description
        return self._backends[name]

    def _free(self, names) -> None:
        """Close and forget the loaded backends of `names` (low_memory: one stage at a time)."""
        for name in [n for n in names if n in self._backends]:
            self._backends.pop(name).close()

    def _make_backend(self, name: str, file: str, precision: str) -> Runner:
        """The pipeline's own runner of `name` (`file` is its graph at `precision`, which the
        backend finds again from the manifest entry)."""
        info = self.manifest.graphs[name]
        return open_backend(
            self.engine,
            self.folder,
            name,
            info,
            precision,
            provider=self.provider,
            threads=self.threads,
            progress=self.verbose,
            low_memory=self.low_memory,
            portable=self.portable_decoder,
        )

    def _run(self, name: str, **feeds: np.ndarray) -> np.ndarray:
        tell_feeds(self._observers, name, feeds)
        backend = self.backend(name)
        return backend.run(feeds, [backend.output_names()[0]])[backend.output_names()[0]]

    def _chunks(self, name: str, axis: str) -> int:
        """How many items to feed at once: the profile's opt size (what an engine is tuned for)."""
        return self.manifest.graphs[name].profile[axis]["opt"]

    # --- media -> encoder outputs (cached) ----------------------------------------------------------

    def encode_media(
        self, video: str | os.PathLike | None, audio: str | os.PathLike | None
    ) -> tuple[MediaFeatures, bool]:
        """The clip's encoder outputs, and whether they came from the cache (the observers are told
        the stages only when they run)."""
        key = (_file_key(video), _file_key(audio))
        if key in self._media_cache:
            self._media_cache.move_to_end(key)
            return self._media_cache[key], True
        video, audio = media.streams(video, audio)
        watch = Stopwatch(self._observers)
        image_embeds, frames = self._encode_frames(video, watch) if video is not None else (None, 0)
        audio_tokens = self._encode_audio(audio, watch) if audio is not None else None
        features = MediaFeatures(image_embeds, audio_tokens, frames, watch.seconds)
        self._media_cache[key] = features
        if len(self._media_cache) > self._media_cache_size:
            self._media_cache.popitem(last=False)
        return features, False

    def _encode_frames(self, video, watch: Stopwatch) -> tuple[np.ndarray, int]:
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
        frames = media.sample_video_frames(video, self.alignment["max_clips"])
        outputs = []
        while True:  # decoding and the encoder take turns, a chunk of frames at a time
            with watch("decode_video+preprocess"):
                batch = [self.preprocessing.frame(frame) for frame in islice(frames, chunk)]
            if batch:
                with watch("vision_encoder"):
                    outputs.append(self._run("vision_encoder", pixel_values=np.stack(batch)))
            if len(batch) < chunk:
                break
        embeds = np.concatenate(outputs)
        return embeds, embeds.shape[0]

    def _encode_audio(self, path, watch: Stopwatch) -> np.ndarray:
        with watch("decode_audio+features"):
            wave = media.load_audio(path, self.alignment["sample_rate"])
            log_mel, fbank = self.preprocessing.audio(wave)
        with watch("whisper_encoder"):
            speech = self._run("whisper_encoder", input_features=log_mel[None])
        with watch("beats_encoder"):
            sound = self._run("beats_encoder", fbank=fbank[None])
        return np.concatenate([speech, sound], axis=-1)

    # --- prompt-dependent graphs ----------------------------------------------------------------------

    def av_tokens(
        self, features: MediaFeatures, prompt: str, timings: dict[str, float] | None = None
    ) -> np.ndarray:
        """[1, 3S, H]: the clip as the LLM reads it; its stages' seconds are added to `timings`."""
        watch = Stopwatch(self._observers, timings)
        video_tokens = None
        if features.image_embeds is not None:
            ids, mask = self.instruction.encode(prompt)
            chunk = self._chunks("frame_qformer", "N")
            with watch("frame_qformer"):
                parts = [
                    self._run(
                        "frame_qformer",
                        image_embeds=features.image_embeds[i : i + chunk],
                        instruction_ids=ids,
                        instruction_mask=mask,
                    )
                    for i in range(0, features.image_embeds.shape[0], chunk)
                ]
            frame_tokens = np.concatenate(parts)  # [N, 32, W]
            video_tokens = frame_tokens.reshape(1, -1, frame_tokens.shape[-1])
        a = self.alignment
        with watch("alignment"):
            av, slot_mask = align_streams(
                video_tokens,
                features.audio_tokens,
                width=self.width,
                tokens_per_frame=a["tokens_per_frame"],
                audio_frames_per_slot=a["audio_frames_per_slot"],
                audio_slots=a["audio_slots"],
                window=a["high_window"],
            )
        with watch("mrc_qformer"):
            return self._run("mrc_qformer", av_features=av, slot_mask=slot_mask)

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

    def default_options(self) -> DecodingOptions:
        """The release's decoding options, from the manifest (with the package's eos token)."""
        return self._options(None)

    def _options(self, options: DecodingOptions | None) -> DecodingOptions:
        if options is None:
            defaults = {
                k: v for k, v in self.manifest.decoding.items() if k in DecodingOptions.__dataclass_fields__
            }
            options = DecodingOptions(**defaults)
        return replace(options, eos_token_id=self.manifest.special_tokens["eos"])

    def _request_step(self) -> DecoderStep:
        """A request's decoder step, through the step wrapper when there is one."""
        step = self._step()
        return step if self._step_wrapper is None else self._step_wrapper(step)

    def _step(self, all_logits: bool = False) -> DecoderStep:
        """The decoder backend's own step: on ONNX Runtime (IO binding) and TensorRT (device buffers)
        the KV cache stays on the device between tokens (the fused variant's, in place); other
        runners go through the host."""
        backend = self.backend(DECODER)
        if all_logits:  # only when asked: a factory's runner need not know the option
            return backend.decoder_step(self.manifest.kv_layout(), all_logits=True)
        return backend.decoder_step(self.manifest.kv_layout())

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
        if self.low_memory:
            self._free([DECODER])
        features, cached = self.encode_media(video, audio)
        timings = {} if cached else dict(features.timings)  # a cached clip's encoders did not run
        av = self.av_tokens(features, prompt, timings)
        if self.low_memory:
            self._free([n for n in self._backends if n != DECODER])
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
        step = self._request_step()
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
        step = self._request_step()
        watch = Stopwatch(self._observers, answer.timings)
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
        watch.stage("time_to_first_token", first if first is not None else total)
        watch.stage("generate", total)
        answer.token_ids = list(ids)
        answer.text = cut_answer(self.llama.decode(ids))
        answer.backends = dict(self._ran)
        return answer


def _file_key(path) -> tuple | None:
    if path is None:
        return None
    p = Path(path)
    st = media.stat_media_file(p)  # missing, a symlink loop, a FIFO, a device: each its own message
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)
