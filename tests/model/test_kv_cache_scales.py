"""KV-cache scales a checkpoint carries (`sluice.model.attention.kv_scales`): an fp8 cache
stores fp8(k / k_scale), fp8(v / v_scale), and attention reads them as stored * scale.

* The `Attention` layer over a scaled fp8 cache (torch and C++ backends, e4m3 and e5m2) equals
  attention over a float32 cache holding the dequantized values, and writes exactly
  fp8(k * inverse(k_scale)); keys far below fp8's range and values far above it, which a
  scale-1 cache flushes / saturates, survive. Over any other cache the scales change nothing.
* A checkpoint's scales load under each name vLLM reads, per layer; fp8 attention's q / prob
  scales are read past; a scale that is not one positive number is a ModelLoadError naming it.
* The tiny Llama rewritten so its keys are ~1e-4 and its values ~3e3 (q and o scaled the other
  way: in exact arithmetic, and in float32, the same model): with its calibrated scales the
  fp8 cache gives HF transformers' logits within fp8's rounding, the scale-1 cache does not;
  the C++ fused decode stack writes the same cache bytes and gives the Python layers' logits.
* `kv_cache_scheme` configs: static per-tensor fp8 accepted (also as a compressed-tensors
  checkpoint's only quantization), anything else refused naming the field; a compressed-tensors
  one makes `--kv-cache-dtype auto` the fp8 cache, as in vLLM.
* Through the engine (`LLM`): the same, in prompt logprobs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch

from sluice.errors import ModelLoadError
from sluice.hf_config import load_model_spec
from sluice.model.attention.backends.cpu_paged import CpuPagedBackend
from sluice.model.attention.backends.torch_paged import TorchPagedBackend
from sluice.model.attention.forward_context import set_forward_context
from sluice.model.attention.kv_cache import FP8_KV_DTYPES, cache_bytes, to_cache_dtype
from sluice.model.attention.kv_scales import (inverse, kv_scale_target, kv_scales_note,
                                              scale_value)
from sluice.model.attention.layer import Attention
from sluice.testing.compressed_checkpoints import (checkpoint_tensors,
                                                   compressed_tensors_config, write_checkpoint)
from sluice.testing.fp8_checkpoints import E4M3_MAX, float_quantized_config, fp8_config
from sluice.testing.kv_scales import calibrate_kv_scales, kv_cache_scheme, modelopt_names

from _sluice_model_helpers import PagedRunner, hf_logits, load_hf, load_ours, prompts
from test_kv_cache_dtype import BLOCK, QUERY_LENS, SEQ_LENS, _step

FP8_IDS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


def test_checkpoint_names():
    assert kv_scale_target("model.layers.3.self_attn.k_scale") == (3, "k")
    assert kv_scale_target("model.layers.3.self_attn.v_scale") == (3, "v")
    assert kv_scale_target("model.layers.0.self_attn.kv_scale") == (0, "kv")
    assert kv_scale_target("model.layers.12.self_attn.k_proj.k_scale") == (12, "k")
    assert kv_scale_target("model.layers.12.self_attn.v_proj.v_scale") == (12, "v")
    assert kv_scale_target("model.layers.1.self_attn.k_proj.output_scale") == (1, "k")
    assert kv_scale_target("model.layers.1.self_attn.v_proj.output_scale") == (1, "v")
    for other in ("model.layers.1.self_attn.q_scale", "model.layers.1.self_attn.k_proj.v_scale",
                  "model.layers.1.self_attn.o_proj.output_scale",
                  "model.layers.1.self_attn.k_proj.weight_scale", "lm_head.k_scale"):
        assert kv_scale_target(other) is None, other


@pytest.mark.parametrize("value", [torch.ones(8), torch.tensor(0.0), torch.tensor([-2.0]),
                                   torch.tensor(float("nan")), torch.tensor(float("inf"))],
                         ids=["per-head", "zero", "negative", "nan", "inf"])
def test_bad_scale_values_are_named(value):
    with pytest.raises(ModelLoadError, match="model.layers.0.self_attn.k_scale"):
        scale_value("model.layers.0.self_attn.k_scale", value)


def test_scale_values():
    assert scale_value("s", torch.tensor([0.25], dtype=torch.bfloat16)) == 0.25
    assert scale_value("s", torch.tensor(3.0)) == 3.0
    assert inverse(3.0) == float(torch.tensor(1 / 3, dtype=torch.float32)) != 1 / 3


K_SCALE, V_SCALE = 2.0 ** -10 * 0.7, 37.5


def _tiny_keys_huge_values(tokens: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """q, k, v with keys ~1e-3 (below e4m3's smallest normal, 2^-6) and values ~1e4 (past
    e4m3's 448): a scale-1 fp8 cache loses both."""
    torch.manual_seed(0)
    q = torch.randn(tokens, 8, head_dim) * 300
    k = torch.randn(tokens, 2, head_dim) * 1e-3
    v = torch.randn(tokens, 2, head_dim) * 1e4
    return q, k, v


def _attention(backend: str, request) -> Attention:
    impl = (CpuPagedBackend(request.getfixturevalue("cpu_ops")) if backend == "cpu_paged"
            else TorchPagedBackend())
    return Attention(8, 32, 2, 0.2, 0, impl)


@pytest.mark.parametrize("cache_dtype", FP8_KV_DTYPES, ids=FP8_IDS.get)
@pytest.mark.parametrize("backend", ["torch_paged", "cpu_paged"])
def test_scaled_fp8_cache_attends_over_dequantized_values(cache_dtype, backend, request):
    """Decodes, a fresh prompt and a chunk after earlier context in one step: the output
    equals attention over a float32 cache of stored * scale (earlier slots: random fp8 codes),
    with this step's k/v rounded the same way; the cache holds fp8(k * inverse(k_scale))."""
    md = _step(QUERY_LENS, SEQ_LENS, 40)
    q, k, v = _tiny_keys_huge_values(sum(QUERY_LENS), 32)
    stored = (torch.randn(2, 40, BLOCK, 2, 32) * 100).to(cache_dtype)
    stored[:, 0] = 0
    # in float64: the values ~1e4 cancel to outputs ~1e2, so float32's own rounding shows
    dequantized = stored.double() * torch.tensor([K_SCALE, V_SCALE],
                                                 dtype=torch.float64).view(2, 1, 1, 1, 1)
    k_ref, v_ref = (to_cache_dtype(x * inverse(s), cache_dtype).double() * s
                    for x, s in ((k, K_SCALE), (v, V_SCALE)))
    expected = TorchPagedBackend().forward(q.double(), k_ref, v_ref, dequantized, md,
                                           0.2).float()

    attn = _attention(backend, request)
    attn.set_kv_scale("k", K_SCALE)
    attn.set_kv_scale("v", V_SCALE)
    cache = stored.clone()
    with torch.inference_mode(), set_forward_context(md, [cache]):
        got = attn(q, k, v).view(q.shape)
    # float32 rounding of values up to 448 * V_SCALE
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * E4M3_MAX * V_SCALE)
    slot = int(md.slot_mapping[-1])
    for i, (x, s) in enumerate(((k, K_SCALE), (v, V_SCALE))):
        assert torch.equal(cache_bytes(cache.view(2, -1, 2, 32)[i, slot]),
                           cache_bytes(to_cache_dtype(x[-1] * inverse(s), cache_dtype)))

    # the same step through a scale-1 cache: keys flushed to 0, values saturated
    plain = _attention(backend, request)
    with torch.inference_mode(), set_forward_context(md, [stored.clone()]):
        unscaled = plain(q, k, v).view(q.shape)
    rows = torch.cat([torch.arange(3), torch.arange(3 + 40, 3 + 40 + 25)])  # this step's keys
    assert (unscaled[rows] - expected[rows]).abs().max() > 0.1 * expected.abs().max()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch_paged", "cpu_paged"])
def test_scales_are_not_used_without_an_fp8_cache(cache_dtype, backend, request):
    md = _step(QUERY_LENS, SEQ_LENS, 40)
    q, k, v = _tiny_keys_huge_values(sum(QUERY_LENS), 32)
    stored = torch.randn(2, 40, BLOCK, 2, 32).to(cache_dtype)
    stored[:, 0] = 0
    outs, caches = [], []
    for scaled in (False, True):
        attn = _attention(backend, request)
        if scaled:
            attn.set_kv_scale("kv", 0.01)
        cache = stored.clone()
        with torch.inference_mode(), set_forward_context(md, [cache]):
            outs.append(attn(q, k, v))
        caches.append(cache)
    assert torch.equal(outs[0], outs[1]) and torch.equal(caches[0], caches[1])


# ---- checkpoints ---------------------------------------------------------------------------

Q_UP, K_DOWN, V_UP = 2.0 ** 20, 2.0 ** -20, 2.0 ** 20
"""The rewrite of the tiny Llama (powers of two, so its float32 forward is unchanged): q_proj x
Q_UP and k_proj x K_DOWN (scores q . k unchanged), v_proj x V_UP and o_proj / V_UP. Its keys
(~1e-7) fall below e5m2's smallest subnormal (2^-16) and e4m3's (2^-9), its values (~1e5)
past e4m3's 448 and, some, e5m2's 57344."""


def _rewritten(llama_dir: Path, root: Path) -> Path:
    """The tiny Llama with keys ~1e-7 and values ~1e5 (Q_UP ... V_UP)."""
    factors = {"q_proj": Q_UP, "k_proj": K_DOWN, "v_proj": V_UP, "o_proj": 1 / V_UP}
    tensors = {name: t * factors.get(name.split(".")[-2], 1.0) if name.endswith(".weight")
               else t for name, t in checkpoint_tensors(llama_dir).items()}
    return write_checkpoint(llama_dir, root / "rewritten", None, tensors)


def _with_scales(src: Path, dst: Path, scales: dict[str, float | torch.Tensor],
                 config: dict | None) -> Path:
    """`src` plus the tensors `scales` (a number: a float32 [] tensor), config.json's
    quantization_config `config` (None: `src`'s)."""
    added = {name: v if isinstance(v, torch.Tensor) else torch.tensor(v)
             for name, v in scales.items()}
    return write_checkpoint(src, dst, config, {**checkpoint_tensors(src), **added})


@pytest.fixture(scope="module")
def scaled_checkpoints(llama_dir, tmp_path_factory) -> tuple[Path, Path, dict[str, float]]:
    """(the rewritten tiny Llama, the same with its KV scales calibrated on two other prompts
    (llm-compressor's names and kv_cache_scheme), the scales)."""
    root = tmp_path_factory.mktemp("kv-scales")
    rewritten = _rewritten(llama_dir, root)
    vocab = load_model_spec(llama_dir).vocab_size
    scales = {name: float(value) for name, value in calibrate_kv_scales(
        load_hf(rewritten), prompts(vocab, [40, 40], seed=7)).items()}
    config = compressed_tensors_config("float-quantized", None, None,
                                       kv_cache_scheme=kv_cache_scheme(), config_groups={})
    return rewritten, _with_scales(rewritten, root / "scaled", scales, config), scales


def _paged_logits(model, cache_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Logits of four prompts (one prefill step) and of two decode steps after them, and the
    caches' bytes (their unused slots' random fill seeded: the same in every call)."""
    torch.manual_seed(0)
    runner = PagedRunner(model, cache_dtype=cache_dtype)
    ps = prompts(model.spec.vocab_size, [5, 17, 1, 33])
    for i, p in enumerate(ps):
        runner.add(str(i), p)
    out = {f"p{k}": v for k, v in runner.step([(str(i), len(p))
                                              for i, p in enumerate(ps)]).items()}
    for step in range(2):
        for i in range(len(ps)):
            runner.extend(str(i), [int(out[f"{'p' if step == 0 else 'd'}{i}"][-1].argmax())])
        out.update({f"d{k}": v for k, v in runner.step([(str(i), 1)
                                                        for i in range(len(ps))]).items()})
    out["caches"] = torch.stack([cache_bytes(c) for c in runner.kv_caches])
    return out


def _hf_reference(model_dir: Path, model) -> dict[str, torch.Tensor]:
    hf = load_hf(model_dir)
    ps = prompts(model.spec.vocab_size, [5, 17, 1, 33])
    return {f"p{i}": hf_logits(hf, p) for i, p in enumerate(ps)}


def test_rewrite_keeps_the_model(llama_dir, scaled_checkpoints):
    rewritten = scaled_checkpoints[0]
    plain = _paged_logits(load_ours(llama_dir), torch.float32)
    again = _paged_logits(load_ours(rewritten), torch.float32)
    for key in ("p0", "p1", "p3"):
        torch.testing.assert_close(again[key], plain[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", FP8_KV_DTYPES, ids=FP8_IDS.get)
def test_checkpoint_scales_make_the_fp8_cache_work(llama_dir, scaled_checkpoints, cache_dtype):
    """Against HF transformers' float32 logits of the (rewritten) model: the rewritten
    checkpoint with its scales over an fp8 cache errs as much as the original tiny Llama over
    a scale-1 fp8 cache (its keys and values in range: the tiny model's own fp8 error, ~20% of
    its logits' spread); without the scales the rewritten model's cache loses its keys and
    values."""
    rewritten, scaled_dir, scales = scaled_checkpoints
    model = load_ours(scaled_dir)
    layers = model.model.layers
    assert [(l.self_attn.attn.k_scale, l.self_attn.attn.v_scale) for l in layers] == [
        (scales[f"model.layers.{i}.self_attn.k_scale"],
         scales[f"model.layers.{i}.self_attn.v_scale"]) for i in range(len(layers))]
    reference = _hf_reference(rewritten, model)   # the float model (HF does not read scales)

    def worst(model_dir_or_model) -> float:
        m = model_dir_or_model if not isinstance(model_dir_or_model, Path) \
            else load_ours(model_dir_or_model)
        got = _paged_logits(m, cache_dtype)
        return max(float((got[key] - ref).abs().max()) for key, ref in reference.items())

    scaled, original, unscaled = worst(model), worst(llama_dir), worst(rewritten)
    assert scaled <= 1.5 * original, (scaled, original)
    assert unscaled > 5 * scaled, (unscaled, scaled)


@pytest.mark.parametrize("cache_dtype", FP8_KV_DTYPES, ids=FP8_IDS.get)
def test_fused_decode_stack_applies_the_scales(cpu_ops, scaled_checkpoints, cache_dtype):
    """Layer ops 'cpu': the decode steps run the C++ stack, the prefill the Python layers;
    without the stack (removed) every step is the Python layers: same cache bytes, logits
    within float32 summation order."""
    scaled_dir = scaled_checkpoints[1]
    fused = load_ours(scaled_dir, layer_ops="cpu", attn_backend="cpu_paged")
    assert fused.model.fused_decode is not None
    python = load_ours(scaled_dir, layer_ops="cpu", attn_backend="cpu_paged")
    python.model.fused_decode = None
    a, b = _paged_logits(fused, cache_dtype), _paged_logits(python, cache_dtype)
    assert torch.equal(a.pop("caches"), b.pop("caches"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)


def test_tp2_gives_tp1_tokens_over_the_scaled_cache(scaled_checkpoints):
    """Two gloo ranks, each caching its KV head with the layer's scales (the Python layers),
    against one rank (the fused C++ stack in decode): the same greedy tokens; logits within
    1e-3 (a row-parallel sum in another order may flip one fp8 rounding of a cached value)."""
    from test_compressed_tensors import assert_tp2_matches_tp1

    assert_tp2_matches_tp1(str(scaled_checkpoints[1]), cache_dtype=torch.float8_e4m3fn,
                           atol=1e-3)


def test_float_cache_ignores_the_scales(scaled_checkpoints, caplog):
    rewritten, scaled_dir, _ = scaled_checkpoints
    a = _paged_logits(load_ours(scaled_dir), torch.float32)
    b = _paged_logits(load_ours(rewritten), torch.float32)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    model = load_ours(scaled_dir)
    assert "apply to an fp8 KV cache only" in kv_scales_note(model, torch.bfloat16)
    assert "with the checkpoint's KV-cache scales (2 layers)" in kv_scales_note(
        model, torch.float8_e4m3fn)
    assert kv_scales_note(load_ours(rewritten), torch.float8_e4m3fn) is None


NAMINGS = {
    "modelopt": modelopt_names,
    "output_scale": lambda scales: {
        re.sub(r"\.self_attn\.([kv])_scale$", r".self_attn.\1_proj.output_scale", name): value
        for name, value in scales.items()},
}


@pytest.mark.parametrize("naming", list(NAMINGS))
def test_other_checkpoint_names_load_the_same_scales(scaled_checkpoints, tmp_path, naming):
    rewritten, scaled_dir, scales = scaled_checkpoints
    other = _with_scales(rewritten, tmp_path / naming, NAMINGS[naming](scales), None)
    a, b = load_ours(other), load_ours(scaled_dir)
    for la, lb in zip(a.model.layers, b.model.layers):
        assert (la.self_attn.attn.k_scale, la.self_attn.attn.v_scale) == \
            (lb.self_attn.attn.k_scale, lb.self_attn.attn.v_scale)
        assert la.self_attn.attn.has_kv_scales


def test_autofp8_kv_scale_and_fp8_attention_scales(llama_dir, tmp_path, caplog):
    """AutoFP8's one kv_scale per layer sets both; q_scale / prob_scale are read past (logged);
    its config's kv_cache_scheme 'static' is accepted."""
    extra = {f"model.layers.{i}.self_attn.{n}": torch.tensor(0.5)
             for i in range(2) for n in ("q_scale", "prob_scale")}
    scales = {f"model.layers.{i}.self_attn.kv_scale": 0.25 * (i + 1) for i in range(2)}
    auto = _with_scales(llama_dir, tmp_path / "autofp8", {**scales, **extra}, None)
    with caplog.at_level(logging.INFO, logger="sluice.model"):
        model = load_ours(auto)
    assert [(l.self_attn.attn.k_scale, l.self_attn.attn.v_scale)
            for l in model.model.layers] == [(0.25, 0.25), (0.5, 0.5)]
    assert "4 fp8-attention query / softmax scales" in caplog.text
    from sluice.model_spec.quantization_config import checkpoint_quantization
    cfg = {"quantization_config": fp8_config(None, activation_scheme="static",
                                             kv_cache_scheme="static")}
    assert checkpoint_quantization(cfg, tmp_path / "config.json").method == "fp8"


def test_per_head_scales_are_refused(llama_dir, tmp_path):
    scales = {"model.layers.0.self_attn.k_scale": 1.0,
              "model.layers.1.self_attn.v_scale": torch.ones(2)}
    bad = _with_scales(llama_dir, tmp_path / "bad", scales, None)
    with pytest.raises(ModelLoadError, match=r"model.layers.1.self_attn.v_scale: .*shape \(2,\)"):
        load_ours(bad)


@pytest.mark.parametrize("scheme, field", [
    ({"num_bits": 8, "type": "float", "strategy": "attn_head", "dynamic": False},
     "kv_cache_scheme.strategy"),
    ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": True},
     "kv_cache_scheme.dynamic"),
    ({"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False},
     "kv_cache_scheme.type"),
    ({"num_bits": 4, "type": "float", "strategy": "tensor", "dynamic": False},
     "kv_cache_scheme.num_bits"),
    ("dynamic", "kv_cache_scheme"),
])
def test_kv_cache_schemes_sluice_does_not_read_are_named(tmp_path, scheme, field):
    from sluice.model_spec.quantization_config import checkpoint_quantization
    for qc in (fp8_config(kv_cache_scheme=scheme),
               {**compressed_tensors_config("float-quantized", None, None,
                                            kv_cache_scheme=scheme), "config_groups": {}}):
        with pytest.raises(ModelLoadError, match=field):
            checkpoint_quantization({"quantization_config": qc}, tmp_path / "config.json")


def test_engine_serves_the_scaled_checkpoint(scaled_checkpoints, caplog):
    """Through `LLM` (config, engine core, workers, the C++ kernels and fused decode stack):
    prompt logprobs over an fp8 cache with the checkpoint's scales stay near the float32
    cache's, those of the same weights without scales do not; `--kv-cache-dtype auto` is the
    fp8 cache for a checkpoint with a kv_cache_scheme; the log says whether the scales are
    used."""
    from sluice.frontend.llm import LLM
    from sluice.sampling_params import SamplingParams

    rewritten, scaled_dir, _ = scaled_checkpoints
    token_ids = prompts(load_model_spec(rewritten).vocab_size, [24, 9, 40], seed=3)

    def logprobs(model_dir: Path, kv: str) -> torch.Tensor:
        with LLM(str(model_dir), kv_cache_dtype=kv, kv_cache_memory="16MiB",
                 max_model_len=128, dtype="float32") as llm:
            outs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids],
                                SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)
        return torch.tensor([position[token].logprob for out in outs
                             for token, position in zip(out.prompt_token_ids[1:],
                                                        out.prompt_logprobs[1:])])

    with caplog.at_level(logging.INFO):
        exact = logprobs(scaled_dir, "float32")
        assert "apply to an fp8 KV cache only" in caplog.text
        scaled = logprobs(scaled_dir, "fp8")
        assert "fp8_e4m3 KV cache with the checkpoint's KV-cache scales (2 layers)" in caplog.text
    # auto follows the checkpoint's kv_cache_scheme, as in vLLM (and says so); without one it
    # is --dtype
    with caplog.at_level(logging.INFO):
        assert torch.equal(logprobs(scaled_dir, "auto"), scaled)
        assert "of float8_e4m3fn (auto: the checkpoint declares fp8 KV-cache scales)" \
            in caplog.text
    assert torch.equal(logprobs(rewritten, "auto"), exact)
    unscaled = logprobs(rewritten, "fp8")
    err, err_unscaled = (float((x - exact).abs().max()) for x in (scaled, unscaled))
    # measured: 0.05 against 2.1
    assert err < 0.2 and err_unscaled > 10 * err, (err, err_unscaled)


def test_which_configs_make_auto_an_fp8_cache(tmp_path, llama_dir):
    """vLLM's rule: a compressed-tensors kv_cache_scheme or ModelOpt's kv_cache_quant_algo FP8
    turns `--kv-cache-dtype auto` into fp8; quant_method fp8 (AutoFP8's 'static' scheme
    included) and KV scales alone do not. (And a GGUF file's float16 rule.)"""
    from sluice.model_spec.quantization_config import read_checkpoint_quantization
    from sluice.worker.worker import kv_cache_auto_dtype

    def declares(qc) -> bool:
        return read_checkpoint_quantization({"quantization_config": qc},
                                            tmp_path / "config.json")[1]

    with_scheme = compressed_tensors_config("float-quantized", None, None,
                                            kv_cache_scheme=kv_cache_scheme(), config_groups={})
    modelopt = {"quant_method": "modelopt", "quant_algo": "FP8"}
    assert declares(with_scheme)
    assert declares({**modelopt, "kv_cache_quant_algo": "fp8"})
    assert declares({**modelopt, "kv_cache_scheme": kv_cache_scheme()})
    for qc in (None, float_quantized_config(), modelopt,
               fp8_config(kv_cache_scheme="static"), fp8_config(kv_cache_scheme=kv_cache_scheme())):
        assert not declares(qc), qc
    spec = load_model_spec(llama_dir)
    declared = dataclasses.replace(spec, fp8_kv_cache=True)
    for dtype in (torch.bfloat16, torch.float32):
        assert kv_cache_auto_dtype(declared, None, dtype) == torch.float8_e4m3fn
        assert kv_cache_auto_dtype(declared, "fp8", dtype) == torch.float8_e4m3fn
        assert kv_cache_auto_dtype(spec, None, dtype) == dtype
    # a GGUF file with int8 activations (its default, --quantization int8) in float32: float16
    gguf = dataclasses.replace(spec, gguf=True)
    assert kv_cache_auto_dtype(gguf, None, torch.float32) == torch.float16
    assert kv_cache_auto_dtype(gguf, "int8", torch.float32) == torch.float16
    assert kv_cache_auto_dtype(gguf, "gguf", torch.float32) == torch.float32
    assert kv_cache_auto_dtype(gguf, None, torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("layout", ["ct-channel", "fp8-tensor-static"])
def test_fp8_weights_with_kv_scales(llama_dir, tmp_path, layout):
    """An FP8 checkpoint that also carries KV-cache scales (RedHatAI's FP8 models with an fp8
    KV scheme, AutoFP8's FP8-KV ones): the weight reader passes the scales through, and the
    model over an fp8 cache equals the dequantized float checkpoint with the same scales."""
    from sluice.testing.fp8_checkpoints import quantize_fp8

    from test_fp8_checkpoint import LAYOUTS

    config, kwargs = LAYOUTS[layout]
    quantized, dequantized = quantize_fp8(checkpoint_tensors(llama_dir), **kwargs)
    scales = {f"model.layers.{i}.self_attn.{w}_scale": torch.tensor(s * (i + 1))
              for i in range(2) for w, s in (("k", 0.011), ("v", 0.006))}
    fp8_dir = write_checkpoint(llama_dir, tmp_path / "fp8", {**config, "kv_cache_scheme": (
        kv_cache_scheme() if config["quant_method"] == "compressed-tensors" else "static")},
        {**quantized, **scales}, torch_dtype="float32")
    float_dir = write_checkpoint(llama_dir, tmp_path / "float", None, {**dequantized, **scales})
    ours, dense = load_ours(fp8_dir), load_ours(float_dir)
    for a, b in zip(ours.model.layers, dense.model.layers):
        assert (a.self_attn.attn.k_scale, a.self_attn.attn.v_scale) == \
            (b.self_attn.attn.k_scale, b.self_attn.attn.v_scale) != (1.0, 1.0)
    got, want = (_paged_logits(m, torch.float8_e4m3fn) for m in (ours, dense))
    for key in got:
        assert torch.equal(got[key], want[key]), key
    assert load_model_spec(fp8_dir).fp8_kv_cache == (config["quant_method"] ==
                                                     "compressed-tensors")
