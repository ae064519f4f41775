"""`vsal perplexity` on the tiny package: the same figure as transformers' LlamaForCausalLM on the
same weights and text (its perplexity guide's sliding windows, with bos at each window's start),
the window plan, torch-free, and a clear error for each user mistake."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from vsal.runtime.errors import ConfigError
from vsal.runtime.manifest import load_manifest
from vsal.runtime.tokenizers import LlamaTokenizer
from vsal.runtime.tools.perplexity import Window, perplexity, perplexity_cli, plan_windows

from tests.test_runtime import VSAL_WITHOUT_TORCH

# No English book is cached here (the sentencepiece sdist's botchan.txt is not fetched by the
# tests' asset helpers), so a paragraph written for the test: 139 LLaMA-2 tokens.
TEXT = (
    "The harbour was quiet in the early morning, and the fishing boats lay still against the stone "
    "wall. An old man walked along the quay with a basket of nets on his shoulder, stopping now and "
    "then to look at the sky. The wind had turned in the night, and the clouds that came from the "
    "west were low and grey. He knew that the weather would change before noon, and that the younger "
    "men would not listen to him when he told them so. They had their radios and their telephones, "
    "and they trusted the voices that came out of them more than the word of a man who had fished "
    "these waters for sixty years.\n"
)
# Mean NLL agreement with PyTorch in fp32 (nats; the two differ by about 3e-7 here).
NLL_ATOL = 1e-5


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("perplexity") / "harbour.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_ids(tiny_package):
    manifest = load_manifest(tiny_package)
    return LlamaTokenizer(tiny_package / manifest.llm_tokenizer.file).encode(TEXT)


@pytest.fixture(scope="module")
def llama(tiny_model, tiny_package):
    """transformers' LlamaForCausalLM with the package's weights (its embeddings.npy, bit for bit)."""
    lm = tiny_model.llm.model.eval()
    table = lm.get_input_embeddings().weight.detach().numpy()
    assert np.array_equal(table, np.load(tiny_package / "embeddings.npy"))
    return lm


def torch_nll(lm, ids: list[int], bos: int, window: int, stride: int) -> tuple[float, int, int]:
    """(mean NLL, tokens scored, windows) as transformers' perplexity guide computes it, each window
    [bos] + up to window - 1 text tokens, labels -100 on the tokens an earlier window scored."""
    total, scored, windows, done = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window - 1, len(ids))
        new = end - done
        input_ids = torch.tensor([[bos, *ids[begin:end]]])
        labels = input_ids.clone()
        labels[:, :-new] = -100
        with torch.no_grad():
            loss = lm(input_ids=input_ids, labels=labels).loss  # mean over the `new` targets
        total += float(loss) * new
        scored += new
        windows += 1
        done = end
        if end == len(ids):
            break
    return total / scored, scored, windows


@pytest.mark.parametrize(
    "window,stride",
    [(48, 20), (100, None), ("whole", None)],  # windows slide; the default stride; one window
)
def test_perplexity_matches_pytorch(tiny_package, text_file, text_ids, llama, window, stride):
    window = len(text_ids) + 1 if window == "whole" else window
    report = perplexity(tiny_package, text_file, window=window, stride=stride, progress=False)
    assert report.window == window and report.stride == (stride or window // 2)
    want, scored, windows = torch_nll(llama, text_ids, 1, window, report.stride)
    assert report.tokens == scored == len(text_ids)
    assert report.windows == windows and (windows > 1) == (window <= len(text_ids))
    assert report.mean_nll == pytest.approx(want, abs=NLL_ATOL)
    assert report.perplexity == pytest.approx(math.exp(want), rel=NLL_ATOL)
    assert report.precisions == {"llm_decoder": "fp32"}
    assert report.seconds > 0 and report.tokens_per_s > 0


@pytest.mark.parametrize("tokens,window,stride", [(139, 48, 20), (100, 11, 10), (57, 8, 3), (10, 11, 5)])
def test_windows_score_each_token_once_with_at_most_window_minus_one_before_it(tokens, window, stride):
    plan = plan_windows(tokens, window, stride)
    scored = [i for w in plan for i in range(w.end - w.scored, w.end)]
    assert scored == list(range(tokens))
    assert all(w.end - w.begin <= window - 1 for w in plan)  # + bos = the window
    assert [w.begin for w in plan] == list(range(0, stride * len(plan), stride))
    assert plan[0] == Window(0, min(window - 1, tokens), min(window - 1, tokens))


def test_perplexity_needs_no_torch(tiny_package, text_file):
    """As on a Jetson image: torch and transformers cannot be imported, the command still scores."""
    code = VSAL_WITHOUT_TORCH.replace(
        "from vsal.runtime.cli import main\nsys.argv = ['vsal'] + sys.argv[1:]\nmain()\n",
        "from vsal.runtime.tools.perplexity import perplexity_cli\nperplexity_cli(sys.argv[1:])\n",
    )
    assert code != VSAL_WITHOUT_TORCH  # the command, not `vsal`'s group
    args = [str(tiny_package), "--text", str(text_file), "--window", "64", "--json"]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["tokens"] == 139 and report["windows"] == 4 and report["perplexity"] > 1
    assert "vsal perplexity: window 4/4" in out.stderr


def test_the_command_prints_one_summary_line(tiny_package, text_file):
    result = CliRunner().invoke(
        perplexity_cli, [str(tiny_package), "--text", str(text_file), "--window", "48"]
    )
    assert result.exit_code == 0, result.output
    assert (
        result.stdout.startswith("perplexity ")
        and "over 139 tokens in 5 windows of 48 (stride 24)" in result.stdout
    )
    assert "llm_decoder fp32" in result.stdout


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        ("folder", "not a file"),
        (b"", "empty"),
        (b" \n\t\n", "empty"),
        (b"caf\xe9 au lait", r"not UTF-8 \(byte 3"),
    ],
)
def test_a_text_file_that_cannot_be_scored_is_a_config_error(tiny_package, tmp_path, content, message):
    path = tmp_path / "text.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        perplexity(tiny_package, path, progress=False)


def test_a_text_shorter_than_one_window_is_a_config_error(tiny_package, text_file):
    with pytest.raises(ConfigError, match=r"the text is 139 tokens.*a window of at most 140"):
        perplexity(tiny_package, text_file, window=141, progress=False)


@pytest.mark.parametrize(
    "window,stride,message",
    [
        (1, None, "--window 1: the decoder takes 2 to 1024 positions"),
        (1025, None, "--window 1025: the decoder takes 2 to 1024 positions"),
        (48, 0, "--stride 0: a window of 48 holds 47 text tokens"),
        (48, 48, "--stride 48: .* a stride of 1 to 47"),
    ],
)
def test_a_window_outside_the_profile_is_a_config_error(tiny_package, text_file, window, stride, message):
    with pytest.raises(ConfigError, match=message):
        perplexity(tiny_package, text_file, window=window, stride=stride, progress=False)


def test_a_precision_named_runs_as_built_even_where_it_would_not_be_picked(tiny_package, text_file, tmp_path):
    """fp16 on the CPU runs the fp16 decoder (the pipeline alone would run fp32 there), close to fp32."""
    from vsal.export.build import build

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_package, folder)
    assert build(folder, "fp16", graphs=("llm_decoder",), progress=False).recorded
    fp32 = perplexity(folder, text_file, precision="fp32", window=64, progress=False)
    fp16 = perplexity(folder, text_file, precision="fp16", window=64, progress=False)
    assert fp16.precisions == {"llm_decoder": "fp16"} and fp32.precisions == {"llm_decoder": "fp32"}
    assert fp16.tokens == fp32.tokens and fp16.mean_nll != fp32.mean_nll  # another graph ran
    assert fp16.mean_nll == pytest.approx(fp32.mean_nll, abs=1e-3)


def test_a_precision_the_decoder_lacks_is_a_config_error(tiny_package, text_file):
    with pytest.raises(ConfigError, match=r"--precision int8: .* has no int8 llm_decoder; build it"):
        perplexity(tiny_package, text_file, precision="int8", window=48, progress=False)
    with pytest.raises(ConfigError, match="unknown precision"):
        perplexity(tiny_package, text_file, precision="fp8", window=48, progress=False)
