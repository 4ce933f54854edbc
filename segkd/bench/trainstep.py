"""``segkd bench --train-step``: the cost of one distillation step against its lower bound.

Measured step (what ``segkd distill`` runs per batch): the method's task from :mod:`segkd.methods.task` —
teacher forward under ``inference_mode`` with the taps the method reads, student forward (with taps), the method's
loss terms and adapters, backward through student + adapters, and an optimiser step over both.

Lower bound (the cheapest any distillation of this pair could be): teacher forward without grad (logits only) +
student forward + cross-entropy + backward + optimiser step on the student alone. For online methods (``dml``,
``collab``; the ``--teacher`` model is then the peer) the bound is two plain supervised steps, one per student.
The overhead ratio is method p50 / bound p50.

With ``--teacher-cache`` the step is timed as ``segkd distill --teacher-cache`` runs it: the batch carries the
teacher's whole-image outputs as the cache stores them (fp16 logits at the teacher's stride, or with ``--cache-topk
K`` the top-K form, and fp16 taps; computed once before timing, so no teacher forward is timed) with each crop's
geometry, and the step warps them onto the crops on the device (:func:`segkd.methods.teacher_cache.warp_stored`:
densify, one ``grid_sample`` per tensor kind) before the loss; the bound is then the student trained alone (forward
+ CE + backward + step). The warp is also timed on its own (``warp``: part of the step, not added to it). The
copy of the stored tensors from the DataLoader to the device is not timed (on a GPU it overlaps with the step when
the loader pins memory; on the CPU there is none).

Choices (documented because the trainer lets users change them): AdamW (lr 6e-5, the SegFormer recipe) for both
the step and the bound, so the ratio isolates the method; random weights (cost does not depend on them); labels
uniform over the classes with 10 % void pixels; batch >= 2 (BatchNorm in train mode needs more than one value per
channel for DeepLab's image-pooling branch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from segkd.bench.latency import peak_rss_bytes, time_loop
from segkd.data.transforms import Geometry
from segkd.engine.batch import Batch, StoredTargets
from segkd.engine.losses import seg_cross_entropy
from segkd.engine.task import OptimConfig
from segkd.errors import SegkdError
from segkd.methods import METHODS, check_pair, make_options
from segkd.methods.targets import teacher_targets
from segkd.methods.task import DistillTask, assemble_task
from segkd.methods.teacher_cache import encode_logits, one_stored, warp_stored
from segkd.models import count_params, create_model

LR = 6e-5


def _random_batch(shape: tuple[int, int, int, int], num_classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=gen)
    labels = torch.randint(0, num_classes, (shape[0], shape[2], shape[3]), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.1] = 255
    return images.to(device), labels.to(device)


def _measure(step: Any, device: torch.device, warmup: int, iters: int, min_time: float, threads: int
             ) -> dict[str, Any]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time_loop(step, sync, warmup, iters, min_time, threads, flag_contention=device.type == "cpu")
    if device.type == "cuda":
        mem, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        mem, kind = peak_rss_bytes() / 2**20, "process_peak_rss"
    lat = {k: getattr(t, f"{k}_ms") for k in ("mean", "std", "min", "max", "p50", "p90", "p95", "p99")}
    return {"latency_ms": lat, "iters": t.iters, "warmup": t.warmup, "cpu_util": t.cpu_util,
            "contended": t.contended, "peak_mem_mb": mem, "peak_mem_kind": kind}


def _supervised_step(model: nn.Module, opt: torch.optim.Optimizer, images: Tensor, labels: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    seg_cross_entropy(model(images), labels, 255).backward()
    opt.step()


def _method_step(task: Any, batch: Batch) -> Any:
    """One step of the distillation task: its losses, backward through student + adapters, AdamW over both."""
    params = [p for part in task.parts().values() for p in part.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    task.train(True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        task.losses(batch)["loss"].backward()
        opt.step()

    return step


def _bound_step(student: nn.Module, other: nn.Module, images: Tensor, labels: Tensor, online: bool,
                cached: bool) -> tuple[Any, str]:
    """The lower bound's step and its definition (see the module docstring)."""
    s_opt = torch.optim.AdamW(student.parameters(), lr=LR)
    student.train()
    if online:
        other.train().requires_grad_(True)
        o_opt = torch.optim.AdamW(other.parameters(), lr=LR)

        def two() -> None:
            _supervised_step(student, s_opt, images, labels)
            _supervised_step(other, o_opt, images, labels)

        return two, "two supervised steps (student and peer)"
    if cached:
        return (lambda: _supervised_step(student, s_opt, images, labels),
                "student fwd + CE + bwd + AdamW step (the student alone)")
    other.eval().requires_grad_(False)

    def with_teacher() -> None:
        with torch.inference_mode():
            other(images)
        _supervised_step(student, s_opt, images, labels)

    return with_teacher, "teacher fwd (no grad) + student fwd + CE + bwd + AdamW step"


def bench_train_step(
    method: str,
    teacher: str,
    student: str,
    shape: tuple[int, int, int, int],
    device: torch.device,
    num_classes: int,
    warmup: int,
    iters: int,
    min_time: float,
    threads: int,
    cached: bool = False,
    topk: int = 0,
) -> dict[str, Any]:
    """Time ``method``'s training step and its lower bound on one batch shape; returns a report entry (``topk``:
    with ``cached``, the batch carries a top-K cache's compact logits)."""
    if shape[0] < 2:
        raise SegkdError(f"--train-step: batch {shape[0]} is too small; use --batch 2 or more "
                         "(BatchNorm in train mode needs more than one value per channel)")
    spec = METHODS.get(method)
    if cached and not spec.can_cache:
        why = "it has no teacher" if not spec.teacher else spec.cache_refusal
        raise SegkdError(f"--teacher-cache cannot serve {spec.name}: {why}")
    s_model = create_model(student, num_classes=num_classes).to(device)
    o_model = create_model(teacher, num_classes=num_classes).to(device)
    check_pair(spec, s_model, o_model)
    images, labels = _random_batch(shape, num_classes, device)
    # the task segkd distill builds (one constructor), with the method's default options
    task = assemble_task(spec, make_options(spec, {}), s_model, o_model, OptimConfig(), OptimConfig())
    task.method.to(device)
    if topk and not 0 < topk <= num_classes:
        raise SegkdError(f"--cache-topk {topk}: needs --teacher-cache and 1 <= K <= the {num_classes} classes")
    batch = _cached_batch(task, images, labels, topk) if cached else Batch(images, labels)  # type: ignore[arg-type]
    measured = _measure(_method_step(task, batch), device, warmup, iters, min_time, threads)
    bound_fn, bound_definition = _bound_step(s_model, o_model, images, labels, spec.peer, cached)
    bound = _measure(bound_fn, device, warmup, iters, min_time, threads)
    extra: dict[str, Any] = {}
    if batch.stored is not None:
        stored = batch.stored
        extra = {"warp": _measure(lambda: warp_stored(stored), device, warmup, iters, min_time, threads),
                 "cache_topk": topk}
    return {
        "method": spec.name,
        "online": spec.peer,
        "student": s_model.zoo_name,
        "teacher" if not spec.peer else "peer": o_model.zoo_name,
        "input": list(shape),
        "num_classes": num_classes,
        "device": str(device),
        "optimizer": f"AdamW lr={LR}",
        "student_params": count_params(s_model),
        "adapter_params": task.method.trainable_parameter_count(),
        "method_step": measured,
        "lower_bound": bound,
        "overhead_ratio": measured["latency_ms"]["p50"] / bound["latency_ms"]["p50"],
        "teacher_cache": cached,
        "bound_definition": bound_definition,
        **extra,
    }


def _cached_batch(task: DistillTask, images: Tensor, labels: Tensor, topk: int = 0) -> Batch:
    """The batch of a cached run: each image's whole-image teacher outputs at the teacher's stride as a shard
    stores them (:func:`~segkd.methods.teacher_cache.encode_logits`, fp16 taps), computed once, with a crop
    geometry that rescales (x1.25), offsets and flips, so the step's warp does the work of a real one."""
    h, w = images.shape[-2:]
    raw = teacher_targets(task.teacher, task.teacher_taps(), images)  # whole-image maps as stored (teacher grid)
    strides = {"logits": 1, **{k: max(1, round(h / v.shape[-2])) for k, v in raw.features.items()}}
    geom = Geometry((h, w), (round(h * 1.25), round(w * 1.25)), 3, 5, (h, w), (h, w), True)
    parts = [one_stored({**encode_logits(raw.logits[i], topk), **{k: v[i].half() for k, v in raw.features.items()}},
                        geom, strides, int(raw.logits.shape[1]), topk) for i in range(images.shape[0])]
    return Batch(images, labels, stored=StoredTargets.join(parts).to(images.device))
