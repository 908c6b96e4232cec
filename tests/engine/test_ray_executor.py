"""The Ray executor (`--distributed-executor-backend ray`) against a local Ray instance that
this module starts (`ray.init` on this machine only, 4 CPUs, no dashboard) and stops.

TP=2 on Ray (one actor per rank in a placement group of CPU bundles, one torch thread each)
gives the same greedy tokens as TP=1; an actor killed mid-generation is an EngineDeadError;
after `ray.shutdown()` no Ray process started by the test is left.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

from sluice.errors import ConfigError, EngineDeadError
from sluice.frontend.llm import LLM
from sluice.messages import EngineCoreRequest
from sluice.sampling_params import SamplingParams

from _sluice_engine_helpers import make_config

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["Hello world", "The quick brown fox", "def main():", "Python is a language"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
RAY_PROCESS_NAMES = ("raylet", "gcs_server")
ray = None   # imported by the `local_ray` fixture (an optional extra)


def ray_processes() -> set[int]:
    """Pids of Ray's processes on this machine: raylet, gcs_server, workers and actors
    ("ray::…"), and Ray's Python helpers (log monitor, agents …)."""
    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            name = p.info["name"] or ""
            cmdline = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if (name in RAY_PROCESS_NAMES or name.startswith("ray::") or cmdline.startswith("ray::")
                or "/site-packages/ray/" in cmdline):
            found.add(p.pid)
    return found


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module; afterwards, no Ray process it started is left."""
    global ray
    ray = pytest.importorskip("ray")
    before = ray_processes()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # nothing written to ~/.ray
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=80 * 2**20,
             log_to_driver=False)
    assert ray_processes() - before, "the scan does not see the Ray processes just started"
    try:
        yield
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 30
        while (left := ray_processes() - before) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid for pid in left if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
        assert not left, f"Ray processes left behind: {left}"


def test_missing_ray_is_a_clear_error(monkeypatch):
    import sys

    from sluice.executor.ray_executor import import_ray
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install sluice\[ray\]"):
        import_ray()


def config(llama_dir, **overrides):
    values = {"kv_cache_memory": "16MiB", "max_num_seqs": 4, "num_threads": 2}
    values.update(overrides)
    return make_config(llama_dir, **values)


def generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_tp2_on_ray_matches_tp1(llama_dir, local_ray):
    with LLM(config=config(llama_dir, num_threads=1)) as llm:
        expected = generate(llm)
    cfg = config(llama_dir, tensor_parallel_size=2, distributed_executor_backend="ray")
    with LLM(config=cfg) as llm:
        executor = llm.client.engine.executor
        assert type(executor).__name__ == "RayExecutor" and len(executor.actors) == 2
        assert generate(llm) == expected
    assert executor.actors == []
    assert ray.util.placement_group_table() and all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_killed_actor_is_engine_dead(llama_dir, local_ray):
    cfg = config(llama_dir, tensor_parallel_size=2, distributed_executor_backend="ray")
    llm = LLM(config=cfg)
    try:
        engine = llm.client.engine
        engine.add_request(EngineCoreRequest("r", [5, 6, 7], LONG, None, time.monotonic()))
        engine.step()
        psutil.Process(engine.executor.pids[1]).kill()
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"Ray actor of worker rank 1 .*died"):
            while True:
                engine.step()
        assert time.monotonic() - start < 5.0
    finally:
        llm.shutdown()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(engine.executor.pids[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(engine.executor.pids[0]), "rank 0's actor outlived the engine"
