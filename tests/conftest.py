"""Shared test setup: one torch thread (two torch processes on 2 cores slow each other down 3-12x),
no W&B, the shared benchmark data as the data directory."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("FTRL_DATA_DIR", str(SHARED_DATA))

import torch

torch.set_num_threads(1)
