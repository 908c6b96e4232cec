"""`sluice router`: an OpenAI-compatible front process over `sluice serve` workers.

    sluice router --port 8000 --router-mode kv \\
        --worker http://127.0.0.1:8001,tcp://127.0.0.1:5557,tcp://127.0.0.1:5558 \\
        --worker http://127.0.0.1:8002,tcp://127.0.0.1:5567,tcp://127.0.0.1:5568

Each `--worker` is URL[,KV_EVENTS_ENDPOINT[,KV_REPLAY_ENDPOINT]]: the worker's HTTP base URL and,
for kv routing, the PUB (and replay) endpoints its `--kv-events-config` publishes on (connect
form: a host, not `*`). More workers can register while it runs: POST /workers. Torch-free.

Disaggregated mode (`disagg.py`): `--prefill SPEC` and `--decode SPEC` (same form) register
workers by role, started with --kv-transfer-config kv_producer / kv_consumer:

    sluice router --port 8000 --prefill http://127.0.0.1:8001 --decode http://127.0.0.1:8002
"""

from __future__ import annotations

import argparse
import logging

from sluice.errors import ConfigError

logger = logging.getLogger("sluice.router")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sluice.entrypoints.router.routing import MODES
    parser = subparsers.add_parser(
        "router", help="Route OpenAI requests over several sluice serve workers.",
        description="An OpenAI-compatible router (aggregated mode): proxies /v1/completions "
                    "and /v1/chat/completions to registered workers, chosen by KV-cache "
                    "overlap and load (kv), least load, or round robin; a canary health check "
                    "removes dead workers and re-adds them when they recover.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default: "
                        "127.0.0.1; 0.0.0.0 for every interface).")
    parser.add_argument("--port", type=int, default=8000, help="Port to bind (default 8000).")
    parser.add_argument("--worker", action="append", default=[], metavar="URL[,EV[,REPLAY]]",
                        help="A worker: its base URL, optionally followed by its KV events "
                             "endpoint and replay endpoint, comma separated. Repeat per worker.")
    parser.add_argument("--prefill", action="append", default=[], metavar="URL[,EV[,REPLAY]]",
                        help="Disaggregated mode: a prefill worker (kv_producer), as --worker. "
                             "Repeat per worker; needs --decode too.")
    parser.add_argument("--decode", action="append", default=[], metavar="URL[,EV[,REPLAY]]",
                        help="Disaggregated mode: a decode worker (kv_consumer), as --worker. "
                             "Repeat per worker; needs --prefill too.")
    parser.add_argument("--router-mode", default="kv", choices=MODES,
                        help="kv: fewest uncached prompt blocks plus load (default); "
                             "least-load: fewest requests in flight; round-robin: in turn.")
    parser.add_argument("--kv-load-weight", type=float, default=1.0,
                        help="kv mode: cost of one in-flight request on a worker, in uncached "
                             "prompt blocks (default 1.0).")
    parser.add_argument("--max-imbalance", type=int, default=4,
                        help="kv mode: only workers with at most this many more in-flight "
                             "requests than the least-loaded one are candidates (default 4).")
    parser.add_argument("--health-check-interval", type=float, default=2.0,
                        help="Seconds between canary GET /health rounds (default 2).")
    parser.add_argument("--health-check-timeout", type=float, default=2.0,
                        help="Seconds a /health probe may take (default 2).")
    parser.add_argument("--health-failure-threshold", type=int, default=2,
                        help="Failed probes in a row that remove a worker (default 2).")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="Seconds a worker may take between bytes of a response "
                             "(default 600).")
    parser.add_argument("--api-key", default=None,
                        help="Require 'Authorization: Bearer KEY' on every route but /health "
                             "(as sluice serve --api-key); the header is forwarded to the "
                             "workers, so workers started with the same key accept it.")
    parser.add_argument("--public-metrics", action="store_true",
                        help="With --api-key: serve /metrics without the key.")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    return parser


def _check(args: argparse.Namespace) -> list[tuple[str, str | None, str | None, str]]:
    """The workers as (url, events, replay, role); ConfigError listing every problem."""
    from sluice.entrypoints.router.workers import parse_worker_spec
    problems, workers = [], []
    for role, specs in (("both", args.worker), ("prefill", args.prefill),
                        ("decode", args.decode)):
        for spec in specs:
            try:
                workers.append((*parse_worker_spec(spec), role))
            except ValueError as e:
                problems.append(str(e).replace("--worker", f"--{role}" if role != "both"
                                               else "--worker"))
    if bool(args.prefill) != bool(args.decode):
        given, missing = ("--prefill", "--decode") if args.prefill else ("--decode", "--prefill")
        problems.append(f"{given} without {missing}: disaggregated mode needs at least one "
                        "prefill and one decode worker.")
    for flag, value, low in (("--port", args.port, 0), ("--max-imbalance", args.max_imbalance, 0),
                             ("--health-failure-threshold", args.health_failure_threshold, 1)):
        if value < low or (flag == "--port" and value > 65535):
            problems.append(f"{flag}: {value} is out of range.")
    for flag, value in (("--health-check-interval", args.health_check_interval),
                        ("--health-check-timeout", args.health_check_timeout),
                        ("--request-timeout", args.request_timeout)):
        if not value > 0:
            problems.append(f"{flag}: {value} must be > 0.")
    if args.kv_load_weight < 0:
        problems.append(f"--kv-load-weight: {args.kv_load_weight} must be >= 0.")
    if problems:
        raise ConfigError(problems)
    return workers


def run(args: argparse.Namespace) -> int:
    import httpx
    import uvicorn

    from sluice import event_loop
    from sluice.entrypoints.cli import configure_logging
    from sluice.entrypoints.router.app import RouterState, build_app
    from sluice.entrypoints.router.routing import Router
    from sluice.entrypoints.router.workers import HealthChecker, WorkerPool
    from sluice.entrypoints.serve_cmd import _route_uvicorn_logs, bind_socket

    configure_logging(args.log_level)
    workers = _check(args)
    sock = bind_socket(args.host, args.port)
    pool = WorkerPool()
    for url, events, replay, role in workers:
        pool.add(url, events, replay, role)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(args.request_timeout, connect=5.0), trust_env=False,
        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))
    state = RouterState(
        pool=pool, client=client,
        router=Router(args.router_mode, args.kv_load_weight, args.max_imbalance),
        health=HealthChecker(pool, client, args.health_check_interval,
                             args.health_check_timeout, args.health_failure_threshold),
        disaggregated=bool(args.prefill), api_key=args.api_key,
        public_metrics=args.public_metrics)
    _route_uvicorn_logs("warning" if args.log_level == "info" else args.log_level)
    config = uvicorn.Config(build_app(state), log_config=None, access_log=False,
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    logger.info("router on http://%s:%d, mode %s%s, %d worker(s): %s", host, port,
                args.router_mode, ", disaggregated prefill/decode" if args.prefill else "",
                len(pool), ", ".join(w.url for w in pool) or "none yet "
                "(POST /workers)")
    try:
        event_loop.run(server.serve(sockets=[sock]))
    finally:
        pool.close()
    return 0
