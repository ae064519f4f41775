"""--checkpoint is checked as media files are (package_paths.file_problem), in its own error type."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from vsal.export.package import check_checkpoint_file
from vsal.export.weights.checkpoints import CheckpointError
from vsal.runtime.package_paths import file_problem


def _fifo(tmp):
    os.mkfifo(tmp / "ckpt.safetensors")  # no writer: opening it to read would block
    return tmp / "ckpt.safetensors"


def _dangling(tmp):
    (tmp / "ckpt.safetensors").symlink_to(tmp / "gone.safetensors")
    return tmp / "ckpt.safetensors"


def _folder(tmp):
    (tmp / "ckpt.safetensors").mkdir()
    return tmp / "ckpt.safetensors"


@pytest.mark.parametrize(
    "make,problem",
    [
        (_fifo, r"is a FIFO \(named pipe\), not a checkpoint file: give a regular file \(--checkpoint\)$"),
        (_dangling, r"a dangling symlink \(its target .*gone.safetensors does not exist\) \(--checkpoint\)$"),
        (_folder, r"is a directory, expected a checkpoint file \(--checkpoint\)$"),
        (lambda tmp: tmp / "missing.safetensors", r"no such file \(--checkpoint\)$"),
    ],
    ids=["fifo", "dangling", "directory", "missing"],
)
def test_what_the_checkpoint_path_is_gets_named(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {problem}"):
        check_checkpoint_file(path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_never_read():
    with pytest.raises(CheckpointError, match=r"^/dev/zero: is a character device, not a checkpoint file"):
        check_checkpoint_file("/dev/zero")


def test_an_empty_or_corrupt_safetensors_is_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"--checkpoint is empty \(0 bytes\)$"):
        check_checkpoint_file(path)
    path.write_bytes(b"\xff" * 8 + b"{}")  # a header length of 2**64 - 1
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file \(.*header too large\)$"):
        check_checkpoint_file(path)


def test_a_good_safetensors_passes(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "ckpt.safetensors"
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(path))
    check_checkpoint_file(path)
    assert file_problem(path) is None


def test_file_problem_says_what_was_expected(tmp_path):
    (tmp_path / "dir").mkdir()
    assert file_problem(tmp_path / "dir", what="a package file") == "is a directory, expected a package file"
    assert file_problem(tmp_path / "dir" / "x") == "no such file"
    (tmp_path / "plain").write_bytes(b"x")
    assert file_problem(tmp_path / "plain" / "x") == "no such file (a part of the path is not a folder)"
