"""Resident memory of one process serving a GGUF file: sluice vs llama.cpp, same context.

    python benchmarks/compare_memory.py --gguf ~/.cache/sluice-tests/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/compare_memory.py --gguf FILE --context 4096 --sluice-args "--quantization gguf"

Each backend runs in a fresh process (llama.cpp in the `llamacpp` venv of compare_peers.py
--setup): it loads the file with a KV cache for exactly `--context` tokens of one sequence,
generates 16 greedy tokens after a 128-token prompt, and reports its peak and final resident set
(VmHWM / VmRSS from /proc/self/status), the KV cache's size (from the model's shape and the
cache type) and the rest (peak RSS - KV cache - the file's size):

* llama.cpp: `Llama(n_ctx=context)`, its default cache (float16 K and V) unless `--kv-cache-dtype`;
* sluice: `LLM(file, max_model_len=context, kv_cache_memory=<context tokens' bytes>)`, the
  default mode (`--sluice-args` adds engine options, e.g. `--quantization gguf`); the engine
  core runs in the same process (offline `LLM`), and sluice touches its whole cache at startup
  (llama.cpp's pages fill as tokens are written: its RSS holds the cache only as far as used,
  so the "KV MB" column is what each allocated).

The rest is each runtime's own: for sluice the Python interpreter, torch's libraries, the
tokenizer and the activations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import (  # noqa: E402
    LLAMACPP_KV_TYPES, LLAMACPP_PRELUDE, REPO, Work, llamacpp_kv_args, log)

LLAMACPP_KV_BYTES = {"auto": 2, "float16": 2, "bfloat16": 2, "float32": 4, "fp8": 34 / 32,
                     "fp8_e4m3": 34 / 32, "fp8_e5m2": 34 / 32}
"""Bytes per K or V element of llama.cpp's cache for `--kv-cache-dtype` (fp8: its Q8_0)."""

PROMPT = list(range(1000, 1128))   # 128 ordinary token ids
NEW_TOKENS = 16

STATUS = r"""
def memory_mb():
    fields = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Vm"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS")}
"""

LLAMACPP_RUNNER = LLAMACPP_PRELUDE + STATUS + r"""
import json, sys
gguf, context, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
llm = llama_cpp.Llama(model_path=gguf, n_threads=2, n_ctx=context, verbose=False,
                      **kv_cache_kwargs(kv_cache_type(sys.argv, 4)))
tokens = []
for t in llm.generate(%(prompt)s, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
    tokens.append(t)
    if len(tokens) >= %(new)d:
        break
json.dump({**memory_mb(), "tokens": tokens}, open(out, "w"))
""" % {"prompt": PROMPT, "new": NEW_TOKENS}

def sluice_memory(gguf: Path, context: int, extra: dict) -> dict:
    """sluice's row: a fresh process, its KV cache sized to `context` tokens."""
    code = STATUS + r"""
import json, sys
from sluice import LLM, SamplingParams
gguf, context, out, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
llm = LLM(gguf, max_model_len=context, kv_cache_memory=int(sys.argv[5]),
          enable_prefix_caching=False, **extra)
result = llm.generate([{"prompt_token_ids": %(prompt)s}],
                      SamplingParams(temperature=0.0, max_tokens=%(new)d, ignore_eos=True),
                      use_tqdm=False)
json.dump({**memory_mb(), "tokens": list(result[0].outputs[0].token_ids)}, open(out, "w"))
llm.shutdown()
""" % {"prompt": PROMPT, "new": NEW_TOKENS}
    kv_bytes = sluice_kv_bytes(gguf, context, extra)
    out = Path("/tmp/sluice-memory.json")
    subprocess.run([sys.executable, "-c", code, str(gguf), str(context), str(out),
                    json.dumps(extra), str(kv_bytes)], check=True, timeout=900, cwd=REPO)
    return {**json.loads(out.read_text()), "kv_mb": kv_bytes / 2 ** 20}


def sluice_kv_bytes(gguf: Path, context: int, extra: dict) -> int:
    """Bytes of a KV cache holding `context` tokens (whole blocks of any block size, plus the
    null block) in the cache dtype sluice resolves for this file and `extra` options."""
    import torch

    from sluice.config import EngineConfig
    from sluice.hf_config import load_model_spec
    from sluice.model.attention.kv_cache import kv_cache_bytes_per_block
    from sluice.model_spec.gguf import prepare_gguf
    from sluice.platform.cpu import CpuPlatform
    from sluice.worker.worker import kv_cache_auto_dtype
    config = EngineConfig.from_kwargs(model=str(gguf), **extra)
    spec = load_model_spec(prepare_gguf(gguf))
    dtype = CpuPlatform().resolve_kv_cache_dtype(
        config.cache.kv_cache_dtype,
        kv_cache_auto_dtype(spec, config.model.quantization, torch.float32))
    block = 128   # the largest --block-size: whole blocks for `context` plus the null block
    return (-(-context // block) + 1) * kv_cache_bytes_per_block(spec, block, dtype)


def llamacpp_memory(work: Work, gguf: Path, context: int, kv_cache_dtype: str) -> dict:
    """llama.cpp's row: a fresh process of the llamacpp venv, n_ctx = `context`."""
    from sluice.hf_config import load_model_spec
    from sluice.model_spec.gguf import prepare_gguf
    spec = load_model_spec(prepare_gguf(gguf))
    kv_mb = (2 * context * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim
             * LLAMACPP_KV_BYTES[kv_cache_dtype] / 2 ** 20)
    runner = work.root / "runner_llamacpp_memory.py"
    runner.write_text(LLAMACPP_RUNNER)
    out = work.root / "results" / "memory-llama.cpp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(work.py("llamacpp")), str(runner), str(gguf), str(context), str(out),
                    *llamacpp_kv_args(kv_cache_dtype)], check=True, timeout=900)
    return {**json.loads(out.read_text()), "kv_mb": kv_mb}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sluice-peers"))
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--context", type=int, default=8192,
                        help="tokens the KV cache holds [default: %(default)s]")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *LLAMACPP_KV_TYPES],
                        help="both backends' KV cache [default: auto, each one's default]")
    parser.add_argument("--sluice-args", default="",
                        help='sluice engine options, e.g. "--quantization gguf"')
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    gguf = args.gguf.expanduser()
    extra = {k.removeprefix("--").replace("-", "_"): v for k, v in
             zip(args.sluice_args.split()[::2], args.sluice_args.split()[1::2])}
    if args.kv_cache_dtype != "auto":
        extra["kv_cache_dtype"] = args.kv_cache_dtype
    rows = {}
    log("sluice ...")
    rows["sluice"] = sluice_memory(gguf, args.context, extra)
    log("llama.cpp ...")
    try:
        rows["llama.cpp"] = llamacpp_memory(Work(args.work_dir), gguf, args.context,
                                            args.kv_cache_dtype)
    except Exception as e:  # a peer that fails is a row with the reason
        rows["llama.cpp"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    size_mb = gguf.stat().st_size / 2 ** 20
    print(f"{gguf.name} ({size_mb:.1f} MiB), KV cache for {args.context} tokens, "
          f"--kv-cache-dtype {args.kv_cache_dtype}, sluice {args.sluice_args or 'defaults'}")
    print(f"{'backend':<12}{'peak RSS MiB':>14}{'RSS MiB':>10}{'KV MiB':>9}{'rest MiB':>10}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<12}  {r['error']}")
            continue
        rest = r["VmHWM"] - r["kv_mb"] - size_mb
        print(f"{name:<12}{r['VmHWM']:>14.1f}{r['VmRSS']:>10.1f}{r['kv_mb']:>9.1f}{rest:>10.1f}")
    (args.work_dir / "results").mkdir(parents=True, exist_ok=True)
    (args.work_dir / "results" / "memory.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
