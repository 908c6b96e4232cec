"""Online comparison: `sluice bench serve` against sluice, vLLM-CPU and llama.cpp servers on W1.

    python benchmarks/compare_peers.py --setup --convert   # the peers' venvs and the f32 GGUF
    python benchmarks/compare_online.py --setup            # + llama-cpp-python's server extras
    python benchmarks/compare_online.py --run              # every server, C = 16 and 64
    python benchmarks/compare_online.py --run --rounds 3   # 3 alternating rounds + medians

Each server in turn is started on 127.0.0.1 (a free port) with the reference model, waited for
(GET /v1/models answers 200), warmed up with one short request, then loaded by
`sluice bench serve` with W1 (the 64 requests of `compare_peers.py`: prompts of 64..256 token
ids, seed 0, exactly 128 greedy output tokens each, EOS ignored) at `--max-concurrency` 16, then
64 (all requests sent at once, at most C in flight), then stopped (its process group: SIGTERM,
then SIGKILL). One table: output tok/s, TTFT median / p99, TPOT median, completed requests and
output tokens, plus the sluice/server ratios of output tok/s and p99 TTFT per concurrency.
JSON: `<work-dir>/online/` (compare_online.json, bench-<server>-c<C>.json, logs/).

* sluice: `sluice serve MODEL --dtype DTYPE --no-enable-prefix-caching` (`--dtype`, default
  float32; other flags default, max-model-len 2048 from the model).
* vllm-cpu: `vllm serve MODEL --dtype DTYPE --no-enable-prefix-caching --max-model-len 2048
  --seed 0` in the `vllmcpu` venv of compare_peers.py, with VLLM_CPU_KVCACHE_SPACE=4 and
  VLLM_CPU_OMP_THREADS_BIND=0-1 (both cores; vLLM's 'auto' keeps one of two for itself).
* llama.cpp: llama-cpp-python 0.3.36's OpenAI server (`python -m llama_cpp.server`) on the
  model's GGUF at DTYPE (f32 / bf16 / f16; compare_peers.py's conversion, made when missing), `--n_threads 2 --n_threads_batch 2 --n_ctx 2048 --n_batch 512 --interrupt_requests
  False` (its default, True, cuts the running stream short whenever another request waits).
  That server holds ONE llama.cpp context behind a lock: requests run one at a time, the others
  queue (that is what its users get; TTFT grows with the queue). Its /v1/completions lacks
  three things the benchmark relies on, so it runs through a small launcher
  (`<work-dir>/online/llamacpp_server.py`, written by this script) that adapts only the
  request/response shape and leaves inference alone:
    - token-id prompts: the request schema accepts `prompt: [int, ...]`, which
      `Llama.create_completion` takes natively (the stock schema allows only strings);
    - `ignore_eos`: mapped to the server's own `logit_bias`, -inf on the vocabulary's
      end-of-generation ids (the GGUF has two, 0 and 2; greedy W1 outputs contain id 2, where
      the stock server would stop);
    - `stream_options.include_usage`: a final usage chunk, counting the tokens that
      `Llama.generate` yielded (the benchmark takes output tokens from it).
  The rest is the server's defaults (e.g. repeat_penalty 1.1; temperature 0 is greedy).
  The output-token column shows what each server really generated (W1: 64 x 128 = 8192).

Every server gets token-id prompts (`sluice bench serve --dataset` with `prompt_token_ids`) on
/v1/completions, streamed, `temperature 0`, `ignore_eos`, `max_tokens 128`. A server that
fails to start or run becomes a row with the reason (its log's tail); servers are always
stopped, also on Ctrl-C. Timeouts on every step.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_peers as cp  # noqa: E402  (Work, check_torch_kept, environment, ...)

REPO = cp.REPO
SERVERS = ("sluice", "vllm-cpu", "llama.cpp")
CONCURRENCIES = (16, 64)
OUTPUT_LEN = 128
# llama-cpp-python 0.3.36's [server] extra (its METADATA), installed without rebuilding it.
LLAMACPP_SERVER_DEPS = ["uvicorn>=0.22.0", "fastapi>=0.100.0", "pydantic-settings>=2.0.1",
                        "sse-starlette>=1.6.1", "starlette-context>=0.3.6,<0.4", "PyYAML>=5.1"]
START_TIMEOUT_S = {"sluice": 600, "vllm-cpu": 900, "llama.cpp": 600}
REQUEST_TIMEOUT_S = 3000     # one request may queue behind all others (llama.cpp)
BENCH_TIMEOUT_S = 3600


def log(msg: str) -> None:
    print(f"[compare_online {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------- setup

def do_setup(work: cp.Work) -> None:
    logfile = work.root / "logs" / "setup-llamacpp-server.log"
    key = "setup:llama.cpp-server"
    log(f"{key}: {' '.join(LLAMACPP_SERVER_DEPS)} into {work.venv('llamacpp')} ...")
    try:
        if not work.py("llamacpp").exists():
            raise RuntimeError(f"{work.venv('llamacpp')} missing: run "
                               "`python benchmarks/compare_peers.py --setup` first")
        if not work.constraints.exists():
            work.constraints.write_text(cp.TORCH_PIN + "\n")
        cp.check_torch_kept(work, "llamacpp", LLAMACPP_SERVER_DEPS, logfile)
        pip = [str(work.py("llamacpp")), "-m", "pip"]
        cp.sh(pip + ["install", "-c", str(work.constraints)] + LLAMACPP_SERVER_DEPS, logfile,
              timeout=1800)
        cp.sh([str(work.py("llamacpp")), "-c",
               "import llama_cpp, llama_cpp.server.app, torch; "
               "print(llama_cpp.__version__, torch.__version__)"], logfile, timeout=300)
        work.set_status(key, "ok")
        log(f"{key} ok")
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        work.set_status(key, f"FAILED: {e}")
        log(f"{key} FAILED: {e}")


# ------------------------------------------------------------------------- llama.cpp launcher

LLAMACPP_LAUNCHER = r'''
"""llama-cpp-python's OpenAI server, unchanged except for three request/response-shape
adaptations (see benchmarks/compare_online.py): token-id prompts, ignore_eos (-> logit_bias
-inf on the end-of-generation ids) and stream_options.include_usage (a final usage chunk)."""
import sys
import time
from typing import List, Union

from pydantic import PrivateAttr, model_validator

import llama_cpp
import llama_cpp.server.types as types

_generate = llama_cpp.Llama.generate


def _counting_generate(self, tokens, *args, **kwargs):
    self._online_generated, self._online_last = 0, None
    for token in _generate(self, tokens, *args, **kwargs):
        self._online_generated += 1
        self._online_last = token
        yield token


llama_cpp.Llama.generate = _counting_generate


class CreateCompletionRequest(types.CreateCompletionRequest):
    # the stock route unwraps a one-element list, so [[ids]] reaches Llama(prompt=[ids])
    prompt: Union[str, List[str], List[List[int]]] = ""
    _ignore_eos: bool = PrivateAttr(default=False)
    _include_usage: bool = PrivateAttr(default=False)

    @model_validator(mode="wrap")
    @classmethod
    def _adapt(cls, data, handler):
        ignore_eos = include_usage = False
        if isinstance(data, dict):
            data = dict(data)
            p = data.get("prompt")
            if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                data["prompt"] = [p]
            ignore_eos = bool(data.pop("ignore_eos", False))
            include_usage = bool((data.pop("stream_options", None) or {}).get("include_usage"))
        model = handler(data)
        model._ignore_eos, model._include_usage = ignore_eos, include_usage
        return model


types.CreateCompletionRequest = CreateCompletionRequest
import llama_cpp.server.app as app  # noqa: E402  (after the schema swap: its routes use it)

_EOG = {}


def _eog_ids(llama):
    key = id(llama)
    if key not in _EOG:
        vocab = llama._model.vocab
        _EOG[key] = [i for i in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        print(f"llama.cpp launcher: end-of-generation ids {_EOG[key]}", file=sys.stderr)
    return _EOG[key]


_publisher = app.get_event_publisher


async def get_event_publisher(request, inner_send_chan, body, body_model, llama_call, kwargs):
    ignore_eos = getattr(body, "_ignore_eos", False)
    include_usage = getattr(body, "_include_usage", False)
    call = llama_call

    def adapted_call(llama, **kw):
        if ignore_eos:
            kw["logit_bias"] = {**(kw.get("logit_bias") or {}),
                                **{i: float("-inf") for i in _eog_ids(llama)}}
        chunks = call(llama, **kw)
        if not include_usage:
            return chunks
        return _with_usage(llama, chunks, kw.get("prompt"))

    return await _publisher(request, inner_send_chan, body, body_model, adapted_call, kwargs)


def _with_usage(llama, chunks, prompt):
    first = None
    for chunk in chunks:
        first = first or chunk
        yield chunk
    generated = getattr(llama, "_online_generated", 0)
    last = getattr(llama, "_online_last", None)
    if last is not None and llama_cpp.llama_vocab_is_eog(llama._model.vocab, last):
        generated -= 1  # the end-of-generation token ends the completion, not part of it
    n_prompt = len(prompt) if isinstance(prompt, list) else len(
        llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))
    first = first or {}
    yield {"id": first.get("id", "cmpl-usage"), "object": "text_completion",
           "created": first.get("created", int(time.time())), "model": first.get("model", ""),
           "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": generated,
                                    "total_tokens": n_prompt + generated}}


app.get_event_publisher = get_event_publisher

if __name__ == "__main__":
    from llama_cpp.server.__main__ import main
    main()
'''


# -------------------------------------------------------------------------------------- servers

_LIVE: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """End `proc`'s process group (SIGTERM, then SIGKILL after `grace_s`) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children (engine cores) may outlive the leader: kill what is left of the group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    if proc in _LIVE:
        _LIVE.remove(proc)


def _stop_all() -> None:
    for proc in list(_LIVE):
        stop(proc, grace_s=5.0)


def _on_signal(signum, frame):  # noqa: ARG001
    _stop_all()
    raise SystemExit(128 + signum)


def log_tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])[-900:]


def http_get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return 0


def first_model(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def server_command(name: str, work: cp.Work, model: str, port: int,
                   vllm_bind: str | None, dtype: str = "float32"
                   ) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1",
               VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    if name == "sluice":
        exe = shutil.which("sluice") or str(Path(sys.executable).parent / "sluice")
        return [exe, "serve", model, "--dtype", dtype, "--no-enable-prefix-caching",
                "--host", "127.0.0.1", "--port", str(port)], env
    if name == "vllm-cpu":
        exe = work.venv("vllmcpu") / "bin" / "vllm"
        if not exe.exists():
            raise RuntimeError(f"not set up: {exe} missing (python benchmarks/compare_peers.py "
                               "--setup)")
        env["VLLM_CPU_KVCACHE_SPACE"] = "4"
        if vllm_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = vllm_bind
        return [str(exe), "serve", model, "--dtype", dtype, "--no-enable-prefix-caching",
                "--max-model-len", "2048", "--seed", "0", "--host", "127.0.0.1",
                "--port", str(port)], env
    if name == "llama.cpp":
        if not work.py("llamacpp").exists():
            raise RuntimeError(f"not set up: {work.venv('llamacpp')} missing "
                               "(python benchmarks/compare_peers.py --setup)")
        if not work.gguf.exists():
            raise RuntimeError(f"no GGUF at {work.gguf} (python benchmarks/compare_peers.py "
                               f"--convert --model {model} --dtype {dtype})")
        st = work.load_status().get("setup:llama.cpp-server", "")
        if st and st != "ok":
            raise RuntimeError(f"llama.cpp server extras: {st}")
        launcher = work.root / "online" / "llamacpp_server.py"
        launcher.parent.mkdir(parents=True, exist_ok=True)
        launcher.write_text(LLAMACPP_LAUNCHER)
        return [str(work.py("llamacpp")), str(launcher), "--model", str(work.gguf),
                "--n_threads", "2", "--n_threads_batch", "2", "--n_ctx", "2048",
                "--n_batch", "512", "--interrupt_requests", "False", "--host", "127.0.0.1",
                "--port", str(port)], env
    raise RuntimeError(f"unknown server {name}")


def start_server(name: str, work: cp.Work, model: str, vllm_bind: str | None,
                 logfile: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd, env = server_command(name, work, model, port, vllm_bind, work.dtype)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=work.root,
                                start_new_session=True)
    _LIVE.append(proc)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S[name]
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            stop(proc)
            raise RuntimeError(f"exited with {proc.returncode} while starting: "
                               f"{log_tail(logfile)}")
        if http_get(base_url + "/v1/models") == 200:
            break
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"not ready after {START_TIMEOUT_S[name]} s: {log_tail(logfile)}")
        time.sleep(1.0)
    log(f"{name}: ready on {base_url} after {time.monotonic() - t0:.0f} s")
    return proc, base_url


def warm_up(base_url: str, prompt_ids: list[int]) -> None:
    """One short streamed request (untimed), so no server pays first-request costs in the run."""
    # reversed: no W1 prompt starts like it (llama.cpp's server reuses the previous prompt's KV
    # for a common prefix)
    body = {"model": first_model(base_url), "prompt": prompt_ids[:16][::-1], "max_tokens": 4,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        text = r.read().decode(errors="replace")
    if r.status != 200 or '"usage"' not in text:
        raise RuntimeError(f"warm-up request: HTTP {r.status}: {text[:300]}")


def run_bench(base_url: str, dataset: Path, num_prompts: int, concurrency: int, out: Path,
              logfile: Path) -> dict:
    if out.exists():
        out.unlink()
    cmd = [sys.executable, "-c", "import sys; from sluice.entrypoints.cli import main; "
           "sys.exit(main())", "bench", "serve", "--base-url", base_url,
           "--dataset", str(dataset), "--num-prompts", str(num_prompts),
           "--max-concurrency", str(concurrency), "--output-len", str(OUTPUT_LEN),
           "--timeout", str(REQUEST_TIMEOUT_S), "--json", str(out), "--disable-tqdm"]
    with open(logfile, "a") as f:
        f.write(f"\n$ sluice {' '.join(cmd[4:])}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, check=False,
                           timeout=BENCH_TIMEOUT_S)
    if not out.exists():
        raise RuntimeError(f"sluice bench serve exited {p.returncode}: {log_tail(logfile)}")
    return json.loads(out.read_text())


def write_dataset(work: cp.Work, model: str, num_prompts: int) -> tuple[Path, dict]:
    """W1 as a `--dataset` list, built exactly as compare_peers.write_workload builds w1.json
    (that file is left alone; it is checked against when it holds the same requests)."""
    from sluice.bench.datasets import random_requests, workload_summary
    from sluice.bench.throughput import _load_tokenizer, _model_dir, _model_vocab_size
    model_dir = _model_dir(model)   # a .gguf file: its converted config / tokenizer sidecar
    reqs = random_requests(num_prompts, OUTPUT_LEN, _model_vocab_size(model_dir), 0,
                           tokenizer=_load_tokenizer(model_dir), input_len_range=(64, 256))
    entries = [{"prompt_token_ids": r.prompt_token_ids, "output_len": r.output_len}
               for r in reqs]
    try:
        shared = json.loads(work.workload.read_text())["requests"]
        if len(shared) == len(entries) and shared != entries:
            raise RuntimeError(f"{work.workload} differs from the W1 rebuilt here")
    except (OSError, ValueError, KeyError):
        pass
    path = work.root / "online" / "w1-requests.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path, workload_summary(reqs)


KEEP = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
        "output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
        "mean_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "median_e2el_ms",
        "errors")


def run_server(name: str, work: cp.Work, model: str, dataset: Path, num_prompts: int,
               concurrencies: list[int], vllm_bind: str | None, prompt_ids: list[int]) -> dict:
    logs = work.root / "online" / "logs"
    server_log, bench_log = logs / f"server-{name}.log", logs / f"bench-{name}.log"
    if bench_log.exists():
        bench_log.unlink()
    res: dict = {"server_log": str(server_log), "bench_log": str(bench_log), "runs": {}}
    try:
        proc, base_url = start_server(name, work, model, vllm_bind, server_log)
        res["command"] = server_log.read_text().splitlines()[0][2:]
    except Exception as e:  # noqa: BLE001 - a row with the reason
        res["error"] = f"start: {e}"
        log(f"{name}: FAILED to start: {e}")
        return res
    try:
        warm_up(base_url, prompt_ids)
        for c in concurrencies:
            log(f"{name}: sluice bench serve, {num_prompts} prompts, max concurrency {c} ...")
            out = work.root / "online" / f"bench-{name}-c{c}.json"
            try:
                r = run_bench(base_url, dataset, num_prompts, c, out, bench_log)
                row = {k: r.get(k) for k in KEEP}
                row["json"] = str(out)
                if not r.get("completed"):
                    row["error"] = f"no request completed: {r.get('errors')}"
                res["runs"][str(c)] = row
                log(f"{name} c={c}: {row['output_throughput']:.1f} output tok/s, "
                    f"TTFT p99 {row['p99_ttft_ms']:.0f} ms, {row['completed']} ok, "
                    f"{row['total_output_tokens']} output tokens")
            except Exception as e:  # noqa: BLE001
                res["runs"][str(c)] = {"error": str(e)}
                log(f"{name} c={c}: FAILED: {e}")
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: "
                                   f"{log_tail(server_log)}")
    except Exception as e:  # noqa: BLE001
        res["error"] = str(e)
        log(f"{name}: FAILED: {e}")
    finally:
        stop(proc)
    return res


# ---------------------------------------------------------------------------------------- table

def format_table(report: dict) -> str:
    """One row per (concurrency, server); the ratios are sluice / server at that concurrency:
    output tok/s (> 1: sluice ahead) and p99 TTFT (<= 1: sluice no worse)."""
    res, n = report["results"], report["num_prompts"]
    head = (f"{'C':>3}  {'server':<10}{'out tok/s':>10}{'TTFT med':>10}{'TTFT p99':>10}"
            f"{'TPOT med':>10}{'ok':>7}{'out toks':>9}  {'sluice/server: tok/s':>20}"
            f"{'p99 TTFT':>10}  goal")
    lines = [head, "-" * len(head)]
    for c in report["concurrencies"]:
        base = res.get("sluice", {}).get("runs", {}).get(str(c), {})
        for name in report["servers"]:
            r = res.get(name, {})
            run = r.get("runs", {}).get(str(c))
            if run is None or not run.get("completed"):
                why = (run or {}).get("error") or r.get("error") or "not run"
                lines.append(f"{c:>3}  {name:<10}FAILED: {why[:400]}")
                continue
            tput = ttft = goal = ""
            if base.get("completed") and name != "sluice":
                t = base["output_throughput"] / run["output_throughput"]
                q = base["p99_ttft_ms"] / run["p99_ttft_ms"]
                tput, ttft = f"{t:.2f}x", f"{q:.2f}x"
                goal = "met" if t > 1 and q <= 1 else "NOT met"
            lines.append(
                f"{c:>3}  {name:<10}{run['output_throughput']:>10.1f}"
                f"{run['median_ttft_ms']:>10.0f}{run['p99_ttft_ms']:>10.0f}"
                f"{run['median_tpot_ms']:>10.1f}{run['completed']:>4}/{n:<2}"
                f"{run['total_output_tokens']:>9}  {tput:>20}{ttft:>10}  {goal}")
    w = report["workload"]
    short = [f"{name} C={c}: {run['total_output_tokens']}" for c in report["concurrencies"]
             for name in report["servers"]
             for run in [res.get(name, {}).get("runs", {}).get(str(c)) or {}]
             if run.get("completed") and run["total_output_tokens"] != w["total_output_tokens"]]
    if short:
        lines.append(f"NOTE: output tokens differ from the {w['total_output_tokens']} expected: "
                     + ", ".join(short))
    lines.append(f"W1: {w['num_requests']} requests, {w['total_prompt_tokens']} prompt tokens, "
                 f"{w['total_output_tokens']} output tokens expected. C = --max-concurrency; "
                 "TTFT/TPOT in ms; goal = sluice ahead in output tok/s (ratio > 1) with p99 "
                 "TTFT no worse (ratio <= 1).")
    return "\n".join(lines)


def median_ratios(rounds: list[dict], servers: list[str], concurrencies: list[int]) -> str:
    """Per (C, peer): the median over rounds of sluice/peer output tok/s and p99 TTFT, with the
    rounds' values, so one disturbed round does not decide the verdict."""
    import statistics
    lines = ["median over rounds (sluice/server): C  server      tok/s   p99 TTFT  goal"]
    for c in concurrencies:
        for name in servers:
            if name == "sluice":
                continue
            pairs = []
            for res in rounds:
                base = res.get("sluice", {}).get("runs", {}).get(str(c), {})
                run = res.get(name, {}).get("runs", {}).get(str(c), {})
                if base.get("completed") and run.get("completed"):
                    pairs.append((base["output_throughput"] / run["output_throughput"],
                                  base["p99_ttft_ms"] / run["p99_ttft_ms"]))
            if not pairs:
                continue
            t = statistics.median(p[0] for p in pairs)
            q = statistics.median(p[1] for p in pairs)
            goal = "met" if t > 1 and q <= 1 else "NOT met"
            each = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in pairs)
            lines.append(f"{'':>34}{c:>3}  {name:<10}{t:>6.3f}x{q:>9.3f}x  {goal}   "
                         f"(rounds: {each})")
    return "\n".join(lines)


def do_run(work: cp.Work, servers: list[str], model_arg: str, num_prompts: int,
           concurrencies: list[int], vllm_bind: str | None, rounds: int = 1) -> dict:
    """Benchmark the servers one after another, `rounds` times over (servers alternate, so a
    slow phase of the machine hits every server); prints each round's table and, for several
    rounds, the median ratios."""
    from sluice.bench.reference_model import resolve_model
    model = resolve_model(model_arg)
    dataset, summary = write_dataset(work, model, num_prompts)
    prompt_ids = json.loads(dataset.read_text())[0]["prompt_token_ids"]
    log(f"workload: {summary}")
    report = {"workload": summary, "num_prompts": num_prompts, "concurrencies": concurrencies,
              "servers": servers, "model": model, "results": {}, "rounds": [],
              "environment": cp.environment(), "status": work.load_status()}
    tables = []
    for r in range(rounds):
        results = {name: run_server(name, work, model, dataset, num_prompts, concurrencies,
                                    vllm_bind, prompt_ids) for name in servers}
        report["rounds"].append(results)
        report["results"] = results
        tables.append((f"round {r + 1}/{rounds}\n" if rounds > 1 else "")
                      + format_table(report))
    if rounds > 1:
        tables.append(median_ratios(report["rounds"], servers, concurrencies))
    table = "\n\n".join(tables)
    report["table"] = table
    out = work.root / "online" / "compare_online.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    log(f"wrote {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true",
                   help="Install llama-cpp-python's server extras into the llamacpp venv.")
    p.add_argument("--run", action="store_true", help="Benchmark every server.")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/sluice-peers"))
    p.add_argument("--model", default="reference",
                   help="HF model dir, or 'reference' (the benchmark reference model).")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"Comma-separated subset of {','.join(SERVERS)}.")
    p.add_argument("--num-prompts", type=int, default=64,
                   help="W1: 64 (smaller for a smoke run).")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)),
                   help="Comma-separated --max-concurrency values. [default: 16,64]")
    p.add_argument("--rounds", type=int, default=1,
                   help="Benchmark the servers this many times over, alternating, and print "
                   "the median sluice/server ratios as well. [default: 1]")
    p.add_argument("--dtype", choices=sorted(cp.GGUF_OUTTYPES), default="float32",
                   help="sluice's and vLLM-CPU's --dtype; llama.cpp serves the model's GGUF "
                   "at that dtype (converted when missing). [default: float32]")
    p.add_argument("--vllm-threads-bind", default="0-1",
                   help="VLLM_CPU_OMP_THREADS_BIND for vLLM-CPU ('' = unset: vLLM's 'auto').")
    a = p.parse_args(argv)
    servers = [x.strip() for x in a.servers.split(",") if x.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
    concurrencies = list(dict.fromkeys(int(x) for x in a.concurrency.split(",") if x.strip()))
    work = cp.Work(a.work_dir.resolve())
    work.dtype = a.dtype
    work.gguf = cp.gguf_path(work, a.model, a.dtype)
    atexit.register(_stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if not (a.setup or a.run):
        a.setup = a.run = True
    if a.setup:
        do_setup(work)
    if a.run:
        if "llama.cpp" in servers and not work.gguf.exists():
            from sluice.bench.reference_model import resolve_model
            cp.do_convert(work, resolve_model(a.model), a.dtype)
        do_run(work, servers, a.model, a.num_prompts, concurrencies, a.vllm_threads_bind or None,
               max(1, a.rounds))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
