"""`sluice bench serve` against the shared live server."""

from __future__ import annotations

import json

from _sluice_server_helpers import API_KEY, run_cli


def test_bench_serve_completions_with_token_ids(server, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(["bench", "serve", "--base-url", server.url, "--api-key", API_KEY,
                      "--vocab-size", "2048", "--num-prompts", "6", "--input-len", "16",
                      "--range-ratio", "0.5", "--output-len", "8", "--request-rate", "50",
                      "--max-concurrency", "3", "--disable-tqdm", "--json", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Serving Benchmark Result" in result.stdout
    assert "Output token throughput (tok/s):" in result.stdout
    report = json.loads(out.read_text())
    assert report["completed"] == 6 and report["failed"] == 0
    assert report["model"] == "tiny-llama"
    assert report["total_output_tokens"] == 6 * 8  # counted from usage; EOS ignored
    assert report["total_input_tokens"] == sum(r["prompt_len"] for r in report["per_request"])
    for r in report["per_request"]:
        assert 0 < r["ttft"] <= r["e2e"] and len(r["itl"]) >= 1
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "mean_e2el_ms"):
        assert report[key] > 0


def test_bench_serve_chat_with_tokenizer(server, llama_dir):
    result = run_cli(["bench", "serve", "--base-url", server.url, "--api-key", API_KEY,
                      "--endpoint", "/v1/chat/completions", "--tokenizer", str(llama_dir),
                      "--num-prompts", "3", "--input-len", "12", "--output-len", "4",
                      "--disable-tqdm"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Successful requests:                     3" in result.stdout
    assert "Total generated tokens:                  12" in result.stdout
