"""`sluice bench throughput`: the HF backend on a tiny model, and the sluice path with a fake LLM.

The real sluice engine is exercised by passing no `llm_factory` (see `run_sluice`); these tests
only check the benchmark's own plumbing.
"""

from __future__ import annotations

import json

import pytest

from sluice.bench import backends, throughput
from sluice.bench.backends import BenchmarkError, hf_batches, run_hf, run_sluice
from sluice.bench.datasets import BenchRequest, random_requests
from sluice.outputs import CompletionOutput, RequestOutput

RESULT_KEYS = {"backend", "elapsed_time", "num_requests", "total_prompt_tokens",
               "total_output_tokens", "total_num_tokens", "requests_per_second",
               "tokens_per_second", "output_tokens_per_second"}


class FakeLLM:
    """Stands in for `sluice.frontend.llm.LLM`: returns `max_tokens` copies of the last prompt
    token (or one token short, when `short=True`)."""

    instances: list["FakeLLM"] = []

    def __init__(self, model: str, short: bool = False, **engine_kwargs):
        self.model, self.short, self.engine_kwargs = model, short, engine_kwargs
        self.params: list = []
        self.closed = False
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.params = list(sampling_params)
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params)):
            n = sp.max_tokens - (1 if self.short else 0)
            outs.append(RequestOutput(str(i), None, p, [CompletionOutput(0, "", [p[-1]] * n)],
                                      finished=True))
        return outs

    def shutdown(self):
        self.closed = True


def test_hf_batches_split_on_size_and_output_len():
    reqs = [BenchRequest([1], n) for n in (4, 4, 4, 2, 2, 4)]
    assert hf_batches(reqs, 2) == [range(0, 2), range(2, 3), range(3, 5), range(5, 6)]
    assert hf_batches(reqs, None) == [range(0, 3), range(3, 5), range(5, 6)]
    with pytest.raises(BenchmarkError):
        hf_batches(reqs, 0)


def test_run_hf_generates_exact_token_counts(llama_dir):
    reqs = random_requests(5, output_len=6, vocab_size=2048, seed=0, input_len_range=(3, 12))
    reqs.append(BenchRequest([7, 8, 9], 3))
    result = run_hf(reqs, str(llama_dir), batch_size=4)
    assert result.total_output_tokens == 5 * 6 + 3
    assert [len(o) for o in result.output_token_ids] == [6] * 5 + [3]
    assert set(result.to_dict()) == RESULT_KEYS
    # Left padding does not change greedy outputs: batch size 1 gives the same tokens.
    assert run_hf(reqs, str(llama_dir), batch_size=1).output_token_ids == \
        result.output_token_ids


def test_cli_hf_backend_writes_json(llama_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = throughput.main([str(llama_dir), "--backend", "hf", "--num-prompts", "6",
                          "--input-len-min", "4", "--input-len-max", "16", "--output-len", "5",
                          "--hf-batch-size", "4", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["results"]["hf"]) == RESULT_KEYS
    assert report["results"]["hf"]["total_output_tokens"] == 6 * 5
    assert report["workload"]["num_requests"] == 6
    assert 4 <= report["workload"]["min_prompt_len"] <= report["workload"]["max_prompt_len"] <= 16
    assert "[hf] Throughput: " in capsys.readouterr().out


def test_run_sluice_with_fake_llm():
    FakeLLM.instances.clear()
    reqs = [BenchRequest([1, 2, 3], 4), BenchRequest([5], 2)]
    result = run_sluice(reqs, "m", {"max_num_seqs": 8}, llm_factory=FakeLLM)
    llm = FakeLLM.instances[-1]
    assert llm.closed and llm.engine_kwargs == {"max_num_seqs": 8}
    assert all(sp.is_greedy and sp.ignore_eos for sp in llm.params)
    assert [sp.max_tokens for sp in llm.params] == [4, 2]
    assert result.total_output_tokens == 6 and result.output_token_ids == [[3] * 4, [5] * 2]
    with pytest.raises(BenchmarkError, match="request 0 generated 3 tokens, expected exactly 4"):
        run_sluice(reqs, "m", {"short": True}, llm_factory=FakeLLM)
    assert FakeLLM.instances[-1].closed


def test_cli_both_backends_side_by_side(llama_dir, tmp_path, monkeypatch, capsys):
    FakeLLM.instances.clear()
    monkeypatch.setattr(backends, "_default_llm_factory", FakeLLM)
    out = tmp_path / "both.json"
    rc = throughput.main(["--model", str(llama_dir), "--backend", "both", "--num-prompts", "3",
                          "--input-len", "8", "--range-ratio", "0.5", "--output-len", "4",
                          "--max-num-seqs", "16", "--kv-cache-memory", "64MiB",
                          "--json", str(out)])
    assert rc == 0
    assert FakeLLM.instances[-1].engine_kwargs == {
        "max_num_seqs": 16, "kv_cache_memory": 64 * 2**20, "enable_prefix_caching": False}
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"sluice", "hf"}
    assert set(report["sluice_over_hf"]) == {"requests_per_second", "tokens_per_second",
                                             "output_tokens_per_second"}
    assert 0 <= report["num_identical_outputs"] <= 3
    text = capsys.readouterr().out
    assert "sluice/hf" in text and "output tokens/s" in text


def test_cli_dataset_and_flag_errors(llama_dir, tmp_path, capsys):
    data = tmp_path / "w.json"
    data.write_text(json.dumps([{"prompt": "def f(x): return x", "output_len": 3},
                                {"prompt_token_ids": [10, 11], "output_len": 2}]))
    out = tmp_path / "r.json"
    assert throughput.main([str(llama_dir), "--backend", "hf", "--dataset", str(data),
                            "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["hf"]["total_output_tokens"] == 5
    data.write_text("[]")
    assert throughput.main([str(llama_dir), "--backend", "hf", "--dataset", str(data)]) == 1
    assert "the workload is empty" in capsys.readouterr().err
    assert throughput.main(["--backend", "hf"]) == 2
    assert "no model given" in capsys.readouterr().err
    assert throughput.main([str(llama_dir), "--model", "other", "--backend", "hf"]) == 2
    assert "disagree" in capsys.readouterr().err
    assert throughput.main([str(llama_dir), "--backend", "hf", "--max-num-seqs", "0"]) == 2


def test_reference_model_resolution(tmp_path):
    from sluice.bench.reference_model import is_built, reference_spec, resolve_model
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert not is_built(tmp_path)
    spec = reference_spec()
    assert (spec.hidden_size, spec.num_hidden_layers, spec.num_attention_heads,
            spec.num_key_value_heads, spec.intermediate_size, spec.vocab_size,
            spec.max_position_embeddings, spec.tie_word_embeddings) == \
        (512, 8, 8, 4, 1408, 32000, 2048, False)


def test_sluice_bench_cli_group(llama_dir, capsys):
    from sluice.entrypoints.cli import main
    assert main(["bench"]) == 2
    assert main(["bench", "throughput", str(llama_dir), "--backend", "hf", "--num-prompts",
                 "2", "--input-len-min", "3", "--input-len-max", "5", "--output-len", "2"]) == 0
    assert "[hf] Total num output tokens:  4" in capsys.readouterr().out


def test_cli_takes_a_gguf_file(smollm2_gguf, monkeypatch, capsys):
    """A .gguf model: the workload reads its converted sidecar's config and tokenizer, the
    engine gets the file; the HF backend, which cannot load it, is refused by name."""
    FakeLLM.instances.clear()
    monkeypatch.setattr(backends, "_default_llm_factory", FakeLLM)
    assert throughput.main([str(smollm2_gguf), "--num-prompts", "2", "--input-len", "8",
                            "--output-len", "3"]) == 0
    assert FakeLLM.instances[-1].model == str(smollm2_gguf)
    assert len(FakeLLM.instances[-1].params) == 2
    assert "[sluice] Throughput: " in capsys.readouterr().out
    assert throughput.main([str(smollm2_gguf), "--backend", "both", "--num-prompts", "2"]) == 2
    assert "not the GGUF file" in capsys.readouterr().err
