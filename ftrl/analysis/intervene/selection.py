"""Which tensors of a checkpoint a selector picks, by name: the freeze policies' rules on safetensors names.

A selector (``ftrl.config.SelectorSpec``: layer range x module kinds x name regex, or ``all``) picks a
tensor when its layer is in the range (with a range, tensors outside the decoder layers are never
picked), its kind is one of the kinds (none given: any) and its name matches the regex, exactly as
``ftrl.train.freeze`` selects parameters of a live model. A checkpoint with tied embeddings stores one
tensor for ``embed_tokens`` and ``lm_head``; as in the freeze policies, that tensor is picked when either
name is. :func:`trainable_parameters` counts what a run's freeze policy trains, from names and sizes only.

    python -c "from ftrl.analysis.intervene.selection import select_names; from ftrl.config import \\
parse_selector; print(select_names(parse_selector('layers=0 modules=[mlp]'), \\
['model.layers.0.mlp.up_proj.weight', 'model.layers.1.mlp.up_proj.weight'], 2))"
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl.analysis.param_delta import num_layers_of
from ftrl.config import SelectorSpec
from ftrl.params import classify_parameter, expand_module_kinds, parse_layer_range

TIED_HEAD = "lm_head.weight"


def layers_in_names(names: Sequence[str]) -> int:
    """1 + the highest ``layers.<i>.`` index among ``names`` (0 when none has one)."""
    indices = [layer for layer, _ in map(classify_parameter, names) if layer is not None]
    return 1 + max(indices) if indices else 0


def num_layers_for(checkpoint: str | os.PathLike, names: Sequence[str]) -> int:
    """``num_hidden_layers`` from the checkpoint's ``config.json``, else counted from the tensor names."""
    try:
        depth = num_layers_of(checkpoint)
    except (OSError, ValueError):
        depth = None
    return depth if depth is not None else layers_in_names(names)


def select_names(spec: SelectorSpec, names: Sequence[str], num_layers: int, key: str = "selector") -> list[str]:
    """The names in ``names`` (kept in order) that ``spec`` selects in a ``num_layers``-layer model.

    Raises ``ConfigError`` (naming ``key``) when the layer range does not fit the model's depth.
    """
    if spec.selects_all:
        return list(names)
    layers = parse_layer_range(spec.layers, num_layers, key) if spec.layers is not None else None
    kinds = expand_module_kinds(spec.modules, key)
    pattern = re.compile(spec.regex) if spec.regex is not None else None
    tied = not any(classify_parameter(name)[1] == "lm_head" for name in names)

    def hit(name: str) -> bool:
        layer, kind = classify_parameter(name)
        if layers is not None and layer not in layers:
            return False
        if kinds and kind not in kinds:
            return False
        return pattern is None or pattern.search(name) is not None

    chosen = []
    for name in names:
        aliases = [name, TIED_HEAD] if tied and classify_parameter(name)[1] == "embed" else [name]
        if any(hit(alias) for alias in aliases):
            chosen.append(name)
    return chosen


def trainable_parameters(freeze: Mapping[str, Any], numels: Mapping[str, int], num_layers: int) -> tuple[int, int]:
    """``(trainable, total)`` parameters under a run's ``freeze`` section (name, layers, modules, regex, action).

    ``numels`` maps tensor names to sizes (a tied tensor is stored, and so counted, once).
    """
    total = sum(numels.values())
    if (freeze.get("name") or "none") == "none":
        return total, total
    spec = SelectorSpec(str(freeze.get("name")), freeze.get("layers"), tuple(freeze.get("modules") or ()),
                        freeze.get("regex"))
    names = list(numels)
    selected = sum(numels[name] for name in select_names(spec, names, num_layers, "freeze"))
    return (selected if (freeze.get("action") or "train") == "train" else total - selected), total
