"""`sluice serve [MODEL] [options]`: the OpenAI-compatible HTTP server.

    sluice serve ./my-model --port 8000 --kv-cache-memory 1GiB --max-model-len 2048

Startup runs in named stages, each logged with its duration:

    parse config -> detect hardware -> bind port -> resolve model (a hub id is downloaded or
    read from the cache, a .gguf file gets its HF-format sidecar) -> start engine (spawn the
    engine core, load weights, allocate the KV cache, warm up) -> serve

The port is bound (not yet listened on) before anything heavy starts, and the same socket is
handed to uvicorn, so "port in use" fails in milliseconds and nobody can take the port while the
model loads. A failing stage ends the process with one line `error: <what, values, fix>`
(exit 2 for a bad flag, 1 otherwise).

HTTP options as vLLM names them: --ssl-keyfile/--ssl-certfile serve HTTPS (uvicorn's TLS),
--root-path sets the ASGI root_path for a reverse proxy that strips a prefix,
--uvicorn-log-level sets uvicorn's loggers (default: --log-level), --chat-template replaces
the tokenizer's template (checked while parsing the config), --disable-log-requests /
--enable-log-requests and --max-log-len control the per-request log line (`AsyncLLM`).

SIGTERM or SIGINT drains: new requests (and /health) get 503 in OpenAI's shape, requests in
flight run on for up to --shutdown-timeout seconds, the rest are then ended with a 503-type
error (streams get an error event and `[DONE]`), and once their responses are out the server
stops, shuts the engine down and exits 0. A second signal ends that grace period at once (the
requests still running end with the error now, and the server stops the same way); a third
stops without waiting for anything. A signal that arrives while the server is still starting
(after the engine is up) is kept and drains it as soon as it serves. If the engine core
dies while serving, /health answers 503, in-flight requests fail with a 503-type error, and the
server stops and exits 1.

Data parallelism (vLLM's flags): `-dp N` runs N engine cores behind this one server (each
request to the least-loaded engine, with prefix affinity; see `sluice.frontend.dp_client`);
every engine's death is the engine's death (503, exit 1). `-dp N --data-parallel-rank R` runs
only engine R of such a group as its own server (vLLM's external load balancing): engine index
R in its outputs and metrics, KV-event ports shifted by R.

Multi-node (vLLM's flags): node 0 runs `sluice serve MODEL -tp 4 --nnodes 2 --node-rank 0
--master-addr IP0 --master-port P` (the server, the engine core and ranks 0-1); node 1 runs
`sluice serve MODEL -tp 4 --nnodes 2 --node-rank 1 --master-addr IP0 --master-port P
--headless`: no HTTP server and no engine, only ranks 2-3, driven by node 0's engine
(`sluice.executor.headless`). It runs the head's engine config (its own copy of the model when
it is given one) and exits when the head shuts down (0), goes silent or loses a rank (1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from typing import Any, Iterator

from sluice import event_loop
from sluice.errors import SluiceError

logger = logging.getLogger("sluice.serve")

WATCHDOG_INTERVAL_S = 0.5
CONNECTION_CLOSE_S = 3
"""After the drain, how long uvicorn waits for connections to close before cancelling them
(only idle keep-alive connections are left by then)."""
ENGINE_DEAD_GRACE_S = 1.5
"""After the engine dies, /health and new requests answer 503 this long before the server
stops (load balancers and clients see a clear error rather than a refused connection)."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sluice.config_sources import add_engine_args
    parser = subparsers.add_parser(
        "serve", help="Start the OpenAI-compatible HTTP server.",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, "
                    "/metrics, /version).")
    add_engine_args(parser, positional_model=True)
    parser.add_argument(
        "--headless", action="store_true",
        help="Run this node's ranks for the engine on node 0 (--nnodes > 1, --node-rank 1 or "
             "more): no API server, no engine core. Exits when node 0 shuts down.")
    return parser


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Log how long the startup stage `name` took (only when it succeeds)."""
    start = time.perf_counter()
    yield
    logger.info("Startup stage '%s' done in %.2f s", name, time.perf_counter() - start)


def hardware_summary() -> str:
    """One line: CPU model, usable/physical cores, RAM total/available."""
    from sluice.platform import host
    total, available = host.memory_bytes()
    physical = host.physical_cores()
    cores = f"{host.affinity_cpus()} usable CPUs" + (f" ({physical} physical cores)"
                                                     if physical else "")
    return (f"Hardware: {host.cpu_model()}, {cores}, RAM {total / 2**30:.1f} GiB total, "
            f"{available / 2**30:.1f} GiB available")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound (not listening) to host:port; raises SluiceError with one clear line.

    uvicorn starts listening on it once the engine is ready, so clients get "connection
    refused" (not a hang) while the model loads.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SluiceError(f"cannot resolve --host {host!r}: {e.strerror}; pass an IP address "
                          "such as 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise SluiceError(f"port {port} on {host} is in use; pass --port to choose "
                              "another") from None
        if e.errno == errno.EACCES:
            raise SluiceError(f"no permission to bind port {port} on {host} (ports below 1024 "
                              "need root); pass --port to choose another") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise SluiceError(f"address {host} is not available on this machine; pass --host "
                              "127.0.0.1 or 0.0.0.0") from None
        raise SluiceError(f"cannot bind {host}:{port}: {e.strerror}; pass --host/--port to "
                          "choose another address") from None
    return sock


def start_engine(config: Any) -> Any:
    """`AsyncLLM.from_config(config)`: spawn the engine core and wait until it is ready."""
    from sluice.frontend.async_llm import AsyncLLM
    return AsyncLLM.from_config(config)


class _Signals:
    """Owns SIGINT/SIGTERM from before the event loop starts until the server has stopped:
    every signal is recorded and passed on to the handler given by `route_to` (the server's
    `handle_exit`). A signal that arrives before the server runs (while the app is built and
    uvicorn starts, after the engine is up) is kept and handed over when `route_to` is called,
    so it drains the server as soon as it starts instead of being lost (uvicorn's own handlers,
    installed only inside `serve()`, are never installed: `DrainingServer.capture_signals`)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}
        self._target: Any = None

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if self._target is not None:
            self._target(signum, frame)

    def route_to(self, handler: Any) -> None:
        """Pass every signal to `handler(signum, frame)`, those already received first; None:
        only record them from now on."""
        self._target = handler
        for signum in list(self.received) if handler is not None else ():
            handler(signum, None)

    def __exit__(self, *exc: object) -> None:
        self._target = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _route_uvicorn_logs(level: str | None = None) -> None:
    """uvicorn's loggers write through sluice's handler and format (one log style), at
    `level` (--uvicorn-log-level; default: sluice's level)."""
    ours = logging.getLogger("sluice")
    uv = logging.getLogger("uvicorn")
    uv.handlers = list(ours.handlers)
    uv.setLevel(ours.level if level is None else uvicorn_level(level))
    uv.propagate = False


def uvicorn_level(name: str) -> int:
    """The logging level of a --uvicorn-log-level name ('trace' is uvicorn's level 5)."""
    return 5 if name == "trace" else getattr(logging, name.upper())


def check_tls_files(server: Any) -> None:
    """Raise ConfigError unless --ssl-keyfile/--ssl-certfile are both unset, or name readable
    files that hold a certificate and its key."""
    from sluice.errors import ConfigError
    keyfile, certfile = server.ssl_keyfile, server.ssl_certfile
    if keyfile is None and certfile is None:
        return
    if certfile is None:
        raise ConfigError("--ssl-keyfile: given without --ssl-certfile. Fix: pass the "
                          "certificate too (--ssl-certfile FILE), or drop --ssl-keyfile.")
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as e:
        raise ConfigError(f"--ssl-certfile/--ssl-keyfile: {e.filename or certfile} does not "
                          "exist. Fix: pass the path of a PEM file.") from None
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--ssl-certfile {certfile}"
                          + (f" / --ssl-keyfile {keyfile}" if keyfile else "")
                          + f": not a usable certificate and private key ({e}). Fix: pass PEM "
                          "files of a certificate and its matching key.") from None


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, but the first SIGTERM/SIGINT starts `drain()` (a coroutine run on
        the server's loop) and stops the server once it returns; a second signal during the
        drain calls `hurry()` (which ends the drain's grace period: the requests still in
        flight end with their error now, and the server stops cleanly); one more stops it at
        once, as uvicorn would. The signals come from `signals` (`_Signals`, installed before
        the loop started), not from handlers of uvicorn's own."""

        def __init__(self, config: Any, drain: Any, signals: _Signals, hurry: Any):
            super().__init__(config)
            self._drain = drain
            self._signals = signals
            self._hurry = hurry
            self._hurried = False
            self._loop: asyncio.AbstractEventLoop | None = None
            self.drain_signal: int | None = None
            self._drain_task: asyncio.Future[None] | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield   # `signals` routes them here (serve)

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            self._signals.route_to(self.handle_exit)
            try:
                await super().serve(sockets=sockets)
            finally:
                self._signals.route_to(None)   # the loop is about to close
            if self.force_exit and self.started and not self.lifespan.shutdown_event.is_set():
                # a third signal skipped uvicorn's lifespan shutdown, and the app's lifespan
                # would be cancelled at loop close with a traceback: end it here (it stops the
                # stats task and the offloader, at once)
                await self.lifespan.shutdown()

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self._loop is not None and not self.should_exit:
                if self.drain_signal is None:
                    self.drain_signal = sig
                    self._loop.call_soon_threadsafe(self._start_drain)
                    return
                if not self._hurried:
                    self._hurried = True
                    self._loop.call_soon_threadsafe(self._hurry)
                    return
            self.should_exit = self.force_exit = True

        def _start_drain(self) -> None:
            async def drain_then_exit() -> None:
                try:
                    await self._drain()
                finally:
                    self.should_exit = True

            self._drain_task = asyncio.ensure_future(drain_then_exit())

    return DrainingServer


async def serve_engine(engine: Any, config: Any, sock: socket.socket, lora_registry: Any,
                       signals: _Signals) -> int:
    """Serve `engine` on the bound `sock` until a signal (returns 0); raises SluiceError when
    the engine dies (after answering 503 for `ENGINE_DEAD_GRACE_S`). `lora_registry`: the
    adapters checked at startup (None: built by `build_app` when LoRA is on). `signals`: the
    SIGINT/SIGTERM recorder installed before the loop started, whose signals (including any
    received already) drive the shutdown."""
    import uvicorn

    from sluice.entrypoints.openai.app import build_app

    app = build_app(engine, config, lora_registry)
    state = app.state.sluice
    obs = config.observability
    srv = config.server
    uv_level = srv.uvicorn_log_level or obs.log_level
    _route_uvicorn_logs(uv_level)
    uv_config = uvicorn.Config(app, log_config=None, log_level=uvicorn_level(uv_level),
                               lifespan="on", access_log=not obs.disable_log_requests,
                               timeout_graceful_shutdown=CONNECTION_CLOSE_S,
                               timeout_keep_alive=5, root_path=srv.root_path or "",
                               ssl_keyfile=srv.ssl_keyfile, ssl_certfile=srv.ssl_certfile)
    grace_s = config.server.shutdown_timeout

    async def drain() -> None:
        logger.info("Shutting down: new requests get 503; waiting up to %g s for %d in-flight "
                    "sequence(s)", grace_s, state.num_in_flight)
        ended = await state.drain(grace_s)
        if ended:
            logger.info("Ended %d request(s) still running after %g s with a 503 error",
                        ended, grace_s)

    def hurry() -> None:
        logger.info("Second signal: ending the %d in-flight sequence(s) now", state.num_in_flight)
        state.cut_grace()

    server = _draining_server_class()(uv_config, drain, signals, hurry)
    death: list[str] = []

    async def watchdog() -> None:
        while not server.should_exit:
            if engine.is_dead:
                try:
                    await engine.check_health()
                    cause = "the engine reported itself dead"
                except Exception as e:  # noqa: BLE001 - we only want its message
                    cause = str(e)
                death.append(cause)
                logger.error("The engine core died; failing in-flight requests, answering 503 "
                             "for %.1f s, then stopping the server.", ENGINE_DEAD_GRACE_S)
                await asyncio.sleep(ENGINE_DEAD_GRACE_S)
                server.should_exit = True
                return
            await asyncio.sleep(WATCHDOG_INTERVAL_S)

    host, port = sock.getsockname()[:2]
    scheme = "https" if srv.ssl_certfile else "http"
    engines = getattr(engine, "engine_indexes", (0,))
    logger.info("Serving model '%s' on %s://%s:%d (max_model_len %d%s)",
                engine.ready.model_name, scheme, host, port, engine.ready.max_model_len,
                f", {len(engines)} data-parallel engines" if len(engines) > 1 else "")
    task = asyncio.create_task(watchdog())
    try:
        await server.serve(sockets=[sock])
    finally:
        task.cancel()
    if server.drain_signal is not None:
        logger.info("Shut down on %s.", signal.Signals(server.drain_signal).name)
    if death:
        raise SluiceError(f"the engine core died while serving; the server stopped. Cause: "
                          f"{death[0]}")
    return 0


def run(args: argparse.Namespace) -> int:
    from sluice.config_sources import engine_config_from_args, flat_config
    from sluice.entrypoints.cli import configure_logging

    with stage("parse config"):
        config = engine_config_from_args(args)
        configure_logging(config.observability.log_level)
        logger.debug("Config: %s", flat_config(config))
        check_tls_files(config.server)
        if config.model.chat_template is not None:
            from sluice.frontend.tokenizer import resolve_chat_template
            resolve_chat_template(config.model.chat_template)
        from sluice.entrypoints.openai.tools import server_tool_parser
        server_tool_parser(config.server)  # a bad --tool-call-parser / plugin fails here
    if getattr(args, "headless", False) or config.parallel.node_rank > 0:
        return run_headless_node(config, headless=getattr(args, "headless", False))
    with stage("detect hardware"):
        logger.info(hardware_summary())
    with stage("bind port"):
        sock = bind_socket(config.server.host, config.server.port)
    try:
        with stage("resolve model"):
            from sluice.hf_config import load_model_spec
            from sluice.model_spec.resolve import resolve_model_config
            given = config.model.model
            config = resolve_model_config(config)
            spec = load_model_spec(config.model.model)
            where = "" if given == config.model.model else f" (from {config.model.model})"
            logger.info("Model %s%s: %s", given, where, spec.architecture)
        lora_registry = None
        if config.lora.enable_lora or config.lora.lora_modules:
            with stage("check LoRA adapters"):   # a bad --lora-modules entry fails here
                from pathlib import Path

                from sluice.lora.registry import registry_from_config
                lora_registry = registry_from_config(
                    config, config.model.served_model_name or (Path(spec.path).name,))
        engines = config.parallel.engine_indexes
        if config.parallel.data_parallel_rank is not None:
            logger.info("Data-parallel rank %d of %d (external load balancing): this server "
                        "runs engine %d only", engines[0], config.parallel.data_parallel_size,
                        engines[0])
        with stage("start engine" if len(engines) == 1 else f"start {len(engines)} engines"):
            engine = start_engine(config)
        for name, seconds in (getattr(engine.ready, "startup_seconds", None) or {}).items():
            logger.info("  engine stage '%s': %.2f s", name, seconds)
        try:
            with _Signals() as signals:
                event_loop.run(serve_engine(engine, config, sock, lora_registry, signals))
        finally:
            engine.shutdown()
    finally:
        sock.close()
    return 0


def run_headless_node(config: Any, headless: bool) -> int:
    """`sluice serve --headless`: this node's ranks, no server (see the module docstring)."""
    from sluice.config_sources import default_model_path
    from sluice.errors import ConfigError
    from sluice.executor.headless import run_headless
    par = config.parallel
    if not headless:
        raise ConfigError(f"--node-rank {par.node_rank}: only node 0 runs the API server and "
                          "the engine. Fix: add --headless to run this node's ranks.")
    if par.nnodes < 2 or par.node_rank == 0:
        raise ConfigError(f"--headless: a headless node runs ranks for node 0's engine, so it "
                          f"needs --nnodes 2 or more and --node-rank 1 or more (got --nnodes "
                          f"{par.nnodes} --node-rank {par.node_rank}). Fix: pass both, or drop "
                          "--headless on node 0.")
    with stage("detect hardware"):
        logger.info(hardware_summary())
    local_model = None
    if config.model.model != str(default_model_path()):   # given here: this machine's copy
        with stage("resolve model"):
            from sluice.model_spec.resolve import resolve_model_config
            local_model = resolve_model_config(config).model.model
    return run_headless(config, local_model)
