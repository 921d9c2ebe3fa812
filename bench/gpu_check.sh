#!/usr/bin/env bash
# The GPU check of issue 6, in one go on a machine with an NVIDIA GPU (bench/README.md,
# "The GPU benchmark"). Run from the repository root; logs go to $OUT:
#
#   OUT=/tmp/out bash bench/gpu_check.sh
#
#   a  env.log          install the wheels in .whl/ (lark, mnist1d), versions, a tiny kernel
#   b  cuda_tests.log   the CUDA test tier on the real GPU (CONVDSL_TEST_GPU=1 pytest -m cuda)
#   c  mnist1d.log      train networks/mnist1d_cnn.cnn with its own recipe, --device cuda
#   d  lenet5.log       train LeNet-5 on digits28 (bench/digits28.py), --device cuda
#   e  bench.log        python3 bench/gpu.py, the report in cuda_bench.md
#   f  ablation.log     ResNet-18-CIFAR's benchmark again, once without prefetching the
#                       next K-slice (cuda_bench_no_prefetch.md), once with 128x128 product
#                       tiles (cuda_bench_tile128.md), once without k tables
#                       (cuda_bench_no_tables.md); LeNet-5's without CUDA graphs
#                       (cuda_bench_no_graphs.md), and its kernels one by one
#                       (convdsl time --kernels, batch 64)
#   g  baseline.log     (only when GPU_CHECK_BASELINE=DIR names an earlier source tree, e.g.
#                       `git archive be34868 | tar -x -C DIR`, carried along) that tree's own
#                       bench/gpu.py, cuda_bench_baseline.md: an A/B on the same machine
#   warm.log            the kernels of steps c to e, compiled in the background during b
#   summary.txt         every step's exit code and seconds
#
# Every step runs under `timeout` and a failed step never stops the next. The steps share
# one kernel cache ($CONVDSL_CACHE), so a kernel compiled once is loaded after. Limits:
# each step has a cap and a floor (seconds); a step gets its cap, or less so that the later
# steps keep their floors within GPU_CHECK_TOTAL_S (default 480) in all. Overrides:
# PY (python3), GPU_CHECK_STEPS ("a b c d e f", and g with a baseline), GPU_CHECK_TOTAL_S,
# GPU_CHECK_DEVICE (cuda; cpu only to try the script on a machine without a GPU),
# GPU_CHECK_BASELINE, GPU_CHECK_WORKERS (8), CAP_<step> (e.g. CAP_c=300).

set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PY:-python3}
BASELINE=${GPU_CHECK_BASELINE:-}
STEPS=${GPU_CHECK_STEPS:-a b c d e f${BASELINE:+ g}}
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WORK=/tmp/convdsl-gpu-check  # run folders and data: never under $OUT (few files come back)
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/runs"

export CONVDSL_CACHE=${CONVDSL_CACHE:-/tmp/convdsl-cache}
# A CPU compile on a machine not yet measured would first spend about ten seconds of
# scarce device time measuring it for the CPU's cost model (codegen/cpu/conv_fit.py);
# the CPU's algorithm choices do not matter here
export CONVDSL_NO_CALIBRATE=${CONVDSL_NO_CALIBRATE:-1}
export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg

# LeNet-5 on digits28: the recipe that reached 97.5-99.2% test accuracy on the CPU (seeds 0-2)
LENET_RECIPE="--epochs 20 --val-split 0 --lr 0.02"

declare -A CAP=([a]=${CAP_a:-60} [b]=${CAP_b:-150} [c]=${CAP_c:-150} [d]=${CAP_d:-90}
                [e]=${CAP_e:-240} [f]=${CAP_f:-240} [g]=${CAP_g:-240})
declare -A FLOOR=([a]=30 [b]=60 [c]=60 [d]=45 [e]=150 [f]=60 [g]=150)
declare -A RC=() TOOK=()
ORDER="a b c d e f g"
START=$(date +%s)

limit_for() {  # the seconds step $1 may take: its cap, less what later steps need
  local step=$1 later=0 seen=0 s
  for s in $ORDER; do
    if [ "$seen" = 1 ] && [[ " $STEPS " == *" $s "* ]]; then later=$((later + FLOOR[$s])); fi
    if [ "$s" = "$step" ]; then seen=1; fi
  done
  local left=$((TOTAL_S - ($(date +%s) - START) - later))
  local limit=${CAP[$step]}
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt "${FLOOR[$step]}" ]; then limit=${FLOOR[$step]}; fi
  echo "$limit"
}

run_step() {  # run_step STEP LOG TITLE COMMAND: COMMAND (bash) under timeout, into $OUT/LOG
  local step=$1 log=$OUT/$2 title=$3 command=$4
  if [[ " $STEPS " != *" $step "* ]]; then return; fi
  local limit
  limit=$(limit_for "$step")
  echo "=== $step: $title (limit ${limit} s) -> $log"
  local began
  began=$(date +%s)
  { echo "\$ $command"; echo "(limit ${limit} s, started $(date -u +%FT%TZ))"; } > "$log"
  # SIGTERM first (training saves its run and stops), SIGKILL 20 s later
  timeout -s TERM -k 20 "$limit" bash -c "$command" >> "$log" 2>&1
  RC[$step]=$?
  TOOK[$step]=$(( $(date +%s) - began ))
  if [ "${RC[$step]}" = 124 ] || [ "${RC[$step]}" = 137 ]; then
    echo "TIMED OUT after ${limit} s" >> "$log"
  fi
  echo "--- $step: exit ${RC[$step]} in ${TOOK[$step]} s; last lines:"
  tail -n 12 "$log"
}

# (a) the wheels, then what the machine has, then one kernel through numba.cuda's toolchain
run_step a env.log "install wheels, versions, a tiny CUDA kernel" '
set -x
ls .whl
'"$PY"' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
nvidia-smi
nproc; free -g | head -2
'"$PY"' - <<"EOF"
import platform
from importlib.metadata import version
import numba, numpy, torch
print("python", platform.python_version(), "numpy", numpy.__version__, "numba",
      numba.__version__, "numba-cuda", version("numba-cuda"), "torch", torch.__version__,
      "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("torch sees a GPU:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import lark, mnist1d
print("lark", lark.__version__, "mnist1d from", mnist1d.__file__)
import convdsl.codegen.cuda  # first: it mends numba-cuda 0.30 for NumPy 2.5
print("convdsl CUDA kernels registered")
from numba import cuda
cuda.detect()
@cuda.jit
def add_one(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] += 1
a = cuda.to_device(numpy.zeros(100, numpy.float32))
add_one[1, 128](a)
print("tiny kernel:", a.copy_to_host().sum(), "(100.0 expected)")
EOF'

# Meanwhile, compile the kernels of the later steps into the shared cache, one process per
# network (NVVM compiles on one core; the machine has many), so that steps c to e load
# them instead of compiling them in turn. A cold compile also shares its stages among
# CONVDSL_COMPILE_WORKERS worker processes (one per core by default): the small networks
# get none, each ResNet-18-CIFAR compile three, so that all together about fill the cores.
if [[ " $STEPS " == *" e "* ]] && [ "$DEVICE" = cuda ]; then
  for job in "mnist1d_cnn 100 1" "lenet5 32 1" "lenet5 64 1" "lenet5 256 1" \
             "resnet18_cifar 128 3"; do
    set -- $job
    CONVDSL_COMPILE_WORKERS=$3 timeout 400 $PY -m convdsl.cli compile "networks/$1.cnn" \
        --batch "$2" --device cuda > "$WORK/warm-$1-$2.log" 2>&1 &
  done
fi
if [[ " $STEPS " == *" f "* ]] && [ "$DEVICE" = cuda ]; then  # step f's other kernels
  for setting in CONVDSL_CUDA_PREFETCH=0 CONVDSL_CUDA_MAX_TILE=128 CONVDSL_CUDA_K_TABLES=0; do
    env "$setting" CONVDSL_COMPILE_WORKERS=3 timeout 400 $PY -m convdsl.cli compile \
        networks/resnet18_cifar.cnn --batch 128 --device cuda \
        > "$WORK/warm-resnet18_cifar-128-$setting.log" 2>&1 &
  done
fi

# (b) the CUDA test tier on the real GPU (test files named explicitly: only them collected);
# cold NVVM compiles take most of its time, one core each, so with pytest-xdist among the
# wheels the tests run in GPU_CHECK_WORKERS processes (8) that share the kernel cache
TIMEOUT_FLAG=""
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_FLAG="--timeout 120"; fi
WORKERS_FLAG=""
if "$PY" -c "import xdist" 2>/dev/null; then WORKERS_FLAG="-n ${GPU_CHECK_WORKERS:-8}"; fi
run_step b cuda_tests.log "CUDA test tier on the GPU" "
CONVDSL_TEST_GPU=1 $PY -m pytest -q -m cuda -x $TIMEOUT_FLAG $WORKERS_FLAG \
    -p no:cacheprovider tests/test_cuda_*.py"

# (c) the MNIST-1D CNN with its file's recipe (150 epochs of batch 100, AdamW); if time runs
# out, training saves its run on SIGTERM and the saved weights are tested instead
MNIST_RUN=$WORK/runs/mnist1d
MNIST_LIMIT=$(limit_for c)
run_step c mnist1d.log "train the MNIST-1D CNN on the GPU" "
timeout -s TERM -k 20 $((MNIST_LIMIT - 35)) \
    $PY -m convdsl.cli train networks/mnist1d_cnn.cnn --data mnist1d --device $DEVICE \
    --no-progress --out $MNIST_RUN
status=\$?
if [ \$status -ne 0 ] && [ -f $MNIST_RUN/checkpoint.npz ]; then
  echo \"training stopped (exit \$status): testing the weights it saved\"
  $PY -m convdsl.cli test networks/mnist1d_cnn.cnn --weights $MNIST_RUN --data mnist1d \
      --device $DEVICE
fi
exit \$status"

# (d) LeNet-5 on the digits at 1x28x28, the CPU's recipe
LENET_RUN=$WORK/runs/lenet5
run_step d lenet5.log "train LeNet-5 on digits28 on the GPU" "
$PY bench/digits28.py $WORK/digits28.npz &&
$PY -m convdsl.cli train networks/lenet5.cnn --data $WORK/digits28.npz $LENET_RECIPE \
    --device $DEVICE --no-progress --out $LENET_RUN"

# (e) the benchmark against PyTorch (writes its report after every case)
run_step e bench.log "bench/gpu.py: convdsl against PyTorch/cuDNN" "
$PY bench/gpu.py --budget 20 --profile-iterations 5 --markdown $OUT/cuda_bench.md"

# (f) ResNet-18-CIFAR with the products' other settings: without prefetching the next
# K-slice, then 128x128 tiles (8x8 register blocks, one block per SM), then without k
# tables (packed launches, switched off, measured 2.1x on LeNet-5's step:
# docs/performance.md); then LeNet-5 without CUDA graphs, and its per-kernel times
run_step f ablation.log "the benchmark without prefetch, with 128x128 tiles, without k tables, without graphs" "
CONVDSL_CUDA_PREFETCH=0 $PY bench/gpu.py --only resnet18_cifar --budget 10 \
    --markdown $OUT/cuda_bench_no_prefetch.md
CONVDSL_CUDA_MAX_TILE=128 $PY bench/gpu.py --only resnet18_cifar --budget 10 \
    --markdown $OUT/cuda_bench_tile128.md
CONVDSL_CUDA_K_TABLES=0 $PY bench/gpu.py --only resnet18_cifar --budget 10 \
    --markdown $OUT/cuda_bench_no_tables.md
CONVDSL_CUDA_GRAPHS=0 $PY bench/gpu.py --only lenet5 --budget 10 \
    --markdown $OUT/cuda_bench_no_graphs.md
$PY -m convdsl.cli time networks/lenet5.cnn --batch 64 --device cuda --kernels"

# (g) the same benchmark at the baseline tree: its own convdsl and its own bench/gpu.py,
# with its own kernel cache (the generated kernels differ)
if [ -n "$BASELINE" ]; then
  run_step g baseline.log "bench/gpu.py at the baseline tree $BASELINE" "
cd $BASELINE && CONVDSL_CACHE=/tmp/convdsl-cache-baseline PYTHONPATH=/tmp/site:$BASELINE \
    $PY bench/gpu.py --only lenet5 --only resnet18_cifar --budget 20 \
    --markdown $OUT/cuda_bench_baseline.md"
fi

# the background compiles' last lines (cold compile seconds per network)
tail -n 2 "$WORK"/warm-*.log > "$OUT/warm.log" 2>/dev/null

{
  echo "gpu_check: $(date -u +%FT%TZ), $(( $(date +%s) - START )) s in all, device $DEVICE"
  for s in $ORDER; do
    if [[ " $STEPS " == *" $s "* ]]; then
      echo "step $s: exit ${RC[$s]:-?} in ${TOOK[$s]:-?} s"
    fi
  done
  for log in cuda_tests mnist1d lenet5; do  # each step's verdict, if it got that far
    grep -hE " in [0-9.]+s( \(|$)|^test split:|\(test split\):|^training stopped|^interrupted|^TIMED OUT" \
        "$OUT/$log.log" 2>/dev/null | sed "s/^/  $log: /" | tail -n 4
  done
  for report in cuda_bench cuda_bench_no_tables cuda_bench_no_graphs cuda_bench_baseline; do
    if [ -f "$OUT/$report.md" ]; then
      echo "$report:"; sed -n '/^| case/,/^$/p' "$OUT/$report.md"
    fi
  done
} | tee "$OUT/summary.txt"
