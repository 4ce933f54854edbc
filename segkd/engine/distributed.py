"""Multi-process training through ``torchrun``: process group, device, data sharding and small collectives.

Everything comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``
or its c10d rendezvous); segkd adds no launcher or rendezvous of its own. Without those variables every helper
here degrades to the single-process case.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from segkd.errors import SegkdError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` (``enabled`` when a process group is in use)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    owns_group: bool = False  # this call created the process group (and so destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_device(pref: str) -> None:
    """``--device`` spelled as segkd takes it: auto, cpu, cuda or cuda:N (whether CUDA exists is checked later)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(pref).strip().lower()):
        raise SegkdError(f"--device must be auto, cpu or cuda[:N], got {pref!r}")


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error, not a silent CPU run."""
    check_device(pref)
    pref = pref.strip().lower()
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SegkdError(f"--device {pref}: CUDA is not available on this machine (use --device cpu)")
    if pref.startswith("cuda:"):
        return torch.device(pref)
    return torch.device("cuda", local_rank)


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU), or return the single-process info."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device_pref))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device, True, owns)


def launch_command(command: str, info: DistInfo) -> str:
    """``command`` (``segkd ...``, with its arguments) as it must be typed to run again on this run's processes:
    itself for one process, else through ``torchrun`` with this run's processes per node (``LOCAL_WORLD_SIZE``),
    and for several nodes the rendezvous options to repeat on every node (segkd cannot know the endpoint the user
    typed; ``HOST:PORT`` stands for it)."""
    if not info.enabled or info.world_size <= 1:
        return command
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    nodes = max(1, info.world_size // max(per_node, 1))
    module = "-m " + command if command.startswith("segkd ") else command
    if nodes == 1:
        return f"torchrun --nproc_per_node {per_node} {module}"
    return (f"torchrun --nnodes {nodes} --nproc_per_node {per_node} --rdzv_backend c10d --rdzv_endpoint HOST:PORT "
            f"{module} (on every node)")


def check_shared_dir(path: Path, info: DistInfo, option: str) -> None:
    """Under torchrun, that every rank sees ``path`` as rank 0 does: rank 0 writes a token file there, every rank
    reads it back. On several nodes ``--out`` (resume state, checkpoints) and ``--teacher-cache`` (shards written by
    every rank, merged by rank 0) must be on a file system all nodes share; a node-local folder of the same name
    would otherwise show up as a rank waiting for shards forever or a resume that finds no state. A rank that cannot
    see the token is one line naming the folder and its host (printed by rank 0; the others exit silently)."""
    if not info.enabled or info.world_size <= 1:
        return
    # a temp-file name (``.NAME.PID-RANDOM.tmp``): if a crash leaves it, the next run's lock removes it
    name = gather_objects(f".segkd-shared.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp" if info.is_main else None,
                          info)[0]
    token = path / name
    if info.is_main:
        path.mkdir(parents=True, exist_ok=True)
        token.write_text(name)
    barrier(info)
    try:
        seen = token.read_text() == name
    except OSError:
        seen = False
    blind = [h for h in gather_objects(None if seen else f"rank {info.rank} on {socket.gethostname()}", info) if h]
    if info.is_main:
        token.unlink(missing_ok=True)
    barrier(info)  # every rank returns with the folder as it was
    if blind:
        err = SegkdError(f"{option} {path}: not the same folder on every process ({', '.join(blind)} cannot see "
                         "what rank 0 writes there); on several nodes it must be on a shared file system")
        err.silent = not info.is_main
        raise err


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on at least one rank (so every rank takes the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_across(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar logs over ranks (the logged loss is the global one, not rank 0's)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (in rank order) on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank, so evaluation and checkpoints agree."""
    if not info.enabled:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


class StepSampler(Sampler[int]):
    """Seeded, resumable, world-size-independent data order.

    Epoch ``e`` is the permutation ``randperm(n, generator=seed + e)``. It is cut into global batches of
    ``global_batch`` images (the last incomplete one dropped, so BatchNorm never sees a tiny batch); rank ``r``
    takes the ``r``-th contiguous chunk of ``global_batch / world_size`` images of each global batch. So the
    images of global step ``k`` are the same whatever the number of processes (a DistributedSampler-equivalent
    sharding), and resuming inside an epoch is skipping the first ``start_step`` global batches.
    """

    def __init__(self, n: int, global_batch: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0) -> None:
        if global_batch % world_size:
            raise SegkdError(f"--batch {global_batch} is not divisible by the {world_size} processes")
        if n < global_batch:
            raise SegkdError(f"the training set has {n} images, fewer than --batch {global_batch}")
        self.n, self.global_batch, self.seed, self.epoch = n, global_batch, seed, epoch
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.local_batch = global_batch // world_size

    @staticmethod
    def steps_per_epoch(n: int, global_batch: int) -> int:
        return n // global_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for step in range(self.start_step, self.steps_per_epoch(self.n, self.global_batch)):
            start = step * self.global_batch + self.rank * self.local_batch
            yield from perm[start:start + self.local_batch]

    def __len__(self) -> int:
        return (self.steps_per_epoch(self.n, self.global_batch) - self.start_step) * self.local_batch


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank ``r`` takes indices ``r, r + W, ...`` so every image counts once
    when the confusion matrices are summed across ranks."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
