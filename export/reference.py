"""The PyTorch reference pipeline (fp32, CPU): the oracle the runtime is compared with.

media file -> the release's frame and audio sampling -> reference features (transformers'
WhisperFeatureExtractor, Kaldi fbank) -> parts -> alignment -> MRC Q-Former -> prompt embeddings
-> transformers generate (greedy or beam) with the release's decoding settings.

Its stages are timed with the runtime's Stopwatch under the runtime's names (vsal.runtime.observe),
plus "prompt_embeddings"; observers are told them as the runtime's are, and `Answer.timings` holds
their sums, so `vsal bench` reads both pipelines the same way.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from vsal.export.models.alignment import align_streams
from vsal.runtime import media
from vsal.runtime.features import beats_fbank
from vsal.runtime.observe import Observer, Stopwatch, check_observer
from vsal.runtime.preprocess import pad_audio
from vsal.runtime.prompt import PROMPT_BEFORE, DecodingOptions, cut_answer, prompt_after
from vsal.runtime.tokenizers import InstructionTokenizer, LlamaTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INSTRUCTION_LIMIT = 512  # the release truncates the instruction at max_tgt_len, from the left


@dataclass
class MediaInputs:
    """What the encoders read; None for an absent modality."""

    pixel_values: torch.Tensor | None  # [N, 3, 224, 224]
    input_features: torch.Tensor | None  # [1, n_mels, 3000]
    fbank: torch.Tensor | None  # [1, F, 128]


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    av_tokens: int  # LLM tokens that carry the clip
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class _TokenClock:
    """A `generate` streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def preprocess_frame(frame: np.ndarray, size: int = 224) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> [3, size, size]: /255, bicubic resize (torch, no antialias), CLIP norm.

    The release resizes the [0, 1] float clip with F.interpolate(mode="bicubic", align_corners=False)
    and normalises after, so values may overshoot [0, 1] before normalisation, as here.
    """
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[0]
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


class ReferencePipeline:
    """Answers a prompt about a clip with the PyTorch parts of a `VideoSalmonn`."""

    def __init__(
        self,
        model,
        llama_tokenizer_dir: str | os.PathLike,
        bert_tokenizer_dir: str | os.PathLike,
        observers: Iterable[Observer] = (),
    ):
        """`llama_tokenizer_dir` holds tokenizer.model (+ tokenizer_config.json), as a Vicuna folder does;
        `bert_tokenizer_dir` holds bert-base-uncased's vocab.txt; `observers` are told each stage's
        seconds (vsal.runtime.observe)."""
        from transformers import WhisperFeatureExtractor

        self.observers = [check_observer(o) for o in observers]
        self.model = model.eval()
        self.config = model.config
        # vsal's sentencepiece/WordPiece tokenizers, not transformers 5's: they give the ids of the
        # release's pinned transformers 4.40.1 slow tokenizers (tests/test_tokenizers.py), which
        # transformers 5's LlamaTokenizer does not on leading or repeated spaces.
        self.llama_tokenizer = LlamaTokenizer(llama_tokenizer_dir)
        self.instruction_tokenizer = InstructionTokenizer(bert_tokenizer_dir, max_length=INSTRUCTION_LIMIT)
        self.whisper_features = WhisperFeatureExtractor(feature_size=self.config.whisper.num_mel_bins)

    def observe(self, observer: Observer) -> None:
        """Tell `observer` each stage's seconds (`stage(name, seconds)`), as Pipeline.observe does."""
        self.observers.append(check_observer(observer))

    def _watch(self, timings: dict[str, float] | None) -> Stopwatch:
        return Stopwatch(self.observers, timings)

    # --- media -> encoder inputs -------------------------------------------------------------
    def prepare(
        self,
        video: str | os.PathLike | None = None,
        audio: str | os.PathLike | None = None,
        timings: dict[str, float] | None = None,
    ) -> MediaInputs:
        """Decode and preprocess; with only `video`, its own audio track is used when it has one."""
        video, audio = media.streams(video, audio)
        watch = self._watch(timings)
        pixels = features = fbank = None
        if video is not None:
            with watch("decode_video+preprocess"):
                pixels = self.video_pixels(video)
        if audio is not None:
            with watch("decode_audio+features"):
                features, fbank = self.audio_features(audio)
        return MediaInputs(pixels, features, fbank)

    def video_pixels(self, video: str | os.PathLike) -> torch.Tensor:
        """[N, 3, H, W]: the release's frames of the clip, preprocessed."""
        frames = [
            preprocess_frame(f, self.config.vision.img_size)
            for f in media.sample_video_frames(video, self.config.alignment.max_clips)
        ]
        return torch.stack(frames)

    def audio_features(self, audio: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(Whisper log-mel [1, mels, 3000], BEATs fbank [1, F, mels]) of the audio."""
        align = self.config.alignment
        wave = media.load_audio(audio, align.sample_rate)
        wave = pad_audio(wave, align.min_audio_seconds, align.sample_rate)
        features = self.whisper_features(
            wave,
            sampling_rate=align.sample_rate,
            return_tensors="pt",
            max_length=int(align.max_audio_seconds * align.sample_rate),
        )["input_features"]
        beats_wave = wave[: int(align.max_audio_seconds * align.sample_rate)]  # truncated, not padded
        fbank = beats_fbank(beats_wave, align.sample_rate, self.config.beats.n_mels)
        return features, torch.from_numpy(fbank)[None]

    def instruction(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame Q-Former's instruction: the prompt as WordPiece ids and mask, [1, L] each."""
        ids, mask = self.instruction_tokenizer.encode(prompt)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    # --- encoders -> LLM tokens ------------------------------------------------------------------
    def _here(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the model's device, floats in its dtype (a model moved to a GPU in fp16
        is the PyTorch fp16 eager baseline of scripts/gpu_check.py)."""
        weight = next(self.model.parameters())
        return x.to(weight.device, weight.dtype if x.is_floating_point() else x.dtype)

    @torch.no_grad()
    def av_tokens(
        self, inputs: MediaInputs, prompt: str, timings: dict[str, float] | None = None
    ) -> torch.Tensor:
        """[1, 3S, llm hidden]: the clip as the LLM reads it."""
        m = self.model
        watch = self._watch(timings)
        video_tokens = audio_tokens = None
        if inputs.pixel_values is not None:
            with watch("vision_encoder"):
                image_embeds = m.vision_encoder(self._here(inputs.pixel_values))
            with watch("frame_qformer"):
                ids, mask = (self._here(t) for t in self.instruction(prompt))
                frame_tokens = m.frame_qformer(image_embeds, ids, mask)
            video_tokens = frame_tokens.reshape(1, -1, frame_tokens.shape[-1])
        if inputs.input_features is not None:
            with watch("whisper_encoder"):
                speech = m.whisper_encoder(self._here(inputs.input_features))
            with watch("beats_encoder"):
                sound = m.beats_encoder(self._here(inputs.fbank))
            audio_tokens = torch.cat([speech, sound], dim=-1)
        with watch("alignment"):
            av_features, slot_mask = align_streams(video_tokens, audio_tokens, self.config)
        with watch("mrc_qformer"):
            return m.mrc_qformer(av_features, slot_mask)

    def text_ids(self, text: str) -> torch.Tensor:
        return self._here(torch.tensor([self.llama_tokenizer.encode(text)], dtype=torch.long))

    @torch.no_grad()
    def inputs_embeds(self, av_tokens: torch.Tensor, prompt: str) -> torch.Tensor:
        """[bos] + "USER: <Img>" + av tokens + "</Img> {prompt}\\nASSISTANT:", embedded."""
        embed = self.model.llm.embed
        bos = self._here(torch.tensor([[self.config.llm.bos_token_id]]))
        return torch.cat(
            [
                embed(bos),
                embed(self.text_ids(PROMPT_BEFORE)),
                av_tokens,
                embed(self.text_ids(prompt_after(prompt))),
            ],
            dim=1,
        )

    # --- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, inputs_embeds: torch.Tensor, options: DecodingOptions, timings: dict[str, float] | None = None
    ) -> list[int]:
        """The generated ids. Stages: "time_to_first_token" (generation start -> first token) and
        "generate" (-> last token); with beam search (no streaming) both are the whole call.
        `options.eos_token_id` None runs to max_new_tokens (the model's eos blocked until then)."""
        watch = self._watch(timings)
        clock = _TokenClock() if options.num_beams == 1 else None
        start = time.perf_counter()
        # With only inputs_embeds the repetition penalty sees generated tokens alone; the release
        # generates from inputs_embeds too, so that is the behaviour to keep (transformers warns).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
            out = self._generate(inputs_embeds, options, clock)
        total = time.perf_counter() - start
        times = clock.times if clock is not None and clock.times else [start + total]
        watch.stage("time_to_first_token", times[0] - start)
        watch.stage("generate", times[-1] - start)
        return out[0].tolist()

    def _generate(self, inputs_embeds: torch.Tensor, options: DecodingOptions, streamer) -> torch.Tensor:
        if options.eos_token_id is None:  # a fixed length (the bench's); min_length is then moot
            length = {"min_new_tokens": options.max_new_tokens}
        else:
            length = {"min_length": options.min_length}
        return self.model.llm.model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device),
            max_new_tokens=options.max_new_tokens,
            **length,
            do_sample=False,
            num_beams=options.num_beams,
            repetition_penalty=options.repetition_penalty,
            length_penalty=options.length_penalty,
            eos_token_id=self.config.llm.eos_token_id,
            pad_token_id=self.config.llm.pad_token_id,
            streamer=streamer,
        )

    def ask(
        self,
        prompt: str,
        video: str | os.PathLike | None = None,
        audio: str | os.PathLike | None = None,
        options: DecodingOptions | None = None,
    ) -> Answer:
        options = options or DecodingOptions()
        timings: dict[str, float] = {}
        av = self.av_tokens(self.prepare(video, audio, timings), prompt, timings)
        watch = self._watch(timings)
        with watch("prompt_embeddings"):
            embeds = self.inputs_embeds(av, prompt)
        ids = self.generate(embeds, options, timings)
        text = self.llama_tokenizer.decode(ids, skip_special_tokens=True)
        return Answer(text=cut_answer(text), token_ids=ids, av_tokens=av.shape[1], timings=timings)
