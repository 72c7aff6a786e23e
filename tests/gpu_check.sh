#!/usr/bin/env bash
# The GPU check, one GPU, under 10 minutes (its timeouts add to 10): bash tests/gpu_check.sh [python]
#  1. Sphere-L 256px bf16 training steps at the memory plan's micro-batch, eager and compiled (bench.py: img/s,
#     MFU, peak memory), next to the plan's estimate; 4-step sampling img/s
#  2. the CUDA-only tests (tests/test_gpu.py)
#  3. a few steps of a 1-process torchrun on NCCL (DDP), then sample.py --npz under torchrun
# It ends with one Markdown table for the README. Outputs go to $OUT (default: a temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
OUT=${OUT:-$(mktemp -d)}
export OMP_NUM_THREADS=8
GB=$($PY -c "import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))")
NAME=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
# the plan for one GPU's share of the README's 8-GPU run: 32 images a step
PLAN=$($PY train.py --dataset imagenet --model L --batch_size 32 --dry_run --gpus 1 --gpu_mem "$GB" | tail -n 1)
echo "$PLAN"
MICRO=$(sed -E 's/.*micro_batch=([0-9]+).*/\1/' <<< "$PLAN")
CKPT=$(sed -E 's/.*grad_ckpt=(on|off).*/\1/' <<< "$PLAN")
EST=$(sed -E 's/.*est_gb=([0-9.]+).*/\1/' <<< "$PLAN")
timeout 300 $PY bench.py --model L --dataset imagenet --batch_size "$MICRO" --perceptual --compile --iters 5 \
    $([ "$CKPT" = on ] && echo --grad_ckpt) | tee "$OUT/bench.txt" || echo "bench.py failed: see above"
timeout 120 $PY -m pytest -q tests/test_gpu.py | tee "$OUT/tests.txt" || echo "CUDA tests failed: see above"
timeout 120 $PY -m torch.distributed.run --nproc_per_node=1 train.py --device cuda --max_steps 40 --log_every 10 \
    --out_dir "$OUT/nccl" | tee "$OUT/nccl.txt"
timeout 60 $PY -m torch.distributed.run --nproc_per_node=1 sample.py --ckpt "$OUT/nccl/last.pt" --num_samples 512 \
    --npz "$OUT/samples.npz" | tee "$OUT/sample.txt"
$PY - "$OUT" "$NAME" "$PLAN" "$EST" <<'PYEOF'
import re, sys
import numpy as np
out, name, plan, est = sys.argv[1:]
bench, tests = open(f"{out}/bench.txt").read(), open(f"{out}/tests.txt").read()
find = lambda pat, text: (re.findall(pat, text) or ["?"])
img_s, mem = find(r"train: ([\d.]+) img/s", bench), find(r"peak memory ([\d.]+) GiB", bench)
mfu, samp = find(r"MFU vs bf16 peak ([\d.]+%)", bench), find(r"4 step\(s\) ([\d.]+)", bench)
npz = np.load(f"{out}/samples.npz")["arr_0"]                 # the NCCL runs above must have passed (set -e)
print(f"\n| GPU | Sphere-L 256px step ({plan[6:]}) | eager img/s | compiled img/s | MFU eager / compiled "
      f"| peak GiB (plan: {est} GiB) | 4-step sampling img/s | CUDA tests | torchrun NCCL train + sample |")
print("|---|---|---|---|---|---|---|---|---|")
print(f"| {name} | bf16, LPIPS | {img_s[0]} | {img_s[-1]} | {mfu[0]} / {mfu[-1]} | {mem[0]} / {mem[-1]} | {samp[0]} "
      f"| {tests.strip().splitlines()[-1]} | ok, npz {npz.shape} |")
PYEOF
