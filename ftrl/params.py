"""The parameter-selector grammar: layer range x module kind x name regex, for any HF decoder.

Freeze policies (``freeze``), LoRA targets (``peft``), the parameter-change analysis and
interventions all select decoder tensors the same way; this module is that grammar, torch-free so
the config can be checked when it is loaded, before any model exists:

* :func:`classify_parameter` maps a parameter name to ``(layer index, module kind)``, whatever
  prefix a wrapper adds (``base_model.model.`` from peft, ``model.language_model.``).
* :func:`expand_module_kinds` resolves ``attn``/``mlp`` aliases and checks each kind.
* :func:`parse_layer_range` reads ``freeze.layers`` / ``peft.layers``: ``"0:0.5"`` (fractions of
  depth, half-open), ``"0:14"`` (indices, half-open), ``"0-13"`` (inclusive), ``"0,2,5"``.
* :func:`check_selectors` validates the ``freeze`` and ``peft`` groups of a run config, against the
  model's layer count when it is known.

    python -c "from ftrl.params import parse_layer_range; print(parse_layer_range('0:0.5', 8))"
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fractions import Fraction
from typing import Protocol

from ftrl.errors import ConfigError, unknown_choice_message


class FreezeSelector(Protocol):
    """The ``freeze`` group's keys (``ftrl.config.FreezeConfig``)."""

    name: str
    layers: str | None
    modules: list[str]
    regex: str | None
    action: str


class PeftSelector(Protocol):
    """The ``peft`` group's selector keys (``ftrl.config.PeftConfig``)."""

    name: str
    target_modules: list[str]
    layers: str | None

ATTN_KINDS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KINDS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
# Linear projections inside a decoder layer: the only kinds LoRA adapters are put on.
PROJECTION_KINDS: tuple[str, ...] = ATTN_KINDS + MLP_KINDS
MODULE_KINDS: tuple[str, ...] = PROJECTION_KINDS + ("norm", "embed", "lm_head")
MODULE_ALIASES: dict[str, tuple[str, ...]] = {"attn": ATTN_KINDS, "mlp": MLP_KINDS}
FREEZE_ACTIONS: tuple[str, ...] = ("train", "freeze")
NO_POLICY = "none"
LAYER_RANGE_FORMS = ('"lo:hi" half-open (ints are layer indices, decimals in [0, 1] are fractions of depth, '
                     'e.g. "0:0.5"), "a-b" inclusive indices, "a,b,c" a list of indices')

# "layers.<index>." anywhere in a dotted name (model.layers.3., model.language_model.layers.3.).
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
ADAPTER_MARKER = ".lora_"  # peft adapter tensors carry this in their names


# ------------------------------------------------------------------------------- naming
def _component_kind(component: str) -> str | None:
    if component in PROJECTION_KINDS:
        return component
    if component == "embed_tokens":
        return "embed"
    if component == "lm_head":
        return "lm_head"
    # norm (final), input_layernorm, post_attention_layernorm, q_norm, k_norm, ...
    if component == "norm" or component.endswith(("_norm", "layernorm")):
        return "norm"
    return None


def classify_parameter(name: str) -> tuple[int | None, str | None]:
    """Decoder layer index and module kind of a parameter name; ``None`` for what does not apply.

    ``model.layers.3.mlp.gate_proj.weight`` -> ``(3, "gate_proj")``; peft names keep the kind of
    the wrapped projection (``...q_proj.lora_A.default.weight`` -> ``q_proj``);
    ``model.embed_tokens.weight`` -> ``(None, "embed")``; a value head -> ``(None, None)``.
    """
    match = _LAYER_INDEX.search(name)
    layer = int(match.group(1)) if match else None
    # The first component with a known kind is the module that owns the tensor; later components
    # are wrapper internals (lora_A, base_layer, modules_to_save) or the tensor name.
    for component in name.split("."):
        kind = _component_kind(component)
        if kind is not None:
            return layer, kind
    return layer, None


def expand_module_kinds(modules: Iterable[str], key: str = "freeze.modules",
                        allowed: tuple[str, ...] = MODULE_KINDS) -> tuple[str, ...]:
    """Resolve aliases (``attn``, ``mlp``) to kinds, in :data:`MODULE_KINDS` order, checking each."""
    requested: set[str] = set()
    for module in modules:
        kinds = MODULE_ALIASES.get(module, (module,))
        bad = [kind for kind in kinds if kind not in allowed]
        if bad:
            valid = sorted(set(allowed) | {alias for alias, members in MODULE_ALIASES.items()
                                           if set(members) <= set(allowed)})
            raise ConfigError(f"{key}: {unknown_choice_message('module kind', module, valid)}")
        requested.update(kinds)
    return tuple(kind for kind in MODULE_KINDS if kind in requested)


# ------------------------------------------------------------------------------- layer ranges
def _unreadable(text: str, spec: str, key: str) -> ConfigError:
    return ConfigError(f"{key}: cannot read '{text}' in layer range '{spec}'; forms: {LAYER_RANGE_FORMS}")


def _parse_index(text: str, spec: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _unreadable(text, spec, key) from None


def _parse_fraction(text: str, spec: str, key: str) -> Fraction:
    try:
        # Fraction("0.3") is exact, so "0.3" of 10 layers is exactly 3 (floats give 3.0000000000000004).
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise _unreadable(text, spec, key) from None


def _depth(num_layers: int) -> str:
    return f"the model has {num_layers} layers (indices 0-{num_layers - 1})"


def parse_layer_range(spec: str | int | None, num_layers: int, key: str = "freeze.layers") -> set[int] | None:
    """Layer indices that ``spec`` selects out of ``num_layers``; ``None`` (all layers) for ``None``.

    ``"lo:hi"`` is half-open: ints are indices (``"0:2"`` -> {0, 1}), and when either side has a
    decimal point both are fractions of depth, layer ``i`` selected if ``lo*n <= i < hi*n``
    (``"0:0.5"`` of 4 -> {0, 1}, ``"0.5:1.0"`` -> {2, 3}); an empty side means the start or the end.
    ``"a-b"`` is inclusive, ``"a,b,c"`` a list (items may be ``a-b`` ranges). Errors name ``key``.
    """
    if spec is None:
        return None
    if num_layers <= 0:
        raise ConfigError(f"{key}: a layer range ('{spec}') needs a model with decoder layers, "
                          f"but no parameter name has a 'layers.<index>.' part")
    text = str(spec).strip()
    if not text:
        raise ConfigError(f"{key}: empty layer range; use null for all layers or one of: {LAYER_RANGE_FORMS}")
    if ":" in text:
        layers = _parse_slice(text, num_layers, key)
    else:
        layers = _parse_list(text, num_layers, key)
    if not layers:
        raise ConfigError(f"{key}: layer range '{text}' selects no layer; {_depth(num_layers)}")
    return layers


def _parse_slice(text: str, num_layers: int, key: str) -> set[int]:
    parts = [part.strip() for part in text.split(":")]
    if len(parts) != 2:
        raise ConfigError(f"{key}: layer range '{text}' has more than one ':'; forms: {LAYER_RANGE_FORMS}")
    lo_text, hi_text = parts
    if "." in lo_text or "." in hi_text:
        lo = _parse_fraction(lo_text or "0", text, key)
        hi = _parse_fraction(hi_text or "1", text, key)
        if not 0 <= lo < hi <= 1:
            raise ConfigError(f"{key}: fractional layer range '{text}' must satisfy 0 <= lo < hi <= 1")
        return {index for index in range(num_layers) if lo * num_layers <= index < hi * num_layers}
    lo_index = _parse_index(lo_text, text, key) if lo_text else 0
    hi_index = _parse_index(hi_text, text, key) if hi_text else num_layers
    if not 0 <= lo_index < hi_index <= num_layers:
        raise ConfigError(f"{key}: layer range '{text}' (half-open) must satisfy "
                          f"0 <= lo < hi <= {num_layers}; {_depth(num_layers)}")
    return set(range(lo_index, hi_index))


def _parse_list(text: str, num_layers: int, key: str) -> set[int]:
    layers: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if "-" in item.lstrip("-"):
            first_text, _, last_text = item.partition("-")
            first, last = _parse_index(first_text, text, key), _parse_index(last_text, text, key)
            if first > last:
                raise ConfigError(f"{key}: inclusive range '{item}' in '{text}' runs backwards")
            indices = range(first, last + 1)
        else:
            indices = range(_parse_index(item, text, key), _parse_index(item, text, key) + 1)
        for index in indices:
            if not 0 <= index < num_layers:
                raise ConfigError(f"{key}: layer {index} in '{text}' is out of range; {_depth(num_layers)}")
            layers.add(index)
    return layers


def format_layers(layers: Iterable[int] | None) -> str:
    """Compact form of a layer set: ``[0, 1, 2, 5]`` -> ``"0-2,5"``; ``None`` -> ``"all"``."""
    if layers is None:
        return "all"
    ordered = sorted(set(layers))
    if not ordered:
        return "-"
    runs: list[list[int]] = [[ordered[0], ordered[0]]]
    for index in ordered[1:]:
        if index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    texts = [str(first) if first == last else f"{first}-{last}" for first, last in runs]
    return ",".join(texts)


# ------------------------------------------------------------------------------- config checks
def check_policy(cfg: FreezeSelector) -> None:
    if cfg.action not in FREEZE_ACTIONS:
        raise ConfigError(f"freeze.action: unknown value '{cfg.action}'; valid: {list(FREEZE_ACTIONS)}")
    has_selector = cfg.layers is not None or bool(cfg.modules) or cfg.regex is not None
    if cfg.name == NO_POLICY and has_selector:
        # Overriding freeze.modules on the command line without choosing a policy would otherwise
        # silently train everything.
        raise ConfigError(f"freeze.name='none' trains every parameter, but the policy sets "
                          f"layers={cfg.layers!r} modules={list(cfg.modules)} regex={cfg.regex!r}; choose a "
                          f"policy (freeze=<option>) or give it a name")
    if cfg.name != NO_POLICY and not has_selector:
        raise ConfigError(f"freeze policy '{cfg.name}' sets none of freeze.layers, freeze.modules, "
                          f"freeze.regex; use freeze=none to train every parameter")


def compile_regex(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"freeze.regex: invalid regular expression {pattern!r}: {error}") from None


def check_selectors(freeze: FreezeSelector, peft: PeftSelector, num_layers: int | None = None) -> None:
    """Validate the ``freeze`` and ``peft`` selectors as the config loads, before any model is built.

    Checks module kinds, the regex, the policy/selector consistency and the layer-range syntax;
    with ``num_layers`` (the model's depth, when known) also that each range fits the model.
    """
    check_policy(freeze)
    if freeze.name != NO_POLICY:
        expand_module_kinds(freeze.modules, "freeze.modules")
        compile_regex(freeze.regex)
    if peft.name != "none" and not expand_module_kinds(peft.target_modules, "peft.target_modules",
                                                        allowed=PROJECTION_KINDS):
        raise ConfigError(f"peft.target_modules: empty; valid kinds: {list(PROJECTION_KINDS)} (or attn, mlp)")
    # Without the model's depth, check the syntax against a deep stand-in (fractions and lists parse alike).
    depth = num_layers if num_layers is not None else _SYNTAX_CHECK_DEPTH
    for key, spec in (("freeze.layers", freeze.layers if freeze.name != NO_POLICY else None),
                      ("peft.layers", peft.layers if peft.name != "none" else None)):
        if spec is None:
            continue
        if num_layers is None and ":" in str(spec) and "." not in str(spec):
            _check_index_slice_order(str(spec), key)
        parse_layer_range(spec, depth, key)


_SYNTAX_CHECK_DEPTH = 1 << 16


def _check_index_slice_order(text: str, key: str) -> None:
    """``"9:2"`` is wrong at any depth; a depth-independent check for index slices."""
    lo_text, _, hi_text = (part.strip() for part in text.partition(":"))
    if lo_text and hi_text:
        lo, hi = _parse_index(lo_text, text, key), _parse_index(hi_text, text, key)
        if not 0 <= lo < hi:
            raise ConfigError(f"{key}: layer range '{text}' (half-open) must satisfy 0 <= lo < hi")
