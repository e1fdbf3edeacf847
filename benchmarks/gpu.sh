#!/usr/bin/env bash
# The GPU benchmark run for a session that is lent a device (one call, about 5 minutes on an H100/H200):
#   bash benchmarks/gpu.sh          # writes $OUT/gpu_benchmarks.md when $OUT is set, else ./gpu_benchmarks.md
# It needs the package and its test extras installed (pytorch-optimizer for the references).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_benchmarks.md"
{
  echo "# GPU benchmarks ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
  echo
  echo '## python benchmarks/bench_optimizer.py --device cuda --rounds 50'
  python benchmarks/bench_optimizer.py --device cuda --rounds 50
  echo
  echo '## python benchmarks/bench_optimizer.py --device cuda --rounds 50 --width 64'
  python benchmarks/bench_optimizer.py --device cuda --rounds 50 --width 64
  echo
  echo '## python benchmarks/bench_mixin.py --device cuda --rounds 5 --steps 50'
  python benchmarks/bench_mixin.py --device cuda --rounds 5 --steps 50 2>/dev/null
  echo
  echo '## python benchmarks/bench_fsdp.py --device cuda --width 8192 --layers 8 (every GPU of the machine)'
  python benchmarks/bench_fsdp.py --device cuda --width 8192 --layers 8 2>/dev/null
} | tee "$out"
