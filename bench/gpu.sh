#!/usr/bin/env bash
# One command on a CUDA machine with torch and triton installed: builds fastguide, runs the full AOT
# compile check (bench/aot.py --full), the GPU test suite and the full benchmark (and, with 2+ GPUs, the
# branch-parallel benchmark bench/parallel.py over NCCL), and leaves the log, CSV and PNG in one folder.
#
#   bash bench/gpu.sh [OUT_DIR]          # default: bench/results/<gpu>-<date>
#
# diffusers (and kornia) are needed by the tests and the peers columns; on a machine without network
# access, bring wheels along and set WHEELS=/path/to/wheels (pip install --no-index --find-links).
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown-gpu)
out=${1:-bench/results/${gpu}-$(date +%Y-%m-%d)}
mkdir -p "$out"
log="$out/log.txt"
{
  echo "== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  if [ -n "${WHEELS:-}" ]; then
    pip install -q --no-index --find-links "$WHEELS" diffusers transformers kornia matplotlib 2>&1 | tail -2
  fi
  pip install -q 'setuptools>=77' ${WHEELS:+--no-index --find-links "$WHEELS"} 2>&1 | tail -2  # PEP 639 license metadata
  pip install -q --no-build-isolation -e . 2>&1 | tail -2
  python -m fastguide info
  echo "== AOT compile check, full set (sm_80 / sm_90: registers, spills, shared memory, grids)"
  python bench/aot.py --full
  echo "== tests (CUDA: Triton kernels compiled for the GPU, torch.compile on CUDA)"
  python -m pytest -q tests 2>&1 | tail -15
  echo "== bench"
  python -m fastguide bench --shapes all --dtype fp32,bf16 --csv "$out/bench.csv" --plot "$out/bench.png" --compile-step
  ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
  if [ "$ngpu" -ge 2 ]; then
    echo "== branch-parallel guidance (fastguide.parallel): 1 vs 2 GPUs over NCCL, step time and bytes per step"
    torchrun --nproc-per-node 2 bench/parallel.py --device cuda --batch 8 64 256 --steps 20 --repeat 5 \
      --guiders cfg pag cfg_ag | tee "$out/parallel.md"
  else
    echo "== branch-parallel guidance: skipped ($ngpu GPU; needs 2)"
  fi
} 2>&1 | tee "$log"
echo "results in $out"
