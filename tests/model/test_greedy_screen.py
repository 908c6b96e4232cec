"""The LM head's bf16 greedy screen (sluice/model/layers/greedy.py, csrc/greedy_screen.cpp):
its error bound holds, it returns the float32 argmax even where bf16 scores rank the tokens
wrongly, it declines what it cannot decide, and the model runner uses it only for plain
greedy steps."""

from __future__ import annotations

import pytest
import torch

from sluice.model.layers import greedy
from sluice.model.layers.greedy import bound_constants, make_greedy_screen, row_norms
from sluice.model.layers.layer_ops import native_bf16_products

needs_bf16 = pytest.mark.skipif(not native_bf16_products(),
                                reason="the CPU has no bf16 dot products: the screen is off")


def bf16_scores(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Screen scores as the kernel expects them, from torch's bf16 matmul (any CPU)."""
    return (x.to(torch.bfloat16) @ w.to(torch.bfloat16).t()).contiguous()


def run_kernel(ops, x: torch.Tensor, w: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    norms = row_norms(w)
    c, a = bound_constants(w.shape[1], float(norms.max()))
    out = torch.empty(x.shape[0], dtype=torch.long)
    ops.greedy_screen(out, scores, x, w, norms, c, a)
    return out


@pytest.mark.parametrize("k,scale", [(64, 1.0), (512, 0.02), (4096, 3.0)])
def test_bf16_scores_stay_within_the_bound(k, scale):
    """|s_j - l_j| <= c ||x|| ||w_j|| + a for every logit, with l_j exact (float64)."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(16, k, generator=gen) * scale
    w = torch.randn(3000, k, generator=gen) * torch.rand(3000, 1, generator=gen)
    norms = row_norms(w)
    c, a = bound_constants(k, float(norms.max()))
    exact = x.double() @ w.double().t()
    bound = c * torch.linalg.vector_norm(x.double(), dim=1, keepdim=True) * norms.double() + a
    err = (bf16_scores(x, w).double() - exact).abs()
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 1e-3  # the errors are real, the bound not vacuous


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [64, 70])
def test_streamed_bf16_scores_stay_within_the_bound(cpu_ops, rows, k):
    """bf16_scores (1-4 decoding rows, K with and without a 16-lane tail) meets the bound the
    screen assumes, and rejects more rows than it handles."""
    gen = torch.Generator().manual_seed(rows * k)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(1000, k, generator=gen) * 0.05
    scores = torch.empty(rows, 1000, dtype=torch.bfloat16)
    cpu_ops.bf16_scores(scores, x, w.to(torch.bfloat16))
    norms = row_norms(w)
    c, a = bound_constants(k, float(norms.max()))
    bound = c * torch.linalg.vector_norm(x.double(), dim=1, keepdim=True) * norms.double() + a
    err = (scores.double() - x.double() @ w.double().t()).abs()
    assert bool((err <= bound).all()) and float((err / bound).max()) > 1e-3
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        cpu_ops.bf16_scores(torch.empty(5, 1000, dtype=torch.bfloat16), torch.randn(5, k),
                            w.to(torch.bfloat16))


@needs_bf16
@pytest.mark.parametrize("rows", [0, 1, 4, 5, 64])
def test_screen_matches_argmax_on_both_score_paths(cpu_ops, rows):
    """1-4 rows take the streamed scores, 5+ oneDNN's bf16 GEMM: both give the argmax."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(3000, 128, generator=gen) * 0.05
    x = torch.randn(rows, 128, generator=gen)
    screen = make_greedy_screen(cpu_ops, w, 64)
    assert torch.equal(screen(x), (x.double() @ w.double().t()).argmax(dim=1))


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 5000])
def test_kernel_returns_the_float32_argmax(cpu_ops, vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, 96, generator=gen)
    w = torch.randn(vocab, 96, generator=gen) * 0.05
    got = run_kernel(cpu_ops, x, w, bf16_scores(x, w))
    assert torch.equal(got, (x.double() @ w.double().t()).argmax(dim=1))


def test_kernel_overrules_bf16_scores_on_near_ties(cpu_ops):
    """Rows that differ below bf16's resolution get equal bf16 scores, so bf16 alone would pick
    the first of them: the screen still returns the float32 argmax, and on an exact tie the
    first maximum, as argmax does."""
    gen = torch.Generator().manual_seed(0)
    k = 256
    common = torch.randn(k, generator=gen)
    x = common + 0.3 * torch.randn(4, k, generator=gen)
    direction = x.mean(dim=0) / x.mean(dim=0).norm()
    # components exactly representable in bf16 and at least 0.03 in magnitude: a perturbation
    # of at most ~1e-5 per component (half a bf16 ulp there is >= 6e-5) rounds back to them
    base = (common.sign() * (0.03 + 0.05 * torch.rand(k, generator=gen))).bfloat16().float()
    near = [base + eps * 1e-5 * direction for eps in (0.0, 1.0, 3.0, 2.0, 0.5)]
    w = torch.cat([torch.randn(200, k, generator=gen) * 0.01, torch.stack(near)])
    scores = bf16_scores(x, w)
    assert bool((scores[:, 200:205] == scores[:, 200:201]).all())  # bf16 cannot tell them apart
    assert bool((scores.float().argmax(dim=1) == 200).all())       # so bf16 alone picks 200
    expected = (x.double() @ w.double().t()).argmax(dim=1)
    assert bool((expected == 202).all())
    assert torch.equal(run_kernel(cpu_ops, x, w, scores), expected)
    w[203] = w[202]                                                # an exact tie: first wins
    assert torch.equal(run_kernel(cpu_ops, x, w, bf16_scores(x, w)), expected)


@pytest.mark.parametrize("poison", ["nan_hidden", "inf_hidden", "nan_score"])
def test_kernel_declines_rows_it_cannot_decide(cpu_ops, poison):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=gen)
    w = torch.randn(40, 32, generator=gen)
    scores = bf16_scores(x, w)
    if poison == "nan_score":
        scores[1, 7] = float("nan")
    else:
        x[1, 3] = float("nan") if poison == "nan_hidden" else float("inf")
        scores = bf16_scores(x, w)
    got = run_kernel(cpu_ops, x, w, scores)
    assert got[1] == -1
    clean = (x.double() @ w.double().t()).argmax(dim=1)
    assert got[0] == clean[0] and got[2] == clean[2]


def test_screen_is_off_without_bf16_dot_products(cpu_ops, monkeypatch):
    monkeypatch.setattr(greedy, "native_bf16_products", lambda: False)
    assert make_greedy_screen(cpu_ops, torch.randn(64, 32), 64) is None
    monkeypatch.undo()
    assert make_greedy_screen(None, torch.randn(64, 32), 64) is None
    assert make_greedy_screen(cpu_ops, torch.randn(64, 32, dtype=torch.float64), 64) is None


@needs_bf16
def test_model_greedy_tokens_match_full_logits(tiny_model_dir):
    """On final-norm-like hidden states the model's screen returns the argmax of
    compute_logits, and a NaN row makes it decline the step."""
    from _sluice_model_helpers import load_ours
    model = load_ours(tiny_model_dir("LlamaForCausalLM"), layer_ops="cpu")
    if model.lm_head.greedy is None:
        pytest.skip("no C++ compiler or no oneDNN: the screen is off")
    gen = torch.Generator().manual_seed(2)
    hidden = torch.nn.functional.rms_norm(
        torch.randn(64, model.spec.hidden_size, generator=gen), (model.spec.hidden_size,))
    with torch.inference_mode():
        tokens = model.greedy_tokens(hidden)
        assert torch.equal(tokens, model.compute_logits(hidden).argmax(dim=-1))
        hidden[5, 0] = float("nan")
        assert model.greedy_tokens(hidden) is None
    assert load_ours(tiny_model_dir("LlamaForCausalLM"), layer_ops="torch").greedy_tokens(
        hidden) is None


@needs_bf16
def test_model_runner_screens_only_plain_greedy_steps(tiny_model_dir, monkeypatch):
    """Greedy steps without logprobs go through greedy_tokens; a step with logprobs computes
    the logits; both produce the same greedy tokens."""
    from sluice import LLM, SamplingParams
    from sluice.model.models.llama import LlamaForCausalLM

    calls = {"screen": 0, "logits": 0}
    screen, logits = LlamaForCausalLM.greedy_tokens, LlamaForCausalLM.compute_logits

    def counted_screen(self, hidden):
        calls["screen"] += 1
        return screen(self, hidden)

    def counted_logits(self, hidden):
        calls["logits"] += 1
        return logits(self, hidden)

    monkeypatch.setattr(LlamaForCausalLM, "greedy_tokens", counted_screen)
    monkeypatch.setattr(LlamaForCausalLM, "compute_logits", counted_logits)
    with LLM(str(tiny_model_dir("LlamaForCausalLM")), kv_cache_memory="32MiB",
             max_model_len=128) as llm:
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        before = dict(calls)
        plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6,
                                                     ignore_eos=True), use_tqdm=False)
        assert calls["screen"] - before["screen"] >= 6 and calls["logits"] == before["logits"]
        before = dict(calls)
        with_lp = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, logprobs=2,
                                                       ignore_eos=True), use_tqdm=False)
        assert calls["screen"] == before["screen"] and calls["logits"] - before["logits"] >= 6
        assert [o.outputs[0].token_ids for o in plain] == \
            [o.outputs[0].token_ids for o in with_lp]
