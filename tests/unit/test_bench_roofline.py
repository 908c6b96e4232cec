"""`sluice.bench.roofline`: FLOP counting by hand, the roofline arithmetic, and the GEMM probe.

No timing assertions beyond "positive": the machine running the suite is shared and noisy.
"""

from __future__ import annotations

import json

import pytest

from sluice.bench import backends, throughput
from sluice.bench.roofline import (format_roofline_line, linear_weights_per_layer,
                                   measure_gemm_peak, roofline_report, workload_flops)
from sluice.hf_config import ModelSpec, RopeSpec, load_model_spec
from sluice.outputs import CompletionOutput, RequestOutput


class FakeLLM:
    """Stands in for `LLM`: `max_tokens` copies of each prompt's last token."""

    def __init__(self, model: str, **engine_kwargs):
        self.engine_kwargs = engine_kwargs

    def generate(self, prompts, sampling_params, use_tqdm=True):
        return [RequestOutput(str(i), None, p, [CompletionOutput(0, "", [p[-1]] * sp.max_tokens)],
                              finished=True)
                for i, (p, sp) in enumerate(zip(prompts, sampling_params))]

    def shutdown(self):
        pass


def tiny_spec() -> ModelSpec:
    return ModelSpec(
        path="/nowhere", architecture="LlamaForCausalLM", model_type="llama", vocab_size=10,
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope=RopeSpec(), tie_word_embeddings=False, attention_bias=False, qk_norm=False,
        hidden_act="silu", torch_dtype="float32", eos_token_ids=(0,), bos_token_id=None)


def test_workload_flops_by_hand():
    spec = tiny_spec()
    # Per layer: q 8*(2*4)=64, k 8*(1*4)=32, v 32, o (2*4)*8=64,
    #            gate 8*16=128, up 128, down 16*8=128  -> 576 weights.
    assert linear_weights_per_layer(spec) == 64 + 32 + 32 + 64 + 128 + 128 + 128 == 576
    flops = workload_flops(spec, [3], [2])
    # Prompt of 3 prefilled once, then 2 - 1 = 1 decode step: 4 tokens through the layers.
    # linear: 2 FLOPs * 576 weights * 2 layers * 4 tokens.
    assert flops["linear"] == 2 * 576 * 2 * 4 == 9216
    # lm_head: 2 * vocab 10 * hidden 8 per output token, 2 output tokens.
    assert flops["lm_head"] == 2 * 10 * 8 * 2 == 320
    # attention: positions 0..3 attend to 1, 2, 3, 4 keys (sum 10);
    # 4 * heads 2 * head_dim 4 * keys per layer, 2 layers.
    assert flops["attention"] == 4 * 2 * 4 * (1 + 2 + 3 + 4) * 2 == 640
    assert flops["total"] == 9216 + 320 + 640 == 10176
    assert all(isinstance(v, float) for v in flops.values())


def test_workload_flops_sums_over_requests_and_rejects_bad_lengths():
    spec = tiny_spec()
    a, b = workload_flops(spec, [3], [2]), workload_flops(spec, [5], [1])
    both = workload_flops(spec, [3, 5], [2, 1])
    assert both == {k: a[k] + b[k] for k in a}
    # output_len 1: the prefill alone, 5 tokens, 1 LM-head row, 1+..+5 = 15 keys.
    assert b == {"linear": 2 * 576 * 2 * 5, "lm_head": 2 * 10 * 8,
                 "attention": 4 * 2 * 4 * 15 * 2, "total": 11520 + 160 + 960}
    with pytest.raises(ValueError):
        workload_flops(spec, [3], [2, 2])
    with pytest.raises(ValueError):
        workload_flops(spec, [3], [0])


def test_roofline_report_math():
    rep = roofline_report(total_flops=300e9, elapsed_s=4.0, peak_gflops=100.0)
    assert rep["roofline_s"] == pytest.approx(3.0)             # 300e9 / (100 * 1e9)
    assert rep["achieved_gflops"] == pytest.approx(75.0)       # 300e9 / 4 / 1e9
    assert rep["fraction_of_roofline"] == pytest.approx(0.75)  # 3.0 / 4.0
    line = format_roofline_line("sluice", rep, 2048, 2)
    assert line == ("[sluice] Roofline: 300.0 GFLOP in 4.00 s = 75.0 GFLOP/s; fp32 GEMM peak "
                    "100.0 GFLOP/s (best GEMM 2048^3, 2 threads) -> 75.0% of roofline")
    with pytest.raises(ValueError):
        roofline_report(1.0, 0.0, 1.0)


def test_measure_gemm_peak_is_positive_and_restores_threads():
    import torch
    before = torch.get_num_threads()
    peak = measure_gemm_peak(num_threads=1, size=64, repeats=1)
    assert isinstance(peak, float) and peak > 0
    assert torch.get_num_threads() == before


def test_cli_roofline_in_report(llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backends, "_default_llm_factory", FakeLLM)
    monkeypatch.setattr(throughput, "measure_gemm_peak", lambda *a, **k: 50.0)
    out = tmp_path / "r.json"
    rc = throughput.main([str(llama_dir), "--num-prompts", "2", "--input-len-min", "3",
                          "--input-len-max", "5", "--output-len", "4", "--num-threads", "1",
                          "--roofline", "--disable-tqdm", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    section = report["roofline"]
    assert section["gemm"]["peak_gflops"] == 50.0 and section["gemm"]["num_threads"] == 1
    spec = load_model_spec(llama_dir)
    n_prompt = report["results"]["sluice"]["total_prompt_tokens"]
    assert section["flops"]["lm_head"] == 2 * spec.vocab_size * spec.hidden_size * 2 * 4
    assert section["flops"]["linear"] == (2 * spec.num_hidden_layers
                                          * linear_weights_per_layer(spec)
                                          * (n_prompt + 2 * 3))
    assert set(section["backends"]) == {"sluice"}
    assert section["backends"]["sluice"]["fraction_of_roofline"] > 0
    assert "[sluice] Roofline: " in capsys.readouterr().out
