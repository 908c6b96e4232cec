"""Per-step cost of tensor parallelism's all-reduces: a [T, hidden] float32 all-reduce over the
real `sluice.distributed` TP-group communicator (gloo on CPU) between two spawned ranks; no
model.

    python benchmarks/tp_allreduce.py [--hidden 512] [--layers 8] [--tokens 1,16,64,256,2048]

A TP step of a Llama-family model all-reduces a [T, hidden] tensor 2 * layers + 1 times (o_proj
and down_proj per layer, the vocab-parallel embedding) and gathers the sampled rows' logits once;
the last column multiplies the median all-reduce by 2 * layers + 1. `--hidden 512 --layers 8`
is the reference model (`sluice.bench.reference_model`). One torch thread per rank; both ranks
run the all-reduces back to back, so each time includes waiting for the slower rank.
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
                                                   get_tp_group, init_parallel_state)
    torch.set_num_threads(1)
    init_parallel_state(ParallelLayout(tp_size=2, pp_size=1, rank=rank),
                        f"tcp://127.0.0.1:{port}", "gloo")
    tp = get_tp_group()
    times: dict[int, list[float]] = {}
    for n in tokens:
        x = torch.randn(n, hidden)
        mine = times[n] = []
        for i in range(iters + 10):
            start = time.perf_counter()
            tp.all_reduce(x)
            if i >= 10:
                mine.append(time.perf_counter() - start)
    out.send((rank, times))
    destroy_parallel_state()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
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
    times = dict(recv_end.recv() for _ in procs)
    for p in procs:
        p.join()
    per_step = 2 * args.layers + 1
    print(f"{'tokens':>7} {'bytes':>10} {'median us':>10} {'p90 us':>8} "
          f"{'x' + str(per_step) + ' per step ms':>18}")
    for n in tokens:
        rank0 = sorted(times[0][n])
        median, p90 = statistics.median(rank0), rank0[int(0.9 * len(rank0))]
        print(f"{n:>7} {n * args.hidden * 4:>10} {median * 1e6:>10.0f} {p90 * 1e6:>8.0f} "
              f"{median * per_step * 1e3:>18.2f}")


if __name__ == "__main__":
    main()
