"""/metrics exports exactly the metrics docs/metrics.md lists, under vLLM's names, each with
the labels vLLM dashboards select on (`model_name`, `engine`)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_ROW = re.compile(r"^\| `(vllm:[a-z0-9_:]+)` \| (gauge|counter|histogram) \| ([a-z_, ]+) \|")
_SERIES = re.compile(r"^(vllm:[a-z0-9_:]+)\{([^}]*)\} ")


def documented() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the tables of docs/metrics.md."""
    found = {}
    for line in DOC.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            name, kind, labels = match.groups()
            found[name] = (kind, {label.strip() for label in labels.split(",")})
    return found


def exported(text: str) -> dict[str, str]:
    """name -> type from the `# TYPE` lines of a scrape."""
    return {parts[2]: parts[3] for parts in (line.split() for line in text.splitlines())
            if len(parts) == 4 and parts[:2] == ["#", "TYPE"]}


def test_doc_lists_the_metrics_vllm_dashboards_read():
    names = documented()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:num_preemptions_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:request_prompt_tokens",
                 "vllm:request_generation_tokens", "vllm:iteration_tokens_total",
                 "vllm:request_params_n", "vllm:request_params_max_tokens"):
        assert name in names, name
    assert names["vllm:request_success_total"][1] == {"model_name", "engine", "finished_reason"}


def test_scrape_matches_the_doc_with_vllm_labels(http):
    completion = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 4,
                                                    "n": 2, "temperature": 0.0})
    assert completion.status_code == 200, completion.text
    text = http.get("/metrics").text
    docs, types = documented(), exported(text)
    assert not [line for line in text.splitlines() if "sluice:" in line]
    assert set(types) == set(docs), (sorted(set(types) - set(docs)),
                                     sorted(set(docs) - set(types)))
    for name, (kind, _) in docs.items():
        assert types[name] == kind, name

    seen: set[str] = set()
    for line in text.splitlines():
        match = _SERIES.match(line)
        if not match:
            continue
        series, labels = match.groups()
        family = next(n for n in docs if series == n or series.startswith(n + "_"))
        label_names = {pair.split("=", 1)[0] for pair in labels.split(",")} - {"le"}
        assert label_names == docs[family][1], line
        assert 'model_name="tiny-llama"' in labels and 'engine="0"' in labels, line
        seen.add(family)
    assert seen == set(docs)

    def value(series: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(series + "{"))
    # the request above (2 samples) is in the request-level histograms
    for name in ("vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_params_max_tokens"):
        assert value(name + "_count") >= 2, name
    assert value("vllm:request_params_n_count") >= 1
    assert value("vllm:iteration_tokens_total_count") >= 1
    assert value("vllm:generation_tokens_total") >= 8
