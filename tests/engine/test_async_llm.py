"""AsyncLLM over a real engine-core child process: streaming parity with the offline LLM,
abort on disconnect, validation errors, stats listeners, health, death and cleanup.

pytest-asyncio is not used: each test runs its coroutine with `asyncio.run`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from sluice.errors import EngineDeadError, EngineStartupError, InvalidRequestError
from sluice.frontend.async_llm import AsyncLLM
from sluice.frontend.llm import LLM
from sluice.sampling_params import RequestOutputKind, SamplingParams

from _sluice_engine_helpers import engine_children, make_config

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["Hello world", "The quick brown fox", "def main():", "Python is a language"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True,
                      output_kind=RequestOutputKind.DELTA)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def all_threads_stopped(pid: int) -> bool:
    """Every thread of `pid` is in the stopped state (SIGSTOP fully delivered)."""
    tasks = Path(f"/proc/{pid}/task")
    states = [(tasks / tid / "stat").read_text().rsplit(")", 1)[1].split()[0]
              for tid in os.listdir(tasks)]
    return all(state in ("T", "t") for state in states)


async def collect_tokens(llm: AsyncLLM, prompt: str, request_id: str) -> list[int]:
    params = GREEDY.with_updates(output_kind=RequestOutputKind.DELTA)
    tokens: list[int] = []
    async for out in llm.generate(prompt, params, request_id):
        tokens += out.outputs[0].token_ids
    assert out.finished
    return tokens


async def drain(agen) -> None:
    async for _ in agen:
        pass


@pytest.fixture(scope="module")
def inproc_token_ids(llama_dir) -> list[list[int]]:
    with LLM(config=make_config(llama_dir)) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def run_with_engine(config, body: Callable[[AsyncLLM], Awaitable[None]]) -> AsyncLLM:
    async def main() -> AsyncLLM:
        llm = AsyncLLM.from_config(config)
        try:
            await body(llm)
        finally:
            llm.shutdown()
        return llm
    return asyncio.run(main())


def test_streaming_matches_llm_abort_stats_and_health(llama_dir, inproc_token_ids):
    reports = []

    async def body(llm: AsyncLLM) -> None:
        # the served name defaults to the model as given, as in vLLM
        assert llm.model_name == str(llama_dir) and llm.ready.max_model_len == 256
        assert llm.config.model.model == str(llama_dir) and llm.tokenizer.vocab_size > 0
        llm.add_stats_listener(lambda sched, front: reports.append((sched, front)))
        results = await asyncio.gather(*(collect_tokens(llm, p, f"r{i}")
                                         for i, p in enumerate(PROMPTS)))
        assert results == inproc_token_ids
        assert llm.num_unfinished_requests == 0
        await llm.check_health()

        # A consumer that stops iterating (client disconnect) aborts its request.
        keeper = asyncio.create_task(drain(llm.generate("keep going", LONG, "keeper")))
        victim = llm.generate("stop early", LONG, "victim")
        await victim.__anext__()
        await wait_for(lambda: llm.latest_scheduler_stats.num_running_reqs == 2)
        await victim.aclose()
        assert llm.num_unfinished_requests == 1
        await wait_for(lambda: llm.latest_scheduler_stats.num_running_reqs == 1)
        # Cancelling the consuming task aborts too.
        keeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await keeper
        assert llm.num_unfinished_requests == 0

        # Explicit abort ends the stream without a further output.
        task = asyncio.create_task(drain(llm.generate("abort me", LONG, "aborted")))
        await wait_for(lambda: "aborted" in llm.output_processor)
        await llm.abort("aborted")
        await asyncio.wait_for(task, 5.0)
        assert llm.num_unfinished_requests == 0

        # Validation errors surface on the first __anext__, before anything is sent.
        with pytest.raises(InvalidRequestError) as err:
            await drain(llm.generate("x", SamplingParams(max_tokens=10_000), "too-long"))
        assert err.value.param == "max_tokens"
        assert llm.num_unfinished_requests == 0
        await llm.reset_prefix_cache()
        assert await collect_tokens(llm, PROMPTS[0], "again") == inproc_token_ids[0]

    llm = run_with_engine(make_config(llama_dir), body)
    assert reports and all(sched is None or sched.num_running_reqs >= 0
                           for sched, _ in reports)
    finished = [f for _, front in reports for f in front.finished_requests]
    assert {f.finish_reason for f in finished} >= {"length", "abort"}
    assert sum(front.num_generation_tokens for _, front in reports) >= 4 * 12
    assert engine_children() == []
    assert not os.path.exists(llm.client.process.addresses.ipc_dir)


def test_engine_death_fails_waiters_and_health(llama_dir):
    async def body(llm: AsyncLLM) -> None:
        pid = llm.client.process.pid
        # A stopped (hung) engine fails the health check by timeout, then recovers.
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: all_threads_stopped(pid))
            with pytest.raises(EngineDeadError, match="did not answer a health ping"):
                await llm.check_health(timeout_s=0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        await llm.check_health()
        assert not llm.is_dead

        streams = [llm.generate(f"prompt {i}", LONG, f"r{i}") for i in range(2)]
        for stream in streams:
            await stream.__anext__()
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        for stream in streams:
            with pytest.raises(EngineDeadError, match="SIGKILL"):
                await asyncio.wait_for(drain(stream), 10.0)
        assert time.monotonic() - start < 5.0
        assert llm.is_dead and llm.errored
        assert llm.num_unfinished_requests == 0
        with pytest.raises(EngineDeadError):
            await llm.check_health()
        with pytest.raises(EngineDeadError):
            await drain(llm.generate("late", GREEDY, "late"))

    llm = run_with_engine(make_config(llama_dir), body)
    llm.shutdown()  # second call: safe
    assert engine_children() == []
    assert not os.path.exists(llm.client.process.addresses.ipc_dir)


def test_startup_failure_raises_engine_startup_error(llama_dir):
    with pytest.raises(EngineStartupError, match="^KV cache too small"):
        AsyncLLM.from_config(make_config(llama_dir, kv_cache_memory="16KiB"))
    assert engine_children() == []


def test_api_server_process_never_imports_torch(llama_dir):
    code = textwrap.dedent(f"""
        import asyncio, sys
        from sluice.config_sources import build_engine_config
        from sluice.frontend.async_llm import AsyncLLM
        from sluice.sampling_params import SamplingParams

        async def main():
            llm = AsyncLLM.from_config(build_engine_config(overrides={{
                "model": {str(llama_dir)!r}, "kv_cache_memory": "64MiB",
                "max_model_len": 256}}))
            try:
                async for out in llm.generate("Hello", SamplingParams(max_tokens=4), "r"):
                    pass
                assert out.finished
            finally:
                llm.shutdown()

        if __name__ == "__main__":
            asyncio.run(main())
            bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
            assert not bad, bad
            print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
