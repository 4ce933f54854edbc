"""Per-role initial weights: every run's student starts from the same draw at the same seed, whatever else it builds.

``segkd train`` builds its model right after :func:`seed_everything`; ``segkd distill`` with ``--teacher-cache``
loads the teacher first (to build the cache), and building a model draws from torch's global generator. Built from
whatever the global stream held, the student would then start from other weights than the same student trained
alone at the same seed, and "paired" rows would not be paired at their start.

Choices (where no paper says anything):

* The student is built by :func:`build_student`: torch's generators are re-seeded with the run seed right before
  it. That is exactly what ``segkd train`` always did (its model was the first draw after seeding), so train runs
  and online distillation runs made before this module existed start from the same weights as today, and every
  command and method now starts the student bit-identical at a given seed. The stream is *not* restored
  afterwards: what online methods build next (``dml``/``collab``'s peer) draws what it always drew, so a B0 peer of
  a B0 student does not start as its twin.
* A method's adapters are built by :func:`build_seeded` with a stream of their own (forked, seeded from the run
  seed and the role, restored afterwards), so the same method starts from the same adapters whether its teacher
  runs online or through the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")
STREAMS = {"student": 0, "peer": 1, "method": 2}
_MIX = 1_000_003  # a prime: role streams of neighbouring seeds do not coincide (seed s peer != seed s+1 student)


def role_seed(seed: int, role: str) -> int:
    """The seed of ``role``'s forked stream: ``seed`` for the student, a derived 63-bit value for the others."""
    k = STREAMS[role]
    return seed if k == 0 else (seed * _MIX + k * 7_919_111) % (2**63 - 1)


def build_student(seed: int, make: Callable[[], T]) -> T:
    """Re-seed torch's generators with ``seed`` and build the student (see the module docstring)."""
    torch.manual_seed(seed)
    return make()


@contextmanager
def seeded(seed: int, role: str = "student") -> Iterator[None]:
    """Run the block with torch's global CPU generator (and CUDA's, if initialised) seeded for ``role`` and restore
    the generators afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(role_seed(seed, role))
        yield


def build_seeded(seed: int, role: str, make: Callable[[], T]) -> T:
    """``make()`` under :func:`seeded`."""
    with seeded(seed, role):
        return make()


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in key order): the fingerprint of an
    initial draw that run.json records and the reproduction protocol compares across rows."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
