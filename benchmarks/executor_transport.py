"""Per-step transport cost of the `mp` executor: encode a SchedulerOutput once, push it to every
rank over ZeroMQ ipc, decode it there, answer from the driver with a ModelRunnerOutput, receive
and decode it — the executor's real sockets and codecs (`sluice.executor.wire`), no model.

    python benchmarks/executor_transport.py [--ranks 2] [--steps 2000]

Prints, per step shape, the median and p99 of the encode time alone and of the whole round
trip (what a step pays on top of the forward pass). No torch.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import tempfile
import time

import zmq

from sluice.executor.wire import CallCodec, ReplyCodec, ReplyType, WorkerMethod
from sluice.sampling_params import SamplingParams
from sluice.step import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput


def decode_step(num_reqs: int) -> SchedulerOutput:
    """A decode step: `num_reqs` running requests, one token each, one new block every 64."""
    cached = [CachedRequestData(f"cmpl-{i:032x}-0", [1000 + i] if i % 64 == 0 else [],
                                300 + i) for i in range(num_reqs)]
    return SchedulerOutput(scheduled_cached_reqs=cached,
                           num_scheduled_tokens={c.request_id: 1 for c in cached},
                           total_num_scheduled_tokens=num_reqs)


def prefill_step(num_reqs: int, prompt_len: int) -> SchedulerOutput:
    """A prefill step: `num_reqs` new requests of `prompt_len` tokens with sampling params."""
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=128, seed=1)
    new = [NewRequestData(f"cmpl-{i:032x}-0", list(range(prompt_len)), prompt_len, params,
                          list(range(i * 8, i * 8 + prompt_len // 64 + 1)), 0, 2)
           for i in range(num_reqs)]
    return SchedulerOutput(scheduled_new_reqs=new,
                           num_scheduled_tokens={n.request_id: prompt_len for n in new},
                           total_num_scheduled_tokens=num_reqs * prompt_len)


def echo_rank(rank: int, call_address: str, reply_address: str) -> None:
    ctx = zmq.Context()
    calls, replies = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    calls.connect(call_address)
    replies.connect(reply_address)
    call_codec, reply_codec = CallCodec(), ReplyCodec()
    while True:
        method, call_id, arg = call_codec.decode(calls.recv_multipart(copy=False))
        if method == WorkerMethod.SHUTDOWN:
            break
        if method == WorkerMethod.HELLO:
            replies.send_multipart(reply_codec.encode(ReplyType.VALUE, rank, call_id, 0))
        elif rank == 0:
            ids = list(arg.num_scheduled_tokens)
            out = ModelRunnerOutput(sampled_token_ids={r: [7] for r in ids})
            replies.send_multipart(reply_codec.encode(ReplyType.OUTPUT, rank, call_id, out))
    ctx.destroy(linger=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    ipc = tempfile.mkdtemp(prefix="sluice-bench-", dir="/tmp")
    ctx = zmq.Context()
    reply_sock = ctx.socket(zmq.PULL)
    reply_sock.bind(f"ipc://{ipc}/reply")
    call_socks = []
    procs = []
    spawn = multiprocessing.get_context("spawn")
    for rank in range(args.ranks):
        sock = ctx.socket(zmq.PUSH)
        sock.bind(f"ipc://{ipc}/call-{rank}")
        call_socks.append(sock)
        p = spawn.Process(target=echo_rank, args=(rank, f"ipc://{ipc}/call-{rank}",
                                                  f"ipc://{ipc}/reply"), daemon=True)
        p.start()
        procs.append(p)
    call_codec, reply_codec = CallCodec(), ReplyCodec()
    for sock in call_socks:
        sock.send_multipart(call_codec.encode(WorkerMethod.HELLO, 0))
    for _ in call_socks:
        reply_sock.recv_multipart()
    shapes = {"decode, 32 requests": decode_step(32), "decode, 256 requests": decode_step(256),
              "prefill, 4 x 512-token prompts": prefill_step(4, 512)}
    print(f"{args.ranks} ranks, {args.steps} steps per shape")
    for name, step in shapes.items():
        encode_us, round_us = [], []
        size = 0
        for i in range(args.steps):
            t0 = time.perf_counter()
            frames = call_codec.encode(WorkerMethod.EXECUTE_MODEL, i + 1, step)
            t1 = time.perf_counter()
            for sock in call_socks:
                sock.send_multipart(frames, copy=False)
            answer = reply_sock.recv_multipart(copy=False)
            reply_codec.decode([f.buffer for f in answer])
            t2 = time.perf_counter()
            size = len(frames[1])
            encode_us.append((t1 - t0) * 1e6)
            round_us.append((t2 - t0) * 1e6)
        q = statistics.quantiles(round_us, n=100)
        print(f"  {name:32s} {size:7d} B  encode median {statistics.median(encode_us):6.1f} us"
              f"  round trip median {statistics.median(round_us):6.1f} us, p99 {q[98]:6.1f} us")
    for sock in call_socks:
        sock.send_multipart(call_codec.encode(WorkerMethod.SHUTDOWN, 0))
    for p in procs:
        p.join(5)
    ctx.destroy(linger=0)
    shutil.rmtree(ipc, ignore_errors=True)


if __name__ == "__main__":
    main()
