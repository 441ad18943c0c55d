"""The inference-engine interface: chat requests in, n sampled generations (text + token ids) out.

Collection, evaluation and the trainer talk to models only through :class:`ChatEngine`, so the HF
engine (CPU / one GPU), a vLLM engine and an OpenAI-compatible client are interchangeable
(``model.engine``, registry ``ftrl.registry.ENGINES``).

    python -c "from ftrl.llm.engines.base import SamplingParams; print(SamplingParams())"
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# "context": the prompt alone filled the engine's context window; the turn is empty and the episode
# ends there (collection and evaluation record it), instead of the whole batch failing.
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "context")
# The generation-config entries ``SamplingParams.inherit`` takes from a model (the reference's HF
# ``generate(do_sample=True, temperature=...)`` applies them implicitly).
INHERITED_WARPERS: tuple[str, ...] = ("top_k", "top_p", "repetition_penalty")


@dataclass
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy; ``n`` generations per request.

    ``top_k == 0`` and ``repetition_penalty == 1.0`` are off. ``inherit``: top_k, top_p and
    repetition_penalty come from the model's generation config where it sets them (these fields
    otherwise); greedy decoding keeps only the repetition penalty. See :func:`effective_warpers`.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1
    seed: int | None = None
    top_k: int = 0
    repetition_penalty: float = 1.0
    inherit: bool = False

    def validate(self) -> SamplingParams:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def read_generation_defaults(model_path: Any) -> dict[str, Any]:
    """top_k / top_p / repetition_penalty of a model's ``generation_config.json`` ({} if none).

    A local directory is read directly; a hub id only from the local Hugging Face cache (where vLLM has
    downloaded the model by the time its engine asks), never over the network.
    """
    from pathlib import Path

    path = Path(str(model_path)) / "generation_config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model_path), "generation_config.json")
        except Exception:  # noqa: BLE001 - not a hub id, or no cache: nothing to inherit
            cached = None
        if not isinstance(cached, str):
            return {}
        path = Path(cached)
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: data[key] for key in INHERITED_WARPERS if data.get(key) is not None}


def effective_warpers(params: SamplingParams, model_defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{top_k, top_p, repetition_penalty}`` one call samples with (0 / 1.0 / 1.0: off).

    ``model_defaults`` (the model's generation config) replace the params' values only when
    ``params.inherit``; greedy decoding keeps only the repetition penalty (as HF ``generate`` does).
    """
    warpers: dict[str, Any] = {"top_k": int(params.top_k), "top_p": float(params.top_p),
                               "repetition_penalty": float(params.repetition_penalty)}
    if params.inherit and model_defaults:
        for key in INHERITED_WARPERS:
            if model_defaults.get(key) is not None:
                warpers[key] = type(warpers[key])(model_defaults[key])
    if params.greedy:
        warpers.update(top_k=0, top_p=1.0)
    return warpers


@dataclass
class ChatRequest:
    """One conversation to continue: reference-format messages and the tools shown to the model."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass
class Generation:
    """One generated turn.

    ``token_ids`` are the response tokens up to and including the stop token (no padding);
    ``text`` is their decoding without special tokens (tool/thought tags kept), so
    ``prompt_token_ids + token_ids`` is exactly the sequence the model saw and produced.
    ``finish_reason`` is ``"stop"`` (a stop token ended it) or ``"length"`` (max_new_tokens hit).
    """

    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    # Engines that return structured tool calls (OpenAI-compatible APIs) fill the parsed assistant
    # message here; local engines leave it None and the model family's parser reads ``text``.
    message: dict[str, Any] | None = None


class ChatEngine(abc.ABC):
    """Generates assistant turns for many conversations at once."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` generations per request, in request order."""

    @abc.abstractmethod
    def render(self, request: ChatRequest) -> str:
        """The prompt text the model continues (chat template with the generation prompt)."""


class TemplateEngine(ChatEngine):
    """An engine over a local tokenizer: prompts are the chat template applied with each row's tools.

    Subclasses set ``self.tokenizer`` and ``self.enable_thinking``.
    """

    tokenizer: Any
    enable_thinking: bool

    def render(self, request: ChatRequest) -> str:
        return self.tokenizer.apply_chat_template(
            request.messages,
            tools=request.tools or None,
            add_generation_prompt=True,
            enable_thinking=self.enable_thinking,
            tokenize=False,
        )

    def encode(self, requests: Sequence[ChatRequest]) -> list[list[int]]:
        """Prompt token ids (the template already writes any special tokens it wants)."""
        if not requests:
            return []
        texts = [self.render(request) for request in requests]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
