#!/bin/bash
# GPU smoke test of the scale path, for machines with one CUDA GPU (not run in CI). In about 8 minutes:
#   1. builds a small Qwen3-shaped model locally (hidden 512, 8 layers, ~32M parameters; no hub);
#   2. generates with vLLM through ftrl's VLLMEngine (model.engine=vllm) and prints tokens/s;
#   3. runs one real verl GRPO step through ftrl's verl backend (backend=verl): collect a few snapshots,
#      train one step in the verl subprocess, merge the checkpoint to HF safetensors, and prints the
#      step's throughput and wall time.
# Every phase prints "PASS <phase>" or "FAIL <phase>: <why>"; the exit status is the number of FAILs.
#
#   bash scripts/gpu_smoke.sh                    # work dir /tmp/ftrl_gpu_smoke (wiped first)
#   FTRL_SMOKE_DIR=/scratch/smoke PYTHON=.venv/bin/python bash scripts/gpu_smoke.sh
#
# Needs the pinned GPU set (pip install -e ".[gpu]": verl[vllm]==0.9.1, vllm==0.24.0, torch==2.11.0,
# transformers==5.9.0, tensordict==0.10.0, TransferQueue). If vllm is missing the script installs that set (from FTRL_SMOKE_WHEELS=<dir> without network if set; skip with
# FTRL_SMOKE_NO_INSTALL=1). Beware: each vllm release pins one torch version and pip replaces the installed
# torch with it (a CPU torch becomes a CUDA one); verl 0.9.1 works with the torch that vllm brings, so
# install vllm first and ftrl (pip install -e .) after, or use a fresh virtualenv for GPU machines.
# Per-phase time limits (seconds): FTRL_SMOKE_{BUILD,INSTALL,VLLM,VERL}_S.

set -uo pipefail

PY="${PYTHON:-python}"
WORK="${FTRL_SMOKE_DIR:-/tmp/ftrl_gpu_smoke}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
failures=0
started_all=$(date +%s)

pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failures=$((failures + 1)); }

# Runs "$@" with a time limit; prints the phase's wall time.
timed() {
    local phase="$1" limit="$2"
    shift 2
    local start status
    start=$(date +%s)
    timeout --kill-after=20 "$limit" "$@"
    status=$?
    echo "[gpu_smoke] ${phase}: $(( $(date +%s) - start ))s wall (limit ${limit}s, status ${status})"
    return "$status"
}

cd "$ROOT" || exit 1
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export TOKENIZERS_PARALLELISM=false
rm -rf "$WORK"
mkdir -p "$WORK"

# ---------------------------------------------------------------- 0. the machine
if nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
    pass gpu
else
    fail gpu "nvidia-smi found no GPU"
fi
if "$PY" -c 'import sys, torch; print("torch", torch.__version__, "cuda", torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)'; then
    pass torch-cuda
else
    fail torch-cuda "torch cannot see a CUDA device (a CPU build of torch?)"
fi

# ---------------------------------------------------------------- 1. a small local model
if timed build "${FTRL_SMOKE_BUILD_S:-120}" "$PY" scripts/gpu_smoke.py build --out "$WORK/model"; then
    :
else
    fail build-model "see the output above"
fi

# ---------------------------------------------------------------- 2. vLLM generation
if ! "$PY" -c 'import vllm' 2>/dev/null; then
    if [[ "${FTRL_SMOKE_NO_INSTALL:-0}" == 1 ]]; then
        echo "[gpu_smoke] vllm is not installed and FTRL_SMOKE_NO_INSTALL=1"
    elif [[ -n "${FTRL_SMOKE_WHEELS:-}" ]]; then
        timed install-vllm "${FTRL_SMOKE_INSTALL_S:-300}" "$PY" -m pip install -q --no-index \
            --find-links "$FTRL_SMOKE_WHEELS" -e ".[gpu]"
    else
        timed install-vllm "${FTRL_SMOKE_INSTALL_S:-300}" "$PY" -m pip install -q -e ".[gpu]"
    fi
fi
if "$PY" -c 'import vllm; print("vllm", vllm.__version__)'; then
    pass vllm-import
    if ! timed vllm "${FTRL_SMOKE_VLLM_S:-150}" "$PY" scripts/gpu_smoke.py vllm --model "$WORK/model" \
            --prompts 256 --n 4 --max-new-tokens 256 --gpu-memory-utilization 0.3; then
        fail vllm-generate "see the output above"
    fi
else
    fail vllm-import "vllm is not importable (install it; see the header of this script)"
fi

# ---------------------------------------------------------------- 3. one verl GRPO step via ftrl
overrides=("actor_rollout_ref.rollout.enforce_eager=true")
# Attention: ftrl selects sdpa itself (backend.verl.attn_implementation); with flash-attn installed,
# add backend.verl.attn_implementation=flash_attention_2 to the command below.
verl_overrides="backend.verl.overrides=[$(printf '"%s",' "${overrides[@]}" | sed 's/,$//')]"

if timed verl "${FTRL_SMOKE_VERL_S:-330}" "$PY" -m ftrl.run backend=verl resources=1x80gb +debug=smoke \
        name=gpu_smoke "hydra.run.dir=$WORK/run" "stages=[build_envs,collect,train]" \
        "model.path=$WORK/model" model.dtype=bfloat16 model.engine=hf model.warm_start=false \
        model.max_new_tokens=64 train.rounds=1 train.max_steps_per_round=1 train.prompts_per_step=8 \
        train.n=4 train.mini_batch_prompts=8 train.micro_batch_size=8 collect.max_envs=16 \
        resources.gpu_memory_utilization=0.3 "$verl_overrides"; then
    "$PY" scripts/gpu_smoke.py report --run-dir "$WORK/run" || failures=$((failures + 1))
else
    fail verl-grpo-step "ftrl.run backend=verl failed; verl's own log: $WORK/run/rounds/r1/train/verl.log"
    tail -n 40 "$WORK/run/rounds/r1/train/verl.log" 2>/dev/null
fi

echo "[gpu_smoke] total $(( $(date +%s) - started_all ))s, ${failures} failure(s)"
if (( failures == 0 )); then
    echo "PASS gpu_smoke"
else
    echo "FAIL gpu_smoke: ${failures} phase(s) failed"
fi
exit "$failures"
