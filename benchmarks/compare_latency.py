"""Single-request latency: sluice vs llama.cpp, against the memory-bandwidth floor.

    python benchmarks/compare_latency.py            # needs compare_peers.py --setup --convert
    python benchmarks/compare_latency.py --model /tmp/smollm2-bf16 --dtype bfloat16

One request, prompt = P token ids (`--prompt-len`, default 128; seed 0, the model's non-special
ids), greedy:

    TTFT(P)   = best of 5 runs of a 1-token generation (prefill of P tokens + first token)
    TPOT      = (best of 3 runs of a 129-token generation - TTFT) / 128 (at positions P..P+128)
    floor     = bytes of weights read per decode token / measured read bandwidth
                (every linear layer and the LM head at `--dtype`'s element size; the
                embedding reads one row)
    bandwidth = median of 7 `torch.sum` passes over a 1 GiB float32 tensor in transparent huge
                pages (as sluice's weights), both threads (the median: on a shared VM single
                passes swing by 2x; with 4 KiB pages the same sum reads ~20% slower), read
                right before and right after each backend's runs: each row's floor uses the
                mean of its two readings (this VM's bandwidth drifts between ~25 and ~60 GB/s
                within minutes, so one reading for the whole script can be far from the one
                a backend ran under)

sluice runs in this interpreter (`LLM`, `--dtype`, prefix caching off, defaults otherwise);
llama.cpp runs its high-level API (`llama_cpp.Llama.generate`, n_threads=2) in the `llamacpp`
venv of compare_peers.py on the GGUF of `--model` at `--dtype` (f32 / bf16 / f16, the file
compare_peers.py names and converts: `--convert` there, or here when the file is missing). Both
read the same prompt from `<work-dir>/latency-prompt.json`.

`--gguf FILE` (e.g. ~/.cache/sluice-tests/SmolLM2-135M-Instruct.Q4_1.gguf): both backends run
that quantized file instead (needs only `compare_peers.py --setup`); sluice once per
`--sluice-quantization` value (default `gguf,default`: the file's blocks with float
activations, and sluice's default, which runs the Q4_0/Q4_1/Q8_0 blocks with int8
activations as llama.cpp computes them; `int8` adds bf16 products for more rows), and the
floor counts the
file's bytes per decode token (every weight but the embedding table, plus the LM head: the
embedding's blocks again when tied).

`--kv-cache-dtype` (default auto: each backend's default cache) stores the KV cache in that
dtype: sluice's `--kv-cache-dtype`, and for llama.cpp `compare_peers.LLAMACPP_KV_TYPES` (it
has no fp8 cache: fp8 runs its Q8_0 K/V), with flash attention, which its quantized caches
need. The floor stays the weights' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import (  # noqa: E402
    GGUF_OUTTYPES, LLAMACPP_EXTRA_BUFTS_ENV, LLAMACPP_KV_TYPES, LLAMACPP_PRELUDE, REPO, Work,
    do_convert, gguf_path, llamacpp_kv_args, log)

PROMPT_LEN = 128  # the default --prompt-len
OUTPUT_LEN = 129  # TPOT is measured over the 128 tokens after the first

LLAMACPP_RUNNER = LLAMACPP_PRELUDE + r"""
import json, sys, time
import llama_cpp
prompt = json.load(open(sys.argv[1]))
out_path, gguf = sys.argv[2], sys.argv[3]
kv = kv_cache_kwargs(kv_cache_type(sys.argv, 5))
n_ctx = int(sys.argv[4])
llm = llama_cpp.Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=n_ctx,
                      n_batch=n_ctx, n_ubatch=512, verbose=False, **kv)

def run(n):
    llm.reset()
    start, k = time.perf_counter(), 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        k += 1
        if k >= n:
            break
    return time.perf_counter() - start

for _ in range(2):
    run(1), run(%(out)d)
ttft = min(run(1) for _ in range(5))
full = min(run(%(out)d) for _ in range(3))
json.dump({"ttft_s": ttft, "tpot_s": (full - ttft) / %(steps)d}, open(out_path, "w"))
""" % {"out": OUTPUT_LEN, "steps": OUTPUT_LEN - 1}


def read_bandwidth_gbs(threads: int) -> float:
    """Median of 7 `torch.sum` passes over 1 GiB of float32 in huge pages, in GB/s."""
    import statistics

    import torch

    from sluice.model.host_memory import huge_page_buffer
    torch.set_num_threads(threads)
    x = huge_page_buffer(1 << 30).view(torch.float32)
    x.fill_(1.0)
    x.sum()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times) / 1e9


def between_bandwidth_readings(run: Callable[[], dict], weight_bytes: int) -> dict:
    """`run()`'s row, with the read bandwidth measured right before and after it
    (`bandwidth_gbs`: (before, after)) and the floor at their mean (`floor_s`)."""
    before = read_bandwidth_gbs(2)
    row = run()
    after = read_bandwidth_gbs(2)
    row["bandwidth_gbs"] = (before, after)
    row["floor_s"] = weight_bytes / ((before + after) / 2 * 1e9)
    return row


def decode_weight_bytes(model: str, element_size: int = 4) -> int:
    """Bytes of the weights one decode token reads at `element_size` bytes per weight (4:
    float32, 2: bf16 / fp16): every weight except the embedding table (one row of it is read),
    plus the LM head (the embedding again if tied)."""
    from safetensors import safe_open
    total = 0
    config = json.loads((Path(model) / "config.json").read_text())
    for f in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                if name.endswith("embed_tokens.weight"):
                    continue
                n = 1
                for d in shape:
                    n *= d
                total += element_size * n
    if config.get("tie_word_embeddings"):
        total += element_size * config["vocab_size"] * config["hidden_size"]
    return total


def gguf_decode_weight_bytes(path: Path) -> int:
    """Bytes of a GGUF file's weights one decode token reads (module doc)."""
    from sluice.model_spec.gguf import open_gguf
    tensors = {t.name: int(t.n_bytes) for t in open_gguf(path).tensors}
    total = sum(n for name, n in tensors.items() if name != "token_embd.weight")
    if "output.weight" not in tensors:
        total += tensors.get("token_embd.weight", 0)
    return total


def sluice_latency(model: str, prompt: list[int], quantization: str | None = None,
                   dtype: str = "auto", kv_cache_dtype: str = "auto") -> dict:
    from sluice import LLM, SamplingParams
    llm = LLM(model, enable_prefix_caching=False, quantization=quantization, dtype=dtype,
              kv_cache_dtype=kv_cache_dtype)

    def run(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    try:
        for _ in range(2):
            run(1), run(OUTPUT_LEN)
        ttft = min(run(1) for _ in range(5))
        full = min(run(OUTPUT_LEN) for _ in range(3))
    finally:
        llm.shutdown()
    return {"ttft_s": ttft, "tpot_s": (full - ttft) / (OUTPUT_LEN - 1)}


def llamacpp_latency(work: Work, prompt_file: Path, gguf: Path | None = None,
                     kv_cache_dtype: str = "auto", prompt_len: int = PROMPT_LEN) -> dict:
    """llama.cpp's row; its context (and prefill batch, one ubatch of 512 at a time, its
    default) holds the prompt and the generation."""
    gguf = gguf or work.gguf
    if not work.py("llamacpp").exists() or not gguf.exists():
        raise RuntimeError("llama.cpp not set up: run compare_peers.py --setup --convert")
    runner = work.root / "runner_llamacpp_latency.py"
    runner.write_text(LLAMACPP_RUNNER)
    out = work.root / "results" / "latency-llama.cpp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(work.py("llamacpp")), str(runner), str(prompt_file), str(out),
                    str(gguf), str(prompt_len + OUTPUT_LEN), *llamacpp_kv_args(kv_cache_dtype)],
                   check=True, timeout=900)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sluice-peers"))
    parser.add_argument("--model", default="reference")
    parser.add_argument("--dtype", default=None, choices=sorted(GGUF_OUTTYPES),
                        help="sluice's --dtype, and the float GGUF llama.cpp runs for --model "
                        "(f32 / bf16 / f16) [default: float32; with --gguf, sluice's 'auto']")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *LLAMACPP_KV_TYPES],
                        help="KV cache dtype of both backends (module doc) [default: auto]")
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN,
                        help="prompt token ids of the request [default: %(default)s]")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="run this GGUF file in both backends (module doc)")
    parser.add_argument("--sluice-quantization", default="gguf,default",
                        help="with --gguf: sluice's --quantization values, comma separated")
    parser.add_argument("--llamacpp-no-extra-bufts", action="store_true",
                        help="llama.cpp without its AMX / repacked weight buffers "
                        "(compare_peers.LLAMACPP_PRELUDE)")
    args = parser.parse_args(argv)
    if args.llamacpp_no_extra_bufts:
        os.environ[LLAMACPP_EXTRA_BUFTS_ENV] = "0"
    sys.path.insert(0, str(REPO))
    from sluice.bench.datasets import random_requests
    from sluice.bench.reference_model import resolve_model
    from sluice.bench.throughput import _load_tokenizer, _model_dir, _model_vocab_size

    work = Work(args.work_dir)
    work.root.mkdir(parents=True, exist_ok=True)
    model = str(args.gguf.expanduser()) if args.gguf else resolve_model(args.model)
    meta = _model_dir(str(model))
    prompt = list(random_requests(1, 1, _model_vocab_size(meta), 0, input_len=args.prompt_len,
                                  tokenizer=_load_tokenizer(meta))[0].prompt_token_ids)
    prompt_file = work.root / "latency-prompt.json"
    prompt_file.write_text(json.dumps(prompt))

    dtype = args.dtype or ("auto" if args.gguf else "float32")
    element_size = 2 if dtype in ("bfloat16", "float16") else 4
    weight_bytes = (gguf_decode_weight_bytes(Path(model)) if args.gguf
                    else decode_weight_bytes(model, element_size))
    work.gguf = args.gguf.expanduser() if args.gguf else gguf_path(work, args.model, dtype)
    if not args.skip_llamacpp and not work.gguf.exists():
        do_convert(work, model, dtype)
    variants = ([None if q == "default" else q for q in args.sluice_quantization.split(",")]
                if args.gguf else [None])
    rows: dict[str, dict] = {}
    for q in variants:
        name = "sluice" if q is None else f"sluice {q}"
        log(f"{name} ...")
        rows[name] = between_bandwidth_readings(
            lambda q=q: sluice_latency(model, prompt, q, dtype, args.kv_cache_dtype),
            weight_bytes)
    if not args.skip_llamacpp:
        log("llama.cpp ...")
        try:
            rows["llama.cpp"] = between_bandwidth_readings(
                lambda: llamacpp_latency(work, prompt_file, work.gguf, args.kv_cache_dtype,
                                         args.prompt_len),
                weight_bytes)
        except Exception as e:  # a peer that fails is a row with the reason
            rows["llama.cpp"] = {"error": f"{type(e).__name__}: {e}"[:300]}

    print(f"model {model}, --dtype {dtype}, --kv-cache-dtype {args.kv_cache_dtype}, "
          f"llama.cpp GGUF {work.gguf.name}")
    print(f"prompt {args.prompt_len} token ids; floor = {weight_bytes / 1e6:.1f} MB of weights per "
          f"token / the bandwidth read around each backend's runs")
    ttft = f"TTFT({args.prompt_len}) ms"
    print(f"{'backend':<14}{ttft:>14}{'TPOT ms':>10}{'GB/s before/after':>19}"
          f"{'floor ms':>10}{'TPOT/floor':>12}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<14}  {r['error']}")
            continue
        before, after = r["bandwidth_gbs"]
        print(f"{name:<14}{r['ttft_s'] * 1e3:>14.1f}{r['tpot_s'] * 1e3:>10.2f}"
              f"{before:>10.1f} / {after:<6.1f}{r['floor_s'] * 1e3:>10.2f}"
              f"{r['tpot_s'] / r['floor_s']:>11.2f}x")
    ok = {k: v for k, v in rows.items() if "error" not in v}
    if "llama.cpp" in ok:
        llama = ok["llama.cpp"]
        for name, s in ok.items():
            if name != "llama.cpp":
                print(f"{name}/llama.cpp: TTFT {s['ttft_s'] / llama['ttft_s']:.2f}x, "
                      f"TPOT {s['tpot_s'] / llama['tpot_s']:.2f}x (below 1 = sluice faster)")
    report = {"model": str(model), "dtype": dtype, "kv_cache_dtype": args.kv_cache_dtype,
              "gguf": str(work.gguf), "rows": rows,
              "decode_weight_bytes": weight_bytes,
              "prompt_len": args.prompt_len, "output_len": OUTPUT_LEN}
    (work.root / "results").mkdir(parents=True, exist_ok=True)
    (work.root / "results" / "latency.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
