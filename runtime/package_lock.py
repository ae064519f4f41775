"""Writers of a model package: one at a time (a lock), and every file replaced in one durable step.

`PackageLock(folder)` holds an exclusive `fcntl.flock` on `<folder>/.vsal.lock` for as long as a
build (or an export replacing the folder) changes the package; a second writer waits, and says it
is waiting. The lock file is never removed: removing it would let two writers lock two different
files. A writer that waited re-checks that the lock file it holds is still the folder's (an export
may have replaced the folder meanwhile).

`write_durable(path, data)`: a temporary file in the same folder, fsync, `os.replace`, fsync of the
folder. After a crash the path holds the old content or the new, never a mix, and the temporary
name (`.<name>.partial-<pid>-<hex>`) says which process left it. Torch-free.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vsal.runtime.errors import BuildError, PackageError

LOCK_NAME = ".vsal.lock"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-[0-9a-f]+$")


class PackageLock:
    """`with PackageLock(folder, "build fp16"):` -- exclusive, blocking, announced when it waits."""

    def __init__(self, folder: str | os.PathLike, purpose: str, wait: bool = True, quiet: bool = False):
        self.folder = Path(folder)
        self.purpose = purpose
        self.wait = wait
        self.quiet = quiet
        self._fd: int | None = None

    def __enter__(self) -> PackageLock:
        while True:
            fd = _open_lock(self.folder / LOCK_NAME)
            try:
                self._acquire(fd)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.folder / LOCK_NAME):
                break
            os.close(fd)  # the folder was replaced while we waited: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.purpose}\n".encode(), 0)
        self._fd = fd
        return self

    def _acquire(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = _holder(fd)
        if not self.wait:
            raise BuildError(
                f"{self.folder}: the package is being changed by {holder}; wait for it to finish"
            )
        if not self.quiet:
            print(
                f"vsal: {self.folder}: waiting for {holder} to finish with the package",
                file=sys.stderr,
                flush=True,
            )
        fcntl.flock(fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it ("<pid> <purpose>"): "pid 123 (vsal-export build
    ...)", or "another process" while the holder has not written itself yet."""
    pid, _, purpose = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"pid {pid} ({purpose})" if purpose else f"pid {pid}"


def _open_lock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PackageError(f"{path}: is a symlink; a package's lock file must be a plain file") from None
        raise PackageError(f"{path}: cannot open the package's lock file ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PackageError(f"{path}: not a plain file; remove it")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` to write by any means (onnx.save, np.save, a stream); when the
    block ends without an error it replaces `path` atomically and durably, otherwise it is removed.
    The one atomic write of the project: every writer of a file others trust goes through it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def write_durable(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Replace `path` with `data` atomically and durably (see the module's docstring)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json_durable(path: str | os.PathLike, data: Any) -> None:
    write_durable(path, (json.dumps(data, indent=2) + "\n").encode())


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make renames and removals in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_partial(path: Path) -> bool:
    """Whether `path` is a temporary file `write_durable` left behind in a process that is gone."""
    m = _PARTIAL.match(path.name)
    if m is None:
        return False
    pid = int(m["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return False  # alive: it may still be writing
