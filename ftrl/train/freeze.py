"""Freeze policies: choose which decoder tensors train, by layer range x module kind x name regex.

The paper attributes tool-use gains mostly to the lower layers' MLPs and tests that with
interventions; the ``freeze`` config group (``conf/freeze/*.yaml``) names those interventions and
this module applies them to any Hugging Face decoder (Llama, Qwen2, Qwen3 naming):

The selector grammar (layer ranges, module kinds and aliases, parameter-name classification) is
``ftrl.params``, shared with LoRA targets, the parameter-change analysis and the config checks.

* :func:`apply_freeze_policy` sets ``requires_grad`` and returns a :class:`FreezeReport` whose
  ``describe()`` line the caller logs. A parameter is *selected* when its layer is in the range
  (with a range set, tensors outside the decoder layers such as embeddings, the final norm and the
  LM head are never selected), its kind is one of ``modules`` (empty: any kind) and its name
  matches ``regex`` (when given). ``action: train`` trains only the selection, ``action: freeze``
  trains everything else; ``name: none`` trains everything.
* :func:`apply_lora` composes a policy with LoRA (``peft=lora``): adapters go only on the target
  projections that the policy would train, base weights are frozen. :func:`merge_lora_for_save`
  folds adapters back so checkpoints load with plain ``from_pretrained``.
* :func:`snapshot_frozen` / :func:`assert_frozen_unchanged` prove frozen tensors never moved.

Tied embeddings (``tie_word_embeddings``): ``lm_head.weight`` and ``model.embed_tokens.weight``
are one tensor with one ``requires_grad`` flag. The tensor counts as selected when *any* of its
names is selected, and a warning is logged when a policy selects one name but not the other
(e.g. ``modules: [lm_head]``), because training the head then also trains the input embedding
(and freezing it freezes both). Reports count a shared tensor once.

    python -m pytest tests/test_freeze.py -q
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ftrl.config import FreezeConfig, PeftConfig
from ftrl.errors import ConfigError
from ftrl.params import (
    ADAPTER_MARKER,
    MODULE_KINDS,
    NO_POLICY,
    PROJECTION_KINDS,
    check_policy,
    classify_parameter,
    compile_regex,
    expand_module_kinds,
    format_layers,
    parse_layer_range,
)

if TYPE_CHECKING:  # transformers and peft take seconds to import; only the LoRA helpers need them.
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

_EXAMPLE_NAME_COUNT = 8


class FrozenParametersChangedError(RuntimeError):
    """A tensor that was frozen when snapshotted has different values now."""


# ------------------------------------------------------------------------------- report
def _format_count(count: int, total: int) -> str:
    for scale, unit, digits in ((1e9, "B", 2), (1e6, "M", 2), (1e3, "K", 1)):
        if total >= scale:
            return f"{count / scale:.{digits}f}{unit}"
    return str(count)


@dataclass(frozen=True)
class FreezeReport:
    """What a policy did: exact counts (tied tensors once) and the selection it applied."""

    policy: str
    action: str
    trainable_params: int
    total_params: int
    trainable_tensors: int
    total_tensors: int
    num_layers: int
    layers: tuple[int, ...] | None  # selected decoder layers; None: no layer restriction
    modules: tuple[str, ...]  # selected module kinds; empty: any kind
    regex: str | None = None
    adapted_modules: int | None = None  # LoRA: number of projections that carry adapters

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def describe(self) -> str:
        """One log line, e.g. ``freeze: policy=lower_mlp_only trainable=0.39M/1.25M (31.2%) ...``."""
        trainable = _format_count(self.trainable_params, self.total_params)
        total = _format_count(self.total_params, self.total_params)
        percent = 100 * self.trainable_fraction
        line = (f"freeze: policy={self.policy} trainable={trainable}/{total} ({percent:.1f}%) "
                f"tensors={self.trainable_tensors}/{self.total_tensors} layers={format_layers(self.layers)} "
                f"modules={','.join(self.modules) or 'all'}")
        if self.regex is not None:
            line += f" regex={self.regex}"
        if self.action != "train":
            line += f" action={self.action}"
        if self.adapted_modules is not None:
            line += f" lora_modules={self.adapted_modules}"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_fraction": self.trainable_fraction}


# ------------------------------------------------------------------------------- selection
@dataclass
class _Tensor:
    """One parameter tensor and every name it is reachable under (several when tied)."""

    names: list[str]
    parameter: nn.Parameter


@dataclass
class _Plan:
    """A policy resolved against one model: which tensors it selects and which end up trainable."""

    cfg: FreezeConfig
    tensors: list[_Tensor]
    num_layers: int
    layers: set[int] | None
    kinds: tuple[str, ...]
    selected: list[bool]

    @property
    def trainable(self) -> list[bool]:
        if self.cfg.name == NO_POLICY:
            return [True] * len(self.tensors)
        if self.cfg.action == "train":
            return list(self.selected)
        return [not chosen for chosen in self.selected]

    def trainable_names(self) -> set[str]:
        return {name for tensor, train in zip(self.tensors, self.trainable) if train for name in tensor.names}


def _unique_tensors(model: nn.Module) -> list[_Tensor]:
    by_identity: dict[int, _Tensor] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        entry = by_identity.get(id(parameter))
        if entry is None:
            by_identity[id(parameter)] = _Tensor([name], parameter)
        else:
            entry.names.append(name)
    return list(by_identity.values())


def _count_layers(names: Iterable[str]) -> int:
    indices = [layer for layer, _ in map(classify_parameter, names) if layer is not None]
    return max(indices) + 1 if indices else 0


def _plan(model: nn.Module, cfg: FreezeConfig) -> _Plan:
    check_policy(cfg)
    tensors = _unique_tensors(model)
    num_layers = _count_layers(name for tensor in tensors for name in tensor.names)
    if cfg.name == NO_POLICY:
        return _Plan(cfg, tensors, num_layers, None, (), [False] * len(tensors))
    layers = parse_layer_range(cfg.layers, num_layers, "freeze.layers")
    kinds = expand_module_kinds(cfg.modules, "freeze.modules")
    pattern = compile_regex(cfg.regex)

    def name_selected(name: str) -> bool:
        layer, kind = classify_parameter(name)
        if layers is not None and layer not in layers:
            return False
        if kinds and kind not in kinds:
            return False
        return pattern is None or pattern.search(name) is not None

    selected: list[bool] = []
    for tensor in tensors:
        hits = [name_selected(name) for name in tensor.names]
        if any(hits) and not all(hits):
            chosen = [name for name, hit in zip(tensor.names, hits) if hit]
            others = [name for name, hit in zip(tensor.names, hits) if not hit]
            log.warning("freeze: policy=%s selects %s but not %s, which is the same (tied) tensor; "
                        "the shared tensor counts as selected, so action=%s applies to both names", cfg.name,
                        ", ".join(chosen), ", ".join(others), cfg.action)
        selected.append(any(hits))
    plan = _Plan(cfg, tensors, num_layers, layers, kinds, selected)
    if not any(selected):
        examples = [tensor.names[0] for tensor in tensors[:_EXAMPLE_NAME_COUNT]]
        raise ConfigError(f"freeze policy '{cfg.name}' (layers={cfg.layers!r}, modules={list(cfg.modules)}, "
                          f"regex={cfg.regex!r}) selects no parameter of this {num_layers}-layer model; "
                          f"parameter names look like: {examples}")
    if not any(plan.trainable):
        raise ConfigError(f"freeze policy '{cfg.name}' with action=freeze selects every parameter and "
                          f"so leaves nothing trainable; narrow freeze.layers/freeze.modules/freeze.regex")
    return plan


def select_parameters(model: nn.Module, cfg: FreezeConfig) -> list[str]:
    """Names (``named_parameters`` order, tied tensors once) that ``cfg`` selects; ``[]`` for ``none``.

    Selection is what ``layers`` x ``modules`` x ``regex`` pick, before ``action`` decides whether
    it is the trained or the frozen part. Raises :class:`ConfigError` when a policy selects nothing.
    """
    plan = _plan(model, cfg)
    return [tensor.names[0] for tensor, chosen in zip(plan.tensors, plan.selected) if chosen]


def _report(plan: _Plan, trainable: list[bool]) -> FreezeReport:
    cfg = plan.cfg
    return FreezeReport(
        policy=cfg.name,
        action=cfg.action,
        trainable_params=sum(t.parameter.numel() for t, train in zip(plan.tensors, trainable) if train),
        total_params=sum(t.parameter.numel() for t in plan.tensors),
        trainable_tensors=sum(trainable),
        total_tensors=len(plan.tensors),
        num_layers=plan.num_layers,
        layers=tuple(sorted(plan.layers)) if plan.layers is not None else None,
        modules=plan.kinds,
        regex=cfg.regex,
    )


def apply_freeze_policy(model: nn.Module, cfg: FreezeConfig) -> FreezeReport:
    """Set ``requires_grad`` on every parameter of ``model`` as ``cfg`` says; return the report.

    Optimizers should be built afterwards (or over all parameters: a frozen tensor has no
    gradient, so AdamW skips it, weight decay included). Gradients left on newly frozen tensors
    are dropped, since an optimizer would otherwise still apply them.
    """
    plan = _plan(model, cfg)
    trainable = plan.trainable
    for tensor, train in zip(plan.tensors, trainable):
        tensor.parameter.requires_grad_(train)
        if not train:
            tensor.parameter.grad = None
    return _report(plan, trainable)


# ------------------------------------------------------------------------------- LoRA
def lora_target_modules(model: nn.Module, peft_cfg: PeftConfig, freeze_cfg: FreezeConfig) -> list[str]:
    """Full module names (``model.layers.0.mlp.gate_proj``) that get LoRA adapters.

    A projection qualifies when its kind is in ``peft.target_modules``, its layer in ``peft.layers``
    and, unless the freeze policy is ``none``, its weight is one the policy would train.
    """
    kinds = expand_module_kinds(peft_cfg.target_modules, "peft.target_modules", allowed=PROJECTION_KINDS)
    if not kinds:
        raise ConfigError(f"peft.target_modules: empty; valid kinds: {list(PROJECTION_KINDS)} (or attn, mlp)")
    plan = _plan(model, freeze_cfg)
    peft_layers = parse_layer_range(peft_cfg.layers, plan.num_layers, "peft.layers")
    policy_trainable = None if freeze_cfg.name == NO_POLICY else plan.trainable_names()
    parameter_names = {name for tensor in plan.tensors for name in tensor.names}
    targets: list[str] = []
    for module_name, _module in model.named_modules():
        weight_name = f"{module_name}.weight"
        if weight_name not in parameter_names:
            continue
        layer, kind = classify_parameter(weight_name)
        if kind not in kinds or layer is None:
            continue
        if peft_layers is not None and layer not in peft_layers:
            continue
        if policy_trainable is not None and weight_name not in policy_trainable:
            continue
        targets.append(module_name)
    if not targets:
        raise ConfigError(f"peft: no projection qualifies for LoRA (peft.target_modules="
                          f"{list(peft_cfg.target_modules)}, peft.layers={peft_cfg.layers!r}, freeze policy "
                          f"'{freeze_cfg.name}' with layers={freeze_cfg.layers!r} "
                          f"modules={list(freeze_cfg.modules)} action={freeze_cfg.action}); "
                          f"the sets do not overlap")
    return targets


def apply_lora(model: PreTrainedModel, peft_cfg: PeftConfig,
               freeze_cfg: FreezeConfig) -> tuple[Any, FreezeReport]:
    """Wrap ``model`` (in place, as peft does) with LoRA adapters; freeze every base weight.

    Returns the ``PeftModel`` and a report whose trainable part is exactly the adapter tensors.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if peft_cfg.name != "lora":
        raise ConfigError(f"peft.name: apply_lora needs 'lora', got '{peft_cfg.name}' "
                          f"(peft=none means no adapters: call apply_freeze_policy instead)")
    if peft_cfg.r <= 0:
        raise ConfigError(f"peft.r: must be > 0, got {peft_cfg.r}")
    if peft_cfg.alpha <= 0:
        raise ConfigError(f"peft.alpha: must be > 0, got {peft_cfg.alpha}")
    if not 0.0 <= peft_cfg.dropout < 1.0:
        raise ConfigError(f"peft.dropout: must be in [0, 1), got {peft_cfg.dropout}")
    targets = lora_target_modules(model, peft_cfg, freeze_cfg)
    lora_config = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                             target_modules=targets, bias="none", task_type=TaskType.CAUSAL_LM)
    peft_model = get_peft_model(model, lora_config)
    tensors = _unique_tensors(peft_model)
    trainable = [ADAPTER_MARKER in tensor.names[0] for tensor in tensors]
    for tensor, train in zip(tensors, trainable):
        tensor.parameter.requires_grad_(train)
    adapted = [classify_parameter(f"{target}.weight") for target in targets]
    report = FreezeReport(
        policy="lora" if freeze_cfg.name == NO_POLICY else f"{freeze_cfg.name}+lora",
        action="train",
        trainable_params=sum(t.parameter.numel() for t, train in zip(tensors, trainable) if train),
        total_params=sum(t.parameter.numel() for t in tensors),
        trainable_tensors=sum(trainable),
        total_tensors=len(tensors),
        num_layers=_count_layers(name for tensor in tensors for name in tensor.names),
        layers=tuple(sorted({layer for layer, _ in adapted if layer is not None})),
        modules=tuple(kind for kind in MODULE_KINDS if any(kind == k for _, k in adapted)),
        adapted_modules=len(targets),
    )
    return peft_model, report


def merge_lora_for_save(model: nn.Module, inplace: bool = False) -> PreTrainedModel:
    """A plain transformers model with the adapters folded into the base weights.

    By default the merge happens on a deep copy so training can continue on ``model`` (the
    copy costs one model's memory); pass ``inplace=True`` for a final save. A model that is not a
    ``PeftModel`` is returned as it is.
    """
    from peft import PeftModel
    from transformers import PreTrainedModel

    if not isinstance(model, PeftModel):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"merge_lora_for_save: expected a PeftModel or PreTrainedModel, "
                            f"got {type(model).__name__}")
        return model
    source = model if inplace else copy.deepcopy(model)
    return source.merge_and_unload(safe_merge=True)


# ------------------------------------------------------------------------------- checks
def snapshot_frozen(model: nn.Module, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Clones of every frozen parameter (``requires_grad=False``), keyed by name (tied tensors once)."""
    return {name: parameter.detach().to(device, copy=True) for name, parameter in model.named_parameters()
            if not parameter.requires_grad}


def assert_frozen_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Raise :class:`FrozenParametersChangedError` naming each snapshotted tensor that changed or vanished."""
    parameters = dict(model.named_parameters())
    missing = sorted(name for name in snapshot if name not in parameters)
    changed = [name for name, before in snapshot.items() if name in parameters
               and not torch.equal(parameters[name].detach(), before.to(parameters[name].device))]
    if missing or changed:
        problems = []
        if changed:
            problems.append(f"{len(changed)} frozen tensor(s) changed: {changed}")
        if missing:
            problems.append(f"{len(missing)} snapshotted tensor(s) are no longer parameters: {missing}")
        raise FrozenParametersChangedError("; ".join(problems))
