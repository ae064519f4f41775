"""Packages come from elsewhere: every file their manifest names stays inside the package folder.

A name must be a relative POSIX path without `..`; every symlink on its way must resolve inside the
folder; what it names must be a regular file (a FIFO blocks a reader forever, /dev/zero never ends).
A name an ONNX graph gives its weights is resolved as the kernel does, symlinks before what follows.
The folders the package's writers glob and clean (graphs/, calibration/, engines/) are real folders,
never symlinks. manifest.json and other JSON files are bounded in size and nesting before parsing.
Writers that place package files elsewhere (the Triton repository) go through `place_file`: inside
their output folder only, never through a symlink found there, and only bytes whose sha256 the
manifest gives. Torch-free.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from vsal.runtime.errors import PackageError

MAX_MANIFEST_BYTES = 4 << 20  # 4 MiB; the 13b's manifest is about 20 KB
MAX_JSON_DEPTH = 32  # the manifest nests 6 levels deep
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def checked_name(name: Any, field: str, manifest: Path) -> PurePosixPath:
    """A manifest's file name as a relative path with no `..`; PackageError naming the field if not."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise PackageError(f"{manifest}: {field} must be a relative file name, got {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise PackageError(
            f"{manifest}: {field} {name!r} is an absolute path; a package names its files relative to it"
        )
    if "" in name.split("/"):  # "graphs//x", "embeddings.npy/": PurePosixPath would hide them
        raise PackageError(
            f"{manifest}: {field} {name!r} has an empty part (a trailing or doubled /); give the "
            "file's name as the export wrote it"
        )
    if ".." in path.parts:
        raise PackageError(f"{manifest}: {field} {name!r} leaves the package folder (..)")
    return path


def confined(
    folder: Path, name: str, field: str, *, must_exist: bool = False, named_in: Path | None = None
) -> Path:
    """The real path of `folder/name`, checked to lie inside `folder` and to be a regular file.

    A name that does not exist passes unless `must_exist` (verify_files reports missing files);
    everything else that is wrong raises PackageError naming the file and the field. `named_in`: the
    file that gives the name (default: the manifest)."""
    folder = Path(folder)
    checked_name(name, field, named_in or folder / "manifest.json")
    path = folder / name
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if not inside(real, root):
        raise PackageError(
            f"{path}: {field} resolves to {real}, outside the package folder {root} (a symlink that "
            "leaves it); a package's files must lie inside its folder"
        )
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        if must_exist:
            raise PackageError(f"{path}: missing ({field})") from None
        return Path(real)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PackageError(f"{path}: {field} is a symlink loop") from None
        raise PackageError(f"{path}: {field} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise PackageError(f"{path}: {field} is {kind}; a package's files must be regular files")
    if not os.access(real, os.R_OK):
        raise PackageError(f"{path}: {field} is not readable by this user (permission denied)")
    return Path(real)


def read_manifest_json(path: Path) -> dict[str, Any]:
    """manifest.json, parsed, once it is known to be small and shallow enough to parse safely."""
    return read_json(path, MAX_MANIFEST_BYTES, "a manifest nests 6")


_TOO_DEEP = object()  # json.loads hit its own recursion limit (None is a valid document: `null`)
MAX_INT_DIGITS = 64  # a package's integers are sizes and ids; Python refuses to parse 4300+ digits


def read_json(path: Path, max_bytes: int, usual: str) -> dict[str, Any]:
    """A small JSON object from a package file that `confined` checked; PackageError when it is
    larger than max_bytes, nested deeper than MAX_JSON_DEPTH, not JSON, not an object, has a key
    twice (the last would silently win) or a string that is not Unicode text. `usual` ends the depth
    message (what such a file usually holds)."""
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        size = f"{max_bytes >> 20} MiB" if max_bytes >= 1 << 20 else f"{max_bytes >> 10} KiB"
        raise PackageError(f"{path}: larger than {size}; such a file is a few KB (not a package?)")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except RecursionError:
        data = _TOO_DEEP  # certainly deeper than ours
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, our hooks' refusals
        raise PackageError(f"{path}: not valid JSON ({exc})") from None
    if data is _TOO_DEEP or _depth(data) > MAX_JSON_DEPTH:
        raise PackageError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; {usual}")
    if not isinstance(data, dict):
        raise PackageError(f"{path}: holds JSON {_json_kind(data)}, expected an object {{...}}")
    _check_text(data, path)
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} appears twice in one object; give each key once")
    return data


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(
            f"an integer of {len(digits.lstrip('-'))} digits; a package's numbers have at most "
            f"{MAX_INT_DIGITS}"
        )
    return int(digits)


def _check_text(data: dict[str, Any], path: Path) -> None:
    """Every key and string is Unicode text: JSON's \\ud800 escapes give lone surrogates, which no
    encoder (sentencepiece, a terminal, UTF-8) takes. Shallow by now, so recursion is bounded."""

    def walk(value: Any, where: str) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            at = f"{where}[{key}]" if isinstance(value, list) else f"{where}.{key}" if where else key
            if isinstance(key, str) and not _is_text(key):
                raise PackageError(
                    f"{path}: {where or 'the top level'} has a key {key!r} that is not "
                    "Unicode text (a lone surrogate escape); write the character itself"
                )
            if isinstance(item, str) and not _is_text(item):
                raise PackageError(
                    f"{path}: {at} is {item[:40]!r}, not Unicode text (a lone surrogate escape such as "
                    "\\ud800); write the character itself"
                )
            if isinstance(item, dict | list):
                walk(item, at)

    walk(data, "")


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    kind = {list: "an array", str: "a string", int: "a number", float: "a number"}
    return kind.get(type(value), type(value).__name__)


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return deepest


def confined_beside(folder: Path, file: str, location: str, field: str, named_in: Path) -> Path:
    """The real path of `location`, a name the package file `file` gives relative to its own folder
    (an ONNX graph's external weights), checked like `confined`. Resolved as the kernel resolves it:
    each symlink on the way before anything after it, so `sub/root -> ../..` cannot hide an exit."""
    checked_name(location, field, named_in)
    real = os.path.realpath(os.path.join(os.path.dirname(Path(folder) / file), location))
    root = os.path.realpath(folder)
    if not inside(real, root):
        raise PackageError(
            f"{named_in}: {field} {location!r} resolves to {real}, outside the package folder {root} "
            "(through a symlink); a package's files must lie inside its folder"
        )
    return confined(folder, os.path.relpath(real, root), field, named_in=named_in)


def package_folder(folder: Path, name: str, role: str) -> Path | None:
    """`folder/name`, a folder the package's writers write and clean (graphs/, calibration/,
    engines/): None when absent, else it must be a real folder, never a symlink (lstat), so no
    glob, unlink or new file can reach outside the package through it."""
    path = Path(folder) / name
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise PackageError(
            f"{path}: the {role} must be a folder inside the package, not a symlink (to "
            f"{os.readlink(path)}); replace the link with the folder it points to"
        )
    if not stat.S_ISDIR(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "a regular file")
        raise PackageError(f"{path}: the {role} must be a folder inside the package, not {kind}")
    return path


def load_embeddings(folder: Path, name: str, vocab: int, hidden: int) -> np.ndarray:
    """The token-embedding table [vocab, hidden] float32, memory-mapped; never unpickled. Its .npy
    header is read first: a dtype, shape or file size that differs is refused before any mapping
    (and before verify_files would spend minutes hashing a file that cannot be the table)."""
    path = confined(folder, name, "embeddings.file", must_exist=True)
    shown = Path(folder) / name
    dtype, shape, offset = _npy_header(path, shown)
    if dtype.hasobject:
        raise PackageError(f"{shown}: not a plain .npy array (it holds pickled Python objects, never loaded)")
    if shape != (vocab, hidden) or dtype != np.dtype("float32"):
        raise PackageError(
            f"{shown}: {dtype} {list(shape)}, expected float32 [{vocab}, {hidden}] "
            "(the manifest's config.llm vocab_size, hidden_size): re-export the package"
        )
    size, expected = os.stat(path).st_size, offset + vocab * hidden * dtype.itemsize
    if size != expected:
        raise PackageError(
            f"{shown}: {size} bytes, its header says float32 [{vocab}, {hidden}] ({expected} bytes): "
            "truncated or padded: re-export the package"
        )
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise PackageError(f"{shown}: cannot be read as .npy ({exc})") from None


def _npy_header(path: Path, shown: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) from a .npy file's header, which is parsed, never unpickled."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
        except ValueError:
            raise PackageError(
                f"{shown}: not a .npy file (it does not start with numpy's magic bytes); embeddings.file "
                "names the token-embedding table, a .npy [vocab, hidden] float32"
            ) from None
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        try:
            shape, _, dtype = read(f)
        except ValueError as exc:  # a header too long, not a dict, a bad descr
            first = str(exc).strip().splitlines()[0].rstrip(".")  # the rest advises allow_pickle=True
            raise PackageError(f"{shown}: not a plain .npy array ({first}); re-export the package") from None
        return dtype, shape, f.tell()


# --- writers ----------------------------------------------------------------------------------------


def _prepare(dst: Path, root: Path) -> None:
    """Make dst writable without following anything planted there: its folder lies inside root
    (through no symlink that leaves it), and whatever sits at dst itself is removed."""
    real_root = os.path.realpath(root)
    if not inside(os.path.realpath(dst.parent), real_root):  # checked before mkdir creates anything
        raise PackageError(f"{dst}: would be written outside the output folder {root} (through a symlink)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dst):
        if os.path.isdir(dst) and not os.path.islink(dst):
            raise PackageError(f"{dst}: a directory is in the way of a file to write")
        os.unlink(dst)  # a planted symlink is replaced, never followed


def place_file(src: Path, dst: Path, sha256: str | None, root: Path, *, link: bool = False) -> None:
    """Copy (or symlink) a confined package file to dst inside root, checking its sha256 (None: a
    file the manifest does not hash). A link points at src's real path, inside the package."""
    _prepare(dst, root)
    if link:
        check_sha256(src, sha256)
        os.symlink(src, dst)
        return
    digest = _copy_hashed(src, dst)
    if sha256 is not None and digest != sha256:
        dst.unlink()
        raise PackageError(f"{src}: sha256 differs from the manifest (corrupt or replaced): not copied")


def link_folder(src: Path, dst: Path, root: Path) -> None:
    """A symlink at dst (inside root) to the package folder src, whose files load_manifest confines."""
    _prepare(dst, root)
    os.symlink(os.path.realpath(src), dst, target_is_directory=True)


def check_sha256(src: Path, sha256: str | None) -> None:
    if sha256 is None:
        return
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != sha256:
        raise PackageError(f"{src}: sha256 differs from the manifest (corrupt or replaced)")


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy src to a new file dst (O_EXCL | O_NOFOLLOW: never through a link), hashing the bytes."""
    h = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with open(src, "rb") as fin, os.fdopen(os.open(dst, flags, 0o644), "wb") as fout:
        for block in iter(lambda: fin.read(1 << 22), b""):
            h.update(block)
            fout.write(block)
    return h.hexdigest()


def write_text_file(dst: Path, text: str, root: Path) -> None:
    """Write a new text file at dst inside root, never through a link planted there."""
    _prepare(dst, root)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(dst, flags, 0o644), "w") as f:
        f.write(text)


# --- what a path names ------------------------------------------------------------------------------


def file_problem(
    path: str | os.PathLike, *, what: str = "a readable file", error: OSError | None = None
) -> str | None:
    """Why `path` cannot be read as `what`, in words to follow "PATH: "; None when it is a readable
    regular file. Nothing is opened: stat names a FIFO or a device without reading it, lstat tells
    a dangling symlink from a missing file. `error`: an OSError that stat'ing or opening `path`
    raised, put in words instead of looking again (an open refused after the check passed)."""
    denied = "permission denied: this user cannot read the file (check its mode and its folders')"
    if error is None:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            error = exc
    if error is not None:
        if error.errno == errno.ENOENT and os.path.islink(path):
            return f"a dangling symlink (its target {os.readlink(path)} does not exist)"
        return {
            errno.ENOENT: "no such file",
            errno.ENOTDIR: "no such file (a part of the path is not a folder)",
            errno.ELOOP: "a symlink loop (following its links leads back to them): give the file itself",
            errno.EACCES: denied,
            errno.EPERM: denied,
        }.get(error.errno, f"cannot be read ({error.strerror})")
    if stat.S_ISDIR(mode):
        return f"is a directory, expected {what}"
    if not stat.S_ISREG(mode):
        kind = {
            stat.S_IFIFO: "a FIFO (named pipe)",
            stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket",
        }.get(stat.S_IFMT(mode))
        if kind is None:  # a kind this table does not name (a door, a whiteout)
            return f"is not a regular file: give {what}"
        return f"is {kind}, not {what}: give a regular file"
    return None if os.access(path, os.R_OK) else denied
