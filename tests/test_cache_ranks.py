"""The teacher cache built by every rank (2 gloo processes): the same cache, tensor for tensor, as one process;
a rank killed mid-build and a rerun that computes the missing shards only; no collective wait during the build."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import random_teacher

from segkd.data import synthesize

K = 3
N_IMAGES = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ranks")
    data = synthesize(root / "data", n_train=N_IMAGES, n_val=1, size=(32, 48), num_classes=K, seed=4)
    teacher = random_teacher(root / "t.safetensors", K, seed=3)
    ref = root / "ref"
    threads = torch.get_num_threads()
    try:  # one process, one thread: what each rank runs
        _worker(0, 1, 0, str(data), str(teacher), str(ref), str(root / "ref-log"), -1)
    finally:
        torch.set_num_threads(threads)
    return {"data": data, "teacher": teacher, "ref": ref}


def _worker(rank: int, world: int, port: int, data: str, teacher: str, cache: str, log: str, die_at: int,
            slow: float = 0.0) -> None:
    """Build the cache of a c2vkd run (logits + the layer4 tap) on this rank; record how many images it computed.
    ``die_at``: this rank exits hard (as a killed process) at its ``die_at``-th teacher forward; ``slow``: seconds
    this rank sleeps per forward, with a process group whose collectives time out after 3 s."""
    from segkd.engine.distributed import DistInfo, init_distributed
    from segkd.methods import teacher_cache as tc
    from segkd.models.loading import load_teacher
    from segkd.runs.distill import DistillConfig, cache_key, prepare_distill_data

    torch.set_num_threads(1)
    cfg = DistillConfig(model="segformer-b0", method="c2vkd", teacher="deeplabv3-resnet18", teacher_weights=teacher,
                        data=data, crop="32x32", workers=0, device="cpu", progress=False)
    bundle = prepare_distill_data(cfg)
    model = load_teacher("deeplabv3-resnet18", teacher, K)
    images, key = bundle.train.cache_images(), cache_key(cfg, model, bundle)
    old_size, tc.SHARD_SIZE = tc.SHARD_SIZE, 1
    info = DistInfo()
    if world > 1:  # the slow start-up first, then join together: the group's 3 s timeout is for the build only
        from datetime import timedelta

        Path(f"{log}.ready{rank}").touch()
        while not all(Path(f"{log}.ready{r}").exists() for r in range(world)):
            time.sleep(0.05)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=3))
        info = init_distributed("cpu")
    calls = {"n": 0}

    def count(m, a) -> None:
        calls["n"] += 1
        time.sleep(slow)
        if calls["n"] == die_at:
            os._exit(9)  # killed: no cleanup, no exception handling

    hook = model.register_forward_pre_hook(count)
    try:
        tc.build_cache(cache, key, images, model, bundle.mean, bundle.std, progress=False, dist=info)
    finally:
        hook.remove()
        tc.SHARD_SIZE = old_size
    Path(f"{log}.{rank}.json").write_text(json.dumps({"computed": calls["n"]}))
    if world > 1:
        torch.distributed.destroy_process_group()


def _spawn(setup: dict[str, Path], cache: Path, log: Path, die: tuple[int, int] | None = None,
           slow: float = 0.0) -> None:
    port = _free_port()
    procs = [mp.get_context("spawn").Process(target=_worker, args=(
        r, 2, port, str(setup["data"]), str(setup["teacher"]), str(cache), str(log),
        die[1] if die and die[0] == r else -1, slow if r == 1 else 0.0)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):  # a rank died: torchrun stops the others, so do we
            break
        time.sleep(0.1)
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join()


def _assert_same_cache(setup: dict[str, Path], cache: Path) -> None:
    from segkd.methods import teacher_cache as tc

    ref, got = tc.read_manifest(setup["ref"]), tc.read_manifest(cache)
    assert ref is not None and got is not None and set(got["images"]) == set(ref["images"])
    assert got["taps"] == ref["taps"]
    a, b = tc.TeacherCache(setup["ref"], ref), tc.TeacherCache(cache, got)
    for sha in ref["images"]:
        ta, tb = a.tensors(sha), b.tensors(sha)
        assert set(ta) == {"logits", "layer4"} and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not list(cache.glob("part-r*.json")) and not (cache / "build.json").exists()


def test_two_ranks_build_the_one_process_cache(setup: dict[str, Path], tmp_path: Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "log"
    # rank 1 takes 3 x 2 s for its slice, rank 0 ~nothing: a barrier would time out after the group's 3 s
    _spawn(setup, cache, log, slow=2.0)
    counts = [json.loads(Path(f"{log}.{r}.json").read_text())["computed"] for r in (0, 1)]
    assert counts == [N_IMAGES // 2, N_IMAGES // 2]  # disjoint slices: every image once, half each
    _assert_same_cache(setup, cache)
    manifest = json.loads((cache / "cache.json").read_text())
    assert sorted(manifest["shards"]) == [f"shard-{i:05d}.safetensors" for i in range(N_IMAGES)]


def test_a_killed_rank_rerun_computes_the_missing_shards_only(setup: dict[str, Path], tmp_path: Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "log"
    _spawn(setup, cache, log, die=(1, 2))  # rank 1 dies at its second image, its first shard written
    assert not Path(f"{log}.1.json").exists()
    part = json.loads((cache / "part-r1.json").read_text())
    assert len(part["shards"]) == 1 and not part["done"]
    recorded = {sha for p in cache.glob("part-r*.json") for e in json.loads(p.read_text())["shards"].values()
                for sha in e["images"]}
    recorded |= {s for s, e in json.loads((cache / "cache.json").read_text())["images"].items() if e["shard"]}
    _spawn(setup, cache, tmp_path / "rerun")
    counts = [json.loads(Path(f"{tmp_path / 'rerun'}.{r}.json").read_text())["computed"] for r in (0, 1)]
    assert sum(counts) == N_IMAGES - len(recorded) and len(recorded) >= 1  # only what no shard held
    _assert_same_cache(setup, cache)


def test_waiting_is_a_poll_with_a_progress_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from segkd.methods import cache_ranks

    monkeypatch.setattr(cache_ranks, "POLL", 0.01)
    monkeypatch.setattr(cache_ranks, "PROGRESS_EVERY", 0.0)
    seen = iter([None, None, {"ok": 1}])
    lines: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert cache_ranks.wait_for(lambda: next(seen), "rank 1: waiting", True, lambda: "2 shard(s)") == {"ok": 1}
    assert len(lines) == 2 and lines[0].startswith("rank 1: waiting (") and "; 2 shard(s))" in lines[0]


def test_a_malformed_part_is_one_line(tmp_path: Path) -> None:
    from segkd.errors import SegkdError
    from segkd.methods import cache_ranks

    (tmp_path / "part-r0.json").write_text(json.dumps({"shards": {"../x": {}}}))
    with pytest.raises(SegkdError, match="part-r0.json: not a valid partial teacher-cache manifest; delete it"):
        cache_ranks.merge_parts(tmp_path, {"images": {}, "shards": [], "shard_sha256": {}, "taps": {}})
