"""Test helpers for distributed code: an in-process thread "world" implementing the
gradsift Comm protocol, and a launcher of real torch.distributed ranks on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


class ThreadWorld:
    """``world_size`` ranks as threads of this process, exchanging through shared slots."""

    def __init__(self, world_size: int, timeout: float = 30.0):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[Any] = [None] * world_size

    def exchange(self, rank: int, obj: Any) -> list[Any]:
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class ThreadComm:
    """gradsift ``Comm`` for one thread-rank of a :class:`ThreadWorld`."""

    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank, self.world_size = world, rank, world.world_size

    def all_reduce_sum(self, t):
        parts = self.world.exchange(self.rank, t.clone())
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def all_gather(self, t):
        return [p.clone() for p in self.world.exchange(self.rank, t.clone())]

    def all_gather_object(self, obj):
        return self.world.exchange(self.rank, obj)

    def broadcast_object(self, obj, src=0):
        return self.world.exchange(self.rank, obj)[src]


def run_threads(world_size: int, fn: Callable[[ThreadComm], Any]) -> list[Any]:
    """Run ``fn(comm)`` on every thread-rank; results (or raised exceptions) in rank order."""
    world = ThreadWorld(world_size)
    results: list[Any] = [None] * world_size

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(world, rank))
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            results[rank] = e
            # Ranks released by the barrier that last tripped may not have left it yet
            # (state 1, "draining"); breaking it now would raise BrokenBarrierError in them
            # instead of letting them reach their own error. Wait for them, then break it
            # for ranks that wait in a later collective.
            deadline = time.monotonic() + 5.0
            while getattr(world.barrier, "_state", 0) == 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            world.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """Environment of one rank as torchrun would set it, on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TORCHELASTIC"))}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def launch(args: list[str], world_size: int = 2, timeout: float = 120.0) -> list[subprocess.CompletedProcess]:
    """Start ``python ARGS`` as ``world_size`` ranks (env:// rendezvous on a free loopback
    port); wait for all (killing them after ``timeout`` s); return each rank's result."""
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, *args], env=dist_env(r, world_size, port), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world_size)
    ]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
            err += f"\n[test] killed after {timeout} s"
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def torchrun(args: list[str], nproc: int = 2, timeout: float = 120.0, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC ARGS`` (rendezvous on a free
    loopback port), with a timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "--monitor-interval", "0.2", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
