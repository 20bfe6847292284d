#!/usr/bin/env bash
# One GPU suite for the kernels (issue 21 item 4): correctness, peers, training throughput, one summary.
#
#   bash benchmarks/gpu_suite.sh OUT              # on one H100/H200: about 8 minutes (a prediction: not yet run)
#   bash benchmarks/gpu_suite.sh OUT --dry-run    # list the steps and their commands, run nothing
#   bash benchmarks/gpu_suite.sh OUT --smoke      # CPU, Triton interpreter, tiny shapes (CI runs this)
#
# Steps (GPU): bf16 correctness of attention (fwd/bwd, packed and not, GQA; split and fused backward; pointer
# and TMA-descriptor paths) and of both CE kernels (with the in-place path) against fp32 references;
# attention against SDPA flash / cuDNN / efficient, FlexAttention (document mask) and FA2/FA3 where installed;
# our TMA path against our pointer path in a step of its own (attention-tma: its autotuning and any failure
# stay out of the peer comparison; the summary's ratios give triton-tma ms / triton ms);
# CE and linear CE against torch eager, torch.compile and Liger in bf16 and fp32; train_step tokens/s and
# MFU of gpu-125m with each kernel choice (attention, its TMA tiles and fused backward, loss) and of gpu-1.3b
# with the torch paths and the three flash-kernel variants under the fused loss. Each step writes JSON under OUT/<step>/ and its log
# to OUT/<step>.log; a failing step is recorded and the suite goes on (a GPU hour measures, not debugs),
# exiting 1 at the end if any failed.
# OUT/summary.md and OUT/summary.json (benchmarks/sm90_report.py) carry device, date, commit and command.
# Liger-Kernel comes from a carried wheel: bash scripts/fetch_wheels.sh puts it in .whl/ (git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash benchmarks/gpu_suite.sh OUT [--dry-run|--smoke]}"
MODE="${2:-gpu}"
PY="${PYTHON:-python}"
[ -f .venv/bin/activate ] && source .venv/bin/activate

if [ "$MODE" = "--smoke" ]; then
    export TRITON_INTERPRET=1
    STEPS=(
        "attention-check|$PY -m benchmarks.attention --check fp16 --smoke --tma --out $OUT/attention-check"
        "ce|$PY benchmarks/cross_entropy.py --smoke --tokens 16 --vocab 256 --providers ours --out $OUT/ce"
        "train|$PY -m benchmarks.sm90_train configs/tiny.toml --smoke --choices triton/triton triton+tma+fused-bwd/triton --out $OUT/train"
    )
    STEP_TIMEOUT=300
else
    unset TRITON_INTERPRET
    STEPS=(
        "attention-check|$PY -m benchmarks.attention --check bf16 --tma --out $OUT/attention-check"
        "ce-check|$PY benchmarks/cross_entropy.py --check-bf16 --out $OUT/ce-check"
        "attention|$PY -m benchmarks.attention --seq-lens 2048 8192 --head-dims 64 128 --warmup 3 --reps 10 --out $OUT/attention"
        "attention-gqa|$PY -m benchmarks.attention --seq-lens 8192 --head-dims 128 --kv-group 4 --warmup 3 --reps 10 --out $OUT/attention-gqa"
        "attention-tma|$PY -m benchmarks.attention --seq-lens 2048 8192 --head-dims 64 128 --tma --providers triton triton-tma --warmup 3 --reps 10 --out $OUT/attention-tma"
        "ce-bf16|$PY benchmarks/cross_entropy.py --dtype bf16 --tokens 16384 --vocab 32768 131072 --out $OUT/ce-bf16"
        "ce-fp32|$PY benchmarks/cross_entropy.py --dtype fp32 --tokens 16384 --vocab 32768 131072 --out $OUT/ce-fp32"
        "train-125m|$PY -m benchmarks.sm90_train configs/gpu-125m.toml --warmup 3 --steps 5 --train.batch_size=16 --train.grad_accum=1 --out $OUT/train-125m"
        "train-1.3b|$PY -m benchmarks.sm90_train configs/gpu-1.3b.toml --warmup 2 --steps 4 --train.batch_size=8 --train.grad_accum=1 --choices torch/torch triton/fused triton+tma/fused triton+fused-bwd/fused --out $OUT/train-1.3b"
    )
    STEP_TIMEOUT=240
fi

if [ "$MODE" = "--dry-run" ]; then
    for step in "${STEPS[@]}"; do echo "${step%%|*}: ${step#*|}"; done
    echo "report: $PY -m benchmarks.sm90_report $OUT"
    exit 0
fi

mkdir -p "$OUT"
echo "bash benchmarks/gpu_suite.sh $*" > "$OUT/command.txt"
: > "$OUT/steps.jsonl"
if [ "$MODE" != "--smoke" ] && ! $PY -c "import liger_kernel" 2>/dev/null && ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    $PY -m pip install --no-deps --no-index .whl/liger_kernel-*.whl > "$OUT/liger-install.log" 2>&1
fi
failed=0
for step in "${STEPS[@]}"; do
    name="${step%%|*}"
    cmd="${step#*|}"
    echo "== $name: $cmd"
    start=$(date +%s)
    timeout "$STEP_TIMEOUT" bash -c "$cmd" > "$OUT/$name.log" 2>&1
    rc=$?
    seconds=$(( $(date +%s) - start ))
    [ $rc -ne 0 ] && failed=1 && tail -5 "$OUT/$name.log"
    printf '{"step": "%s", "rc": %d, "seconds": %d, "command": "%s"}\n' "$name" "$rc" "$seconds" "$cmd" >> "$OUT/steps.jsonl"
done
$PY -m benchmarks.sm90_report "$OUT" || failed=1
exit $failed
