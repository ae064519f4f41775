"""`vsal bench` on the tiny package: every stage, the reference and its ratio, the machine's limits.

Speed itself is never asserted (the CI machine is shared); only that everything is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from vsal.runtime.cli import cli
from vsal.runtime.tools.bench import STAGES

from tests.test_runtime import VSAL_WITHOUT_TORCH


@pytest.fixture(scope="module")
def clip_3s(tmp_path_factory):
    from vsal.runtime.synthetic import write_clip

    return write_clip(tmp_path_factory.mktemp("bench") / "clip3.mp4", seconds=3.0)


def test_bench_json_has_every_stage_reference_ratio_and_limits(tiny_package, clip_3s):
    args = ["bench", str(tiny_package), "--media", str(clip_3s), "--runs", "2", "--max-new-tokens", "4"]
    result = CliRunner().invoke(cli, [*args, "--json", "--quick-limits"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(data["runtime"]["stages"]) == set(STAGES)
    for stat in data["runtime"]["stages"].values():
        assert len(stat["runs"]) == 2 and stat["min"] <= stat["median"] <= stat["max"]
    assert data["runtime"]["tokens"] == 4  # eos ignored: a fixed length
    assert data["runtime"]["peak_rss_bytes"] > 0
    assert data["reference"]["stages"].keys() == data["runtime"]["stages"].keys()
    assert data["reference"]["tokens"] == 4
    assert set(data["ratio"]) == set(STAGES) | {"decode_tokens_per_s", "peak_rss"}
    machine = data["machine"]
    assert machine["memory_bandwidth"]["bytes_per_s"] > 0 and machine["gemm_fp32"]["flop_per_s"] > 0
    decode = data["roofline"]["decode"]
    assert decode["roofline_tokens_per_s"] > 0 and decode["fraction"] > 0
    compute = set(data["roofline"]["compute"])
    assert {"vision_encoder", "whisper_encoder", "beats_encoder", "prefill"} <= compute
    assert "| end_to_end" in result.stderr  # the table


def test_bench_without_torch_skips_the_reference(tiny_package, clip_3s):
    """As on a Jetson image: torch cannot be imported, the bench still runs and says why no reference."""
    args = ["bench", str(tiny_package), "--media", str(clip_3s), "--runs", "1", "--max-new-tokens", "2"]
    out = subprocess.run(
        [sys.executable, "-c", VSAL_WITHOUT_TORCH, *args, "--json", "--quick-limits"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "torch" in data["reference"]["skipped"] and "ratio" not in data
    assert set(data["runtime"]["stages"]) == set(STAGES)


def test_reference_refuses_weights_it_cannot_rebuild(tiny_package, tmp_path):
    from vsal.export.bench_reference import load_model

    manifest = json.loads((tiny_package / "manifest.json").read_text())
    manifest["random_weights"] = False  # as a package exported from the released checkpoints
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    model, reason = load_model(tmp_path, None)
    assert model is None and "--checkpoint" in reason


BENCH_QUICK = ["--runs", "1", "--max-new-tokens", "2", "--quick-limits"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/nope.safetensors"], "{tmp}/nope.safetensors: no such file (--checkpoint)"),
        (["--checkpoint", "/dev/null"], "/dev/null: is a character device, not a consolidated checkpoint"),
        (["--no-reference", "--checkpoint", "{pkg}/embeddings.npy"], "leave out --no-reference"),
    ],
)
def test_bench_checks_the_checkpoint_before_it_starts(tiny_package, clip_3s, tmp_path, args, message):
    from vsal.runtime.errors import ConfigError

    args = [a.format(tmp=tmp_path, pkg=tiny_package) for a in args]
    command = ["bench", str(tiny_package), "--media", str(clip_3s), *BENCH_QUICK, *args]
    result = CliRunner().invoke(cli, command)
    assert isinstance(result.exception, ConfigError), result.output
    assert message.format(tmp=tmp_path) in str(result.exception)
    assert "runtime" not in result.stderr  # before the runtime bench


def test_bench_with_a_checkpoint_that_is_not_one_fails_in_one_line(tiny_package, clip_3s, tmp_path, capfd):
    """The reference child's user error comes back as its one line, and an asked-for reference that
    cannot run is an error, not a silent skip."""
    from vsal.runtime.errors import ConfigError

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    command = ["bench", str(tiny_package), "--media", str(clip_3s), *BENCH_QUICK, "--checkpoint", str(junk)]
    result = CliRunner().invoke(cli, command)
    assert isinstance(result.exception, ConfigError), result.output
    message = str(result.exception)
    assert message.startswith("--checkpoint: the PyTorch reference could not run: ") and str(junk) in message
    assert "\n" not in message
    assert "Traceback" not in capfd.readouterr().err  # the child's stderr


@pytest.mark.parametrize("threads", ["-1", "5000"])
def test_bench_refuses_a_thread_count_out_of_range(tiny_package, threads):
    result = CliRunner().invoke(cli, ["bench", str(tiny_package), "--threads", threads])
    assert result.exit_code == 2 and "'--threads'" in result.output and "0<=x<=256" in result.output


def test_run_bench_refuses_a_thread_count_out_of_range(tmp_path):
    from vsal.runtime.errors import ConfigError
    from vsal.runtime.tools.bench import run_bench

    with pytest.raises(ConfigError, match=r"^--threads 5000: expected 0 \(the default\) to 256$"):
        run_bench(tmp_path / "no-package", threads=5000)
