#!/bin/bash
# The wheels scripts/device_check.sh carries to a closed GPU box (torch 2.11 + transformers + peft there,
# no verl/Ray/Hydra, no network): ~3 MB, into .whl/ (ignored by git: `echo /.whl/ >> .git/info/exclude`).
# ftrl's native trainer imports verl's core_algos (verl + tensordict; Ray is replaced by
# scripts/ray_stand_in), and ftrl.run needs Hydra/OmegaConf. antlr4 4.9.3 ships no wheel: built here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0 \
    importlib_metadata==8.7.0 orjson==3.13.0 codetiming==1.4.0 dill==0.4.1 hydra-core==1.3.2 omegaconf==2.3.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
