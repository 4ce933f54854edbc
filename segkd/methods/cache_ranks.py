"""The teacher cache built by every rank of a torchrun job, with no long collective wait.

:func:`build_ranked` is what :func:`~segkd.methods.teacher_cache.build_cache` runs when the process group has more
than one rank. Every writer is gated by the cache directory's lock (:mod:`segkd.runlock`), which rank 0 takes:

1. Two short collectives while every rank is at the same point of its start-up (right after hashing the run's
   images, which every rank does): whether any rank lacks an image (else every rank opens the cache as it is), and
   a random token naming this build.
2. Rank 0 takes the lock (waiting, if another job builds the same cache), removes temp files of killed writes,
   takes in the shards a killed build recorded in its partial manifests, enters the run's new images, writes the
   manifest and then the lease ``build.json``: the token and the first free shard index.
3. Every rank waits for the lease with this token (polling the file system), reads the manifest (rank 0 does not
   write it again until step 5), cuts the images without a shard into shards of ``SHARD_SIZE`` numbered from the
   lease's index and builds every ``world``-th of them, starting at its rank: disjoint slices, names that cannot
   collide, the same images per shard as one process would make (one image's tensors do not depend on the
   others'). After each shard it rewrites its partial manifest ``part-r<rank>.json`` atomically; at the end it
   marks it done.
4. Ranks wait by polling with a progress line every ``PROGRESS_EVERY`` seconds, never in a collective: a
   collective barrier would time out after the process group's timeout (30 min by default) on a build longer
   than that, and a poll has no such limit. The cost is a poll of a few small files every ``POLL`` seconds.
5. Rank 0, its own slice done, waits for every rank's done part, merges the parts into the manifest, writes it,
   removes the parts and the lease and releases the lock; the other ranks wait until the manifest holds every
   image of the run, then open it.

Killed and rerun (torchrun stops every rank when one dies): the shards a rank finished are in its part file;
the next rank 0 merges them before it plans, so only the missing images are computed, by whatever world size
the rerun has. A shard written but not yet recorded is never overwritten (new indices start past every file on
disk) and simply not used.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from segkd.checkpoint import atomic_write_text
from segkd.engine.distributed import any_rank, gather_objects
from segkd.errors import SegkdError
from segkd.methods import teacher_cache as tc

LEASE = "build.json"
POLL = 0.5
PROGRESS_EVERY = 30.0
T = TypeVar("T")


def part_path(root: Path, rank: int) -> Path:
    return root / f"part-r{rank}.json"


def build_ranked(root: Path, key: tc.CacheKey, images: list[tc.CacheImage], teacher: torch.nn.Module,
                 mean: Sequence[float], std: Sequence[float], device: str | torch.device, progress: bool,
                 dist: Any) -> tc.TeacherCache:
    """This rank's part of a multi-rank build (module docstring); returns the complete cache on every rank."""
    manifest = tc.read_manifest(root)
    ready = manifest is not None and tc._complete(root, manifest, key, images)
    if not any_rank(not ready, dist):
        return tc.TeacherCache(root, manifest)  # type: ignore[arg-type]
    token = gather_objects(uuid.uuid4().hex if dist.rank == 0 else None, dist)[0]
    lock = None
    try:
        if dist.rank == 0:
            lock = tc._lock(root, progress)
            manifest = tc.open_for_build(root, key, images, progress)
            atomic_write_text(root / LEASE, json.dumps({"token": token, "base": tc.next_shard_index(root, manifest),
                                                        "world": dist.world_size}) + "\n")
        lease = wait_for(lambda: _lease(root, token), f"rank {dist.rank}: waiting for rank 0 to take the lock of "
                         f"teacher cache {root}", progress)
        manifest = tc.read_manifest(root)
        assert manifest is not None
        _build_slice(root, manifest, images, lease["base"], token, teacher, mean, std, device, progress, dist)
        if dist.rank == 0:
            wait_for(lambda: _all_done(root, token, dist.world_size), "rank 0: waiting for the other ranks' "
                     "slices of the teacher cache", progress, lambda: _parts_progress(root, token, dist.world_size))
            merge_parts(root, manifest)
            atomic_write_text(root / tc.MANIFEST, json.dumps(manifest, indent=1) + "\n")
            remove_parts(root)
    finally:
        if lock is not None:
            lock.release()
    done = wait_for(lambda: _complete_manifest(root, key, images), f"rank {dist.rank}: waiting for rank 0 to merge "
                    "the teacher cache's manifest", progress)
    return tc.TeacherCache(root, done)


def _build_slice(root: Path, manifest: dict[str, Any], images: list[tc.CacheImage], base: int, token: str,
                 teacher: torch.nn.Module, mean: Sequence[float], std: Sequence[float], device: str | torch.device,
                 progress: bool, dist: Any) -> None:
    """Build every ``world``-th shard of the images the manifest lacks, recording each in this rank's part."""
    todo = [im for im in images if manifest["images"].get(im.sha256, {}).get("shard") is None]
    jobs = tc.plan_shards(todo, base)[dist.rank::dist.world_size]
    part: dict[str, Any] = {"token": token, "rank": dist.rank, "done": False, "shards": {}}
    path = part_path(root, dist.rank)

    def record(name: str, chunk: dict[str, str], sha: str, channels: dict[str, int]) -> None:
        part["shards"][name] = {"images": chunk, "sha256": sha, "channels": channels}
        atomic_write_text(path, json.dumps(part) + "\n")

    atomic_write_text(path, json.dumps(part) + "\n")
    tc.fill(root, manifest, jobs, teacher, mean, std, torch.device(device), progress, record,
            label=f"teacher cache (rank {dist.rank})")
    part["done"] = True
    atomic_write_text(path, json.dumps(part) + "\n")


def merge_parts(root: Path, manifest: dict[str, Any]) -> int:
    """Enter the shards every partial manifest in ``root`` records (whose file exists) into ``manifest``; returns
    how many. The parts stay until the manifest is written (then :func:`remove_parts`)."""
    n = 0
    for path in sorted(root.glob("part-r*.json")):
        part = _read_part(path)
        for name, entry in part["shards"].items():
            if (root / name).is_file():
                tc.record_shard(manifest, name, entry["images"], entry["sha256"], entry["channels"])
                n += 1
    return n


def _read_part(path: Path) -> dict[str, Any]:
    try:
        part = json.loads(path.read_text())
        ok = isinstance(part, dict) and isinstance(part.get("shards"), dict) and all(
            tc.SHARD_NAME.fullmatch(str(name)) and isinstance(e, dict) and isinstance(e.get("images"), dict)
            and isinstance(e.get("sha256"), str) and isinstance(e.get("channels"), dict)
            for name, e in part["shards"].items())
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise SegkdError(f"{path}: not a valid partial teacher-cache manifest; delete it (its shards are then "
                         "computed again)")
    return part


def remove_parts(root: Path) -> None:
    """The partial manifests and the lease, once the manifest holds what they recorded."""
    for path in [*root.glob("part-r*.json"), root / LEASE]:
        path.unlink(missing_ok=True)


def _lease(root: Path, token: str) -> dict[str, Any] | None:
    try:
        lease = json.loads((root / LEASE).read_text())
    except (OSError, ValueError):
        return None
    return lease if lease.get("token") == token else None


def _parts(root: Path, token: str, world: int) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for r in range(world):
        try:
            part = json.loads(part_path(root, r).read_text())
        except (OSError, ValueError):
            part = None
        out.append(part if isinstance(part, dict) and part.get("token") == token else None)
    return out


def _all_done(root: Path, token: str, world: int) -> bool | None:
    return True if all(p is not None and p.get("done") for p in _parts(root, token, world)) else None


def _parts_progress(root: Path, token: str, world: int) -> str:
    parts = _parts(root, token, world)
    waiting = [str(r) for r, p in enumerate(parts) if not (p and p.get("done"))]
    shards = sum(len(p["shards"]) for p in parts if p)
    return f"rank(s) {', '.join(waiting)} still building; {shards} shard(s) written so far"


def _complete_manifest(root: Path, key: tc.CacheKey, images: list[tc.CacheImage]) -> dict[str, Any] | None:
    if (root / LEASE).exists():
        return None  # rank 0 has not merged yet
    manifest = tc.read_manifest(root)
    return manifest if manifest is not None and tc._complete(root, manifest, key, images) else None


def wait_for(probe: Callable[[], T | None], what: str, progress: bool,
             detail: Callable[[], str] | None = None) -> T:
    """Poll ``probe`` every ``POLL`` seconds until it returns a value; a progress line every ``PROGRESS_EVERY``."""
    start = last = time.monotonic()
    while True:
        got = probe()
        if got is not None:
            return got
        now = time.monotonic()
        if progress and now - last >= PROGRESS_EVERY:
            extra = f"; {detail()}" if detail is not None else ""
            print(f"{what} ({now - start:.0f} s{extra})", file=sys.stderr, flush=True)
            last = now
        time.sleep(POLL)
