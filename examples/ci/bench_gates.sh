#!/usr/bin/env bash
# Export a student checkpoint to ONNX, then benchmark the checkpoint (PyTorch) and the ONNX file (ONNX Runtime)
# with CI gates. Exit codes: 0 all gates passed, 3 a gate failed (one line on stderr says which), 1 bad input.
#
#   CKPT=student.safetensors MAX_LATENCY_MS=400 MAX_GFLOPS=40 MAX_PARAMS=4M examples/ci/bench_gates.sh
#
# Settings (environment variables):
#   CKPT            segkd checkpoint of the student (required)
#   OUT_DIR         where student.onnx and bench.json go (default: bench-out)
#   INPUT           input shape BxCxHxW (default 1x3x512x1024)
#   THREADS         CPU threads for torch and ONNX Runtime (default 2)
#   ITERS, WARMUP   timed and warm-up calls (default 20 and 3)
#   MAX_LATENCY_MS  gate on the p50 latency of every run (optional)
#   MAX_GFLOPS      gate on GFLOPs per image, 2 x GMACs (optional)
#   MAX_PARAMS      gate on deploy parameters, e.g. 4M (optional)
#   BASELINE        a previous bench.json to compare with (optional)
#   MAX_REGRESSION  allowed increase vs BASELINE of p50 latency, GMACs and params (default 10%)
#   SEGKD           the segkd command (default: segkd)
set -euo pipefail

: "${CKPT:?set CKPT to the student checkpoint (.safetensors)}"
OUT_DIR=${OUT_DIR:-bench-out}
INPUT=${INPUT:-1x3x512x1024}
THREADS=${THREADS:-2}
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-3}
MAX_REGRESSION=${MAX_REGRESSION:-10%}
SEGKD=${SEGKD:-segkd}
read -r -a SEGKD_CMD <<< "$SEGKD"

mkdir -p "$OUT_DIR"
HW=${INPUT#*x*x}   # 1x3x512x1024 -> 512x1024

# 1. export (verified against PyTorch before the file is written)
"${SEGKD_CMD[@]}" export "$CKPT" --out "$OUT_DIR/student.onnx" --size "$HW" --threads "$THREADS"

# 2. bench the checkpoint on torch and the exported file on ONNX Runtime, with gates
gates=()
[[ -n "${MAX_LATENCY_MS:-}" ]] && gates+=(--max-latency-ms "$MAX_LATENCY_MS")
[[ -n "${MAX_GFLOPS:-}" ]] && gates+=(--max-gflops "$MAX_GFLOPS")
[[ -n "${MAX_PARAMS:-}" ]] && gates+=(--max-params "$MAX_PARAMS")
[[ -n "${BASELINE:-}" ]] && gates+=(--baseline "$BASELINE" --max-regression "$MAX_REGRESSION")

status=0
"${SEGKD_CMD[@]}" bench "$CKPT" "$OUT_DIR/student.onnx" --input "$INPUT" --threads "$THREADS" \
  --backend torch --providers cpu --warmup "$WARMUP" --iters "$ITERS" \
  --json-out "$OUT_DIR/bench.json" "${gates[@]}" || status=$?

if [[ $status -eq 3 ]]; then
  echo "bench gates failed; report: $OUT_DIR/bench.json" >&2
elif [[ $status -ne 0 ]]; then
  echo "segkd bench could not run (exit $status)" >&2
fi
exit $status
