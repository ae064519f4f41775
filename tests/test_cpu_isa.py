"""runtime.cpu_isa: which x86 CPUs run ONNX Runtime's u8s8 GEMM exactly (VNNI), and the override."""

from __future__ import annotations

import pytest
from vsal.runtime import cpu_isa
from vsal.runtime.cpu_isa import ENV, detect_vnni, vnni_from_flags
from vsal.runtime.errors import ConfigError

AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}

# /proc/cpuinfo flags (the relevant part) -> does MLAS pick a VNNI u8s8 kernel (platform.cpp)?
CPUS = {
    "Haswell / Zen 2 EPYC Rome (AVX2)": (AVX2, False),
    "Skylake-SP (AVX-512, no VNNI)": (AVX512, False),
    "Cascade Lake / Ice Lake-SP (AVX-512 VNNI)": (AVX512 | {"avx512_vnni"}, True),
    "Zen 4 EPYC Genoa (AVX-512 VNNI)": (AVX512 | {"avx512_vnni", "avx512_bf16"}, True),
    "Alder Lake (AVX-VNNI, AVX-512 off)": (AVX2 | {"avx_vnni"}, True),
    "Sapphire Rapids (both)": (AVX512 | {"avx512_vnni", "avx_vnni", "amx_int8"}, True),
    # MLAS takes its AVX-512 core kernel (vpmaddubsw) over the AVX-VNNI one when there is AVX-512
    "AVX-512 without avx512_vnni, with avx_vnni": (AVX512 | {"avx_vnni"}, False),
}


@pytest.mark.parametrize("cpu", CPUS)
def test_vnni_from_flags_follows_mlas(cpu):
    flags, vnni = CPUS[cpu]
    assert vnni_from_flags(frozenset(flags)) is vnni


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the detection at a file of ours; returns a writer."""
    monkeypatch.delenv(ENV, raising=False)
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu_isa, "CPUINFO", path)
    cpu_isa._cpu_flags.cache_clear()
    yield lambda flags: path.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 7R32\nflags\t\t: " + " ".join(sorted(flags)) + "\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    cpu_isa._cpu_flags.cache_clear()


def test_reads_the_first_flags_line(cpuinfo):
    cpuinfo(AVX2)
    assert detect_vnni() == cpu_isa.Vnni(False, f"{cpu_isa.CPUINFO}: no avx_vnni or avx512_vnni")
    cpu_isa._cpu_flags.cache_clear()
    cpuinfo(AVX512 | {"avx512_vnni"})
    assert detect_vnni() == cpu_isa.Vnni(True, f"{cpu_isa.CPUINFO}: avx512_vnni")
    cpu_isa._cpu_flags.cache_clear()
    cpuinfo(AVX512 | {"avx_vnni"})
    vnni = detect_vnni()
    assert not vnni.present and "AVX-512 without avx512_vnni" in vnni.source


def test_without_cpuinfo_the_cpu_counts_as_without_vnni(cpuinfo):
    vnni = detect_vnni()  # the file was never written
    assert not vnni.present and "assumed none" in vnni.source


@pytest.mark.parametrize("value, present", [("0", False), ("1", True), (" 1 ", True)])
def test_the_environment_overrides_the_flags(cpuinfo, monkeypatch, value, present):
    cpuinfo(AVX512 | {"avx512_vnni"} if not present else AVX2)  # the opposite of what is forced
    monkeypatch.setenv(ENV, value)
    assert detect_vnni() == cpu_isa.Vnni(present, f"{ENV}={value.strip()}")


@pytest.mark.parametrize("value", ["yes", "", "2"])
def test_a_bad_override_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ConfigError, match=rf"^{ENV}='{value}': expected 0 \(no VNNI\) or 1 \(VNNI\)"):
        detect_vnni()
