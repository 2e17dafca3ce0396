"""Processes started by torchrun: joining the group, and doing work on every rank safely.

Shared by training (``vseinf train``) and encoding (``vseinf encode``), which both run under
``torchrun`` with gloo on CPUs and nccl on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join the process group torchrun set up (env WORLD_SIZE > 1); nccl on GPUs, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # One GPU per process: nccl refuses two ranks on one device, and deep inside at that.
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun started more processes on this machine than it has GPUs "
                             f"({torch.cuda.device_count()}): use --nproc_per_node "
                             f"{torch.cuda.device_count()} or fewer, or CUDA_VISIBLE_DEVICES= to train on "
                             f"the CPU (gloo)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Rank 0 alone evaluates and writes checkpoints while the others wait in the next
        # collective: allow that an hour (VSEINF_DIST_TIMEOUT_MIN), not nccl's default 10 minutes.
        timeout = timedelta(minutes=float(os.environ.get("VSEINF_DIST_TIMEOUT_MIN", "60")))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun lends its rendezvous store to the workers and keeps it when it restarts them
            # (--max_restarts), so a restarted process group would read the previous attempt's
            # addresses and fail to connect (pytorch/pytorch#135712): each attempt gets its own keys.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                                        is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"vseinf/attempt-{attempt}", agent_store),
                                    rank=int(os.environ["RANK"]), world_size=size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return World(dist.get_rank(), dist.get_world_size(), local)


def leave_distributed() -> None:
    """Leave the process group (if any) before the process exits. A torchrun process that exits
    with its gloo group alive can abort while the interpreter shuts down ("terminate called without
    an active exception", exit -6), failing a job whose work was done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def in_turns(world: World, device, work, what: str):
    """Runs ``work()`` on every rank, in three turns: rank 0; then the first process of every other
    machine; then the rest. Feature caches are built that way: rank 0 builds them, the other
    machines open them from a shared file system or, when VSEINF_CACHE is local to each machine,
    build their own copy once, and every remaining process opens a finished cache. If ``work``
    fails on any rank, every rank raises (instead of waiting in a collective until the timeout).
    """
    my_turn = 0 if world.main else 1 if world.local_rank == 0 else 2
    return _take_turns(world, device, work, what, my_turn, turns=3)


def together(world: World, device, work, what: str):
    """Runs ``work()`` on every rank at once; if it fails on any rank, every rank raises."""
    return _take_turns(world, device, work, what, my_turn=0, turns=1)


def _take_turns(world: World, device, work, what: str, my_turn: int, turns: int):
    if world.size == 1:
        return work()
    result, error = None, None
    for turn in range(turns):
        if turn == my_turn:
            try:
                result = work()
            except Exception as e:  # reported below, after the other ranks learn of it
                error = e
        _raise_if_any_failed(world, device, error, what)
    return result


def _raise_if_any_failed(world: World, device, error: Exception | None, what: str) -> None:
    if dist.get_backend() == "nccl":  # nccl reduces GPU tensors only, whatever device the work used
        device = torch.device("cuda", torch.cuda.current_device())
    failed = torch.tensor([0.0 if error is None else 1.0], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"rank {world.rank}: stopping, another process failed while {what} "
                           "(its error is in its own output)")
