"""Name -> object registries with lazy ``"module:attr"`` targets and "did you mean" errors.

Anything that appears in a paper table (rewards, algorithms, env sets, benchmarks, freeze policies,
engines) is looked up by name here, so configs stay strings and heavy modules load only when used.

    python -c "from ftrl.registry import REWARDS; print(REWARDS.names())"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ftrl.errors import ConfigError, UnknownNameError, unknown_choice_message

T = TypeVar("T")


def resolve_target(target: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError as error:
        raise ImportError(f"{module_name} has no attribute {attribute!r} (target {target!r})") from error


class Registry(Generic[T]):
    """A named table of objects or lazy ``"module:attr"`` import targets."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Any] = {}

    def register(self, name: str, target: Any = None) -> Any:
        """Register ``target`` under ``name``; without a target, work as a decorator."""

        def add(obj: Any) -> Any:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.what} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        if target is None:
            return add
        return add(target)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(unknown_choice_message(self.what, name, self.names()))
        entry = self._entries[name]
        if isinstance(entry, str) and ":" in entry:
            entry = resolve_target(entry)
            self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check(self, name: str, key: str) -> None:
        """Raise a config error naming ``key`` if ``name`` is not registered."""
        if name not in self._entries:
            raise ConfigError(f"{key}: {unknown_choice_message(self.what, name, self.names())}")


Factory = Callable[..., Any]


@dataclass(frozen=True)
class AlgorithmSpec:
    """What an ``algorithm`` option trains with: its advantage estimator and whether it needs a critic.

    ``conf/algorithm/<name>.yaml`` sets the same values (a test checks they agree); a user may override
    ``algorithm.adv_estimator``, and both backends then train with the override.
    """

    adv_estimator: str
    use_critic: bool

# Registries referenced by configs. Entries are lazy so importing this module stays cheap.
# (Freeze policies are data: conf/freeze/*.yaml selectors interpreted by ftrl.train.freeze.)
REWARDS: Registry[Factory] = Registry("reward")
PARSERS: Registry[Factory] = Registry("tool-call parser")
ENGINES: Registry[Factory] = Registry("inference engine")
ENV_SOURCES: Registry[Factory] = Registry("environment source")
BENCHMARKS: Registry[Factory] = Registry("benchmark")
ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm")
ADV_ESTIMATORS: Registry[Factory] = Registry("advantage estimator")
BACKENDS: Registry[Factory] = Registry("backend")

# A reward variant is its p >= 1 formula (p parsed calls, q newly solved -> score); the other rows of
# the reward table are shared (ftrl.reward.score_response, docs/reference.md).
REWARDS.register("solve_f1", "ftrl.reward:f1_formula")
REWARDS.register("solve_precision", "ftrl.reward:precision_formula")
REWARDS.register("solve_rate", "ftrl.reward:rate_formula")
REWARDS.register("solve_pr", "ftrl.reward:pr_formula")
PARSERS.register("qwen", "ftrl.llm.parsers:parse_qwen")
PARSERS.register("llama31", "ftrl.llm.parsers:parse_llama31")
ENGINES.register("hf", "ftrl.llm.engines.hf:HFEngine")
ENGINES.register("openai", "ftrl.llm.engines.openai:OpenAIEngine")
ENGINES.register("vllm", "ftrl.llm.engines.vllm:VLLMEngine")
ENV_SOURCES.register("procedural", "ftrl.envs.sources:procedural")
ENV_SOURCES.register("ftrl_files", "ftrl.envs.sources:ftrl_files")
ENV_SOURCES.register("llm", "ftrl.builder:env_source")
ENV_SOURCES.register("set", "ftrl.envs.sources:env_set")
ENV_SOURCES.register("taubench", "ftrl.envs.sources:taubench")
BENCHMARKS.register("ftrl_test", "ftrl.eval.own_test:ftrl_test")
# The paper's Table 2 benchmarks and BFCL: ftrl/eval/<name>.py, entry ``evaluate(ctx, engine, checkpoint)``.
for _name in ("toolhop", "taubench", "rotbench", "general", "bfcl"):
    BENCHMARKS.register(_name, f"ftrl.eval.{_name}:evaluate")
# Algorithms of the paper's tables -> the verl core_algos estimator they use (the same names verl takes).
ALGORITHMS.register("grpo", AlgorithmSpec(adv_estimator="grpo", use_critic=False))
ALGORITHMS.register("reinforce_pp", AlgorithmSpec(adv_estimator="reinforce_plus_plus", use_critic=False))
ALGORITHMS.register("ppo", AlgorithmSpec(adv_estimator="gae", use_critic=True))
ADV_ESTIMATORS.register("grpo", "ftrl.train.algorithms:grpo_advantages")
ADV_ESTIMATORS.register("reinforce_plus_plus", "ftrl.train.algorithms:reinforce_pp_advantages")
ADV_ESTIMATORS.register("gae", "ftrl.train.algorithms:gae_advantages")
BACKENDS.register("native", "ftrl.train.native:train_round")
BACKENDS.register("verl", "ftrl.train.verl_backend:train_round")
