#!/usr/bin/env bash
# Every GPU claim of grpo-scale, measured in one command, in at most 8 minutes on one H100/H200:
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run    # the same stages on the CPU at tiny shapes (pytest -m slow tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --out DIR    # where the CSVs go
#
# Stages, each capped (a stage past its cap is stopped; what it wrote stays):
#   tests   120 s   the kernel tests on the device (the fast grid)                     -> tests.csv
#   kernels 160 s   the GRPO loss at N=16384, V=151936, bf16, every loss type, token
#                   and sequence level: Triton, in place, fused-linear, eager, compile,
#                   Liger; time, peak memory, bandwidth against copy and the 2U floor   -> kernel.csv
#   e2e     170 s   GRPO steps, random model with Qwen2.5-0.5B's shapes, bf16, shared
#                   prompt, full and LoRA, sdpa and flash-attention                     -> e2e.csv
#   summary  30 s   summary.md with the GPU's name; on a GPU also benchmarks/README.md
# stages.csv records each stage's status and time. Exit status: 0 when every stage passed, else 1.
# Default folder: benchmarks/results/gpu-check-<gpu name> (a temporary folder with --dry-run).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    --out=*) out="${1#--out=}" ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

python=${PYTHON:-python}
flags=()
if [ "$dry" = 1 ]; then
  flags=(--dry-run)
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  out=${out:-$(mktemp -d -t gpu-check-dry-run.XXXXXX)}
else
  name=$($python -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))" 2>/dev/null) \
    || { echo "gpu_check.sh: no CUDA device visible; use --dry-run on a CPU machine" >&2; exit 2; }
  out=${out:-benchmarks/results/gpu-check-$name}
fi
mkdir -p "$out"
echo "stage,status,seconds,cap_s" > "$out/stages.csv"
echo "gpu_check: results in $out"

failed=0
run_stage() {  # name, cap in seconds, extra arguments
  local stage=$1 cap=$2 start rc status
  shift 2
  echo "=== stage $stage (cap ${cap} s)"
  start=$(date +%s)
  timeout --kill-after=10 "$cap" "$python" benchmarks/gpu_check.py --stage "$stage" --out "$out" "${flags[@]}" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out"; failed=1 ;;
    *) status="failed (exit $rc)"; failed=1 ;;
  esac
  echo "$stage,$status,$(( $(date +%s) - start )),$cap" >> "$out/stages.csv"
  echo "=== stage $stage: $status"
}

run_stage tests 120
run_stage kernels 160
run_stage e2e 170
run_stage summary 30
echo "gpu_check: done; summary in $out/summary.md"
exit $failed
