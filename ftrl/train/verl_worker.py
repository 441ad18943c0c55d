"""Freeze policies inside verl's actor: ``requires_grad`` set on the HF model before the FSDP wrap.

verl 0.9.1 has no option to freeze parameters. Its supported extension point that runs inside
every training worker, before the model is built, is ``actor_rollout_ref.model.external_lib``: a
module the worker imports when it reads its model config (``HFModelConfig.__post_init__``). The
verl backend names this module there and puts the policy file's path in the workers' environment
(``FTRL_VERL_FREEZE_FILE``, via verl's ``ray_kwargs.ray_init.runtime_env``). Importing the module
wraps ``FSDPEngine._build_module`` (verl builds the HF model there and then, in
``_build_model_optimizer``, wraps it with FSDP and builds the optimizer): after the model is
built, ``ftrl.train.freeze.apply_freeze_policy`` runs on it, with the same selection rules and
log line as the native backend, and rank 0 writes the report to ``freeze_report.json`` beside
the policy file (the backend refuses a round whose report is missing).

What it does:
* the actor's trainable set is exactly the native one (same parameter names, same policy code);
  frozen tensors get no gradient, so AdamW neither updates nor decays them;
* FSDP1 (``strategy=fsdp``) needs ``fsdp_config.use_orig_params=true`` to mix frozen and trained
  tensors in one layer; the backend sets it, and the hook refuses to run without it; FSDP2 shards
  per parameter and needs nothing.

What it cannot do:
* it patches verl's FSDP engine only (strategies fsdp/fsdp2); Megatron, VeOmni and TorchTitan
  engines build their models elsewhere and would train everything;
* it relies on a private method of verl 0.9.1 (``FSDPEngine._build_module`` being called by
  ``_build_model_optimizer`` before the wrap), pinned by a test; a verl upgrade must re-check it;
* it does not save memory the way a smaller model would: frozen weights stay sharded in full and
  FSDP1 with original parameters still allocates gradient buffers for whole flat parameters;
* LoRA (``peft=lora``) is refused with a freeze policy (verl's LoRA freezes every base weight);
  the reference model (forward only) and the PPO critic (a value model) are never frozen, as in
  the native backend;
* on a multi-node cluster the run directory (policy file, report) must be on a shared filesystem,
  as verl's checkpoints already require.

    python -m pytest tests/test_verl_backend.py -q -k freeze
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ftrl.artifacts import FREEZE_REPORT_JSON, atomic_write_text
from ftrl.config import FreezeConfig
from ftrl.errors import ConfigError
from ftrl.train.freeze import FreezeReport, apply_freeze_policy
from ftrl.train.verl_backend import FREEZE_FILE_ENV

log = logging.getLogger(__name__)

REPORT_NAME = FREEZE_REPORT_JSON
_PATCH_MARKER = "_ftrl_freeze_hook"


def freeze_config_from_env(environ: Mapping[str, str] | None = None) -> FreezeConfig | None:
    """The freeze policy named by ``FTRL_VERL_FREEZE_FILE``; None when the variable is unset."""
    environ = os.environ if environ is None else environ
    path = environ.get(FREEZE_FILE_ENV)
    if not path:
        return None
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{FREEZE_FILE_ENV}={path}: cannot read the freeze policy: {error}") from None
    unknown = sorted(set(payload) - set(FreezeConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"{path}: unknown freeze keys {unknown}; valid: {sorted(FreezeConfig.__dataclass_fields__)}")
    return FreezeConfig(**payload)


def freeze_built_module(module: Any, engine: Any, cfg: FreezeConfig) -> FreezeReport | None:
    """Apply ``cfg`` to a model verl just built, if this engine trains a policy; else return None.

    ``engine`` is verl's FSDP engine (its ``engine_config``, ``model_config`` and ``_is_lora``
    are read). Reference models (forward only) and value models are left as they are.
    """
    engine_config = engine.engine_config
    if getattr(engine_config, "forward_only", False):
        return None
    if getattr(engine.model_config, "model_type", "language_model") != "language_model":
        return None
    if getattr(engine, "_is_lora", False):
        raise ConfigError(f"freeze policy '{cfg.name}' with LoRA: verl's LoRA already freezes every base weight")
    strategy = getattr(engine_config, "strategy", None) or "fsdp"
    if strategy == "fsdp" and not getattr(engine_config, "use_orig_params", False):
        raise ConfigError(f"freeze policy '{cfg.name}' under FSDP1 needs actor_rollout_ref.actor.fsdp_config."
                          "use_orig_params=true (one flattened parameter cannot mix frozen and trained tensors)")
    return apply_freeze_policy(module, cfg)


def _write_report(report: FreezeReport, policy_file: str) -> Path:
    path = Path(policy_file).with_name(REPORT_NAME)
    return atomic_write_text(path, json.dumps(report.as_dict(), indent=2) + "\n")


def wrap_build_module(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``FSDPEngine._build_module`` followed by the freeze policy of the environment (if any)."""

    def build_module_then_freeze(self: Any) -> Any:
        module = original(self)
        cfg = freeze_config_from_env()
        if cfg is None:
            return module
        report = freeze_built_module(module, self, cfg)
        if report is not None:
            print(f"[ftrl] {report.describe()}", flush=True)  # workers' logging is not configured
            if getattr(self, "rank", 0) == 0:
                _write_report(report, os.environ[FREEZE_FILE_ENV])
        return module

    setattr(build_module_then_freeze, _PATCH_MARKER, True)
    build_module_then_freeze.__wrapped__ = original  # type: ignore[attr-defined]
    return build_module_then_freeze


def install() -> bool:
    """Wrap verl's ``FSDPEngine._build_module`` once per process; True if this call installed it."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    if getattr(FSDPEngine._build_module, _PATCH_MARKER, False):
        return False
    FSDPEngine._build_module = wrap_build_module(FSDPEngine._build_module)
    return True


# verl imports this module (external_lib) in each worker; the import is what installs the hook.
install()
