#!/usr/bin/env bash
# One prepared device run (issue 5): GPU tests + the benchmarks, results under $OUT.
# The device image has torch 2.11 + transformers 5.17 + peft but no pydantic: carry it (and liger-kernel) as wheels
# (see docs/GPU.md), e.g. run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# results are named after the card (issue 5's targets are for an H100; an H200 run must not pass for one)
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s|l4|a10g' | head -1 | tr 'A-Z' 'a-z')
CARD=${CARD:-gpu}
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
# 1) correctness on CUDA: flex BlockMask vs SDPA loss on the same batch, bf16 training steps
timeout 90 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" tests/trainer/test_rope_attention.py tests/trainer/test_layout.py tests/trainer/test_cross_entropy.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
# 2) the real trainer command end to end at the 0.5B shape (demo data, quick-start flags): its own tokens/s, peak
timeout 120 python3 bench/train_cli_smoke.py --json "$OUT/train_cli_${CARD}.json" 2>&1 | grep -v Warning | tail -20 | tee "$OUT/train_cli_${CARD}.txt"
# 3) the LM head's cross-entropy alone: full logits, checkpointed chunks, shipped LinearCrossEntropy, liger (if carried)
timeout 45 python3 bench/cross_entropy.py --json "$OUT/cross_entropy_${CARD}.json" 2>&1 | grep -v Warning | tee "$OUT/cross_entropy_${CARD}.txt"
# 4) the benchmark: naive vs trainer_core at the guide's quick-start shape, plus a token-budget sweep
timeout 300 python3 bench/train_gpu.py --json "$OUT/train_gpu_${CARD}.json" 2>&1 | grep -v Warning | tee "$OUT/train_gpu_${CARD}.txt"
