"""Load a causal LM and its tokenizer from a local directory (or hub id) for generation and training.

The tiny base model (``ftrl.llm.tiny.create_tiny_base``), round checkpoints and real models all
load through :func:`load_model_and_tokenizer`, which sets up the tokenizer for batched generation
(left padding, pad token falling back to eos).

    python -c "from ftrl.llm.models import load_model_and_tokenizer as l; print(l('/tmp/tiny')[0])"
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
DEVICE_KINDS: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:<index>")
# transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` in 4.56.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def resolve_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu``/``cuda``/``cuda:N`` as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}'; valid: {list(DEVICE_KINDS)}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device '{name}'; valid: {list(DEVICE_KINDS)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def prepare_tokenizer_for_generation(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (prompts end where generation starts); pad falls back to eos."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    path: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from ``path``; the model is in eval mode on ``device``."""
    from ftrl.progress import quiet_library_bars

    quiet_library_bars()  # no "Loading weights" bar in a log file
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    local = Path(path)
    if (path.startswith((".", "/", "~")) or local.exists()) and not (
        local.expanduser() / "config.json"
    ).is_file():
        raise FileNotFoundError(f"model path '{path}' has no config.json (is it a saved model directory?)")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    prepare_tokenizer_for_generation(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=trust_remote_code, **{_DTYPE_KWARG: torch_dtype}
    )
    model.to(target)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    _, total = count_parameters(model)
    log.info("model: path=%s params=%d dtype=%s device=%s", path, total, dtype, target)
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied tensors are counted once."""
    parameters = list(model.parameters())
    return (sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters))


def load_value_model(path: str, dtype: str = "float32", device: str = "cpu",
                     trust_remote_code: bool = False) -> torch.nn.Module:
    """A critic: the checkpoint's backbone with a fresh scalar head (verl's value-model shape)."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(
        path, num_labels=1, trust_remote_code=trust_remote_code, **{_DTYPE_KWARG: resolve_dtype(dtype)}
    )
    return model.to(resolve_device(device))
