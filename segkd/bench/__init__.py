"""Complexity and latency measurement (``segkd bench``): FLOPs, latency, throughput, memory, CI gates."""

from segkd.bench.gates import Gates, apply_gates, enforce
from segkd.bench.run import BenchConfig, bench_models, run_bench_command
from segkd.models.flops import FlopCount, count_flops, module_table

__all__ = [
    "BenchConfig",
    "FlopCount",
    "Gates",
    "apply_gates",
    "bench_models",
    "count_flops",
    "enforce",
    "module_table",
    "run_bench_command",
]
