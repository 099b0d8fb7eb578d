#!/usr/bin/env bash
# The GPU check: one command that proves roli's GPU path on a CUDA machine (each stage has its own time
# limit, 9 minutes in all for the default stages; a stage that runs out is a failure and the next one starts).
#   env     device, driver, torch/CUDA/Triton/nvcc versions, Python headers, c++, ninja (benchmarks/gpu_env.py);
#           fails, naming what is missing, when the just-in-time build of roli._C could not run
#   build   roli._C with its CUDA kernels: the ahead-of-time build if it has them, else the just-in-time
#           build for this GPU's architecture (TORCH_CUDA_ARCH_LIST, default: this GPU's), then roli.info
#   tests   ROLI_TEST_GPU=1 pytest tests/test_gpu.py (triton and cuda backends on CUDA tensors, CUDA graphs)
#   ops     the op benchmark with every provider (torch, cuda, triton)
#   attack  the attack benchmark (PGD-10: ours vs torchattacks vs the reference-style loop), resnet18 and
#           ViT-B/16 at 224, batch 64 (torchattacks' rows are left out, with a note, where it is not installed)
#   train   the training-step benchmark (PGD-7 finetuning step and ALP step), ViT-B/16 at 224 and resnet18,
#           with the CUDA-graph row (only with --only train: perf supersedes it)
#   perf    the same step settled (bench_train.py --settle): every variant interleaved, 3 rounds of 10 steps after
#           2 warm-up rounds, median with min-max, host syncs per step, the same-run matmul peak; ViT-B/16,
#           Swin-B, ResNet-50 at 224 and resnet18, with the CUDA-graph and (sm89+) fp8-attack rows, and ViT-B at
#           the largest batch that fits (bench_perf_cuda.*)
#   fp8     what an fp8 attack costs (benchmarks/bench_fp8.py): input-gradient sign agreement with fp32 (ViT-B,
#           Swin-B), PGD-10 strength of fp8 vs bf16 PGD, and a small ViT trained both ways (clean, PGD-10,
#           AutoAttack-lite) on --data's npz (else digits) (bench_fp8_cuda.*); skipped below sm89, said so
#   sdpa    which attention kernel runs in the attack for timm's ViT-B and Swin-B, and Swin-B with timm's fused
#           attention forced on (benchmarks/sdpa_kernels.py: sdpa_kernels_cuda.md)
#   compile the compile rows (inductor default + roli's CUDA graph, inductor's reduce-overhead CUDA graphs) for
#           ViT-B (bench_perf_compile_cuda.*) after the slow compile test of test_gpu.py (compiled attack in roli's
#           CUDA graph equals eager); not in the default run (minutes of compilation): --only compile
# Tables go to the --out folder (*_cuda.md, the CSVs, a PNG) with the device name and versions, and the whole
# output to gpu_check_cuda.log there. The default folder is outside the checkout: a copied checkout that is
# thrown away after the run (a lent machine) would take the results with it.
#
# usage: benchmarks/gpu_check.sh [--only env,build,tests,ops,attack,train,perf,fp8,sdpa,compile] [--out DIR]
#                                [--wheels DIR]
#                                [--bundle DIR] [--data FILE.npz]
#   --out     where the tables and the log go (default: $TMPDIR/roli-gpu-check, /tmp/roli-gpu-check)
#   --only    the stages to run (env and build always run first); e.g. --only attack,train to redo two
#   --wheels  install the wheels in DIR first, without a network (into a temporary folder on PYTHONPATH),
#             for a machine that lacks a dependency (the benchmarks compare with torchattacks)
#   --bundle  after each stage, pack the --out folder into DIR/gpu_check.tgz (a killed run keeps what ran)
#   --data    the fp8 stage's training data: an npz with x_train, y_train, x_test, y_test (e.g. a CIFAR-10 subset)
# Python: $PYTHON, else `python` if it imports torch, else `python3`. The checkout's roli is the one tested
# (its folder goes first on PYTHONPATH). Exit status: 0 when every stage passed, 3 when one failed (named on
# the last line), 2 for a bad argument, 1 without CUDA.
#
# On the lent GPU machine of this project (no network), from the checkout:
#   pip download --no-deps --only-binary=:all: -d .whl torchattacks==3.5.1        # here, once (.whl is ignored)
#   PYTHON=python3 bash benchmarks/gpu_check.sh --wheels .whl --out /tmp/gc --bundle $OUT   # there, .whl carried
set -uo pipefail
STAGES=env,build,tests,ops,attack,train,perf,fp8,sdpa,compile
ONLY=env,build,tests,ops,attack,perf,fp8,sdpa  # on request: train (perf's quick predecessor), compile (long)
DATA=
WHEELS=
BUNDLE=
RESULTS=
bad() { echo "gpu_check: $1" >&2; exit 2; }
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # paths are the caller's, not the repo's
while [ $# -gt 0 ]; do
  case "$1" in
    --only) [ $# -ge 2 ] || bad "--only needs a comma list of: $STAGES"; ONLY=$2; shift 2 ;;
    --wheels) [ $# -ge 2 ] || bad "--wheels needs a folder of .whl files"; WHEELS=$(absolute "$2"); shift 2 ;;
    --out) [ $# -ge 2 ] || bad "--out needs a folder"; RESULTS=$(absolute "$2"); shift 2 ;;
    --bundle) [ $# -ge 2 ] || bad "--bundle needs a folder to write gpu_check.tgz into"; BUNDLE=$(absolute "$2"); shift 2 ;;
    --data) [ $# -ge 2 ] || bad "--data needs an .npz file"; DATA=$(absolute "$2"); shift 2 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) bad "unknown argument '$1' (see --help)" ;;
  esac
done
for s in ${ONLY//,/ }; do
  case ",$STAGES," in *",$s,"*) ;; *) bad "--only: unknown stage '$s' (stages: $STAGES)" ;; esac
done
if [ -n "$WHEELS" ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then bad "--wheels: no .whl files in '$WHEELS'"; fi
if [ -n "$BUNDLE" ] && [ ! -d "$BUNDLE" ]; then bad "--bundle: '$BUNDLE' is not a folder"; fi
if [ -n "$DATA" ] && [ ! -f "$DATA" ]; then bad "--data: '$DATA' is not a file"; fi
cd "$(dirname "$0")/.." || exit 2
RESULTS=${RESULTS:-${TMPDIR:-/tmp}/roli-gpu-check}
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif command -v python >/dev/null 2>&1 && python -c "import torch" 2>/dev/null; then
  PY=python
else
  PY=python3  # a machine whose `python` is missing or has no torch (the lent GPU machine promises python3)
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: '$PY' cannot import torch; activate roli's environment or set PYTHON" >&2
  exit 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 1
fi

mkdir -p "$RESULTS" || bad "--out: cannot create '$RESULTS'"
LOG=$RESULTS/gpu_check_cuda.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "$WHEELS" ]; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || bad "--wheels: pip could not install them"
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}
export TORCH_CUDA_ARCH_LIST
FAILED=()
bundle() {
  [ -z "$BUNDLE" ] && return 0
  tar czf "$BUNDLE/gpu_check.tgz.part" -C "$RESULTS" . && mv -f "$BUNDLE/gpu_check.tgz.part" "$BUNDLE/gpu_check.tgz"
}
stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, note a failure, bundle the results
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  case ",$ONLY," in *",$name,"*) ;; *) [ "$name" = build ] || [ "$name" = env ] || return 0 ;; esac
  echo "== $name (limit ${limit} s)"
  if timeout "$limit" "$@"; then
    echo "== $name: ok in $((SECONDS - t0)) s"
  else
    echo "== $name: FAILED (exit $?) after $((SECONDS - t0)) s"
    FAILED+=("$name")
  fi
  bundle
}

"$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| arch list', '$TORCH_CUDA_ARCH_LIST')"
echo "gpu_check: results in $RESULTS"
stage env 20 "$PY" benchmarks/gpu_env.py
stage build 60 "$PY" -c "
import time
from roli import _ext, info
t = time.time()
ok = _ext.load() and _ext.has_cuda_kernels()
print(f'roli._C: {_ext.EXT_MODE} build, loaded in {time.time() - t:.0f} s' if _ext.HAS_EXT else f'roli._C: {_ext.EXT_ERROR}')
info.main()
raise SystemExit(0 if ok else 'roli._C has no CUDA kernels (see the cuda line above)')
"
stage tests 90 env ROLI_TEST_GPU=1 "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu.py
stage ops 40 "$PY" benchmarks/bench_pgd_step.py --quick --device cuda --no-compile --out "$RESULTS"
stage attack 60 "$PY" benchmarks/bench_attack.py --quick --device cuda --models resnet18,vit_base_patch16_224 --out "$RESULTS"
stage train 120 "$PY" benchmarks/bench_train.py --quick --device cuda --models vitb,resnet18 --no-compile --out "$RESULTS"
stage perf 140 "$PY" benchmarks/bench_train.py --settle --quick --device cuda --models vitb,swinb,resnet50,resnet18 \
  --no-compile --largest-batch vitb --out "$RESULTS"
if "$PY" -c "import sys; from roli.models.fp8 import fp8_supported; sys.exit(0 if fp8_supported('cuda')[0] else 1)"; then
  stage fp8 100 "$PY" benchmarks/bench_fp8.py --device cuda ${DATA:+--dataset "npz:$DATA"} --out "$RESULTS"
elif case ",$ONLY," in *",fp8,"*) true ;; *) false ;; esac; then
  echo "== fp8: skipped: $("$PY" -c "from roli.models.fp8 import fp8_supported; print(fp8_supported('cuda')[1])")"
fi
stage sdpa 30 "$PY" benchmarks/sdpa_kernels.py --device cuda --models vitb,swinb --out "$RESULTS"
stage compile 300 bash -c '"$0" -m pytest -q -p no:cacheprovider -m slow -k compile tests/test_gpu.py && "$0" \
  benchmarks/bench_train.py --settle --quick --device cuda --models vitb --compile-only --name bench_perf_compile \
  --out "$1"' "$PY" "$RESULTS"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${FAILED[*]} (log: $LOG)"
  sleep 1 && bundle
  exit 3
fi
echo "gpu_check: every stage passed; tables in $RESULTS (*_cuda.md), log in $LOG"
sleep 1 && bundle  # the log's last lines too (tee writes them asynchronously)
