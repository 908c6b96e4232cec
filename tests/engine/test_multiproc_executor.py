"""The `mp` executor: one worker process per rank, typed messages over ZeroMQ, supervision.

Greedy parity (mp with one rank == uni; TP=2 == TP=1), a worker killed mid-generation or while
idle becomes a clear engine-dead error in bounded time, the engine core killed takes its workers
with it, and no worker process, IPC file or /dev/shm entry is left behind on any of these paths.
Every rank runs one torch thread (--num-threads is split over the ranks).
"""

from __future__ import annotations

import glob
import os
import signal
import tempfile
import time

import psutil
import pytest

from sluice.errors import ConfigError, EngineDeadError
from sluice.executor.worker_proc import process_name
from sluice.frontend.sync_client import SyncMPClient
from sluice.frontend.llm import LLM
from sluice.messages import EngineCoreRequest
from sluice.sampling_params import SamplingParams

from _sluice_engine_helpers import engine_children, make_config

pytestmark = pytest.mark.timeout(240)

PROMPTS = ["Hello world", "The quick brown fox", "def main():", "Python is a language"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def leftovers() -> tuple[set[str], set[str]]:
    """The executor's IPC directories and the /dev/shm entries that exist now."""
    ipc = set(glob.glob(os.path.join(tempfile.gettempdir(), "sluice-exec-*")))
    ipc |= set(glob.glob("/tmp/sluice-exec-*"))
    return ipc, set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def workers_of(engine_pid: int, world_size: int = 2) -> list[psutil.Process]:
    """The worker processes of an engine-core process, in rank order (found by the process
    name each rank sets)."""
    by_name = {c.name(): c for c in psutil.Process(engine_pid).children()}
    workers = [by_name.get(process_name(rank)) for rank in range(world_size)]
    assert all(workers), f"worker processes not found: {sorted(by_name)}"
    return workers


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until every pid has exited (or is a zombie); return the ones still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def config(llama_dir, **overrides):
    values = {"kv_cache_memory": "16MiB", "max_num_seqs": 4, "num_threads": 2}
    values.update(overrides)
    return make_config(llama_dir, **values)


def generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def greedy_tokens(cfg) -> list[list[int]]:
    with LLM(config=cfg) as llm:
        return generate(llm)


@pytest.fixture(scope="module")
def uni_tokens(llama_dir) -> list[list[int]]:
    return greedy_tokens(config(llama_dir, distributed_executor_backend="uni"))


def test_mp_one_rank_matches_uni(llama_dir, uni_tokens):
    before = leftovers()
    assert greedy_tokens(config(llama_dir, distributed_executor_backend="mp")) == uni_tokens
    assert engine_children() == []
    assert leftovers() == before


def test_tp2_matches_tp1_also_after_sleep(llama_dir, uni_tokens):
    """Two ranks of one thread each (gloo all-reduces); sleep level 2 frees the KV cache and
    the weights on every rank, wake-up restores both."""
    before = leftovers()
    cfg = config(llama_dir, tensor_parallel_size=2, enable_sleep_mode=True)
    assert cfg.parallel.executor_backend == "mp"
    with LLM(config=cfg) as llm:
        assert generate(llm) == uni_tokens
        llm.client.sleep(2)
        llm.client.wake_up()
        assert generate(llm) == uni_tokens
    assert engine_children() == []
    assert leftovers() == before


def test_heads_tp_does_not_divide_is_refused_before_spawning(llama_dir):
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size 3.*num_attention_heads \(4\)"):
        LLM(config=config(llama_dir, tensor_parallel_size=3))
    assert engine_children() == []


def _start(llama_dir) -> tuple[SyncMPClient, list[psutil.Process]]:
    client = SyncMPClient(config(llama_dir, tensor_parallel_size=2))
    return client, workers_of(client.process.pid)


def _assert_all_gone(client: SyncMPClient, pids: list[int], before) -> None:
    assert wait_gone(pids, 15.0) == [], "a worker or the engine core outlived the engine"
    assert engine_children() == []
    assert not os.path.exists(client.process.addresses.ipc_dir)
    assert leftovers() == before


def test_killed_worker_fails_the_in_flight_request(llama_dir):
    before = leftovers()
    client, workers = _start(llama_dir)
    pids = [client.process.pid, *(w.pid for w in workers)]
    try:
        client.add_request(EngineCoreRequest("r", [5, 6, 7], LONG, None, time.monotonic()))
        assert client.get_output(timeout_s=60).outputs
        workers[1].kill()
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"rank 1 .*died with signal SIGKILL"):
            while True:
                client.get_output(timeout_s=30)
        assert time.monotonic() - start < 5.0
        assert client.is_dead
    finally:
        client.shutdown()
    _assert_all_gone(client, pids, before)


def test_worker_dying_while_idle_kills_the_engine(llama_dir):
    before = leftovers()
    client, workers = _start(llama_dir)
    pids = [client.process.pid, *(w.pid for w in workers)]
    try:
        client.check_health()
        workers[0].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while not client.is_dead and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(EngineDeadError, match=r"rank 0 .*died with signal SIGTERM"):
            client.check_health()
    finally:
        client.shutdown()
    _assert_all_gone(client, pids, before)


def test_killed_engine_core_takes_its_workers(llama_dir):
    before = leftovers()
    client, workers = _start(llama_dir)
    pids = [w.pid for w in workers]
    try:
        os.kill(client.process.pid, signal.SIGKILL)
        assert wait_gone(pids, 10.0) == [], "worker processes outlived the engine core"
    finally:
        client.shutdown()
    _assert_all_gone(client, [client.process.pid, *pids], before)
