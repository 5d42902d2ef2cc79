"""The distributed tests' launcher: run a function on WORLD CPU processes joined in a gloo
process group over the loopback interface."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


def run_ranks(fn, tmp_path, *args) -> None:
    """Run ``fn(rank, *args)`` on every rank (``fn`` must be a module-level function: the ranks
    are spawned processes). An exception on any rank fails the call with that rank's traceback."""
    mp.spawn(_init_and_run, args=(fn, str(tmp_path / "rendezvous"), args), nprocs=WORLD, join=True)


def _init_and_run(rank, fn, init_file, args):
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:  # keep gloo's transport on the loopback interface
        os.environ["GLOO_SOCKET_IFNAME"] = loopback[0]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()
