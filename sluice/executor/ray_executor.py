"""The Ray executor (`--distributed-executor-backend ray`): one Ray actor per rank, placed by a
placement group, driven through the same `Executor` methods as the `mp` executor.

    engine core ── RayExecutor ── actor.call.remote(frames) ──► RankActor rank 0 ─┐ gloo / NCCL
                       │      ◄── reply frames (output rank) ──┘                  │ collectives
                       └──────── actor.call.remote(frames) ──► RankActor rank 1 ──┘
                                 (placement group: one bundle per rank, PACK)

For users who already run a Ray cluster: the executor connects to the one at $RAY_ADDRESS
(or the one this process already joined with `ray.init`), else starts a local Ray instance
(and stops it at shutdown). The placement group holds one bundle per rank: {"CPU": threads per
rank} on CPU, {"GPU": 1, "CPU": 1} on CUDA (`--device auto` picks GPU bundles when the
cluster has GPUs). Rank 0's actor picks the rendezvous (its node's address and a free port).

Each actor is worker_proc's `_WorkerServer` (the very code a `mp` worker process runs): a call
is the wire's frames (`wire.CallCodec`, msgspec, no pickle of our objects) and the answer is
the reply frames, or None from a rank that does not answer (a step's result comes from the
output rank only). Every call waits for every rank, so a failure anywhere surfaces; KV memory
is the minimum over ranks. Supervision: each actor also runs a `watch` call that returns only
at shutdown (its own concurrency group), so an actor that dies is seen at once by `ray.wait`
(during a call, or in `check_health` between steps) and raised as `WorkerDiedError` (an
`EngineDeadError`); a call that outlives $SLUICE_EXECUTE_MODEL_TIMEOUT is `WorkerHungError`.

`ray` is optional (`pip install sluice[ray]`) and imported only here, only when this executor
is chosen. No torch in this process.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any

from sluice.config import EngineConfig
from sluice.config_sources import ENGINE_STARTUP_TIMEOUT_ENV, EXECUTE_MODEL_TIMEOUT_ENV
from sluice.errors import ConfigError, EngineDeadError
from sluice.executor.ranked import RankedExecutor
from sluice.executor.multiproc import (DEFAULT_EXECUTE_MODEL_TIMEOUT_S, DEFAULT_SETUP_TIMEOUT_S,
                                       WorkerDiedError, WorkerHungError, _worker_error,
                                       env_seconds, threads_per_rank)
from sluice.executor.wire import CallCodec, ReplyCodec, ReplyType, StepCall, WorkerMethod
from sluice.executor.worker_proc import WorkerArgs, _WorkerServer, setup_logging
from sluice.hf_config import ModelSpec
from sluice.step import ModelRunnerOutput, SchedulerOutput
from sluice.structured_output.output import GrammarOutput

logger = logging.getLogger(__name__)

_SHUTDOWN_GRACE_S = 5.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--distributed-executor-backend ray: the 'ray' package is not "
                          "installed. Fix: pip install sluice[ray] (or pip install ray), or use "
                          "--distributed-executor-backend mp.") from None
    return ray


class RankActor:
    """One rank inside a Ray actor (wrapped by `ray.remote` at runtime, so that importing this
    module needs no Ray)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.server: _WorkerServer | None = None
        self._stopped = threading.Event()
        self._call_codec, self._reply_codec = CallCodec(), ReplyCodec()

    def rendezvous(self) -> str:
        """`tcp://<this node's address>:<a free port>`, for the ranks' process group."""
        import socket

        import ray
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return f"tcp://{ip}:{s.getsockname()[1]}"

    def start(self, args: WorkerArgs) -> int:
        setup_logging(args)
        self.server = _WorkerServer(args)
        return os.getpid()

    def call(self, frames: list[bytes]) -> list[bytes] | None:
        """One wire call in, its reply frames out (None: this rank does not answer)."""
        assert self.server is not None, "call before start"
        method, call_id, arg = self._call_codec.decode(frames)
        kind, value = self.server.answer(method, arg)
        if kind is None:
            return None
        return self._reply_codec.encode(kind, self.rank, call_id, value)

    def watch(self) -> None:
        """Returns at shutdown only: its ref failing means this actor died."""
        self._stopped.wait()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        self._stopped.set()


class RayExecutor(RankedExecutor):
    def __init__(self, config: EngineConfig, spec: ModelSpec, max_model_len: int):
        ray = self._ray = import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        par = config.parallel
        self.world_size, self.output_rank = par.world_size, par.output_rank
        self.execute_timeout_s = env_seconds(EXECUTE_MODEL_TIMEOUT_ENV,
                                             DEFAULT_EXECUTE_MODEL_TIMEOUT_S)
        self.setup_timeout_s = env_seconds(ENGINE_STARTUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S)
        self._call_ids = itertools.count()
        self._call_codec, self._reply_codec = CallCodec(), ReplyCodec()
        self._lock = threading.Lock()
        self._closed = self._failed = False
        self._deferred: SchedulerOutput | None = None   # execute_model → sample_tokens
        self._owns_ray = not ray.is_initialized()
        self.actors: list[Any] = []
        self.pids: list[int] = []
        self._watch: dict[Any, int] = {}   # watch ref -> rank
        self._pg = None
        try:
            if self._owns_ray:
                address = os.environ.get("RAY_ADDRESS") or None
                ray.init(address=address) if address else ray.init(include_dashboard=False)
            bundle = self._bundle(config)
            self._pg = placement_group([dict(bundle) for _ in range(self.world_size)],
                                       strategy="PACK")
            self._wait_placement(bundle)
            remote = ray.remote(concurrency_groups={"watch": 1})(RankActor)
            for rank in range(self.world_size):
                self.actors.append(remote.options(
                    num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                    max_restarts=0, max_task_retries=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._pg, placement_group_bundle_index=rank),
                ).remote(rank))
            init_method = self._get(self.actors[0].rendezvous.remote(), "placing rank 0")
            threads = int(bundle["CPU"]) if "GPU" not in bundle else None
            self.pids = self._get([a.start.remote(WorkerArgs(
                config=config, spec=spec, max_model_len=max_model_len,
                tp_size=par.tensor_parallel_size, pp_size=par.pipeline_parallel_size,
                rank=rank, local_rank=0, num_threads=threads, call_address="",
                reply_address="", init_method=init_method, ipc_dir="", parent_pid=0,
                pdeathsig=False)) for rank, a in enumerate(self.actors)], "starting")
            self._watch = {a.watch.options(concurrency_group="watch").remote(): rank
                           for rank, a in enumerate(self.actors)}
            self._call_all(WorkerMethod.INIT)
        except BaseException:
            self._failed = True
            self.shutdown()
            raise
        logger.info("%d Ray actors ready (pids %s, bundles %s), rendezvous %s",
                    self.world_size, ", ".join(map(str, self.pids)), bundle, init_method)

    def _bundle(self, config: EngineConfig) -> dict[str, float]:
        """One rank's resources: GPU bundles on CUDA (and on 'auto' when the cluster has
        GPUs), CPU bundles of this rank's share of --num-threads otherwise."""
        device = config.device.device
        if device == "auto":
            has_gpus = self._ray.cluster_resources().get("GPU", 0) >= self.world_size
            device = "cuda" if has_gpus else "cpu"
        if device == "cuda":
            return {"GPU": 1.0, "CPU": 1.0}
        return {"CPU": float(threads_per_rank(config))}

    def _wait_placement(self, bundle: dict[str, float]) -> None:
        ray = self._ray
        ready = self._pg.ready()
        if ray.wait([ready], timeout=10.0)[0]:
            return
        logger.warning("Waiting for the Ray cluster to place %d bundles of %s (available now: "
                       "%s)", self.world_size, bundle, ray.available_resources())
        if not ray.wait([ready], timeout=self.setup_timeout_s)[0]:
            raise ConfigError(
                f"--distributed-executor-backend ray: the Ray cluster could not place "
                f"{self.world_size} bundles of {bundle} within {self.setup_timeout_s:g}s "
                f"(available: {ray.available_resources()}). Fix: add resources to the "
                "cluster, or lower --tensor-parallel-size / --num-threads.")

    # ---- the Executor's methods --------------------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput, *,
                      grammar_follows: bool = True) -> None:
        """Kept for `sample_tokens`, which sends the whole step as one STEP call (Ray actor
        calls are not overlapped with the engine core's bitmask here: one call per step)."""
        assert self._deferred is None, "execute_model twice without sample_tokens"
        self._deferred = scheduler_output

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        deferred, self._deferred = self._deferred, None
        assert deferred is not None, "sample_tokens without execute_model"
        answers = self._call(WorkerMethod.STEP, StepCall(deferred, grammar_output),
                             self.execute_timeout_s)
        return answers[self.output_rank]

    def check_health(self) -> None:
        """Raise `WorkerDiedError` if an actor has died."""
        if self._closed:
            return
        done, _ = self._ray.wait(list(self._watch), num_returns=1, timeout=0)
        if done:
            self._raise_died(self._watch[done[0]], done[0], "between steps")

    # ---- calls ---------------------------------------------------------------------------------

    def _call_all(self, method: WorkerMethod, arg: Any = None) -> list[int]:
        answers = self._call(method, arg, self.setup_timeout_s)
        return [answers[rank] for rank in range(self.world_size)]

    def _call(self, method: WorkerMethod, arg: Any, timeout_s: float) -> dict[int, Any]:
        """Send one call to every actor and wait for all of them (or a death, a failure, the
        timeout); the answers by rank (ranks that do not answer are left out)."""
        if self._closed:
            raise EngineDeadError("The executor was shut down.")
        ray = self._ray
        frames = self._call_codec.encode(method, next(self._call_ids), arg)
        pending = {a.call.remote(frames): rank for rank, a in enumerate(self.actors)}
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        doing = f"running {method.name.lower()}"
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._failed = True
                raise WorkerHungError(
                    f"Worker rank(s) {', '.join(map(str, sorted(pending.values())))} (Ray "
                    f"actors) did not answer {method.name.lower()} within {timeout_s:g}s; the "
                    "engine is considered hung and stops.")
            done, _ = ray.wait([*pending, *self._watch], num_returns=1, timeout=remaining)
            for ref in done:
                if ref in self._watch:
                    self._raise_died(self._watch[ref], ref, doing)
                rank = pending.pop(ref)
                try:
                    reply = ray.get(ref)
                except ray.exceptions.RayActorError:
                    self._raise_died(rank, ref, doing)
                if reply is None:
                    continue
                kind, _, _, value = self._reply_codec.decode(reply)
                if kind == ReplyType.FAILED:
                    self._failed = True
                    self._raise_if_any_died(doing)
                    logger.error("worker rank %d failed in %s:\n%s", rank,
                                 method.name.lower(), value.traceback)
                    raise _worker_error(value, f" (worker rank {rank}, a Ray actor)")
                answers[rank] = value
        return answers

    def _raise_if_any_died(self, doing: str) -> None:
        """A rank failed: if a peer died meanwhile (its collectives then fail), say so."""
        done, _ = self._ray.wait(list(self._watch), num_returns=1, timeout=0.5)
        if done:
            self._raise_died(self._watch[done[0]], done[0], doing)

    def _raise_died(self, rank: int, ref: Any, doing: str) -> None:
        self._failed = True
        try:
            self._ray.get(ref, timeout=0)
            cause = "it returned unexpectedly"
        except Exception as e:  # noqa: BLE001 - its message is the cause
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        pid = f" (pid {self.pids[rank]})" if rank < len(self.pids) else ""
        raise WorkerDiedError(
            f"The Ray actor of worker rank {rank}{pid} died "
            f"while {doing}; the engine cannot continue and in-flight requests are lost. "
            f"Ray says: {cause}")

    def _get(self, refs: Any, doing: str) -> Any:
        try:
            return self._ray.get(refs, timeout=self.setup_timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            self._failed = True
            raise WorkerHungError(f"Ray actors did not answer within {self.setup_timeout_s:g}s "
                                  f"while {doing}.") from None
        except self._ray.exceptions.RayActorError as e:
            self._failed = True
            raise WorkerDiedError(f"A Ray actor died while {doing}: {e}") from None

    # ---- shutdown ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Leave the process groups, kill the actors, remove the placement group, and stop Ray
        if this executor started it. Idempotent and thread-safe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        ray = self._ray
        try:
            if self.actors:
                refs = [a.shutdown.remote() for a in self.actors]
                ray.wait(refs, num_returns=len(refs),
                         timeout=0.5 if self._failed else _SHUTDOWN_GRACE_S)
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            if self._pg is not None:
                from ray.util.placement_group import remove_placement_group
                remove_placement_group(self._pg)
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            logger.debug("releasing the Ray actors failed", exc_info=True)
        finally:
            self.actors = []
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
