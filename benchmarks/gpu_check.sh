#!/usr/bin/env bash
# The GPU check: one command that proves roli's GPU path on a CUDA machine, within about 8 minutes.
#   1. ROLI_TEST_GPU=1 pytest tests/test_gpu.py (triton and cuda backends on CUDA tensors, CUDA graphs)
#   2. the op benchmark with every provider (torch, cuda, triton)
#   3. the attack benchmark (PGD-10: ours vs torchattacks vs the reference-style loop), ViT-B/16 at 224, batch 64
#   4. the training-step benchmark (PGD-7 finetuning step and ALP step), ViT-B/16 at 224 and resnet18, with
#      the CUDA-graph row
# Tables go to benchmarks/results/ (*_cuda.md and the CSVs) with the device name and versions.
# Without CUDA it prints one line and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 1
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
"$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
"$PY" -m roli.info
echo "== 1/4 GPU tests"
ROLI_TEST_GPU=1 timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 || echo "gpu_check: GPU tests FAILED (see above)"
echo "== 2/4 op benchmark (torch, cuda, triton)"
timeout 120 "$PY" benchmarks/bench_pgd_step.py --quick --device cuda --no-compile --out "$OUT" || echo "gpu_check: bench_pgd_step FAILED"
echo "== 3/4 attack benchmark: ViT-B/16 @224, batch 64, PGD-10"
timeout 150 "$PY" benchmarks/bench_attack.py --quick --device cuda --models resnet18,vit_base_patch16_224 --out "$OUT" || echo "gpu_check: bench_attack FAILED"
echo "== 4/4 training step: PGD-7 finetuning and ALP, ViT-B/16 @224 and resnet18, with the CUDA-graph row"
timeout 150 "$PY" benchmarks/bench_train.py --quick --device cuda --models vitb,resnet18 --no-compile --out "$OUT" || echo "gpu_check: bench_train FAILED"
echo "gpu_check: done; tables in $OUT"
