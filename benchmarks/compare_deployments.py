"""Deployments side by side (issue 16): one engine, `-dp 2`, router + 2 workers (aggregated,
kv mode), and disaggregated 1 prefill + 1 decode behind the router, each loaded by
`sluice bench serve` with the same workload on the demo model.

    python benchmarks/compare_deployments.py                  # all four, concurrency 16
    python benchmarks/compare_deployments.py --rounds 2       # alternating rounds (A B C D A B C D)
    python benchmarks/compare_deployments.py --only single,disagg --num-prompts 16   # quick

Each deployment is started on 127.0.0.1 (free ports; workers split the cores with
--num-threads), waited for (GET /health), warmed up with one request, loaded with random
token-id prompts (`--input-len`, `--output-len`, seed 0, EOS ignored, greedy, streamed) at
`--concurrency`, then stopped (its process groups: SIGTERM, then SIGKILL). One table: request
and output-token throughput, TTFT and ITL p50/p99; for the disaggregated deployment also the
KV transfer rate (bytes / summed per-request pull time, from the decode worker's
vllm:kv_transfer_* series) and the mean per-request pull latency. JSON reports and logs go to
`--work-dir` (default a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sluice" / "assets" / "demo_model"
DEPLOYMENTS = ("single", "dp2", "agg", "disagg")
LAUNCH = "import sys; from sluice.entrypoints.cli import main; sys.exit(main())"


def log(msg: str) -> None:
    print(f"[compare_deployments {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_ports(n: int) -> list[int]:
    sys.path.insert(0, str(REPO))
    from sluice.platform.host import free_ports as _free
    return list(_free("127.0.0.1", n))


class Deployment:
    """The processes of one deployment (each in its own process group)."""

    def __init__(self, name: str, logs: Path):
        self.name, self.logs, self.procs = name, logs, []
        self.url = ""
        self.decode_url = ""     # disagg: where the transfer metrics are

    def start(self, label: str, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
        out = open(self.logs / f"{self.name}-{label}.log", "w")
        self.procs.append(subprocess.Popen([sys.executable, "-c", LAUNCH, *args], stdout=out,
                                           stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))

    def wait(self, url: str, timeout_s: float = 600) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{self.name}: a process exited; see {self.logs}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: {url} not healthy after {timeout_s}s")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def launch(name: str, logs: Path, threads: int) -> Deployment:
    d = Deployment(name, logs)
    common = ("--kv-cache-memory", "256MiB", "--max-model-len", "1024")
    half = str(max(1, threads // 2))
    ports = free_ports(8)
    url = lambda port: f"http://127.0.0.1:{port}"  # noqa: E731
    if name == "single":
        d.start("serve", "serve", "--port", str(ports[0]), "--num-threads", str(threads),
                *common)
        d.url = url(ports[0])
    elif name == "dp2":
        d.start("serve", "serve", "--port", str(ports[0]), "-dp", "2", "--num-threads",
                str(threads), *common)
        d.url = url(ports[0])
    elif name == "agg":
        specs = []
        for i in range(2):
            ev, replay = ports[3 + 2 * i], ports[4 + 2 * i]
            cfg = {"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{ev}",
                   "replay_endpoint": f"tcp://127.0.0.1:{replay}"}
            d.start(f"worker{i}", "serve", "--port", str(ports[1 + i]), "--num-threads", half,
                    "--kv-events-config", json.dumps(cfg), *common)
            specs += ["--worker", f"{url(ports[1 + i])},tcp://127.0.0.1:{ev},"
                                  f"tcp://127.0.0.1:{replay}"]
        for i in range(2):
            d.wait(url(ports[1 + i]))
        d.start("router", "router", "--port", str(ports[0]), "--router-mode", "kv", *specs)
        d.url = url(ports[0])
    elif name == "disagg":
        for i, role in enumerate(("kv_producer", "kv_consumer")):
            cfg = {"kv_connector": "ZmqPullConnector", "kv_role": role, "kv_ip": "127.0.0.1",
                   "kv_port": ports[3]}
            d.start(role, "serve", "--port", str(ports[1 + i]), "--num-threads", half,
                    "--kv-transfer-config", json.dumps(cfg), *common)
        for i in range(2):
            d.wait(url(ports[1 + i]))
        d.start("router", "router", "--port", str(ports[0]), "--router-mode", "least-load",
                "--prefill", url(ports[1]), "--decode", url(ports[2]))
        d.url, d.decode_url = url(ports[0]), url(ports[2])
    d.wait(d.url)
    return d


def scrape(url: str) -> dict[str, float]:
    """Summed vllm:kv_transfer_* series of a worker."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name in ("vllm:kv_transfer_bytes_total", "vllm:kv_transfer_failures_total",
                 "vllm:kv_transfer_latency_seconds_sum",
                 "vllm:kv_transfer_latency_seconds_count"):
        out[name] = sum(float(m.group(1)) for m in
                        re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))
    return out


def bench(d: Deployment, args: argparse.Namespace, vocab: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    warm = ["--base-url", d.url, "--vocab-size", str(vocab), "--num-prompts", "2",
            "--input-len", "16", "--output-len", "4", "--disable-tqdm"]
    subprocess.run([sys.executable, "-c", LAUNCH, "bench", "serve", *warm], env=env,
                   check=True, capture_output=True, timeout=600)
    before = scrape(d.decode_url) if d.decode_url else {}
    cmd = ["bench", "serve", "--base-url", d.url, "--vocab-size", str(vocab),
           "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
           "--range-ratio", "0.5", "--output-len", str(args.output_len),
           "--max-concurrency", str(args.concurrency), "--seed", "0", "--disable-tqdm",
           "--json", str(out)]
    subprocess.run([sys.executable, "-c", LAUNCH, *cmd], env=env, check=True, timeout=7200)
    report = json.loads(out.read_text())
    report = report.get("summary", report)
    if d.decode_url:
        after = scrape(d.decode_url)
        delta = {k: after[k] - before.get(k, 0.0) for k in after}
        seconds = delta["vllm:kv_transfer_latency_seconds_sum"]
        count = delta["vllm:kv_transfer_latency_seconds_count"]
        report["kv_bytes"] = delta["vllm:kv_transfer_bytes_total"]
        report["kv_failures"] = delta["vllm:kv_transfer_failures_total"]
        report["kv_mb_per_s"] = report["kv_bytes"] / seconds / 1e6 if seconds else 0.0
        report["kv_ms_per_request"] = 1000 * seconds / count if count else 0.0
    return report


def table(rows: list[tuple[str, dict]]) -> str:
    head = (f"{'deployment':<10} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9}"
            f" {'ITL p50':>8} {'ITL p99':>8}  KV transfer")
    lines = [head, "-" * len(head)]
    for name, r in rows:
        kv = ""
        if "kv_mb_per_s" in r:
            kv = (f"{r['kv_mb_per_s']:.0f} MB/s, {r['kv_ms_per_request']:.1f} ms/request, "
                  f"{r['kv_bytes'] / 1e6:.0f} MB, {r['kv_failures']:.0f} failed")
        lines.append(f"{name:<10} {r['request_throughput']:>7.2f} {r['output_throughput']:>10.1f}"
                     f" {r['median_ttft_ms']:>9.0f} {r['p99_ttft_ms']:>9.0f}"
                     f" {r['median_itl_ms']:>8.1f} {r['p99_itl_ms']:>8.1f}  {kv}")
    lines.append("(latencies in ms; failed requests: "
                 + ", ".join(f"{n} {r['failed']}" for n, r in rows) + ")")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEPLOYMENTS),
                        help=f"Comma-separated subset of {', '.join(DEPLOYMENTS)}.")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(DEPLOYMENTS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sluice-deployments-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    vocab = json.loads((DEMO / "config.json").read_text())["vocab_size"]
    rows: list[tuple[str, dict]] = []
    for rnd in range(args.rounds):
        for name in names:
            log(f"round {rnd + 1}: starting {name}")
            d = None
            try:
                d = launch(name, work / "logs", args.threads)
                report = bench(d, args, vocab, work / f"bench-{name}-r{rnd + 1}.json")
                rows.append((name if args.rounds == 1 else f"{name}#{rnd + 1}", report))
            except Exception as e:  # noqa: BLE001 - reported, the others still run
                log(f"{name} failed: {e}")
            finally:
                if d is not None:
                    d.stop()
    print(f"\nconcurrency {args.concurrency}, {args.num_prompts} prompts of "
          f"~{args.input_len} tokens, {args.output_len} output tokens, demo model, "
          f"{args.threads} threads in all\n")
    print(table(rows))
    (work / "compare_deployments.json").write_text(json.dumps(dict(rows), indent=2) + "\n")
    log(f"reports in {work}")
    return 0 if len(rows) == len(names) * args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
