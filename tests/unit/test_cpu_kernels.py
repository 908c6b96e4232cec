"""Which prebuilt build of the CPU kernels a machine takes (sluice.platform.cpu_kernels): a pure
function of the CPU's flags, the override, and the build record beside the modules."""

from __future__ import annotations

import json

import pytest

from sluice.platform import cpu_kernels as K

V2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3", "sse", "sse2"}
AVX2 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
SAPPHIRE_RAPIDS = AVX512 | {"avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize("flags,expected", [
    (SAPPHIRE_RAPIDS, "x86_64_v4"),
    (AVX512, "x86_64_v4"),
    (AVX2, "x86_64_v3"),
    (AVX2 | {"avx512f"}, "x86_64_v3"),          # AVX-512F alone (Xeon Phi) is not x86-64-v4
    (AVX512 - {"avx512vl"}, "x86_64_v3"),
    (AVX2 - {"fma"}, None),                      # AVX2 without FMA: no prebuilt variant
    (AVX2 - {"movbe"}, None),                    # a hypervisor hiding a v3 flag: build here
    (V2 | {"avx"}, None),                        # Sandy Bridge
    (set(), None),
])
def test_variant_follows_the_cpu_flags(flags, expected):
    assert K.choose_variant(flags) == expected


def test_no_prebuilt_variant_off_x86():
    assert K.choose_variant(AVX512, machine="aarch64") is None
    assert K.build_variants("aarch64") == []
    assert K.build_variants("x86_64") == list(K.VARIANTS)


def test_every_variant_requires_what_its_march_enables():
    # x86-64-v4 code may use every v3 instruction: its requirements include v3's
    assert K.VARIANTS["x86_64_v3"]["requires"] < K.VARIANTS["x86_64_v4"]["requires"]
    assert list(K.VARIANTS) == ["x86_64_v4", "x86_64_v3"]  # best first


@pytest.mark.parametrize("forced,flags,expected", [
    ("x86_64_v3", AVX512, "x86_64_v3"),          # simulate an AVX2-only CPU on an AVX-512 one
    ("x86_64_v4", AVX2, "x86_64_v3"),            # never a variant the CPU cannot run
    ("jit", AVX512, None),
    ("bogus", AVX2, "x86_64_v3"),
    ("", AVX512, "x86_64_v4"),
])
def test_the_override_picks_only_runnable_variants(forced, flags, expected, monkeypatch):
    monkeypatch.setattr(K._pyplatform, "machine", lambda: "x86_64")
    variant, why = K.selected_variant(flags, env={K.FORCE_ENV: forced})
    assert variant == expected
    if forced:
        assert forced in why


def _fake_build(tmp_path, torch_version="2.13.0+cpu", digest=None, variants=("x86_64_v3",)):
    from importlib.machinery import EXTENSION_SUFFIXES
    built = {}
    for v in variants:
        name = f"{K.MODULE_PREFIX}{v}{EXTENSION_SUFFIXES[0]}"
        (tmp_path / name).write_bytes(b"not really a module")
        built[v] = name
    (tmp_path / K.BUILD_INFO).write_text(json.dumps(
        {"torch": torch_version, "sources_sha256": digest or K.sources_digest(),
         "variants": built}))


def test_prebuilt_module_matches_the_build_record(tmp_path):
    _fake_build(tmp_path)
    path, problem = K.prebuilt_problem("x86_64_v3", "2.13.0+cpu", tmp_path)
    assert problem is None and path.parent == tmp_path
    path, problem = K.prebuilt_problem("x86_64_v4", "2.13.0+cpu", tmp_path)
    assert path is None and "no prebuilt x86_64_v4" in problem


def test_a_module_built_for_another_torch_is_not_used(tmp_path):
    _fake_build(tmp_path, torch_version="2.12.0+cpu")
    path, problem = K.prebuilt_problem("x86_64_v3", "2.13.0+cpu", tmp_path)
    assert path is not None and "built against torch 2.12.0+cpu" in problem


def test_a_module_built_from_other_sources_is_not_used(tmp_path):
    _fake_build(tmp_path, digest="0" * 64)
    _, problem = K.prebuilt_problem("x86_64_v3", "2.13.0+cpu", tmp_path)
    assert "sources" in problem and "changed" in problem


def test_no_build_record_means_no_prebuilt_module(tmp_path):
    _, problem = K.prebuilt_problem("x86_64_v3", "2.13.0+cpu", tmp_path)
    assert problem is not None
