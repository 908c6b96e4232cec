"""sluice.distributed: rank layout arithmetic, the single-rank identity, and every collective of
`TorchCommunicator` on real gloo process groups (4 processes: TP=2 x PP=2)."""

from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp

from sluice.distributed import parallel_state as ps
from sluice.distributed.comm import SingleRankCommunicator
from sluice.platform.host import free_ports


def test_layout_follows_vllm_rank_order():
    layouts = [ps.ParallelLayout(tp_size=2, pp_size=3, rank=r) for r in range(6)]
    assert [(x.pp_rank, x.tp_rank) for x in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1),
                                                         (2, 0), (2, 1)]
    assert layouts[3].tp_group_ranks(1) == [2, 3]
    assert layouts[3].pp_group_ranks(1) == [1, 3, 5]
    assert layouts[0].is_driver and layouts[0].is_first_stage and not layouts[0].is_last_stage
    assert layouts[5].is_last_stage and not layouts[5].is_driver


def test_groups_are_single_rank_until_initialised():
    assert isinstance(ps.get_tp_group(), SingleRankCommunicator)
    comm = ps.get_tp_group()
    x = torch.arange(4.0)
    assert comm.all_reduce(x) is x
    assert torch.equal(comm.all_gather(x), x) and torch.equal(comm.gather(x), x)
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(RuntimeError, match="single-rank"):
        comm.send(x, 1)


def _rank_main(rank: int, port: int, results) -> None:
    torch.set_num_threads(1)
    layout = ps.ParallelLayout(tp_size=2, pp_size=2, rank=rank)
    ps.init_parallel_state(layout, f"tcp://127.0.0.1:{port}", "gloo", timeout_s=60)
    try:
        tp, pp, world = ps.get_tp_group(), ps.get_pp_group(), ps.get_world_group()
        out = {"tp": (tp.rank, tp.size), "pp": (pp.rank, pp.size), "world": world.size}
        out["tp_sum"] = tp.all_reduce(torch.tensor([float(rank)])).item()
        out["pp_sum"] = pp.all_reduce(torch.tensor([float(rank)])).item()
        out["tp_cat"] = tp.all_gather(torch.tensor([[float(rank)]]), dim=1).tolist()
        gathered = pp.gather(torch.tensor([float(rank)]), dst=1, dim=0)
        out["pp_gather"] = None if gathered is None else gathered.tolist()
        out["bcast"] = tp.broadcast(torch.tensor([float(rank)]), src=1).item()
        out["obj"] = world.broadcast_object({"from": rank} if rank == 0 else None, src=0)
        if pp.rank == 0:
            pp.send(torch.full((2,), float(rank)), dst=1)
        else:
            out["recv"] = pp.recv(torch.empty(2), src=0).tolist()
        world.barrier()
        results[rank] = out
    finally:
        ps.destroy_parallel_state()


@pytest.mark.timeout(180)
def test_collectives_on_gloo_groups_tp2_pp2():
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    port = free_ports("127.0.0.1")[0]
    procs = [ctx.Process(target=_rank_main, args=(r, port, results)) for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    r = dict(results)
    # TP groups {0,1}, {2,3}; PP groups {0,2}, {1,3}
    assert [r[i]["tp"] for i in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [r[i]["pp"] for i in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [r[i]["tp_sum"] for i in range(4)] == [1.0, 1.0, 5.0, 5.0]
    assert [r[i]["pp_sum"] for i in range(4)] == [2.0, 4.0, 2.0, 4.0]
    assert r[2]["tp_cat"] == [[2.0, 3.0]]
    assert [r[i]["pp_gather"] for i in range(4)] == [None, None, [0.0, 2.0], [1.0, 3.0]]
    assert [r[i]["bcast"] for i in range(4)] == [1.0, 1.0, 3.0, 3.0]
    assert all(r[i]["obj"] == {"from": 0} for i in range(4))
    assert r[2]["recv"] == [0.0, 0.0] and r[3]["recv"] == [1.0, 1.0]
