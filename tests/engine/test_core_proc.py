"""The engine core in a child process: handshake, parity with the in-process engine, startup
failures, death detection and cleanup. Real ZeroMQ sockets and a real spawned child."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from sluice.engine.launch import EngineProcess
from sluice.errors import EngineDeadError, EngineStartupError, ModelLoadError
from sluice.frontend.sync_client import SyncMPClient
from sluice.frontend.llm import LLM
from sluice.hf_config import load_model_spec
from sluice.messages import EngineCoreRequest
from sluice.platform.cpu import CpuPlatform
from sluice.sampling_params import SamplingParams

from _sluice_engine_helpers import engine_children, make_config

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["Hello world", "The quick brown fox", "def main():", "Python is a language"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def inproc_token_ids(llama_dir) -> list[list[int]]:
    with LLM(config=make_config(llama_dir)) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_process_llm_matches_inproc_and_cleans_up(llama_dir, inproc_token_ids):
    llm = LLM(config=make_config(llama_dir), use_process=True)
    client = llm.client
    assert isinstance(client, SyncMPClient)
    ready = client.ready
    # --block-size not given: the CPU platform's default
    assert ready.num_kv_blocks > 1 and ready.block_size == CpuPlatform.default_block_size
    assert ready.max_model_len == 256 and ready.vocab_size >= llm.tokenizer.vocab_size
    assert ready.model_name == str(llama_dir)  # the model as given, as in vLLM
    ipc_dir = client.process.addresses.ipc_dir
    info = os.stat(ipc_dir)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    pid = client.process.pid
    assert [c.pid for c in engine_children()] == [pid]

    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == inproc_token_ids
    assert client.ping() < 5.0
    client.check_health()
    client.reset_prefix_cache()
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], GREEDY,
                                                         use_tqdm=False)] == inproc_token_ids[:2]

    llm.shutdown()
    llm.shutdown()  # idempotent
    assert wait_gone(pid, 1.0)
    assert engine_children() == []
    assert not os.path.exists(ipc_dir)
    with pytest.raises(EngineDeadError, match="shut down"):
        client.add_request(EngineCoreRequest("late", [1, 2], GREEDY, None, time.monotonic()))


def test_startup_error_is_the_childs_message(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as local:
        load_model_spec(str(missing))
    with pytest.raises(EngineStartupError) as remote:
        SyncMPClient(make_config(missing))
    assert str(remote.value) == str(local.value)
    assert remote.value.error_type == "ModelLoadError"
    assert "Traceback" in remote.value.child_traceback
    assert engine_children() == []


def test_kv_cache_too_small_fails_startup_with_the_fix(llama_dir):
    with pytest.raises(EngineStartupError) as err:
        SyncMPClient(make_config(llama_dir, kv_cache_memory="16KiB"))
    message = str(err.value)
    assert message.startswith("KV cache too small") and "--kv-cache-memory" in message
    assert err.value.error_type == "KVCacheTooSmallError"
    assert engine_children() == []


def test_startup_timeout_kills_the_child(llama_dir):
    process = EngineProcess(make_config(llama_dir))
    with pytest.raises(EngineStartupError, match=r"did not finish starting within 0\.2s"):
        process.wait_ready(timeout_s=0.2)
    assert not process.is_alive()
    assert not os.path.exists(process.addresses.ipc_dir)
    assert engine_children() == []


def test_killed_engine_raises_engine_dead(llama_dir):
    client = SyncMPClient(make_config(llama_dir))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        client.add_request(EngineCoreRequest("r", [5, 6, 7], params, None, time.monotonic()))
        assert client.get_output(timeout_s=30).outputs
        os.kill(client.process.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            while True:
                client.get_output(timeout_s=10)
        assert time.monotonic() - start < 5.0
        assert client.is_dead
        with pytest.raises(EngineDeadError):
            client.check_health()
        with pytest.raises(EngineDeadError):
            client.abort_requests(["r"])
    finally:
        client.shutdown()
        client.shutdown()
    assert engine_children() == []
    assert not os.path.exists(client.process.addresses.ipc_dir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_child_never_outlives_its_parent(llama_dir, tmp_path, sig):
    """SIGTERM: the parent's handler stops the child before dying; SIGKILL: the child notices
    the parent's death on its own."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from sluice.config_sources import build_engine_config
        from sluice.frontend.sync_client import SyncMPClient

        if __name__ == "__main__":
            config = build_engine_config(overrides={{
                "model": {str(llama_dir)!r}, "kv_cache_memory": "64MiB",
                "max_model_len": 256}})
            client = SyncMPClient(config)
            print(client.process.pid, client.process.addresses.ipc_dir, flush=True)
            os.kill(os.getpid(), {int(sig)})
            time.sleep(30)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -sig, proc.stderr
    pid_text, ipc_dir = proc.stdout.split()
    assert wait_gone(int(pid_text), 0.5 if sig == signal.SIGTERM else 10.0), \
        "the engine core outlived its parent"
    assert not os.path.exists(ipc_dir)
