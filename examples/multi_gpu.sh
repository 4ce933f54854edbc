#!/usr/bin/env bash
# Multi-GPU training and distillation with torchrun + DistributedDataParallel (one process per GPU).
#
#   bash examples/multi_gpu.sh DATA_ROOT [NUM_GPUS]
#
# --batch is the global batch (split across processes), so the same command gives the same data order on 1, 2
# or 8 GPUs. Several nodes: replace --standalone with torchrun's rendezvous flags
# (--nnodes N --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT) on every node.
# On a CPU-only machine the same commands run on the gloo backend (set --nproc_per_node to 2 to try it).
set -euo pipefail
DATA=${1:?usage: multi_gpu.sh DATA_ROOT [NUM_GPUS]}
NGPU=${2:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
OUT=${OUT:-runs/multi-gpu}

# 1. a teacher, supervised, with SyncBatchNorm and mixed precision (fp16 + GradScaler on CUDA)
torchrun --standalone --nproc_per_node "$NGPU" -m segkd train --model deeplabv3-resnet50 --data "$DATA" \
    --out "$OUT/teacher" --iters 40000 --batch 16 --crop 512x1024 --optimizer sgd --lr 0.01 --poly-power 0.9 \
    --sync-bn --amp --channels-last --val-every 4000

# 2. a SegFormer-B0 student distilled from it with C2VKD (resumable: rerun with --resume "$OUT/student")
torchrun --standalone --nproc_per_node "$NGPU" -m segkd distill --method c2vkd \
    --teacher deeplabv3-resnet50 --teacher-weights "$OUT/teacher/best.safetensors" --student segformer-b0 \
    --data "$DATA" --out "$OUT/student" --iters 40000 --batch 16 --crop 512x1024 --amp --val-every 4000

# 3. evaluation is sharded across the same processes; rank 0 prints
torchrun --standalone --nproc_per_node "$NGPU" -m segkd eval "$OUT/student/best.safetensors" --data "$DATA" \
    --mode slide --crop 512x1024 --stride 341x683 --json-out "$OUT/student-eval.json"
