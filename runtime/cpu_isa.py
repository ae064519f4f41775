"""Does this x86 CPU run ONNX Runtime's u8s8 integer GEMM exactly? (VNNI, read from the CPU flags.)

ONNX Runtime's CPU kernels for integer MatMul (MLAS QGEMM, `MatMulIntegerToFloat`) multiply uint8
activations by int8 weights. With VNNI (`vpdpbusd`) four u8*s8 products go straight into an int32
sum: exact. Without it (AVX2 or AVX-512 without VNNI: AMD EPYC before Zen 4, Intel before Cascade
Lake) MLAS uses `vpmaddubsw`, which adds each pair of u8*s8 products into an int16 with
saturation: 2 * 255 * 127 = 64770 does not fit in 32767, and the result is silently clipped.

MLAS (platform.cpp, ONNX Runtime 1.32) picks its u8s8 kernel so:
    AVX-512 F/BW/DQ/VL present:  AVX-512 VNNI kernel if avx512_vnni, else AVX-512 core (vpmaddubsw)
    otherwise, AVX2:             AVX-VNNI kernel if avx_vnni, else AVX2 (vpmaddubsw)
`vnni_from_flags` follows the same rule (a CPU with avx_vnni but AVX-512 core without
avx512_vnni would get the saturating AVX-512 kernel). The flags come from /proc/cpuinfo (Linux),
which shows what CPUID reports to MLAS, also in a VM. Elsewhere the flags are not read and the CPU
counts as without VNNI: the path chosen then (runtime.qdq_cpu) is exact on every CPU and only
costs speed. ARM needs none of this: its int8 kernels (sdot/udot, smmla, or widening NEON
multiplies) accumulate in int32.

VSAL_CPU_VNNI=1 or 0 overrides the detection (tests force both cases; users can too).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from vsal.runtime.errors import ConfigError

ENV = "VSAL_CPU_VNNI"
CPUINFO = Path("/proc/cpuinfo")
AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})


@dataclass(frozen=True)
class Vnni:
    """Whether the u8s8 GEMM of ONNX Runtime is exact here, and where that answer came from."""

    present: bool
    source: str  # e.g. "/proc/cpuinfo: avx512_vnni", "VSAL_CPU_VNNI=0"


def vnni_from_flags(flags: frozenset[str] | set[str]) -> bool:
    """True when MLAS's u8s8 kernel for CPUs with these /proc/cpuinfo flags is a VNNI one."""
    if AVX512_CORE <= flags:
        return "avx512_vnni" in flags
    return "avx_vnni" in flags


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str] | None:
    """The first `flags` line of /proc/cpuinfo (x86 Linux), or None where there is none."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def detect_vnni() -> Vnni:
    """VSAL_CPU_VNNI when set (0 or 1), else the CPU's flags; without flags: no VNNI (the safe side)."""
    forced = os.environ.get(ENV)
    if forced is not None:
        if forced.strip() not in ("0", "1"):
            raise ConfigError(
                f"{ENV}={forced!r}: expected 0 (no VNNI) or 1 (VNNI); unset it to read the CPU's flags"
            )
        return Vnni(forced.strip() == "1", f"{ENV}={forced.strip()}")
    flags = _cpu_flags()
    if flags is None:
        return Vnni(False, f"unknown ({CPUINFO} unreadable): assumed none")
    if vnni_from_flags(flags):
        return Vnni(True, f"{CPUINFO}: {'avx512_vnni' if AVX512_CORE <= flags else 'avx_vnni'}")
    if "avx_vnni" in flags:  # AVX-512 core without avx512_vnni: MLAS takes its AVX-512 kernel
        return Vnni(False, f"{CPUINFO}: avx_vnni, but AVX-512 without avx512_vnni")
    return Vnni(False, f"{CPUINFO}: no avx_vnni or avx512_vnni")
