#!/usr/bin/env bash
# One prepared device run (issue 5), results under $OUT, issue 5's numbers first (docs/GPU.md):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# The image has torch + transformers + peft but no pydantic: .whl carries it (and liger-kernel).
# Every step runs under one deadline, writes as it goes, and logs its exit status, so a step that a limit
# stops still leaves what it had. At most 8 files come back from $OUT; this writes 7:
#   log_CARD.txt (GPU, versions, preflight, flex_check, every step's status), train_gpu_CARD.{txt,json},
#   train_cli_CARD.{txt,json}, cross_entropy_CARD.{txt,json}.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
START=$SECONDS
# under run's timeout_s=600, with room for the last step's kill grace and the machine's own overhead
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-570}))
left() { local r=$((DEADLINE - SECONDS)); echo $(( r < $1 ? r : $1 )); }   # seconds for a step: its cap or what is left

# Results are named after the card: issue 5's targets are for an H100, and an H200 reads differently (docs/GPU.md).
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oiE 'h100|h200|a100|l40s|l4|a10g' | head -1 | tr 'A-Z' 'a-z')
CARD=${CARD:-gpu}
LOG="$OUT/log_${CARD}.txt"
log() { echo "[$((SECONDS - START)) s] $*" | tee -a "$LOG"; }

# run_step NAME CAP OUTFILE CMD...: CMD under `timeout` (CAP seconds or what is left), its output without
# warnings appended to OUTFILE (and shown) line by line, so a killed step keeps its lines; its exit status
# goes into the log.
run_step() {
  local name=$1 limit; limit=$(left "$2"); local out=$3; shift 3
  if (( limit < 15 )); then log "$name: skipped, ${limit} s left"; return; fi
  log "$name: start, limit ${limit} s"
  timeout -k 5 "$limit" "$@" 2>&1 | grep --line-buffered -v -e Warning -e 'warnings.warn(' | tee -a "$out"
  local rc=${PIPESTATUS[0]}
  log "$name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (stopped by its time limit)')"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv >>"$LOG" 2>&1 \
  || log "nvidia-smi failed"
# 0) wheels: a failed install is logged, not the end (an exit here would return an empty $OUT)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# each recompile is a few log lines: an odd tokens/s (a compile inside the timed steps) can then be explained
export TORCH_LOGS=recompiles
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >>"$LOG" 2>&1; then
    log "wheels installed: $(cd .whl && echo *.whl)"
  else
    log "wheel install FAILED, going on with the image's packages"
  fi
else
  log "no .whl folder: the image's packages only"
fi
# every step imports pydantic (trainer_core.config): if that fails, the log says so before anything else
run_step "0 preflight" 60 "$LOG" python3 -c '
import importlib.metadata as md
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
print(*(f"{n} {version(n)}" for n in ("torch", "transformers", "peft", "triton", "typing_extensions", "pydantic",
                                      "pydantic_core", "liger_kernel")), sep=", ")
import torch, pydantic, trainer_core.config, trainer_core.model
print("preflight OK: trainer_core.config and trainer_core.model import; CUDA", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
'
# 1) correctness on CUDA in float32: flex BlockMask vs SDPA (loss, LoRA gradients), no leak between packed samples
run_step "1 flex_check" 80 "$LOG" python3 bench/flex_check.py
# 2) issue 5: (a) naive vs (b) trainer_core at the quick-start shape; the speedup is saved right after (b)
run_step "2 train_gpu (a)+(b)" 210 "$OUT/train_gpu_${CARD}.txt" \
  python3 bench/train_gpu.py --variants naive,shipped --json "$OUT/train_gpu_${CARD}.json"
# 3) the real trainer command end to end at the 0.5B shape; it stops itself 15 s early to write its summary
limit=$(left 120)
run_step "3 train_cli_smoke" "$limit" "$OUT/train_cli_${CARD}.txt" \
  python3 bench/train_cli_smoke.py --timeout $((limit - 15)) --json "$OUT/train_cli_${CARD}.json"
# 4) the LM head's cross-entropy alone: full logits, checkpointed chunks, shipped LinearCrossEntropy, liger
run_step "4 cross_entropy" 60 "$OUT/cross_entropy_${CARD}.txt" \
  python3 bench/cross_entropy.py --json "$OUT/cross_entropy_${CARD}.json"
# 4b) --dtype float16 (GPUs without bfloat16): the trainer's loss scaling on CUDA, a few steps, appended to
# step 3's text (its summary JSON stays in /tmp: 8 files at most come back); with a validation set, so the
# validation loss (eval mode, no_grad, flex BlockMask) runs on CUDA too: "val loss" in its step lines
# float16 kernels compile cold (step 3 cached bf16 ones); one row per step (tokens_per_row 65536) saves the
# second compile for a changing row count
limit=$(left 110)
echo "--- float16 (loss scaling) ---" >>"$OUT/train_cli_${CARD}.txt"
run_step "4b train_cli_smoke float16" "$limit" "$OUT/train_cli_${CARD}.txt" \
  python3 bench/train_cli_smoke.py --steps 6 --timeout $((limit - 15)) --json /tmp/train_cli_fp16.json -- \
  --dtype float16 --tokens_per_row 65536 --val_ratio 0.1 --eval_interval 3
# 5) the rest of the training bench with what time is left: (b') bf16 adapters, (b'') --compile, the sweep
run_step "5 train_gpu options + sweep" 600 "$OUT/train_gpu_${CARD}.txt" \
  python3 bench/train_gpu.py --variants options,sweep --append --json "$OUT/train_gpu_${CARD}.json"
log "done: $(cd "$OUT" && echo *)"
