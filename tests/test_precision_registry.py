"""Adding a precision is one registry row plus one quantizer (vsal.runtime.precisions,
vsal.transforms.quantizers): a plug-in's precision builds, runs and is a CLI choice."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from vsal.export.build import build
from vsal.runtime import precisions
from vsal.runtime.errors import ConfigError
from vsal.runtime.manifest import load_manifest, verify_files
from vsal.runtime.pipeline import Pipeline
from vsal.runtime.precisions import Precision, register_precision, unregister_precision
from vsal.runtime.prompt import DecodingOptions
from vsal.transforms.quantizers import (
    TransformReport,
    get_quantizer,
    register_quantizer,
    unregister_quantizer,
)


@dataclass(frozen=True)
class Identity:
    """A plug-in's quantizer: the variant is the fp32 graph itself, saved under the variant's name."""

    name: str = "identity"
    calibrated: bool = False

    def convert(self, src: Path, dst: Path, calibration) -> TransformReport:
        import onnx

        onnx.save_model(onnx.load_model(src), dst)  # weights read beside src, written inline in dst
        return TransformReport(True, "identity: the exported graph as it is")


@pytest.fixture(scope="module")
def identity():
    """The plug-in: one precision row and its quantizer, removed again after the module."""
    register_precision(Precision("identity", 32, "float32", 18, "identity", default_on=()))
    register_quantizer(Identity())
    try:
        yield
    finally:
        unregister_precision("identity")
        unregister_quantizer("identity")


@pytest.fixture(scope="module")
def with_identity(identity, tiny_package, tmp_path_factory):
    folder = tmp_path_factory.mktemp("identity") / "tiny"
    shutil.copytree(tiny_package, folder)
    report = build(folder, "identity", progress=False)
    return folder, report


def test_a_registered_precision_builds_and_runs(with_identity, clip_10s):
    folder, report = with_identity
    assert report.recorded and report.problems == []
    manifest = load_manifest(folder)
    assert verify_files(manifest, folder) == []
    for name, graph in manifest.graphs.items():
        variant = graph.variants["identity"]
        assert variant.file == f"graphs/{name}.identity.{report.build_id}.onnx"
        assert variant.notes == "identity: the exported graph as it is"
        assert variant.accuracy["cosine"] >= 0.99999, (name, variant.accuracy)
    assert report.end_to_end["token_agreement"] == 1.0
    options = DecodingOptions(num_beams=1, max_new_tokens=4)
    pipeline = Pipeline.load(folder, verbose=False, precision="identity")
    answer = pipeline.ask("What is it?", video=clip_10s, options=options)
    assert {pipeline.backend(name).precision for name in manifest.graphs} == {"identity"}
    reference = Pipeline.load(folder, verbose=False, precision="fp32")
    assert answer.token_ids == reference.ask("What is it?", video=clip_10s, options=options).token_ids


def test_a_registered_precision_is_a_cli_choice(identity):
    from click.testing import CliRunner
    from vsal.export.cli import cli
    from vsal.runtime.cli import cli as run_cli

    assert "identity" in CliRunner().invoke(cli, ["build", "--help"]).output
    refused = CliRunner().invoke(cli, ["build", "--precision", "nope"])
    assert refused.exit_code == 2 and "'identity'" in refused.output
    assert "identity" in CliRunner().invoke(run_cli, ["run", "--help"]).output


def test_cli_choices_follow_the_registry():
    from vsal.runtime.registry_choice import precision_choice

    choice = precision_choice()  # made before the row exists, as a CLI module is imported first
    assert "late" not in choice.choices
    register_precision(Precision("late", 32, "float32", 18, None))
    try:
        assert "late" in choice.choices
    finally:
        unregister_precision("late")
    assert "late" not in choice.choices


def test_unknown_quantizers_and_taken_names_are_refused(tiny_package):
    with pytest.raises(
        ConfigError, match="quantizer 'nope' is not registered.*registered: fp16, int8-static"
    ):
        get_quantizer("nope")
    with pytest.raises(ValueError, match="'fp16' is already registered"):
        register_quantizer(Identity(name="fp16"))
    with pytest.raises(TypeError, match="a quantizer has a name, calibrated and convert"):
        register_quantizer(object())
    register_precision(Precision("orphan", 8, "float32", 18, "missing"))
    try:  # a row naming no registered quantizer fails before the package is locked or touched
        with pytest.raises(ConfigError, match="quantizer 'missing' is not registered"):
            build(tiny_package, "orphan", progress=False)
    finally:
        unregister_precision("orphan")
    with pytest.raises(ConfigError, match="--precision 'int3': unknown precision; choose fp32, fp16, int8"):
        build(tiny_package, "int3", progress=False)
    assert "int8" in precisions.variant_names() and "fp32" not in precisions.variant_names()


def test_a_precision_a_graph_lacks_runs_its_best_other_with_as_many_bits():
    from vsal.runtime import precisions

    assert precisions.choose({"int8": 1}, "int4", "cpu") == ("int8", "no int4 variant built: int8")
    assert precisions.choose({"int4": 1}, "int8", "cpu") == ("fp32", "no int8 variant built: fp32")
    assert precisions.choose({}, "int4", "cpu")[0] == "fp32"
    assert precisions.choose({"int8": 1, "int4": 1}, "int4", "cpu") == ("int4", None)
