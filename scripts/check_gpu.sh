#!/usr/bin/env bash
# GPU readiness: run the CUDA parity tests (tests/test_cuda.py: model, KV cache, greedy generation, LoRA gradients,
# int8, NF4 against the CPU; two GPUs under torchrun/NCCL against one process where there are two) and print one
# summary line. Without CUDA it says so and exits 0.
#   scripts/check_gpu.sh [extra pytest arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "check_gpu: skipped: torch sees no CUDA device"
    exit 0
fi
gpus=$(python -c "import torch; print(f'{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}')")
log=$(mktemp)
python -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs "$@" >"$log" 2>&1
rc=$?
tail -n 30 "$log"
echo "check_gpu: $gpus: $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$log" | tail -n 1)"
rm -f "$log"
exit $rc
