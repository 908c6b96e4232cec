"""Two "nodes" on 127.0.0.1: node 0 runs the engine (`--nnodes 2 --node-rank 0`, TP=2, rank 0)
in this test process or a child, node 1 is a separate process tree started as
`sluice serve --headless --nnodes 2 --node-rank 1` (rank 1), reached over TCP only.

Greedy tokens equal a single-node TP=1 run; the head's shutdown lets the headless node exit 0;
a rank killed on node 1 is an EngineDeadError on node 0 within seconds; a head that dies
makes node 1 exit after $SLUICE_NODE_TIMEOUT; no process is left behind on any path. Every
rank runs one torch thread.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from sluice.config_sources import build_engine_config
from sluice.errors import ConfigError, EngineDeadError
from sluice.executor.worker_proc import process_name
from sluice.frontend.sync_client import SyncMPClient
from sluice.frontend.llm import LLM
from sluice.messages import EngineCoreRequest
from sluice.sampling_params import SamplingParams

from _sluice_engine_helpers import engine_children, make_config

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["Hello world", "The quick brown fox", "def main():", "Python is a language"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
NODE_TIMEOUT_S = 3


def free_port_pair() -> int:
    """A port p with p and p + 1 both free (the rendezvous and the head's join port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def head_config(llama_dir, port: int, **overrides):
    values = {"kv_cache_memory": "16MiB", "max_num_seqs": 4, "num_threads": 1,
              "tensor_parallel_size": 2, "nnodes": 2, "node_rank": 0, "master_port": port}
    values.update(overrides)
    return make_config(llama_dir, **values)


def start_node(llama_dir, port: int) -> subprocess.Popen:
    """Node 1: `sluice serve --headless`, its own session (a separate process tree)."""
    env = dict(os.environ, SLUICE_NODE_TIMEOUT=str(NODE_TIMEOUT_S))
    return subprocess.Popen(
        [sys.executable, "-m", "sluice.entrypoints.cli", "serve", str(llama_dir), "--headless",
         "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port",
         str(port), "-tp", "2", "--num-threads", "1", "--kv-cache-memory", "16MiB"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)


def node_ranks(node: subprocess.Popen, timeout_s: float = 60.0) -> list[psutil.Process]:
    """The rank processes node 1 spawned (found by their process name)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ranks = [c for c in psutil.Process(node.pid).children()
                 if c.name() == process_name(1)]
        if ranks:
            return ranks
        assert node.poll() is None, node.communicate()[0]
        time.sleep(0.1)
    raise AssertionError("node 1 spawned no rank")


def finish(node: subprocess.Popen, timeout_s: float) -> tuple[int, str]:
    """Node 1's exit code and output (killed if it outlives `timeout_s`)."""
    try:
        out, _ = node.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        out, _ = node.communicate()
        raise AssertionError(f"the headless node did not exit:\n{out}")
    return node.returncode, out


def assert_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert alive == [], f"processes left behind: {alive}"
    assert engine_children() == []


def generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_multinode_flags_are_checked():
    with pytest.raises(ConfigError, match=r"--node-rank: 2 is not a node of --nnodes 2"):
        build_engine_config(overrides={"nnodes": 2, "node_rank": 2, "tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match=r"--nnodes: 2 nodes cannot share 3 ranks"):
        build_engine_config(overrides={"nnodes": 2, "tensor_parallel_size": 3})
    with pytest.raises(ConfigError, match=r"need --distributed-executor-backend mp, not 'ray'"):
        build_engine_config(overrides={"nnodes": 2, "tensor_parallel_size": 2,
                                       "distributed_executor_backend": "ray"})
    par = build_engine_config(overrides={"nnodes": 2, "tensor_parallel_size": 4}).parallel
    assert (par.ranks_per_node, par.rendezvous_port) == (2, 29501)   # vLLM's default port
    from sluice.entrypoints.serve_cmd import run_headless_node
    one_node = build_engine_config(overrides={"tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match=r"--headless: .* needs --nnodes 2 or more"):
        run_headless_node(one_node, headless=True)
    node1 = build_engine_config(overrides={"nnodes": 2, "node_rank": 1,
                                           "tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match=r"--node-rank 1: only node 0 .* add --headless"):
        run_headless_node(node1, headless=False)


def test_node_side_imports_neither_torch_nor_ray():
    code = ("import sys, sluice.executor.headless, sluice.executor.nodes, "
            "sluice.executor.ray_executor, sluice.entrypoints.serve_cmd; "
            "sys.exit(bool({'torch', 'ray'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_two_nodes_match_one_node(llama_dir):
    with LLM(config=make_config(llama_dir, kv_cache_memory="16MiB", max_num_seqs=4,
                                num_threads=1)) as llm:
        expected = generate(llm)
    port = free_port_pair()
    node = start_node(llama_dir, port)
    try:
        with LLM(config=head_config(llama_dir, port)) as llm:
            ranks = node_ranks(node)
            assert generate(llm) == expected
        code, out = finish(node, 30)
        assert code == 0, out
        assert "the head said goodbye (the engine shut down)" in out
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
    assert_gone([r.pid for r in ranks])


def test_rank_killed_on_the_other_node_kills_the_engine(llama_dir):
    port = free_port_pair()
    node = start_node(llama_dir, port)
    client = None
    try:
        client = SyncMPClient(head_config(llama_dir, port))
        local = [c.pid for c in psutil.Process(client.process.pid).children()
                 if c.name() == process_name(0)]
        remote = node_ranks(node)
        client.add_request(EngineCoreRequest("r", [5, 6, 7], LONG, None, time.monotonic()))
        assert client.get_output(timeout_s=60).outputs
        remote[0].kill()
        start = time.monotonic()
        with pytest.raises(EngineDeadError,
                           match=r"rank 1 \(pid \d+ on node 1 .*died with signal SIGKILL"):
            while True:
                client.get_output(timeout_s=30)
        assert time.monotonic() - start < 5.0
        code, out = finish(node, 20)
        assert code == 1, out
    finally:
        if client is not None:
            client.shutdown()
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
    assert_gone([client.process.pid, *local, *(r.pid for r in remote)])


def test_headless_node_exits_when_the_head_dies(llama_dir):
    port = free_port_pair()
    node = start_node(llama_dir, port)
    client = None
    try:
        client = SyncMPClient(head_config(llama_dir, port))
        remote = node_ranks(node)
        os.kill(client.process.pid, signal.SIGKILL)
        start = time.monotonic()
        code, out = finish(node, NODE_TIMEOUT_S + 20)
        assert code == 1, out
        assert "sent nothing for 3s; it is gone" in out
        assert time.monotonic() - start < NODE_TIMEOUT_S + 10
    finally:
        if client is not None:
            client.shutdown()
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
    assert_gone([client.process.pid, *(r.pid for r in remote)])
