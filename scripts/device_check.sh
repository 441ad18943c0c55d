#!/bin/bash
# Device check for a small closed GPU box (one H100/H200, torch + transformers + peft, no vLLM/Ray/verl,
# no network, 64 MiB carried per call). One call of at most ~8 minutes; every phase prints a timed
# PASS/FAIL/SKIP line (scripts/device_check.py). What such a box lacks travels as ~3 MB of wheels in
# .whl/ (bash scripts/device_wheels.sh: verl, tensordict, Hydra, OmegaConf, ...); Ray is replaced by
# scripts/ray_stand_in (docs/scale.md "Device check").
#
#   bash scripts/device_check.sh --dry            # CPU, toy sizes: what CI runs (tests/test_device_check.py)
#   bash scripts/device_check.sh --cpu-baseline   # on the GPU box (carry .whl)
# Status: not yet run on a GPU (written and dry-run on CPU only).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import hydra, omegaconf, verl, tensordict' 2>/dev/null; then
    ls "$ROOT"/.whl/*.whl >/dev/null 2>&1 || { echo "FAIL wheels: verl/Hydra missing and no .whl/ (bash scripts/device_wheels.sh)"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ftrl_site \
        "$ROOT"/.whl/*.whl || { echo "FAIL wheels: pip could not install .whl/*.whl"; exit 1; }
    export PYTHONPATH="/tmp/ftrl_site${PYTHONPATH:+:${PYTHONPATH}}"
fi
if [[ "${FTRL_RAY_STAND_IN:-0}" == 1 ]] || ! "$PY" -c 'import ray' 2>/dev/null; then
    # verl's modules the native trainer uses import ray but never call it: a stand-in (no Ray on the box).
    export PYTHONPATH="$ROOT/scripts/ray_stand_in${PYTHONPATH:+:${PYTHONPATH}}"
    echo "[device_check] ray: stand-in (scripts/ray_stand_in)"
fi
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}" TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
cd "$ROOT" && exec "$PY" scripts/device_check.py "$@"
