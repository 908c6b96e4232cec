"""`sluice bench serve`: online latency/throughput of any OpenAI-compatible server.

    sluice serve ./model --port 8000 &
    sluice bench serve --base-url http://127.0.0.1:8000 --tokenizer ./model \\
        --num-prompts 32 --input-len 128 --output-len 64 --request-rate 4 --max-concurrency 8

Requests come from `sluice.bench.datasets` (seeded random token-id prompts, or a JSON workload).
Without `--tokenizer` prompts are sent as token ids (the server must accept token-id prompts,
as sluice and vLLM do on /v1/completions); with it they are decoded and sent as text (needed for
/v1/chat/completions). Arrivals are Poisson at `--request-rate` (inf: all at once), at most
`--max-concurrency` in flight. Every request streams, is greedy, ignores EOS and asks for exactly
its `output_len` tokens; output tokens are counted from the final usage chunk
(`stream_options.include_usage`).

Per request: TTFT (to the first chunk with text), ITL (between chunks with text), TPOT
((e2e - ttft) / (output_tokens - 1)) and E2E latency. The report, printed in vLLM's table shape,
gives request / output token / total token throughput and mean, median, p99 of each latency;
`--json PATH` writes it with the per-request values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sluice import event_loop
from sluice.bench.datasets import BenchRequest, load_json_workload, random_requests
from sluice.errors import ConfigError, SluiceError

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="Server address. [default: http://127.0.0.1:8000]")
    g.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS,
                   help="API route to load. [default: /v1/completions]")
    g.add_argument("--model", default=None,
                   help="Model name to send; default: the first of GET /v1/models.")
    g.add_argument("--api-key", default=None,
                   help="Bearer token. [env: OPENAI_API_KEY or SLUICE_API_KEY]")
    g.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="Per-request timeout in seconds. [default: 600]")
    w = parser.add_argument_group("workload")
    w.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="Tokenizer directory: sizes the random vocabulary and sends prompts as "
                        "text (required for /v1/chat/completions).")
    w.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="Vocabulary size for random token-id prompts without --tokenizer.")
    w.add_argument("--dataset", type=Path, default=None, metavar="JSON",
                   help='JSON workload: a list of {"prompt_token_ids": [...] or "prompt": str, '
                        '"output_len": int}.')
    w.add_argument("--num-prompts", type=int, default=64, metavar="N",
                   help="Number of requests. [default: 64]")
    w.add_argument("--input-len", type=int, default=128, metavar="L",
                   help="Random prompt length. [default: 128]")
    w.add_argument("--range-ratio", type=float, default=0.0, metavar="R",
                   help="Prompt lengths uniform in [L*(1-R), L*(1+R)]. [default: 0]")
    w.add_argument("--output-len", type=int, default=None, metavar="N",
                   help="Tokens to generate per request (default 64; with --dataset it "
                        "overrides each entry's output_len).")
    w.add_argument("--seed", type=int, default=0, help="Workload and arrival seed. [default: 0]")
    t = parser.add_argument_group("traffic")
    t.add_argument("--request-rate", type=float, default=float("inf"), metavar="RPS",
                   help="Poisson arrival rate in requests/s; inf sends all at once. "
                        "[default: inf]")
    t.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                   help="At most N requests in flight. [default: unlimited]")
    parser.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="Write the report as JSON to PATH.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve` on the `bench` group's subparsers; sets `bench_run=run`."""
    parser = subparsers.add_parser(
        "serve", help="Online latency/throughput against an OpenAI-compatible server.",
        description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(bench_run=run)
    return parser


# ---------------------------------------------------------------------------------------------
# Workload

def _load_tokenizer(path: str) -> Any:
    from sluice.frontend.tokenizer import load_tokenizer
    return load_tokenizer(path).hf


def build_workload(args: argparse.Namespace, tokenizer: Any) -> list[BenchRequest]:
    """The benchmark's requests from the workload flags."""
    if args.num_prompts < 1:
        raise ConfigError(f"--num-prompts: {args.num_prompts} must be at least 1.")
    if args.dataset is not None:
        requests = load_json_workload(args.dataset, tokenizer=tokenizer,
                                      vocab_size=args.vocab_size)
        requests = requests[:args.num_prompts]
        if args.output_len is not None:
            requests = [BenchRequest(r.prompt_token_ids, args.output_len, r.prompt)
                        for r in requests]
        return requests
    vocab_size = args.vocab_size or (len(tokenizer) if tokenizer is not None else None)
    if vocab_size is None:
        raise ConfigError("--vocab-size: random token-id prompts need the vocabulary size. "
                          "Fix: pass --tokenizer DIR or --vocab-size N.")
    return random_requests(args.num_prompts, args.output_len or 64, vocab_size, args.seed,
                           input_len=args.input_len, range_ratio=args.range_ratio,
                           tokenizer=tokenizer)


def make_payload(endpoint: str, model: str, request: BenchRequest, tokenizer: Any
                 ) -> dict[str, Any]:
    """The JSON body of one streamed, greedy, EOS-ignoring request."""
    body: dict[str, Any] = {"model": model, "max_tokens": request.output_len,
                            "temperature": 0.0, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}
    text = request.prompt
    if text is None and tokenizer is not None:
        text = tokenizer.decode(request.prompt_token_ids)
    if endpoint == "/v1/chat/completions":
        if text is None:
            raise ConfigError("--tokenizer: /v1/chat/completions needs text prompts. Fix: pass "
                              "--tokenizer DIR.")
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text if text is not None else request.prompt_token_ids
    return body


# ---------------------------------------------------------------------------------------------
# Sending

@dataclass
class RequestResult:
    """What one request measured (seconds)."""
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def _carries_output(chunk: dict[str, Any]) -> bool:
    """Whether a stream chunk carries generated tokens. Their text may be empty (tokens that
    do not decode on their own, or ids beyond the tokenizer of a random-weight model), so the
    presence of a text/content field counts, not its length; a chat role-only chunk does not."""
    for choice in chunk.get("choices") or []:
        if isinstance(choice.get("text"), str):
            return True
        if isinstance((choice.get("delta") or {}).get("content"), str):
            return True
    return False


async def send_request(client: Any, url: str, payload: dict[str, Any],
                       headers: dict[str, str], prompt_len: int) -> RequestResult:
    """Stream one request and time its chunks."""
    result = RequestResult(prompt_len=prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:300]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = int(chunk["usage"].get("completion_tokens", 0))
                    result.prompt_len = int(chunk["usage"].get("prompt_tokens", prompt_len))
                if _carries_output(chunk):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.success = result.ttft > 0.0
        if not result.success:
            result.error = "the stream carried no output tokens"
    except Exception as e:  # noqa: BLE001 - a failed request is reported, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(args: argparse.Namespace, requests: list[BenchRequest], model: str,
                   tokenizer: Any, headers: dict[str, str]) -> tuple[list[RequestResult], float]:
    """Send every request with Poisson arrivals and the concurrency cap; returns the results
    (in request order) and the wall time."""
    import httpx
    url = args.base_url.rstrip("/") + args.endpoint
    payloads = [make_payload(args.endpoint, model, r, tokenizer) for r in requests]
    rng = np.random.default_rng(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = None
    if not args.disable_tqdm:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(requests), desc="Requests", dynamic_ncols=True)

    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout),
                                 limits=httpx.Limits(max_connections=None,
                                                     max_keepalive_connections=64)) as client:
        async def one(payload: dict[str, Any], request: BenchRequest) -> RequestResult:
            if limit is None:
                result = await send_request(client, url, payload, headers, request.prompt_len)
            else:
                async with limit:
                    result = await send_request(client, url, payload, headers,
                                                request.prompt_len)
            if bar is not None:
                bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for payload, request in zip(payloads, requests):
            tasks.append(asyncio.create_task(one(payload, request)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / args.request_rate)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(results), duration


# ---------------------------------------------------------------------------------------------
# Report

def _stats_ms(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float) * 1000.0 if values else np.zeros(1)
    return {"mean": float(arr.mean()), "median": float(np.median(arr)),
            "p99": float(np.percentile(arr, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The report: counts, throughputs and latency statistics (ms)."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    report: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpots),
                         ("itl", [x for r in ok for x in r.itl]),
                         ("e2el", [r.e2e for r in ok])):
        for stat, value in _stats_ms(values).items():
            report[f"{stat}_{name}_ms"] = value
    report["errors"] = sorted({r.error for r in results if not r.success})[:10]
    return report


def format_report(report: dict[str, Any]) -> str:
    """vLLM's result table."""
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any, fmt: str = "<10") -> None:
        lines.append("{:<40} {:{}}".format(label, value, fmt))

    row("Successful requests:", report["completed"])
    if report["failed"]:
        row("Failed requests:", report["failed"])
    row("Benchmark duration (s):", report["duration"], "<10.2f")
    row("Total input tokens:", report["total_input_tokens"])
    row("Total generated tokens:", report["total_output_tokens"])
    row("Request throughput (req/s):", report["request_throughput"], "<10.2f")
    row("Output token throughput (tok/s):", report["output_throughput"], "<10.2f")
    row("Total Token throughput (tok/s):", report["total_token_throughput"], "<10.2f")
    for key, title, label in (("ttft", "Time to First Token", "TTFT"),
                              ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl", "Inter-token Latency", "ITL"),
                              ("e2el", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        row(f"Mean {label} (ms):", report[f"mean_{key}_ms"], "<10.2f")
        row(f"Median {label} (ms):", report[f"median_{key}_ms"], "<10.2f")
        row(f"P99 {label} (ms):", report[f"p99_{key}_ms"], "<10.2f")
    lines.append("=" * 50)
    return "\n".join(lines)


def _resolve_model(args: argparse.Namespace, headers: dict[str, str]) -> str:
    import httpx
    url = args.base_url.rstrip("/") + "/v1/models"
    try:
        response = httpx.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        raise SluiceError(f"cannot reach the server at {args.base_url} ({e}); start it with "
                          "`sluice serve` or pass --base-url.") from None
    if response.status_code != 200:
        raise SluiceError(f"GET {url} answered {response.status_code}: "
                          f"{response.text[:200]}")
    if args.model:
        return args.model
    data = response.json().get("data") or []
    if not data:
        raise SluiceError(f"GET {url} lists no models; pass --model.")
    return str(data[0]["id"])


def run(args: argparse.Namespace) -> int:
    """Run `sluice bench serve`; returns the exit code (1 when every request failed)."""
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency: {args.max_concurrency} must be at least 1.")
    if not args.request_rate > 0:
        raise ConfigError(f"--request-rate: {args.request_rate} must be > 0 (or inf).")
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("SLUICE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    requests = build_workload(args, tokenizer)
    model = _resolve_model(args, headers)
    print(f"Benchmarking {args.base_url}{args.endpoint} (model {model}): {len(requests)} "
          f"requests, request rate {args.request_rate}, max concurrency "
          f"{args.max_concurrency or 'unlimited'}", flush=True)
    results, duration = event_loop.run(run_load(args, requests, model, tokenizer, headers))
    report = summarize(results, duration)
    print(format_report(report), flush=True)
    for error in report["errors"]:
        print(f"request error: {error}", file=sys.stderr)
    if args.json is not None:
        full = {**report, "base_url": args.base_url, "endpoint": args.endpoint,
                "model": model, "request_rate": args.request_rate,
                "max_concurrency": args.max_concurrency, "num_prompts": len(requests),
                "seed": args.seed, "per_request": [asdict(r) for r in results]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(full, indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 0 if report["completed"] else 1
