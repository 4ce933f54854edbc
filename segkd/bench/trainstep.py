"""``segkd bench --train-step``: the cost of one distillation step against its lower bound.

Measured step (what ``segkd distill`` runs per batch): the method's task from :mod:`segkd.methods.task` —
teacher forward under ``inference_mode`` with the taps the method reads, student forward (with taps), the method's
loss terms and adapters, backward through student + adapters, and an optimiser step over both.

Lower bound (the cheapest any distillation of this pair could be): teacher forward without grad (logits only) +
student forward + cross-entropy + backward + optimiser step on the student alone. For online methods (``dml``,
``collab``; the ``--teacher`` model is then the peer) the bound is two plain supervised steps, one per student.
The overhead ratio is method p50 / bound p50.

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
from segkd.errors import SegkdError

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
    from segkd.engine.losses import seg_cross_entropy

    opt.zero_grad(set_to_none=True)
    seg_cross_entropy(model(images), labels, 255).backward()
    opt.step()


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
) -> dict[str, Any]:
    """Time ``method``'s training step and its lower bound on one batch shape; returns a report entry."""
    from segkd.engine.task import OptimConfig
    from segkd.methods import METHODS, check_pair, make_options
    from segkd.methods.task import DistillTask, OnlineTask
    from segkd.models import count_params, create_model

    if shape[0] < 2:
        raise SegkdError(f"--train-step: batch {shape[0]} is too small; use --batch 2 or more "
                         "(BatchNorm in train mode needs more than one value per channel)")
    spec = METHODS.get(method)
    s_model = create_model(student, num_classes=num_classes).to(device)
    o_model = create_model(teacher, num_classes=num_classes).to(device)
    check_pair(spec, s_model, o_model)
    opts = make_options(spec, {})
    adapters = spec.build(opts, s_model, o_model, ignore_index=255).to(device)
    images, labels = _random_batch(shape, num_classes, device)

    if spec.peer:
        task: Any = OnlineTask(spec, adapters, s_model, o_model, OptimConfig(), OptimConfig())
        params = list(task.a.parameters()) + list(task.b.parameters())
    else:
        task = DistillTask(spec, adapters, s_model, o_model, OptimConfig())
        params = list(task.module.parameters())
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=LR)
    task.train(True)

    def method_step() -> None:
        opt.zero_grad(set_to_none=True)
        task.losses(images, labels)["loss"].backward()
        opt.step()

    measured = _measure(method_step, device, warmup, iters, min_time, threads)
    adapter_params = sum(p.numel() for p in adapters.parameters() if p.requires_grad)

    s_opt = torch.optim.AdamW(s_model.parameters(), lr=LR)
    if spec.peer:
        o_model.train().requires_grad_(True)
        o_opt = torch.optim.AdamW(o_model.parameters(), lr=LR)

        def bound_step() -> None:
            _supervised_step(s_model, s_opt, images, labels)
            _supervised_step(o_model, o_opt, images, labels)
    else:
        o_model.eval().requires_grad_(False)

        def bound_step() -> None:
            with torch.inference_mode():
                o_model(images)
            _supervised_step(s_model, s_opt, images, labels)

    s_model.train()
    bound = _measure(bound_step, device, warmup, iters, min_time, threads)
    ratio = measured["latency_ms"]["p50"] / bound["latency_ms"]["p50"]
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
        "adapter_params": adapter_params,
        "method_step": measured,
        "lower_bound": bound,
        "overhead_ratio": ratio,
        "bound_definition": "two supervised steps (student and peer)" if spec.peer else
        "teacher fwd (no grad) + student fwd + CE + bwd + AdamW step",
    }
