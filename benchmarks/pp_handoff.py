"""Per-step cost of the pipeline-parallel stage hand-off: the [2, T, hidden] tensor (hidden
states and residual stacked) that stage p sends to stage p+1, over the real `sluice.distributed`
PP-group communicator (gloo on CPU), between two spawned ranks; no model.

    python benchmarks/pp_handoff.py [--hidden 512] [--tokens 1,16,64,256,2048] [--iters 300]

Rank 0 builds the hand-off as the model runner does (`torch.stack((hidden, residual))`) and
sends it; rank 1 receives it into a fresh buffer (as `ModelRunner._forward`) and answers with a
one-element ack so the next round starts with both ranks ready. The one-way time is rank 1's
clock after the receive minus rank 0's before the stack (`time.perf_counter` is
CLOCK_MONOTONIC, shared by the processes of one machine), so it includes the receiver's
wake-up, as in a real step. Prints, per token count, the median and p90 in microseconds.
`--hidden 512` is the reference model's (`sluice.bench.reference_model`). One torch thread
per rank; on a busy machine the wake-up dominates small hand-offs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

from sluice.platform.host import free_ports


def _rank(rank: int, port: int, hidden: int, tokens: list[int], iters: int, out) -> None:
    import torch

    from sluice.distributed.parallel_state import (ParallelLayout, destroy_parallel_state,
                                                   get_pp_group, init_parallel_state)
    torch.set_num_threads(1)
    init_parallel_state(ParallelLayout(tp_size=1, pp_size=2, rank=rank),
                        f"tcp://127.0.0.1:{port}", "gloo")
    pp = get_pp_group()
    ack = torch.zeros(1)
    stamps: dict[int, list[float]] = {}
    for n in tokens:
        h, r = torch.randn(n, hidden), torch.randn(n, hidden)
        mine = stamps[n] = []
        for i in range(iters + 10):
            if rank == 0:
                start = time.perf_counter()
                pp.send(torch.stack((h, r)), dst=1)
                pp.recv(ack, src=1)
            else:
                pp.recv(torch.empty(2, n, hidden), src=0)
                start = time.perf_counter()
                pp.send(ack, dst=0)
            if i >= 10:
                mine.append(start)
    out.send((rank, stamps))
    destroy_parallel_state()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", default="1,16,64,256,2048")
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    ctx = multiprocessing.get_context("spawn")
    recv_end, send_end = ctx.Pipe(duplex=False)
    port = free_ports("127.0.0.1")[0]
    procs = [ctx.Process(target=_rank, args=(r, port, args.hidden, tokens, args.iters,
                                             send_end)) for r in range(2)]
    for p in procs:
        p.start()
    stamps = dict(recv_end.recv() for _ in procs)
    for p in procs:
        p.join()
    print(f"{'tokens':>7} {'bytes':>10} {'median us':>10} {'p90 us':>8}")
    for n in tokens:
        times = sorted(b - a for a, b in zip(stamps[0][n], stamps[1][n]))
        median, p90 = statistics.median(times), times[int(0.9 * len(times))]
        print(f"{n:>7} {2 * n * args.hidden * 4:>10} {median * 1e6:>10.0f} {p90 * 1e6:>8.0f}")


if __name__ == "__main__":
    main()
