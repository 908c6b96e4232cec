"""Multi-LoRA on the worker: adapters made by `peft` itself, applied through sluice's model runner.

Checked against PEFT: a mixed batch [adapter a, base, adapter b, a] gives logits within 1e-4 of
PEFT's mixed-batch forward (`adapter_names=`) and the same greedy tokens; adapter a's logits
also match the merged-weights model (`merge_and_unload`); adapter b is rsLoRA on all seven
projections. LRU: with --max-cpu-loras 2, a third adapter evicts the least recently used one,
which is re-loaded (same logits) when it comes back. TP=2 (two spawned ranks on gloo) gives the
TP=1 logits and tokens: A whole and B's rows split on q/k/v and gate/up, A's columns split on
o/down before the all-reduce.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _sluice_model_helpers import load_hf, prompts, run_on_tp_ranks

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {   # name: (lora_int_id, LoraConfig kwargs)
    "a": (1, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj",
                                                       "gate_proj", "down_proj"])),
    "b": (2, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL)),
    "c": (3, dict(r=16, lora_alpha=32, target_modules=["k_proj", "up_proj"])),
}
BLOCK = 16


def _make_adapter(model_dir: Path, out: Path, seed: int, **kwargs) -> Path:
    """A PEFT adapter on the tiny model with random (non-zero) lora_B, saved by PEFT."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(load_hf(model_dir), peft.LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapter_dirs(llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {name: _make_adapter(llama_dir, root / name, seed, **kw)
            for seed, (name, (_, kw)) in enumerate(ADAPTERS.items())}


def _requests(adapter_dirs):
    from sluice.lora.request import LoRARequest
    return {name: LoRARequest(name, lid, str(adapter_dirs[name]))
            for name, (lid, _) in ADAPTERS.items()}


def _runner(model_dir: Path, layer_ops: str = "cpu", enable_lora: bool = True,
            dtype: torch.dtype = torch.float32, **lora):
    from sluice.config_sources import build_engine_config
    from sluice.hf_config import load_model_spec
    from sluice.worker.model_runner import ModelRunner
    config = build_engine_config(overrides={
        "model": str(model_dir), "kv_cache_memory": "16MiB", "max_model_len": 128,
        "block_size": BLOCK, "enable_lora": enable_lora, **lora})
    runner = ModelRunner(config, load_model_spec(model_dir), torch.device("cpu"),
                         dtype, 128, layer_ops=layer_ops)
    runner.load_model()
    runner.initialize_kv_cache(64)
    return runner


class _Driver:
    """Feeds a ModelRunner hand-written SchedulerOutputs: a prefill of every request, then
    decode steps; returns the logits of every scheduled token (read between execute_model
    and sample_tokens)."""

    def __init__(self, runner) -> None:
        self.runner, self.next_block, self.rids = runner, 1, []

    def prefill(self, reqs: list[tuple[str, list[int], object]]) -> dict[str, torch.Tensor]:
        from sluice.sampling_params import SamplingParams
        from sluice.step import NewRequestData, SchedulerOutput
        new = []
        for rid, tokens, lora in reqs:
            blocks = list(range(self.next_block, self.next_block + 4))
            self.next_block += 4
            new.append(NewRequestData(rid, tokens, len(tokens),
                                      SamplingParams(temperature=0.0, max_tokens=16),
                                      blocks, 0, lora_request=lora))
        self.rids = [r[0] for r in reqs]
        return self._run(SchedulerOutput(
            scheduled_new_reqs=new, num_scheduled_tokens={r: len(t) for r, t, _ in reqs},
            total_num_scheduled_tokens=sum(len(t) for _, t, _ in reqs)))

    def decode(self) -> dict[str, torch.Tensor]:
        from sluice.step import CachedRequestData, SchedulerOutput
        cached = [CachedRequestData(rid, [], self.runner.requests[rid].num_computed_tokens)
                  for rid in self.rids]
        return self._run(SchedulerOutput(
            scheduled_cached_reqs=cached, num_scheduled_tokens={r: 1 for r in self.rids},
            total_num_scheduled_tokens=len(self.rids)))

    def finish(self) -> None:
        from sluice.step import SchedulerOutput
        self.runner.step(SchedulerOutput(finished_request_ids=set(self.rids)))
        self.rids = []

    def _run(self, so) -> dict[str, torch.Tensor]:
        runner = self.runner
        runner.execute_model(so)
        pending = runner._pending
        logits = runner.model.compute_logits(pending.hidden)   # None off the TP driver
        runner.sample_tokens(None)
        if logits is None:
            return {}
        out, start = {}, 0
        for rid, n in zip(pending.request_ids, pending.num_scheduled):
            out[rid] = logits[start:start + n]
            start += n
        return out

    def tokens(self, rid: str) -> list[int]:
        return self.runner.requests[rid].output_token_ids


@pytest.fixture(scope="module")
def prompt_ids(llama_dir):
    return prompts(2048, [9, 6, 12, 7], seed=3)


@pytest.fixture(scope="module")
def peft_reference(llama_dir, adapter_dirs, prompt_ids):
    """PEFT's mixed batch [a, base, b, a]: logits per prompt position, then 4 greedy tokens
    per row (each row continued with its own adapter)."""
    model = peft.PeftModel.from_pretrained(load_hf(llama_dir), str(adapter_dirs["a"]),
                                           adapter_name="a")
    model.load_adapter(str(adapter_dirs["b"]), adapter_name="b")
    model.eval()
    names = ["a", "__base__", "b", "a"]
    seqs = [list(p) for p in prompt_ids]
    logits, greedy = [], [[] for _ in seqs]
    with torch.inference_mode():
        for step in range(5):
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            out = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            if step == 0:
                logits = [out[i, :len(s)].float() for i, s in enumerate(seqs)]
            for i, s in enumerate(seqs):
                tok = int(out[i, len(s) - 1].argmax())
                if step < 4:
                    greedy[i].append(tok)
                    s.append(tok)
    return names, logits, greedy


@pytest.mark.parametrize("form", ["stacked", "segments"])
def test_mixed_batch_matches_peft(llama_dir, adapter_dirs, prompt_ids, peft_reference, form,
                                  monkeypatch):
    """Both forms of a mixed step (`sluice.lora.forward_context`), each forced for every step
    by the size limit: the stacked one, and one GEMM pair per adapter segment (the runner
    groups the requests by adapter, so the segments are contiguous)."""
    from sluice.lora import forward_context
    monkeypatch.setattr(forward_context, "STACKED_MAX_TOKENS", 4096 if form == "stacked" else 0)
    names, ref_logits, ref_greedy = peft_reference
    lora = _requests(adapter_dirs)
    runner = _runner(llama_dir, max_loras=2, max_cpu_loras=2)
    driver = _Driver(runner)
    reqs = [(f"r{i}", p, None if n == "__base__" else lora[n])
            for i, (n, p) in enumerate(zip(names, prompt_ids))]
    got = driver.prefill(reqs)
    base = load_hf(llama_dir)
    from _sluice_model_helpers import hf_logits
    for i, (rid, p, _) in enumerate(reqs):
        torch.testing.assert_close(got[rid], ref_logits[i], atol=1e-4, rtol=0)
        if names[i] != "__base__":   # the adapter really changes the output
            assert (ref_logits[i] - hf_logits(base, p)).abs().max() > 1e-2
    for _ in range(3):
        driver.decode()
    for i, (rid, _, _) in enumerate(reqs):
        assert driver.tokens(rid) == ref_greedy[i], (names[i], driver.tokens(rid),
                                                     ref_greedy[i])


def test_merged_weights_agree(llama_dir, adapter_dirs, prompt_ids):
    """Adapter a through the model runner (one adapter for the whole batch: the contiguous
    path) == PEFT's merge_and_unload model."""
    merged = peft.PeftModel.from_pretrained(load_hf(llama_dir),
                                            str(adapter_dirs["a"])).merge_and_unload().eval()
    from _sluice_model_helpers import hf_logits
    lora = _requests(adapter_dirs)
    runner = _runner(llama_dir, max_loras=1)
    got = _Driver(runner).prefill([("x", prompt_ids[0], lora["a"]),
                                   ("y", prompt_ids[2], lora["a"])])
    torch.testing.assert_close(got["x"], hf_logits(merged, prompt_ids[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(got["y"], hf_logits(merged, prompt_ids[2]), atol=1e-4, rtol=0)


def test_adapters_over_bf16_weights(llama_dir, adapter_dirs, prompt_ids, monkeypatch):
    """`--dtype bfloat16` on CPU (16-bit base weights, float32 activations, `half_linear`): the
    adapter slots take the activations' float32, so adapter a through the runner == PEFT's
    merge of a into the HF model whose base weights were rounded to bf16 (within 1e-4; with
    oneDNN's bf16 GEMM, on CPUs that have it, the prefill's activations are rounded to bf16
    too: within 2% of the logits' norm, test_half_weights' PREFILL_BF16_RTOL)."""
    import sluice.model.layers.half_linear as half_linear
    from _sluice_model_helpers import hf_logits
    base = load_hf(llama_dir)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dirs["a"])).merge_and_unload()
    want = hf_logits(merged.eval(), prompt_ids[0])
    lora = _requests(adapter_dirs)
    for native in sorted({False, half_linear.native_bf16_products()}):
        monkeypatch.setattr(half_linear, "native_bf16_products", lambda native=native: native)
        runner = _runner(llama_dir, max_loras=1, dtype=torch.bfloat16)
        layer = runner.model.model.layers[0].self_attn.qkv_proj
        assert layer.weight.dtype == torch.bfloat16 and layer.lora_a.dtype == torch.float32
        got = _Driver(runner).prefill([("x", prompt_ids[0], lora["a"]),
                                       ("y", prompt_ids[1], None)])["x"]
        if native:
            assert ((got - want).norm() / want.norm()).item() <= 0.02
        else:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_lru_eviction_and_reload(llama_dir, adapter_dirs, prompt_ids):
    lora = _requests(adapter_dirs)
    runner = _runner(llama_dir, max_loras=2, max_cpu_loras=2)
    manager, driver = runner.lora_manager, _Driver(runner)
    first = driver.prefill([("a1", prompt_ids[0], lora["a"]), ("b1", prompt_ids[1], lora["b"])])
    driver.finish()
    assert manager.loaded_ids() == [1, 2] and manager.num_loads == 2
    driver.prefill([("b2", prompt_ids[1], lora["b"]), ("c2", prompt_ids[2], lora["c"])])
    driver.finish()
    assert manager.loaded_ids() == [2, 3] and manager.num_loads == 3   # a evicted (LRU)
    again = driver.prefill([("a3", prompt_ids[0], lora["a"]), ("n3", prompt_ids[3], None)])
    assert manager.loaded_ids() == [3, 1] and manager.num_loads == 4   # b evicted, a re-read
    torch.testing.assert_close(again["a3"], first["a1"], atol=1e-5, rtol=0)


def test_fast_paths(llama_dir, adapter_dirs, prompt_ids, monkeypatch):
    """With --enable-lora the projections' method is LoRALinearMethod: the fused decode stack
    stays installed (where the plain model has it) but runs only decode steps without adapter
    tokens; the LM head keeps its method, so its greedy screen is unchanged. Base-model
    requests on the LoRA engine give the plain engine's tokens."""
    from _sluice_model_helpers import load_ours
    from sluice.lora.layers import LoRALinearMethod, lora_layers
    from sluice.model.fused_decode import FusedDecode
    runner = _runner(llama_dir, max_loras=1)
    model = runner.model
    plain = load_ours(llama_dir, layer_ops="cpu")
    wrapped = lora_layers(model)
    assert len(wrapped) == 4 * 2 and all(isinstance(m.linear_method, LoRALinearMethod)
                                         for m in wrapped)
    assert not isinstance(model.lm_head.linear_method, LoRALinearMethod)
    assert (model.lm_head.greedy is None) == (plain.lm_head.greedy is None)
    assert (model.model.fused_decode is None) == (plain.model.fused_decode is None)
    calls = []
    original = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__",
                        lambda self, *a: calls.append(1) or original(self, *a))
    lora = _requests(adapter_dirs)
    driver = _Driver(runner)
    driver.prefill([("base", prompt_ids[0], None)])
    driver.decode()
    base_calls = len(calls)
    base_tokens = driver.tokens("base")
    driver.finish()
    driver.prefill([("x", prompt_ids[0], lora["a"]), ("y", prompt_ids[1], None)])
    driver.decode()
    assert len(calls) == base_calls, "a step with adapter tokens ran the fused stack"
    assert base_calls == (0 if plain.model.fused_decode is None else 1)
    plain_driver = _Driver(_runner(llama_dir, enable_lora=False))
    plain_driver.prefill([("base", prompt_ids[0], None)])
    plain_driver.decode()
    assert plain_driver.tokens("base") == base_tokens


def test_mapping_segments():
    from sluice.lora.forward_context import STACKED_MAX_TOKENS, LoRAMapping
    assert LoRAMapping.from_requests([None, None], [3, 1]) is None
    m = LoRAMapping.from_requests([0, 0, None], [2, 3, 1])
    assert m.index is None and m.segments == ((0, 0, 5),) and not m.stacked
    m = LoRAMapping.from_requests([0, 0, None, 1], [2, 3, 1, 4])
    assert m.index is None and m.segments == ((0, 0, 5), (1, 6, 10)) and m.stacked
    m = LoRAMapping.from_requests([1, None, 0, 1], [2, 1, 2, 1])
    assert m.index.tolist() == [3, 4, 0, 1, 5] and m.segments == ((0, 0, 2), (1, 2, 5))
    assert m.token_slots.tolist() == [1, 1, -1, 0, 0, 1] and m.num_slots == 2
    assert m.mask(2).tolist()[1:4] == [[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]
    big = LoRAMapping.from_requests([1, 0], [STACKED_MAX_TOKENS, 1])
    assert not big.stacked and big.token_slots is None


def _mixed_run(model_dir: str, adapter_dirs: dict, prompt_ids, layer_ops: str) -> dict:
    """The mixed batch [a, base, b, a] through a ModelRunner: prefill logits and 3 decodes."""
    lora = _requests(adapter_dirs)
    driver = _Driver(_runner(Path(model_dir), layer_ops, max_loras=2))
    names = ["a", None, "b", "a"]
    got = driver.prefill([(f"r{i}", p, None if n is None else lora[n])
                          for i, (n, p) in enumerate(zip(names, prompt_ids))])
    for _ in range(3):
        driver.decode()
    return {"logits": got, "tokens": {rid: driver.tokens(rid) for rid in driver.rids}}


@pytest.mark.timeout(300)
def test_tp2_matches_tp1(llama_dir, adapter_dirs, prompt_ids):
    args = (str(llama_dir), {k: str(v) for k, v in adapter_dirs.items()}, prompt_ids, "torch")
    got, want = run_on_tp_ranks(_mixed_run, args, local=lambda: _mixed_run(*args))
    for rid, logits in want["logits"].items():
        torch.testing.assert_close(got[0]["logits"][rid], logits, atol=1e-4, rtol=0)
    assert got[0]["tokens"] == got[1]["tokens"] == want["tokens"]


@pytest.mark.parametrize("stacked_max_tokens", [0, 256])
@pytest.mark.parametrize("slots", [[0, 0, None, 1, 1], [1, None, 0, 1, 2, 0]])
def test_layer_forms_match_per_token_reference(slots, stacked_max_tokens, monkeypatch):
    """LoRALinearMethod on a merged layer: contiguous segments, gathered segments and the
    stacked form all equal y = base + B_s A_s x for each token's slot s (zeros for base)."""
    from torch import nn

    from sluice.lora import forward_context
    from sluice.lora.forward_context import LoRAMapping, set_lora_mapping
    from sluice.lora.layers import set_slot, wrap_lora_layers
    from sluice.model.layers import MergedColumnLinear
    monkeypatch.setattr(forward_context, "STACKED_MAX_TOKENS", stacked_max_tokens)
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList([nn.Module()])
    root.model.layers[0].mlp = nn.Module()
    layer = MergedColumnLinear(16, [8, 8], False)
    root.model.layers[0].mlp.gate_up_proj = layer
    g = torch.Generator().manual_seed(0)
    layer.weight.data.normal_(generator=g)
    (wrapped,) = wrap_lora_layers(root, max_loras=3, max_lora_rank=4)
    pairs = {}
    for s, r in enumerate((4, 2, 3)):   # ranks below the maximum are zero-padded
        a = torch.randn(2 * r, 16, generator=g)
        b = torch.block_diag(torch.randn(8, r, generator=g), torch.randn(8, r, generator=g))
        pairs[s] = (a, b)
        set_slot(wrapped, s, (a, b))
    counts = [2, 3, 1, 2, 1, 3][:len(slots)]
    x = torch.randn(sum(counts), 16, generator=g)
    token_slots = [s for s, n in zip(slots, counts) for _ in range(n)]
    want = x @ layer.weight.T
    for t, s in enumerate(token_slots):
        if s is not None:
            want[t] += pairs[s][1] @ (pairs[s][0] @ x[t])
    mapping = LoRAMapping.from_requests(slots, counts)
    assert mapping.stacked == (stacked_max_tokens > 0)
    with set_lora_mapping(mapping):
        got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with set_lora_mapping(None):
        torch.testing.assert_close(layer(x), x @ layer.weight.T)
