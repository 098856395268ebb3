#!/usr/bin/env bash
# The GPU-machine results (docs/results.md) in one run: the CUDA tests, HumanEval throughput for the
# F16 copy and the Q4_1 default (there `dovetail serve`'s default, --draft auto, drafts with
# the shipped draft on the GPU), and the cost profiles (the target's T_V(k), the draft's
# time per tree level on the GPU, and the operations that take a tree's time).
#
#   bash scripts/gpu_results.sh [OUT]        # OUT: results-gpu/ unless given
#
# Environment: PYTHON (python3), COUNT (40 HumanEval problems), SYSTEMS (the throughput
# script's systems; llama-cpp-lookup is left out by default: it only costs time), MODEL
# (the default model's GGUF unless given), STEPS (which of the steps run; default: all,
# tests-cuda tests-cuda-engine throughput-f16 throughput-q4 profile), SERVE_ARGS (more
# `dovetail serve` flags for the speculative system, e.g. "--draft runs/new/draft"; the
# profile step then times that draft too), VARIANT (one more server system for both
# throughput runs, NAME=FLAGS; default "lookup=--draft ngram": prompt lookup alone, no draft,
# against the draft's default; empty: none), STOCK_LLAMA (a folder holding another
# llama-cpp-python build, e.g. the stock one: the throughput runs report speedups against
# it too), SERIAL (one more server system, default "serial=--no-draft-ahead": the default
# without drafting during verification; empty: none). Each step's output goes to
# OUT/<step>.log; a
# failing step is reported and the others still run. Needs the project importable
# (installed, or on PYTHONPATH) and, for the tests, pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results-gpu}
PYTHON=${PYTHON:-python3}
COUNT=${COUNT:-40}
SYSTEMS=${SYSTEMS:-dovetail dovetail-plain llama-cpp}
STEPS=" ${STEPS:-tests-cuda tests-cuda-engine throughput-f16 throughput-q4 profile} "
SERVE_ARGS=${SERVE_ARGS:-}
VARIANT_ARGS=()
VARIANT=${VARIANT-lookup=--draft ngram}
if [[ -n "$VARIANT" ]]; then VARIANT_ARGS=(--variant "$VARIANT"); fi
SERIAL=${SERIAL-serial=--no-draft-ahead}
if [[ -n "$SERIAL" ]]; then VARIANT_ARGS+=(--variant "$SERIAL"); fi
DRAFT=shipped
if [[ "$SERVE_ARGS" =~ --draft[=[:space:]]+([^[:space:]]+) ]]; then DRAFT=${BASH_REMATCH[1]}; fi
MODEL_ARGS=()
if [[ -n "${MODEL:-}" ]]; then MODEL_ARGS=(--model "$MODEL"); fi
if [[ -n "${STOCK_LLAMA:-}" ]]; then VARIANT_ARGS+=(--stock-llama "$STOCK_LLAMA"); fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME COMMAND...: run, log, note a failure (unless STEPS leaves it out)
    local name=$1
    shift
    [[ "$STEPS" == *" $name "* ]] || return 0
    echo "== $name: $*"
    local started=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "   done in $((SECONDS - started)) s"
    else
        echo "   FAILED after $((SECONDS - started)) s (see $OUT/$name.log):"
        tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
        failed+=("$name")
    fi
}

{ if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  lscpu | grep -E 'Model name|^CPU\(s\)' || true
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    # the tests that need CUDA: first the draft's own (tiny models, seconds: the CUDA-graph
    # growth and catch-up against the host loop), then the speculative exactness tests with
    # the draft on the GPU in the engine (they train a small draft on the CPU first: minutes)
    step tests-cuda "$PYTHON" -m pytest -v --durations=10 -k cuda tests/test_draft_model.py
    step tests-cuda-engine "$PYTHON" -m pytest -v --durations=10 -k cuda \
        tests/test_speculative.py
else
    echo "== tests-cuda, tests-cuda-engine: skipped (no pytest)"
fi
# shellcheck disable=SC2086
step throughput-f16 "$PYTHON" scripts/humaneval_throughput.py "${MODEL_ARGS[@]}" --f16 \
    --count "$COUNT" --check --systems $SYSTEMS --serve-args="$SERVE_ARGS" \
    "${VARIANT_ARGS[@]}" --out "$OUT/humaneval_throughput_f16"
# shellcheck disable=SC2086
step throughput-q4 "$PYTHON" scripts/humaneval_throughput.py "${MODEL_ARGS[@]}" \
    --count "$COUNT" --check --systems $SYSTEMS --serve-args="$SERVE_ARGS" \
    "${VARIANT_ARGS[@]}" --out "$OUT/humaneval_throughput"
step profile "$PYTHON" scripts/profile_costs.py "${MODEL_ARGS[@]}" --draft "$DRAFT" --trace \
    --max-k 32 --out "$OUT/cost_profile"

for table in "$OUT"/*.md; do
    [[ -e "$table" ]] && { echo "== $table"; cat "$table"; }
done
if ((${#failed[@]})); then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
