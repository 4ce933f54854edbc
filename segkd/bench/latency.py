"""Latency, throughput and memory of one model on one backend.

What is timed: one call of the model on a batch that is already on the device (torch) or already a contiguous
float32 numpy array (ONNX Runtime), followed by a device synchronisation (``torch.cuda.synchronize`` on CUDA; ORT's
``run`` returns host arrays, so it is synchronous). Not timed: image decoding, resizing, normalisation, the copy of
the input to the device for torch, upsampling of logits to the input size and argmax (the zoo models return logits at
their output stride; an ONNX file exported with ``--output probs|labels`` does include them). With ORT's CUDA or
TensorRT provider, the host-to-device copy of the input and the copy of the output back are inside ``run`` and are
therefore timed.

The loop runs ``warmup`` untimed calls, then at least ``iters`` timed calls and keeps going until ``min_time``
seconds have been spent timing. Every call is timed on its own with ``time.perf_counter`` so percentiles are real.
While the loop runs, process CPU time (all threads) is compared with wall time: on CPU a run whose ratio is below
0.9 x threads was sharing the cores with something else and is flagged ``contended`` (its figures are too slow).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from segkd.errors import SegkdError

CONTENDED_RATIO = 0.9


@dataclass
class Timing:
    """Per-call latency statistics (milliseconds) of one timed loop plus the loop's CPU/wall accounting."""

    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    iters: int
    warmup: int
    wall_s: float
    cpu_s: float
    cpu_util: float
    contended: bool | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(times_s: list[float]) -> dict[str, float]:
    """Mean, sample std (0 for one sample), min, max and linear-interpolated percentiles, in milliseconds."""
    if not times_s:
        raise ValueError("no timings to summarize")
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    pct = np.percentile(ms, [50, 90, 95, 99])
    return {
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "p50_ms": float(pct[0]),
        "p90_ms": float(pct[1]),
        "p95_ms": float(pct[2]),
        "p99_ms": float(pct[3]),
    }


def time_loop(
    step: Callable[[], object],
    sync: Callable[[], None],
    warmup: int,
    iters: int,
    min_time: float = 0.0,
    threads: int | None = None,
    flag_contention: bool = True,
) -> Timing:
    """Run ``step`` ``warmup`` times untimed, then time each call (``sync`` after it) as described above."""
    if warmup < 0 or iters < 1:
        raise SegkdError(f"--warmup must be >= 0 and --iters >= 1 (got {warmup} and {iters})")
    for _ in range(warmup):
        step()
    sync()
    times: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while len(times) < iters or (time.perf_counter() - wall0) < min_time:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    util = cpu / wall if wall > 0 else 0.0
    contended = None
    if flag_contention and threads:
        contended = util < CONTENDED_RATIO * threads
    return Timing(**summarize(times), iters=len(times), warmup=warmup, wall_s=wall, cpu_s=cpu,
                  cpu_util=util, contended=contended)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (process-wide and monotonic: it includes everything run before)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def resolve_device(device: str) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` -> a torch device that exists here, else a one-line error."""
    text = device.strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SegkdError(f"--device {device}: CUDA is not available on this machine (torch sees no GPU)")
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SegkdError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise SegkdError(f"--device {device!r}: choose cpu or cuda (or cuda:N)")


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def _cuda_peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield


@dataclass
class RunResult:
    """One backend on one input: timing, throughput, memory and what actually ran."""

    timing: Timing
    throughput_ips: float
    peak_mem_mb: float
    peak_mem_kind: str
    providers_used: list[str]
    compile_s: float | None = None


def _throughput(batch: int, t: Timing) -> float:
    return batch / (t.mean_ms / 1e3) if t.mean_ms > 0 else math.inf


def bench_torch(
    model: nn.Module,
    shape: tuple[int, int, int, int],
    device: torch.device,
    warmup: int,
    iters: int,
    min_time: float,
    threads: int,
    compile: bool = False,
    channels_last: bool = False,
) -> RunResult:
    """Eager (or ``torch.compile``d) eval-mode forward under ``inference_mode`` on a random batch."""
    model = model.to(device).eval()
    x = torch.randn(shape, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fn: Callable[[torch.Tensor], object] = model
    compile_s = None
    if compile:
        fn, compile_s = _compiled(model, x)
    sync = _sync_for(device)

    def step() -> object:
        with torch.inference_mode():
            return fn(x)

    with _cuda_peak(device):
        timing = time_loop(step, sync, warmup, iters, min_time, threads, flag_contention=device.type == "cpu")
    if device.type == "cuda":
        mem, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        mem, kind = peak_rss_bytes() / 2**20, "process_peak_rss"
    used = [f"torch-{'compile' if compile else 'eager'}:{device.type}"]
    return RunResult(timing, _throughput(shape[0], timing), mem, kind, used, compile_s)


def _compiled(model: nn.Module, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], object], float]:
    """``torch.compile`` with its first (compiling) call done here, so failures are one line and not timed."""
    if not hasattr(torch, "compile"):
        raise SegkdError("--backend torch-compile: this torch has no torch.compile")
    t0 = time.perf_counter()
    try:
        fn = torch.compile(model)
        with torch.inference_mode():
            fn(x)
    except Exception as e:  # inductor raises many types (missing compiler, unsupported op, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SegkdError(f"--backend torch-compile: torch.compile failed on this machine ({first})") from None
    return fn, time.perf_counter() - t0


def bench_onnxruntime(
    onnx_path: str | os.PathLike,
    shape: tuple[int, int, int, int],
    providers: str,
    warmup: int,
    iters: int,
    min_time: float,
    threads: int,
) -> RunResult:
    """ONNX Runtime with the asked provider (never a silent fallback) on a random float32 batch."""
    from segkd.export.runtime import create_session

    sess = create_session(onnx_path, providers, threads=threads)
    inp = sess.get_inputs()[0]
    x = np.ascontiguousarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    try:
        sess.run(None, {inp.name: x})
    except Exception as e:  # ORT raises its own error types for wrong shapes/ranks
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SegkdError(f"{onnx_path}: ONNX Runtime rejected input {'x'.join(map(str, shape))} ({first})") from None
    on_cpu = providers.strip().lower().split(",")[0] == "cpu"
    timing = time_loop(lambda: sess.run(None, {inp.name: x}), lambda: None, warmup, iters, min_time, threads,
                       flag_contention=on_cpu)
    return RunResult(timing, _throughput(shape[0], timing), peak_rss_bytes() / 2**20, "process_peak_rss",
                     list(sess.get_providers()))
