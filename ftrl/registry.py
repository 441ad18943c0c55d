"""Name -> object registries with lazy ``"module:attr"`` targets and "did you mean" errors.

Anything that appears in a paper table (rewards, algorithms, env sets, benchmarks, freeze policies,
engines) is looked up by name here, so configs stay strings and heavy modules load only when used.

    python -c "from ftrl.registry import REWARDS; print(REWARDS.names())"
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_choice_message(what: str, name: Any, choices: list[str]) -> str:
    return f"unknown {what} '{name}'; valid: {sorted(choices)}{did_you_mean(str(name), choices)}"


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
            from ftrl.config import ConfigError

            raise ConfigError(f"{key}: {unknown_choice_message(self.what, name, self.names())}")


Factory = Callable[..., Any]

# Registries referenced by configs. Entries are lazy so importing this module stays cheap.
# (Freeze policies are data: conf/freeze/*.yaml selectors interpreted by ftrl.train.freeze.)
REWARDS: Registry[Factory] = Registry("reward")
PARSERS: Registry[Factory] = Registry("tool-call parser")
ENGINES: Registry[Factory] = Registry("inference engine")
ENV_SOURCES: Registry[Factory] = Registry("environment source")
BENCHMARKS: Registry[Factory] = Registry("benchmark")
ALGORITHMS: Registry[Factory] = Registry("algorithm")
BACKENDS: Registry[Factory] = Registry("backend")

for _name in ("solve_f1", "solve_precision", "solve_rate", "solve_pr"):
    REWARDS.register(_name, f"ftrl.reward:{_name}")
PARSERS.register("qwen", "ftrl.llm.parsers:parse_qwen")
PARSERS.register("llama31", "ftrl.llm.parsers:parse_llama31")
ENGINES.register("hf", "ftrl.llm.engines.hf:HFEngine")
ENGINES.register("openai", "ftrl.llm.engines.openai:OpenAIEngine")
ENGINES.register("vllm", "ftrl.llm.engines.vllm:VLLMEngine")
ENV_SOURCES.register("procedural", "ftrl.envs.sources:procedural")
ENV_SOURCES.register("ftrl_files", "ftrl.envs.sources:ftrl_files")
ENV_SOURCES.register("llm", "ftrl.envs.sources:llm")
ENV_SOURCES.register("set", "ftrl.envs.sources:env_set")
ENV_SOURCES.register("taubench", "ftrl.envs.sources:taubench")
BENCHMARKS.register("ftrl_test", "ftrl.eval.own_test:ftrl_test")
BACKENDS.register("native", "ftrl.train.native:train_round")
BACKENDS.register("verl", "ftrl.train.verl_backend:train_round")
