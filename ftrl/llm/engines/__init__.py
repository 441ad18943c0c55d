"""Inference engines (``model.engine``): hf (transformers generate), vllm (GPU), openai (HTTP API).

Heavy engines are imported only when selected, so the CPU path never loads vLLM.

    python -c "from ftrl.registry import ENGINES; print(ENGINES.names())"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_engine(cfg: Any, policy: Path | str, batch_size: int) -> Any:
    """An engine for ``policy`` (a checkpoint path or hub id) configured from the run config."""
    from ftrl.registry import ENGINES

    engine_cls = ENGINES.get(cfg.model.engine)
    return engine_cls.from_config(cfg, policy, batch_size=batch_size)
