"""OpenAI-compatible chat engine: hosted APIs and local servers (``vllm serve``) behind one client.

:class:`OpenAIEngine` speaks ``POST {base_url}/chat/completions`` over ``httpx``. It is both

* a :class:`~ftrl.llm.engines.base.ChatEngine` (``model.engine=openai``): ``generate`` sends the
  reference-format conversation and tools, and returns :class:`Generation` objects whose ``message``
  is the assistant turn in the reference shape ``{"role": "assistant", "content": str, "tool_calls":
  [{"id", "type": "function", "function": {"name", "arguments": "<JSON string>"}}] | None}``, so the
  collector and the evaluator play API models exactly like local ones (no text parser involved);
* the environment builder's client (``ftrl.builder``): :meth:`chat` returns plain completions.

Robustness and accounting: at most ``concurrency`` requests are in flight at once (one semaphore
per engine, shared by every thread that uses it); 408/409/425/429/5xx replies, timeouts and
connection errors are retried up to ``max_retries`` times, waiting the server's ``Retry-After`` or
``backoff_base_s * 2**attempt`` (capped at ``backoff_max_s``); other 4xx fail at once with the
server's message. An unreachable or failing endpoint is logged once, when its first request fails
(with the retry schedule), then summarised (failed attempts, requests given up, for how long) when a
batch of concurrent requests ends, when it answers again, or when the engine closes: not once per
request and retry. Every reply's ``usage`` is added to :attr:`usage` (requests, prompt/completion
tokens, retries, cost from the per-million-token prices). The API key comes from the environment
variable named by ``api_key_env`` (``model.api.api_key_env``; an empty name means no key, e.g. a
local vLLM server started without ``--api-key``).

API models return no token ids: ``Generation.token_ids``/``prompt_token_ids`` are empty, so they
can be collected and evaluated but not trained on.

    vllm serve Qwen/Qwen3-8B --enable-auto-tool-choice --tool-call-parser hermes   # then:
    python -m ftrl.run model=api model.path=Qwen/Qwen3-8B model.api.base_url=http://localhost:8000/v1 \\
        model.api.api_key_env='' stages=[build_envs,eval]
    python -m pytest tests/test_openai_engine.py -q
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from typing_extensions import Self

from ftrl.llm.engines.base import ChatEngine, ChatRequest, Generation, SamplingParams
from ftrl.llm.parsers import format_qwen_tool_calls
from ftrl.types import make_tool_call

log = logging.getLogger(__name__)

RETRYABLE_STATUS: frozenset[int] = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
OUTAGE_SUMMARY_EVERY_S = 60.0  # requests given up outside a batch are summarised at most this often


class APIError(RuntimeError):
    """The endpoint failed for good (a non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class MissingAPIKeyError(RuntimeError):
    """The environment variable that should hold the API key is not set."""


@dataclass
class Usage:
    """Running totals of what the endpoint was asked and what it cost."""

    requests: int = 0  # successful HTTP exchanges
    attempts: int = 0  # HTTP attempts, failed ones included
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    requests_without_usage: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Outage:
    """A run of failed attempts against one endpoint, from its first failure to its next success."""

    since: float
    failed_attempts: int = 0
    requests: int = 0  # requests with at least one failed attempt
    given_up: int = 0  # requests that failed every attempt
    last_error: str = ""
    summarized: tuple[int, int, int] = (0, 0, 0)
    summarized_at: float = float("-inf")

    def counts(self) -> tuple[int, int, int]:
        return self.failed_attempts, self.requests, self.given_up

    def describe(self) -> str:
        return (f"{self.failed_attempts} failed attempts by {self.requests} requests over "
                f"{time.monotonic() - self.since:.1f} s, {self.given_up} requests given up; "
                f"last error: {self.last_error}")


@dataclass
class Completion:
    """One choice of a chat completion: text, the reference-shape message, and why it stopped."""

    text: str
    message: dict[str, Any]
    finish_reason: str  # the server's: stop | length | tool_calls | ...
    # The reply's token counts and their price (shared by all choices of one reply).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


def resolve_api_key(api_key_env: str | None) -> str | None:
    """The key held by the environment variable ``api_key_env``; None when no variable is named."""
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise MissingAPIKeyError(
            f"the API key variable {api_key_env} is not set (named by model.api.api_key_env or "
            f"envs.llm.api.api_key_env): export {api_key_env}=<key>, or set api_key_env='' for a server "
            "without authentication such as a local `vllm serve`"
        )
    return key


def to_wire_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Reference-format messages as the OpenAI API wants them (string arguments, no extra keys)."""
    wire: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{index}]: role {role!r} is not one of system/user/assistant/tool")
        content = message.get("content")
        out: dict[str, Any] = {
            "role": role,
            "content": content
            if isinstance(content, str) or content is None
            else json.dumps(content, ensure_ascii=False),
        }
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = call.get("function", {})
                call_id = call.get("id") or f"call_{index}_{len(calls)}"
                calls.append(make_tool_call(function.get("name"), function.get("arguments", "{}"), call_id))
            out["tool_calls"] = calls
        if role == "tool":
            out["tool_call_id"] = message.get("tool_call_id") or ""
            out["content"] = "" if content is None else out["content"]
        wire.append(out)
    return wire


def to_reference_message(choice_message: Mapping[str, Any]) -> dict[str, Any]:
    """An API reply's message in the reference shape (``arguments`` always a JSON string)."""
    content = choice_message.get("content")
    calls = []
    for call in choice_message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        call_id = call.get("id") or f"call_{uuid.uuid4().hex}"
        calls.append(make_tool_call(function.get("name"), "{}" if arguments is None else arguments, call_id))
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content if isinstance(content, str) else "",
        "tool_calls": calls or None,
    }
    reasoning = choice_message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        message["reasoning_content"] = reasoning
    return message


def message_text(message: Mapping[str, Any]) -> str:
    """The turn as Qwen/Hermes text: content, then one ``<tool_call>`` block per call."""
    calls = []
    for call in message.get("tool_calls") or []:
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"])
        except (TypeError, ValueError):
            arguments = function["arguments"]
        # Decoded and re-encoded: standard spacing whatever the API sent; text that is not JSON is
        # written as a JSON string.
        calls.append({"name": function["name"], "arguments": json.dumps(arguments, ensure_ascii=False)})
    return "\n".join(part for part in (message.get("content") or "", format_qwen_tool_calls(calls)) if part)


def openai_sampling_extra(params: SamplingParams) -> dict[str, Any]:
    """Request fields beyond the OpenAI API's own for ``params`` (vLLM/SGLang servers read them).

    ``top_k`` / ``repetition_penalty`` are sent only when set (OpenAI itself has neither). With
    ``inherit`` they and ``top_p`` are left out (None), so a vLLM server applies the model's
    generation config (its default ``--generation-config auto``).
    """
    if params.inherit:
        return {"top_p": None} if not params.greedy else {}
    extra: dict[str, Any] = {}
    if params.top_k > 0 and not params.greedy:
        extra["top_k"] = int(params.top_k)
    if params.repetition_penalty != 1.0:
        extra["repetition_penalty"] = float(params.repetition_penalty)
    return extra


class OpenAIEngine(ChatEngine):
    """Chat completions from an OpenAI-compatible endpoint, with retries, a concurrency cap and usage."""

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 120.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        price_per_mtok_in: float = 0.0,
        price_per_mtok_out: float = 0.0,
        enable_thinking: bool | None = None,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not model:
            raise ValueError("OpenAIEngine: model must name the served model (e.g. 'gpt-4o-mini')")
        if concurrency < 1:
            raise ValueError(f"OpenAIEngine: concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"OpenAIEngine: max_retries must be >= 0, got {max_retries}")
        if not timeout_s > 0:
            raise ValueError(f"OpenAIEngine: timeout_s must be > 0, got {timeout_s}")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else resolve_api_key(api_key_env)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout_s = float(timeout_s)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.price_per_mtok_in = float(price_per_mtok_in)
        self.price_per_mtok_out = float(price_per_mtok_out)
        self.enable_thinking = enable_thinking
        self._sleep = sleep
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._usage = Usage()
        self._outage: _Outage | None = None  # the endpoint's current run of failures (under _lock)
        self._batches = 0  # map_concurrently calls in progress: they summarise at their end
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            transport=transport,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    # ------------------------------------------------------------------ construction from config
    @classmethod
    def from_api_config(
        cls, model: str, api: Any, *, backoff_base_s: float = 1.0, enable_thinking: bool | None = None
    ) -> OpenAIEngine:
        """An engine for ``model`` with the endpoint settings of an :class:`ftrl.config.ApiConfig`."""
        return cls(
            model,
            api.base_url,
            api_key_env=api.api_key_env,
            concurrency=api.concurrency,
            max_retries=api.max_retries,
            timeout_s=api.timeout_s,
            backoff_base_s=backoff_base_s,
            price_per_mtok_in=api.price_per_mtok_in,
            price_per_mtok_out=api.price_per_mtok_out,
            enable_thinking=enable_thinking,
        )

    @classmethod
    def from_config(cls, cfg: Any, policy: Any, batch_size: int = 32) -> OpenAIEngine:
        """The policy engine of a run (``model.engine=openai``): ``policy`` is the served model id."""
        thinking = bool(cfg.mode.enable_thinking) if cfg.model.supports_thinking else None
        return cls.from_api_config(str(policy), cfg.model.api, enable_thinking=thinking)

    # ------------------------------------------------------------------ accounting
    @property
    def usage(self) -> Usage:
        """A copy of the running totals."""
        with self._lock:
            return Usage(**asdict(self._usage))

    def _account(self, reply: Mapping[str, Any]) -> None:
        usage = reply.get("usage") if isinstance(reply, Mapping) else None
        with self._lock:
            self._usage.requests += 1
            if not isinstance(usage, Mapping):
                self._usage.requests_without_usage += 1
                return
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            self._usage.prompt_tokens += prompt
            self._usage.completion_tokens += completion
            self._usage.cost_usd += (
                prompt * self.price_per_mtok_in + completion * self.price_per_mtok_out
            ) / 1e6

    # ------------------------------------------------------------------ HTTP
    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            retry_after = response.headers.get("retry-after")
            if retry_after is not None:
                try:
                    return min(max(float(retry_after), 0.0), self.backoff_max_s)
                except ValueError:
                    pass  # an HTTP date: fall back to exponential backoff
        return min(self.backoff_base_s * (2**attempt), self.backoff_max_s)

    def retry_schedule(self) -> str:
        """The waits between attempts without ``Retry-After``: ``'5 retries after 1, 2, 4, 8, 16 s'``."""
        if self.max_retries == 0:
            return "no retries"
        delays = [self._delay(attempt, None) for attempt in range(self.max_retries)]
        return (f"{self.max_retries} retries after {', '.join(f'{d:g}' for d in delays)} s "
                f"({sum(delays):g} s in all, or the server's Retry-After up to {self.backoff_max_s:g} s)")

    def _failed(self, path: str, error: str, first_of_request: bool) -> None:
        """One failed attempt: the first of an outage is logged with the retry schedule, the rest counted."""
        with self._lock:
            starting = self._outage is None
            if starting:
                self._outage = _Outage(since=time.monotonic())
            outage = self._outage
            outage.failed_attempts += 1
            outage.requests += int(first_of_request)
            outage.last_error = error
        if starting:
            log.warning("%s%s (model %s): %s; retrying each request: %s. Further failures of this endpoint are "
                        "counted, not logged one by one; a summary follows", self.base_url, path, self.model,
                        error, self.retry_schedule())
        else:
            log.debug("%s%s: %s", self.base_url, path, error)

    def _gave_up(self) -> None:
        with self._lock:
            if self._outage is None:
                return
            self._outage.given_up += 1
            due = self._batches == 0 and time.monotonic() - self._outage.summarized_at >= OUTAGE_SUMMARY_EVERY_S
        if due:
            self._summarize_outage()

    def _recovered(self) -> None:
        with self._lock:
            outage, self._outage = self._outage, None
        if outage is not None:
            log.info("%s: answering again; %s", self.base_url, outage.describe())

    def _summarize_outage(self, force: bool = False) -> None:
        """Log the current outage's numbers once more if they changed since the last summary."""
        with self._lock:
            outage = self._outage
            if outage is None or (outage.summarized == outage.counts() and not force):
                return
            outage.summarized, outage.summarized_at = outage.counts(), time.monotonic()
            text = outage.describe()
        log.warning("%s (model %s) still failing: %s", self.base_url, self.model, text)

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST JSON with retries and the concurrency cap; the decoded reply (usage accounted)."""
        last_error = ""
        last_status: int | None = None
        for attempt in range(self.max_retries + 1):
            response: httpx.Response | None = None
            with self._slots:
                with self._lock:
                    self._usage.attempts += 1
                try:
                    response = self._client.post(path, json=body)
                except httpx.TimeoutException as error:
                    last_error, last_status = (
                        f"timed out after {self.timeout_s:g} s ({type(error).__name__})",
                        None,
                    )
                except httpx.TransportError as error:
                    last_error, last_status = f"connection failed: {error}", None
            if response is not None:
                if response.status_code == 200:
                    try:
                        reply = response.json()
                    except ValueError:
                        last_error, last_status = f"reply is not JSON: {response.text[:200]!r}", 200
                    else:
                        self._account(reply)
                        if self._outage is not None:
                            self._recovered()
                        return reply
                else:
                    last_status = response.status_code
                    last_error = f"HTTP {response.status_code}: {response.text[:500]}"
                    if response.status_code not in RETRYABLE_STATUS and response.status_code < 500:
                        raise APIError(
                            f"{self.base_url}{path} (model {self.model}) refused the request: {last_error}",
                            status=response.status_code,
                        )
            self._failed(path, last_error, first_of_request=attempt == 0)
            if attempt < self.max_retries:
                delay = self._delay(attempt, response)
                with self._lock:
                    self._usage.retries += 1
                log.debug("%s%s: retry %d/%d in %.2fs", self.base_url, path, attempt + 1, self.max_retries, delay)
                self._sleep(delay)
        self._gave_up()
        raise APIError(
            f"{self.base_url}{path} (model {self.model}) failed after {self.max_retries + 1} "
            f"attempts: {last_error}",
            status=last_status,
            retryable=True,
        )

    # ------------------------------------------------------------------ chat
    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 1024,
        n: int = 1,
        seed: int | None = None,
        json_mode: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> list[Completion]:
        """``n`` completions of ``messages`` (reference format). Servers that ignore ``n`` are asked again."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_wire_messages(messages),
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
        }
        if tools:
            body["tools"] = list(tools)
        if seed is not None:
            body["seed"] = seed
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        for key, value in (extra or {}).items():
            if value is None:
                body.pop(key, None)  # left to the server (e.g. vLLM's defaults from the model's generation config)
            else:
                body[key] = value
        if self.enable_thinking is not None:
            # vLLM/SGLang pass this to the chat template (Qwen3's thinking switch); others ignore it.
            body["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking}
        completions: list[Completion] = []
        while len(completions) < n:
            body["n"] = n - len(completions)
            reply = self.post("/chat/completions", body)
            choices = reply.get("choices") if isinstance(reply, Mapping) else None
            if not isinstance(choices, list) or not choices:
                raise APIError(f"{self.base_url}/chat/completions: reply has no choices: {str(reply)[:300]}")
            completions += self._completions(reply, choices[: n - len(completions)])
        return completions

    def _completions(self, reply: Mapping[str, Any], choices: Sequence[Mapping[str, Any]]) -> list[Completion]:
        """One reply's choices as Completions, each carrying the reply's token counts and cost."""
        usage = reply.get("usage") if isinstance(reply.get("usage"), Mapping) else {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        cost = (prompt_tokens * self.price_per_mtok_in + completion_tokens * self.price_per_mtok_out) / 1e6
        completions = []
        for choice in choices:
            message = to_reference_message(choice.get("message") or {})
            completions.append(Completion(text=message_text(message), message=message,
                                          finish_reason=str(choice.get("finish_reason") or "stop"),
                                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                          cost_usd=cost))
        return completions

    def map_concurrently(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[function(item) ...]`` on up to ``concurrency`` threads, in order; the first error is raised."""
        with self._lock:
            self._batches += 1
        try:
            if len(items) <= 1:
                return [function(item) for item in items]
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
                return list(pool.map(function, items))
        finally:
            with self._lock:
                self._batches -= 1
            self._summarize_outage()

    # ------------------------------------------------------------------ ChatEngine
    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[list[Generation]]:
        params.validate()

        def one(request: ChatRequest) -> list[Generation]:
            completions = self.chat(
                request.messages,
                tools=request.tools,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                n=params.n,
                seed=params.seed,
                extra=openai_sampling_extra(params),
            )
            return [
                Generation(
                    text=c.text,
                    prompt_token_ids=[],
                    token_ids=[],
                    finish_reason="length" if c.finish_reason == "length" else "stop",
                    message=c.message,
                )
                for c in completions
            ]

        return self.map_concurrently(one, list(requests))

    def render(self, request: ChatRequest) -> str:
        """What is sent for ``request``: the wire messages and tools as JSON (there is no local template)."""
        payload: dict[str, Any] = {"model": self.model, "messages": to_wire_messages(request.messages)}
        if request.tools:
            payload["tools"] = request.tools
        return json.dumps(payload, ensure_ascii=False, indent=1)

    def close(self) -> None:
        self._summarize_outage()
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"OpenAIEngine(model={self.model!r}, base_url={self.base_url!r}, concurrency={self.concurrency})"
        )
