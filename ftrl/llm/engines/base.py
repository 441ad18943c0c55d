"""The inference-engine interface: chat requests in, n sampled generations (text + token ids) out.

Collection, evaluation and the trainer talk to models only through :class:`ChatEngine`, so the HF
engine (CPU / one GPU), a vLLM engine and an OpenAI-compatible client are interchangeable
(``model.engine``, registry ``ftrl.registry.ENGINES``).

    python -c "from ftrl.llm.engines.base import SamplingParams; print(SamplingParams())"
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FINISH_REASONS: tuple[str, ...] = ("stop", "length")


@dataclass
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy; ``n`` generations per request."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1
    seed: int | None = None

    def validate(self) -> SamplingParams:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
