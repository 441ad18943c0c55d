"""The builder's LLM access: a request-keyed disk cache, per-task accounting, and validated JSON replies.

* :class:`LLMCache` stores every completed exchange under the SHA-256 of its request (model,
  messages, sampling settings). A re-run with the same inputs replays from disk and sends nothing; a
  killed build resumes with every finished request reused, whatever stage it was in. Failed requests
  are never stored, so an endpoint outage costs a re-run only the requests that failed.
* :class:`Ledger` counts, per seed task, requests sent, cache hits, repairs, and tokens/cost both
  for this run and in total (a cached reply carries the usage it cost when it was made), so a set's
  manifest reports what the set cost to build even when it was rebuilt from the cache.
* :class:`StructuredLLM` asks for a JSON object, parses it leniently (code fences, prose, trailing
  commas), validates it, and on failure sends a repair request that quotes the errors, at most
  ``max_repairs`` times; then it raises :class:`StageError` with the reason (``invalid_json`` or
  ``schema_violation``) and the last errors.
* :class:`CachingChatEngine` puts the same cache in front of a :class:`ChatEngine` (the optional
  reference-model check plays whole episodes).

The engine itself is created lazily on the first cache miss, so rebuilding a cached set needs
neither a server nor an API key.

    python -m pytest tests/test_env_builder.py -q -k cache
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftrl.artifacts import atomic_write_text
from ftrl.builder.prompts import SYSTEM_PROMPT, Prompt
from ftrl.builder.schema import parse_llm_json
from ftrl.llm.engines.base import ChatEngine, ChatRequest, Generation, SamplingParams

log = logging.getLogger(__name__)

INVALID_JSON = "invalid_json"
SCHEMA_VIOLATION = "schema_violation"
API_ERROR = "api_error"


class StageError(Exception):
    """An item failed a stage; ``reason`` is a short key for the report, ``detail`` the evidence."""

    def __init__(
        self, reason: str, detail: str = "", transient: bool = False, strategies: list[str] | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient
        self.strategies = list(strategies or [])  # scaling strategies to blame (stage 4)


def request_key(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class LLMCache:
    """Completed LLM exchanges on disk: ``<root>/<key[:2]>/<key>.json``; writes are atomic."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("LLM cache: ignoring unreadable entry %s", path)
            return None

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        atomic_write_text(self._path(key), json.dumps(entry, ensure_ascii=False))

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0


@dataclass
class Ledger:
    """LLM accounting for one seed task (or a whole build, by summing)."""

    requests: int = 0  # sent to the endpoint in this run
    cache_hits: int = 0
    repairs: int = 0  # repair requests after a malformed or invalid reply
    local_repairs: int = 0  # replies fixed without asking again (fences, prose, trailing commas)
    prompt_tokens: int = 0  # this run
    completion_tokens: int = 0
    cost_usd: float = 0.0
    total_prompt_tokens: int = 0  # what the replies cost when they were made (cached ones included)
    total_completion_tokens: int = 0
    total_cost_usd: float = 0.0

    def add(self, other: Ledger) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost_usd"] = round(data["cost_usd"], 8)
        data["total_cost_usd"] = round(data["total_cost_usd"], 8)
        return data


class LazyEngine:
    """Creates the endpoint client on first use (a fully cached build never needs it)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._engine: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._engine is None:
                self._engine = self._factory()
            return self._engine

    @property
    def created(self) -> Any:
        return self._engine


class StructuredLLM:
    """JSON-object requests with caching, validation and bounded repair."""

    def __init__(
        self,
        engine: LazyEngine,
        cache: LLMCache,
        *,
        model: str,
        repair_prompt: Prompt,
        temperature: float = 0.0,
        max_tokens: int = 4096,
        json_mode: bool = True,
        max_repairs: int = 2,
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.model = model
        self.repair_prompt = repair_prompt
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        self.max_repairs = max_repairs

    def complete(self, messages: list[dict[str, Any]], ledger: Ledger) -> str:
        """One reply's text, from the cache or the endpoint (then cached)."""
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "json_mode": self.json_mode,
        }
        key = request_key(payload)
        entry = self.cache.get(key)
        if entry is not None:
            ledger.cache_hits += 1
        else:
            from ftrl.llm.engines.openai import APIError

            try:
                [completion] = self.engine.get().chat(
                    messages,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    json_mode=self.json_mode,
                )
            except APIError as error:
                raise StageError(API_ERROR, str(error), transient=True) from error
            entry = {
                "text": completion.text,
                "finish_reason": completion.finish_reason,
                "usage": {
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "cost_usd": completion.cost_usd,
                },
            }
            self.cache.put(key, entry)
            ledger.requests += 1
            ledger.prompt_tokens += completion.prompt_tokens
            ledger.completion_tokens += completion.completion_tokens
            ledger.cost_usd += completion.cost_usd
        usage = entry.get("usage") or {}
        ledger.total_prompt_tokens += int(usage.get("prompt_tokens") or 0)
        ledger.total_completion_tokens += int(usage.get("completion_tokens") or 0)
        ledger.total_cost_usd += float(usage.get("cost_usd") or 0.0)
        return str(entry["text"])

    def ask(self, prompt: str, validate: Callable[[Any], list[str]], ledger: Ledger) -> Any:
        """The first reply that parses and validates; repair requests quote the errors."""
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
        ]
        reason, errors = INVALID_JSON, ["no reply"]
        for attempt in range(self.max_repairs + 1):
            text = self.complete(messages, ledger)
            value, repaired, parse_error = parse_llm_json(text)
            if parse_error is not None:
                reason, errors = INVALID_JSON, [parse_error]
            else:
                reason = SCHEMA_VIOLATION
                errors = validate(value)
                if not errors:
                    ledger.local_repairs += int(repaired)
                    return value
            if attempt < self.max_repairs:
                ledger.repairs += 1
                shown = "\n".join(f"- {error}" for error in errors[:20])
                messages = messages + [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": self.repair_prompt.render(errors=shown)},
                ]
        suffix = f" (after {self.max_repairs} repair request(s))" if self.max_repairs else ""
        raise StageError(reason, "; ".join(errors[:5]) + suffix)


class CachingChatEngine(ChatEngine):
    """A :class:`ChatEngine` whose generations are cached per request (model, messages, tools, sampling)."""

    def __init__(self, engine: LazyEngine, cache: LLMCache, model: str) -> None:
        self.engine = engine
        self.cache = cache
        self.model = model
        self.ledger = Ledger()
        self._lock = threading.Lock()

    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[list[Generation]]:
        results: list[list[Generation] | None] = [None] * len(requests)
        misses = []
        for index, request in enumerate(requests):
            key = request_key(
                {
                    "model": self.model,
                    "messages": request.messages,
                    "tools": request.tools,
                    "temperature": params.temperature,
                    "top_p": params.top_p,
                    "max_tokens": params.max_new_tokens,
                    "n": params.n,
                    "seed": params.seed,
                }
            )
            entry = self.cache.get(key)
            if entry is None:
                misses.append((index, key))
                continue
            self.ledger.cache_hits += 1
            results[index] = [
                Generation(g["text"], [], [], g["finish_reason"], g["message"]) for g in entry["generations"]
            ]
        if misses:
            fresh = self.engine.get().generate([requests[index] for index, _ in misses], params)
            for (index, key), generations in zip(misses, fresh):
                self.cache.put(
                    key,
                    {
                        "generations": [
                            {"text": g.text, "finish_reason": g.finish_reason, "message": g.message}
                            for g in generations
                        ]
                    },
                )
                results[index] = generations
            with self._lock:
                self.ledger.requests += len(misses)
        return results  # type: ignore[return-value]

    def render(self, request: ChatRequest) -> str:
        return json.dumps(
            {"model": self.model, "messages": request.messages, "tools": request.tools}, ensure_ascii=False
        )
