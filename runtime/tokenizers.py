"""Torch-free tokenizers: the LLM's sentencepiece tokenizer and the frame Q-Former's instruction tokenizer.

Both reproduce, id for id, what the released video-SALMONN code computes with transformers 4.40.1
(the release's pin), without importing torch or transformers:

* `LlamaTokenizer`: the slow (sentencepiece) `LlamaTokenizer` that the release loads with
  `LlamaTokenizer.from_pretrained(vicuna_ckpt_path, use_fast=False)` and calls with
  `add_special_tokens=False` on the prompt pieces "USER: <Img>" and "</Img> " + prompt +
  "\\nASSISTANT:". Vicuna v1.5's tokenizer_config sets `legacy: false`, so the default here is the
  non-legacy behaviour: a "▁" prefix is added to the text, the sentencepiece model runs with its
  dummy prefix switched off, and the literal strings "<unk>", "<s>", "</s>" in a text become their
  special ids. For text without those strings, legacy and non-legacy give the same ids as plain
  sentencepiece encoding (checked against transformers 4.40.1). transformers 5.x no longer has
  this slow tokenizer; its `LlamaTokenizer` (tokenizers backend) differs on leading spaces, runs
  of spaces and "▁" characters, so it is not the reference.
* `InstructionTokenizer`: bert-base-uncased WordPiece as `BertTokenizer.from_pretrained(
  "bert-base-uncased", truncation_side="left")` + `add_special_tokens({"bos_token": "[DEC]"})`
  (the added token gets id 30522), called as the release calls it on the user's prompt:
  `padding="longest", truncation=True, max_length=512` (512 = the release's `max_tgt_len`), so
  "[CLS] ... [SEP]" with the text cut from the LEFT when too long. Built with the `tokenizers`
  library from a vocab.txt.
* `JsonTokenizer`: the LLM tokenizer of a checkpoint folder that ships a Hugging Face
  `tokenizer.json` instead (SmolLM2: GPT-2 style byte-level BPE), run by the `tokenizers` library:
  the same ids and text as transformers' fast tokenizer with `add_special_tokens=False`.
  `LlamaTokenizer(path)` makes one when `path` is a tokenizer.json (or a folder with a
  tokenizer.json and no tokenizer.model), so a package's manifest names either file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from vsal.runtime.errors import PackageError
from vsal.runtime.protobuf_wire import read_varint

SPIECE_UNDERLINE = "\u2581"
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
INSTRUCTION_BOS_TOKEN = "[DEC]"
INSTRUCTION_MAX_LENGTH = 512  # the release's max_tgt_len, passed as max_length to the bert tokenizer
# File sizes read at most (checked with stat before reading: a package's files come from elsewhere).
MAX_SPM_BYTES = 64 << 20  # tokenizer.model; LLaMA-2's is 500 KB
MAX_VOCAB_BYTES = 16 << 20  # vocab.txt; bert-base-uncased's is 230 KB
MAX_TOKENIZER_JSON_BYTES = 64 << 20  # tokenizer.json; SmolLM2's is 3.5 MB, LLaMA-3's 9 MB
MAX_TOKENIZER_CONFIG_BYTES = 1 << 20  # tokenizer_config.json: a few hundred bytes of settings
SPM_FILE, JSON_FILE = "tokenizer.model", "tokenizer.json"


class TokenizerFileError(PackageError):
    """A tokenizer file is missing or not what it should be; the message names the file."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _resolve(path: Path | str, default_name: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise TokenizerFileError(p, "no such tokenizer file")
    return p


def llm_tokenizer_file(path: Path | str) -> Path:
    """The LLM tokenizer file at `path`: the file itself, or in a folder its tokenizer.model,
    else its tokenizer.json (a LLaMA-2 folder ships both: sentencepiece is the release's)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / SPM_FILE if (p / SPM_FILE).is_file() or not (p / JSON_FILE).is_file() else p / JSON_FILE
    if not p.is_file():
        raise TokenizerFileError(p, "no such tokenizer file")
    return p


def _read_bounded(path: Path, limit: int, usual: str) -> bytes:
    """The file's bytes, refused by its size before reading when larger than `limit`."""
    size = path.stat().st_size
    if size > limit:
        raise TokenizerFileError(
            path, f"{size} bytes, more than a tokenizer file holds ({limit >> 20} MiB at most; {usual})"
        )
    with open(path, "rb") as f:
        return f.read(limit)  # a file that grew since stat is cut, then fails to parse


# --- minimal protobuf wire-format editing (to switch off add_dummy_prefix without protobuf) -----


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _split_fields(buf: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """Top-level fields of a protobuf message: (field number, wire type, whole field, payload)."""
    fields = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = read_varint(buf, pos)
        number, wtype = key >> 3, key & 7
        if wtype == 0:
            _, pos = read_varint(buf, pos)
            payload = b""
        elif wtype == 1:
            pos += 8
            payload = b""
        elif wtype == 2:
            n, pos = read_varint(buf, pos)
            payload = buf[pos : pos + n]
            pos += n
        elif wtype == 5:
            pos += 4
            payload = b""
        else:
            raise ValueError(f"unsupported wire type {wtype}")
        if pos > len(buf) or number == 0:
            raise ValueError("truncated or invalid field")
        fields.append((number, wtype, buf[start:pos], payload))
    return fields


def _without_dummy_prefix(model: bytes) -> bytes:
    """The serialized ModelProto with normalizer_spec.add_dummy_prefix = false."""
    # ModelProto: 3 = normalizer_spec; NormalizerSpec: 3 = add_dummy_prefix (bool, default true).
    out = bytearray()
    spec = b""
    for number, wtype, whole, payload in _split_fields(model):
        if number == 3 and wtype == 2:
            spec = payload  # protobuf merges repeated sub-messages; the models have one
        else:
            out += whole
    kept = b"".join(whole for n, _, whole, _ in _split_fields(spec) if n != 3)
    new_spec = kept + b"\x18\x00"
    return bytes(out) + b"\x1a" + _varint(len(new_spec)) + new_spec


class LlamaTokenizer:
    """Vicuna / LLaMA-2 sentencepiece tokenizer, same ids as transformers' slow LlamaTokenizer.

    `path` is a `tokenizer.model` file or a folder holding one; a `tokenizer.json` (or a folder
    with only that) gives a `JsonTokenizer` instead, which ignores the sentencepiece options.
    `legacy=False` is Vicuna v1.5's setting; `legacy=True` reproduces the old behaviour (each text
    chunk gets sentencepiece's dummy prefix). `encode` never adds bos/eos: the release adds bos as
    an embedding of its own.
    """

    def __new__(cls, path: Path | str, **options):
        if cls is LlamaTokenizer and llm_tokenizer_file(path).suffix == ".json":
            return super().__new__(JsonTokenizer)  # a tokenizer.json: its __init__ runs
        return super().__new__(cls)

    def __init__(self, path: Path | str, *, legacy: bool = False, add_prefix_space: bool = True):
        import sentencepiece as spm

        self.path = llm_tokenizer_file(path)
        self.legacy = legacy
        self.add_prefix_space = add_prefix_space
        data = _read_bounded(self.path, MAX_SPM_BYTES, "LLaMA-2's tokenizer.model is 500 KB")
        if not data:
            raise TokenizerFileError(self.path, "empty file, not a sentencepiece model")
        try:
            if not legacy:
                data = _without_dummy_prefix(data)
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(data)
        except (ValueError, RuntimeError, OSError) as exc:
            raise TokenizerFileError(self.path, f"not a valid sentencepiece model ({exc})") from exc
        if sp.get_piece_size() <= 0:
            raise TokenizerFileError(self.path, "sentencepiece model has no pieces")
        self._sp = sp
        specials = {t: sp.piece_to_id(t) for t in LLAMA_SPECIAL_TOKENS}
        ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
        if any(i < 0 for i in ids) or tuple(specials.values()) != ids:
            raise TokenizerFileError(
                self.path,
                f"not a LLaMA-style model: <unk>, <s>, </s> must be its unk/bos/eos pieces, got {ids}",
            )
        self._special_ids = specials
        self._special_set = set(specials.values())
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in LLAMA_SPECIAL_TOKENS) + ")")
        self._unk_len = len(sp.encode(LLAMA_SPECIAL_TOKENS[0]))

    # -- properties ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= int(token_id) < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")

    # -- encoding ------------------------------------------------------------------------------
    def _encode_chunk(self, chunk: str) -> list[int]:
        if self.legacy or not chunk.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp.encode(chunk)
        # The dummy prefix is off, so a leading space is kept by encoding "<unk>" + chunk and
        # dropping the pieces of "<unk>" (transformers' non-legacy `_tokenize`).
        ids = self._sp.encode(LLAMA_SPECIAL_TOKENS[0] + chunk)
        return ids[self._unk_len :] if len(ids) >= self._unk_len else ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no bos/eos added (transformers: `add_special_tokens=False`)."""
        if not text:
            return []
        if not self.legacy:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        ids: list[int] = []
        first_is_lone_prefix = False
        for i, chunk in enumerate(c for c in self._special_re.split(text) if c):
            if chunk in self._special_ids:
                ids.append(self._special_ids[chunk])
            else:
                part = self._encode_chunk(chunk)
                if i == 0 and part == [self._sp.piece_to_id(SPIECE_UNDERLINE)]:
                    first_is_lone_prefix = True
                ids.extend(part)
        # transformers drops the added "▁" when the text starts with a special token
        if not self.legacy and first_is_lone_prefix and len(ids) > 1 and ids[1] in self._special_set:
            ids = ids[1:]
        return ids

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` as the slow tokenizer's `decode` gives it (no clean-up of spaces)."""
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_set]
        if not ids:
            return ""
        pieces = [self._sp.id_to_piece(i) for i in ids]
        if pieces[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            pieces[0] = pieces[0][1:]
        out: list[str] = []
        current: list[str] = []
        prev_is_special = False
        for i, (token_id, piece) in enumerate(zip(ids, pieces, strict=True)):
            if token_id in self._special_set:
                if not prev_is_special and i != 0 and self.legacy:
                    out.append(" ")
                out.append(self._sp.decode_pieces(current) + piece)
                prev_is_special = True
                current = []
            else:
                if (
                    prev_is_special
                    and i == 1
                    and self.add_prefix_space
                    and not piece.startswith(SPIECE_UNDERLINE)
                ):
                    out.append(" ")
                current.append(piece)
                prev_is_special = False
        out.append(self._sp.decode_pieces(current))
        return "".join(out)


class JsonTokenizer(LlamaTokenizer):
    """An LLM tokenizer from a Hugging Face `tokenizer.json` (e.g. SmolLM2's byte-level BPE).

    Same ids as transformers' fast tokenizer called with `add_special_tokens=False`, same text as
    its `decode` (a tokenizer_config.json beside the file may ask for the clean-up of spaces).
    bos/eos/unk ids come from that tokenizer_config.json when it names them, else None: a package
    takes its special ids from the model's config, not from here.
    """

    def __init__(self, path: Path | str, **_sentencepiece_options):
        from tokenizers import Tokenizer

        self.path = llm_tokenizer_file(path)
        data = _read_bounded(self.path, MAX_TOKENIZER_JSON_BYTES, "SmolLM2's tokenizer.json is 3.5 MB")
        try:
            self._tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # UnicodeDecodeError, or the tokenizers library's own exception
            raise TokenizerFileError(self.path, f"not a valid tokenizer.json ({exc})") from exc
        if self._tok.get_vocab_size(with_added_tokens=True) <= 0:
            raise TokenizerFileError(self.path, "tokenizer.json has no tokens")
        settings = self._settings(self.path.with_name("tokenizer_config.json"))
        self._clean_up = bool(settings.get("clean_up_tokenization_spaces", False))
        self._special = {
            role: self._token_id(settings.get(f"{role}_token")) for role in ("bos", "eos", "unk")
        }

    @staticmethod
    def _settings(path: Path) -> dict:
        if not path.is_file():
            return {}
        data = _read_bounded(path, MAX_TOKENIZER_CONFIG_BYTES, "its settings take a few hundred bytes")
        try:
            settings = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise TokenizerFileError(path, f"not a JSON tokenizer_config.json ({exc})") from exc
        if not isinstance(settings, dict):
            raise TokenizerFileError(path, "not a JSON object of tokenizer settings")
        return settings

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):  # transformers' AddedToken form: {"content": ..., ...}
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._special["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._special["eos"]

    @property
    def unk_id(self) -> int | None:
        return self._special["unk"]

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._tok.id_to_token(int(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no bos/eos added (transformers: `add_special_tokens=False`)."""
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up else text


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before punctuation and contractions."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text


class InstructionTokenizer:
    """bert-base-uncased + "[DEC]" for the frame Q-Former's instruction, as the release tokenises it.

    `path` is a `vocab.txt` or a folder holding one; `model_vocab`, the Q-Former's vocabulary size
    its ids must stay below. `encode(text)` returns `(ids, mask)`, numpy
    int64 arrays of shape [1, L]: "[CLS] text [SEP]", lower-cased and accent-stripped WordPiece,
    truncated from the left to `max_length` tokens (specials included).
    """

    def __init__(
        self, path: Path | str, *, max_length: int = INSTRUCTION_MAX_LENGTH, model_vocab: int | None = None
    ):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

        self.path = _resolve(path, "vocab.txt")
        self.max_length = max_length
        vocab = self._read_vocab(self.path)
        self.bos_id = vocab.setdefault(INSTRUCTION_BOS_TOKEN, len(vocab))
        ids = max(vocab.values()) + 1
        if model_vocab is not None and ids > model_vocab:  # an id past it fails in the Q-Former's Gather
            raise TokenizerFileError(
                self.path,
                f"gives ids up to {ids - 1} (with {INSTRUCTION_BOS_TOKEN}), past the frame Q-Former's "
                f"vocabulary of {model_vocab} (the manifest's config.frame_qformer.vocab_size): a vocab.txt "
                "of another model",
            )
        self.vocab = vocab
        try:
            tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        except Exception as exc:  # the tokenizers library raises its own exception types
            raise TokenizerFileError(self.path, f"not a usable WordPiece vocabulary ({exc})") from exc
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tok.add_special_tokens([*BERT_SPECIAL_TOKENS, INSTRUCTION_BOS_TOKEN])
        tok.enable_truncation(max_length=max_length, direction="left")
        tok.no_padding()
        self._tok = tok
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, vocab["[PAD]"]

    @staticmethod
    def _read_vocab(path: Path) -> dict[str, int]:
        data = _read_bounded(path, MAX_VOCAB_BYTES, "bert-base-uncased's vocab.txt is 230 KB")
        if not data:
            raise TokenizerFileError(path, "empty file, not a WordPiece vocab.txt")
        if b"\x00" in data:
            raise TokenizerFileError(path, "binary data, not a WordPiece vocab.txt")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TokenizerFileError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        vocab: dict[str, int] = {}
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for index, line in enumerate(lines):
            vocab[line.rstrip("\r\n")] = index  # as transformers' load_vocab: a later duplicate wins
        missing = [t for t in BERT_SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise TokenizerFileError(path, f"not a BERT vocab.txt: no {', '.join(missing)}")
        return vocab

    @property
    def vocab_size(self) -> int:
        """Size with "[DEC]" (30523 for bert-base-uncased)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_ids(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) of one instruction, int64 arrays of shape [1, L]."""
        ids = np.asarray([self.encode_ids(text)], dtype=np.int64)
        return ids, np.ones_like(ids)
