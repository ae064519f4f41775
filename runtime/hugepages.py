"""Transparent huge pages for the memory ONNX Runtime allocates (its prepacked weights, the KV cache).

A decode step streams every weight once; on 4 KiB pages that is a TLB miss every 4 KiB. Linux in
THP mode "madvise" (Debian's and Ubuntu's default) gives 2 MiB pages only to memory that asks for
them, and ONNX Runtime's CPU allocator is glibc's malloc, which asks when the tunable
glibc.malloc.hugetlb=1 is set (glibc 2.35 or newer). glibc reads tunables once, at the process's
start, so the `vsal` command restarts itself once with it set, before anything is loaded.
Measured on SmolLM2-135M, 2 cores (docs/performance.md): decode +11 % at int4, +12 % at int8,
+4 to +20 % at fp32. Child processes inherit the tunable: `vsal bench`'s peers and its PyTorch
reference run on huge pages too, so the comparison is on the same footing.

VSAL_HUGEPAGES=0 turns it off. Nothing happens where THP is "always" (every large allocation
already gets them), "never", or absent (not Linux), or where glibc is older or not glibc. Only a
command's entry point calls it (runtime/entry.py, the decoder_eval child): called inside another
program (a test run), it would restart that program.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
OFF_SWITCH = "VSAL_HUGEPAGES"
RESTARTED = "VSAL_HUGEPAGES_RESTARTED"  # set in the restarted process: one restart, whatever the tunables
FIRST_GLIBC = (2, 35)  # the first with glibc.malloc.hugetlb


def thp_mode(path: Path = THP_ENABLED) -> str | None:
    """The kernel's THP mode, the bracketed word of "always [madvise] never", or None."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def _tunables(environ: Mapping[str, str]) -> dict[str, str]:
    """GLIBC_TUNABLES ("name=value:name=value") as a dict."""
    return dict(item.partition("=")[::2] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item)


def hugepage_environment(
    environ: Mapping[str, str], mode: str | None, glibc: tuple[int, int] | None
) -> dict[str, str] | None:
    """The environment to restart with, or None where a restart would change nothing."""
    if environ.get(OFF_SWITCH, "1") == "0" or RESTARTED in environ:
        return None
    if mode != "madvise" or glibc is None or glibc < FIRST_GLIBC:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in _tunables(environ):
        return None  # set already (by us before the restart, or by the user): never loop
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    env[RESTARTED] = "1"
    return env


def state(environ: Mapping[str, str] = os.environ) -> str:
    """One line for a benchmark's header: whether this process's allocations can get huge pages
    (THP always; or madvise with the tunable at 1, or at 2: the kernel's reserved pool)."""
    mode = thp_mode()
    if mode == "always":
        return "huge pages: on (THP always)"
    values = _tunables(environ)
    glibc = glibc_version()
    if values.get(TUNABLE) in ("1", "2") and glibc is not None and glibc >= FIRST_GLIBC:
        return f"huge pages: on (THP {mode or 'absent'}, {TUNABLE}={values[TUNABLE]})"
    return f"huge pages: off (THP {mode or 'absent'})"


def restart_with_hugepages() -> None:
    """Replace this process by itself with the tunable set, when that gives it huge pages.

    Call first thing in a command's entry point: the process's arguments, streams and working
    folder carry over; what it had loaded does not. Returns (no restart) where nothing would change
    or the restart cannot start."""
    env = hugepage_environment(os.environ, thp_mode(), glibc_version())
    if env is None or not sys.executable:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return
