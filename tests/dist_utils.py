"""Run a function on N CPU processes joined by a gloo process group (for the multi-process tests).

``run_workers(fn, world_size, *args)`` spawns ``world_size`` fresh interpreters (torch's
``spawn``), each with torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` on a free local port) and one compute thread, initialises the
group through :func:`blip_fast.distributed.init_distributed`, calls ``fn(rank, world_size, *args)``
and returns the per-rank results (anything ``torch.save`` can write). A worker that raises fails
the test with its traceback; workers still running after ``timeout`` seconds are killed and the
test fails, so a collective that hangs cannot stall CI.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, device: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from blip_fast.distributed import destroy_distributed, init_distributed

    init_distributed(device=device)  # gloo on the CPU, nccl on GPU ``rank``
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_distributed()


def run_workers(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, device: str = "cpu") -> List[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, one process per rank.

    ``device='cuda'``: rank r computes on GPU r and the group uses NCCL. Results should be CPU
    tensors (or plain objects)."""
    with tempfile.TemporaryDirectory() as out_dir:
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # read by the children at start-up
        try:
            ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), out_dir, device, args), nprocs=world_size,
                                     join=False, start_method="spawn")
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} processes did not finish in {timeout:.0f} s")
        finally:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
