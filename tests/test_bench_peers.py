"""`vsal bench --llm-dir`: vsal's decoder as a child engine, and the interleaved comparison with
peers (here a fake peer: a small script the test writes, printing the runners' JSON line).

Speed is never asserted (the machine is shared); what is: the greedy tokens, the order the children
ran in, the grouping by precision class, a missing peer, and the check that --llm-dir is the
package's LLM.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from vsal.runtime.cli import cli
from vsal.runtime.errors import ConfigError
from vsal.runtime.manifest import load_manifest
from vsal.runtime.tools import peers

PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203]  # bos + 11 ids
NEW_TOKENS = 6


def _decoder_eval(package: Path, precision: str, job: Path, *extra: str) -> tuple[int, dict]:
    cmd = [sys.executable, "-m", "vsal.runtime.tools.decoder_eval", str(package), precision, str(job)]
    out = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300)
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


def _job(tmp_path: Path, **fields) -> Path:
    job = {"prompts": [PROMPT], "new_tokens": NEW_TOKENS, "runs": 2, "warmup": 0, "threads": 1} | fields
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return path


def test_decoder_eval_gives_the_greedy_tokens_of_runtime_generation(tiny_package, tmp_path):
    from vsal.runtime.generation import generate_tokens
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions

    code, result = _decoder_eval(tiny_package, "fp32", _job(tmp_path))
    assert code == 0, result
    pipeline = Pipeline.load(tiny_package, provider="cpu", threads=1, verbose=False, precision="fp32")
    options = DecodingOptions(
        num_beams=1, max_new_tokens=NEW_TOKENS, repetition_penalty=1.0, eos_token_id=None
    )
    embeds = pipeline.embed(np.array(PROMPT))
    expected = list(generate_tokens(pipeline.decoder_step(), pipeline.embed, embeds, options))
    (measured,) = result["prompts"]
    assert measured["greedy"] == expected and len(expected) == NEW_TOKENS
    assert measured["greedy_same_every_run"] and measured["prompt_tokens"] == len(PROMPT)
    assert len(measured["prefill_ms"]["runs"]) == 2 and measured["prefill_ms"]["median"] > 0
    assert measured["decode_tokens_per_s"]["min"] > 0
    assert result["decoder_graph"] == "portable"  # the tiny package has no fused variant built
    assert result["peak_rss_bytes"] > 0


def test_decoder_eval_refuses_a_precision_the_package_lacks(tiny_package, tmp_path):
    code, result = _decoder_eval(tiny_package, "int4", _job(tmp_path))
    assert code == 1 and "no int4 variant" in result["error"] and "vsal-export build" in result["error"]


# --- the comparison, with a fake peer -------------------------------------------------------------


FAKE_GENAI = """
import json, sys
checkpoint, precision, out = sys.argv[1:4]
log = open(sys.argv[0] + ".log", "a")
if "--build-only" in sys.argv:
    log.write(f"build {precision}\\n")
    print(json.dumps({"engine": "onnxruntime-genai", "precision": precision}))
    sys.exit(0)
job = json.load(open(sys.argv[4]))
log.write(f"run {precision}\\n")
greedy = {"fp32": [7, 8, 9, 10], "int8": [7, 8, 3, 10], "int4": [5, 8, 9, 10]}[precision]
prompt = {
    "prompt_tokens": len(job["prompts"][0]),
    "prefill_ms": {"median": 12.5},
    "decode_tokens_per_s": {"median": {"fp32": 40.0, "int8": 80.0, "int4": 120.0}[precision]},
    "greedy": greedy[: job["new_tokens"]],
}
print("builder noise on stdout first")
print(json.dumps({"engine": "onnxruntime-genai", "precision": precision, "prompts": [prompt],
                  "peak_rss_bytes": 123 << 20, "weights_bytes_per_token": 50 << 20, "kv_dtype": "float32"}))
"""


@pytest.fixture
def llm_dir(tiny_package, tmp_path):
    """A checkpoint folder whose embedding table is the tiny package's (all the check reads)."""
    from safetensors.numpy import save_file

    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    table = np.load(tiny_package / load_manifest(tiny_package).embeddings.file)
    save_file({peers.EMBEDDINGS_KEY: table}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def fake_peers(tmp_path):
    """VSAL_PEERS with onnxruntime-genai's venv (this Python) and no llama.cpp; the runners' folder."""
    venv = tmp_path / "peers" / "ort-genai" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "ort_genai_eval.py").write_text(FAKE_GENAI)
    return tmp_path / "peers", scripts


def test_peers_run_interleaved_grouped_by_class_and_a_missing_peer_is_reported(
    tiny_package, llm_dir, fake_peers
):
    peers_dir, scripts = fake_peers
    result = peers.compare(
        tiny_package,
        llm_dir,
        rounds=2,
        threads=1,
        quick_limits=True,
        peers_dir=peers_dir,
        scripts_dir=scripts,
        prompt_tokens=16,
        new_tokens=4,
    )
    one_round = ["vsal portable graph fp32", "onnxruntime-genai fp32", "onnxruntime-genai int8"]
    one_round.append("onnxruntime-genai int4")
    assert result["order"] == [[1, label] for label in one_round] + [[2, label] for label in one_round]
    log = (scripts / "ort_genai_eval.py.log").read_text().split("\n")
    builds, runs = ["build fp32", "build int8", "build int4"], ["run fp32", "run int8", "run int4"]
    assert log == [*builds, *runs, *runs, ""]  # built once, before the rounds; then each round in turn

    rows = {(r["engine"], r["precision"]): r for r in result["engines"]}
    assert [r["class"] for r in result["engines"]] == ["fp32", "fp32", "8-bit", "4-bit"]
    genai = rows["onnxruntime-genai", "int8"]
    assert genai["greedy_equal_to_fp32"] == {
        "prefix": 2,
        "count": 3,
        "of": 4,
        "reference": "onnxruntime-genai fp32",
    }
    assert rows["onnxruntime-genai", "int4"]["greedy_equal_to_fp32"]["prefix"] == 0
    assert genai["rounds"] == 2 and genai["decode_tokens_per_s"]["median"] == 80.0
    assert genai["bytes_per_token"] > 50 << 20 and 0 < genai["fraction_of_roofline"]
    vsal = rows["vsal portable graph", "fp32"]
    assert vsal["greedy_equal_to_fp32"]["count"] == 4 and vsal["decoder_graph"] == "portable"
    assert vsal["weights_bytes_per_token"] > 0 and vsal["roofline_tokens_per_s"] > 0
    assert result["settings"]["prompt_tokens"] == 16

    (missing,) = result["not_installed"]
    assert missing["engine"] == "llama.cpp" and "install_llama_cpp.sh" in missing["note"]
    text = peers.table(result)
    fp32_line, int8_line = text.index("| fp32 | onnxruntime-genai"), text.index("| 8-bit | onnxruntime-genai")
    assert fp32_line < int8_line < text.index("| 4-bit | onnxruntime-genai")
    assert "llama.cpp: not installed: run scripts/peers/install_llama_cpp.sh" in text
    # which pages every child ran on (they inherit the bench's environment), and vsal's own child's
    assert (
        text.splitlines()[1]
        == f"every engine's process: {result['settings']['huge_pages']} (the bench's environment, inherited)"
    )
    assert vsal["huge_pages"].startswith("huge pages: ")


def test_bench_refuses_an_llm_dir_that_is_not_the_packages(tiny_package, llm_dir):
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(llm_dir / "model.safetensors"))
    weights[peers.EMBEDDINGS_KEY][3, 5] += 1.0  # one value off: another model
    save_file(weights, str(llm_dir / "model.safetensors"))
    with pytest.raises(ConfigError, match="--llm-dir .*embeddings.npy"):
        peers.compare(tiny_package, llm_dir)
    result = CliRunner().invoke(cli, ["bench", str(tiny_package), "--llm-dir", str(llm_dir)])
    assert isinstance(result.exception, ConfigError), result.output  # before any stage runs
    assert "--llm-dir" in str(result.exception) and "embeddings.npy" in str(result.exception)


def test_embedding_table_reads_bfloat16_as_float32(tmp_path):
    """A bf16 checkpoint's table widens exactly: bfloat16 is the upper half of a float32."""
    values = np.array([[1.0, -2.5], [0.15625, 2.0**100]], np.float32)
    upper = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: these have 7-bit mantissas
    header = {peers.EMBEDDINGS_KEY: {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, upper.nbytes]}}
    encoded = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(
        len(encoded).to_bytes(8, "little") + encoded + upper.tobytes()
    )
    assert np.array_equal(peers.embedding_table(tmp_path), values)


def test_fused_rows_are_compared_with_the_portable_graph_of_their_precision():
    rows = [
        {"engine": peers.VSAL, "precision": "fp32", "class": "fp32", "greedy": [1, 2, 3]},
        {"engine": peers.VSAL_PORTABLE, "precision": "fp32", "class": "fp32", "greedy": [1, 2, 3]},
        {"engine": peers.VSAL, "precision": "int4", "class": "4-bit", "greedy": [1, 5, 3]},
        {"engine": peers.VSAL_PORTABLE, "precision": "int4", "class": "4-bit", "greedy": [1, 5, 4]},
    ]
    peers.add_greedy_equal(rows)
    assert rows[2]["greedy_equal_to_fp32"]["prefix"] == 1
    assert rows[2]["greedy_equal_to_portable"] == {"prefix": 2, "count": 2, "of": 3}
    assert rows[0]["greedy_equal_to_portable"]["prefix"] == 3
    assert "greedy_equal_to_portable" not in rows[1]  # the portable graph is the reference
    assert peers._greedy(rows[2]) == "1/3 first, 2 in all; = portable graph: 2/3 first"
