"""Batched chat generation with vLLM's offline ``LLM`` (GPU; ``model.engine=vllm``).

:class:`VLLMEngine` renders each request with the model tokenizer's chat template exactly like
:class:`ftrl.llm.engines.hf.HFEngine` (the row's own ``tools=`` and ``enable_thinking=``), tokenizes
the prompt itself and hands vLLM token ids, so both engines feed the model the same sequence. Every
(request, sample) pair becomes one vLLM prompt with ``n=1`` and its own seed (``seed + request *
n + sample``): sampling is reproducible for a fixed batch independently of how vLLM fans out
``n``, and greedy decoding (``temperature == 0``) with ``n > 1`` needs no special case. vLLM's
automatic prefix caching makes the repeated prompts nearly free. Sampling is on-policy: top-k,
min-p and the repetition/presence/frequency penalties are set explicitly to their no-op values, so
a model's generation-config presets (Qwen3 ships top_k=20) cannot apply. A turn stops at ``<|im_end|>``,
``<|endoftext|>`` or the tokenizer's eos. Each :class:`Generation` holds the prompt ids, the
response ids up to and including the stop token, and the response decoded by the tokenizer without
special tokens (tool and thought tags are ordinary added tokens and stay), as HFEngine does.

vLLM is imported only when an engine is built (never at import time), so this module loads on the
CPU path; the pure parts (:func:`sampling_kwargs`, :func:`expand_jobs`, :func:`to_generation`,
:func:`context_length`) are tested on CPU with fake vLLM outputs (``tests/test_vllm_engine.py``).

Resources come from the run config: ``resources.tensor_parallel_size`` and
``resources.gpu_memory_utilization``; the context length is ``mode.max_prompt_tokens`` plus the
response budget, capped by the model's ``max_position_embeddings``.

    python -m ftrl.run model.engine=vllm resources=1x80gb model=qwen3_8b stages=[eval]   # on a GPU
    python scripts/gpu_smoke.py vllm --model /tmp/ftrl_gpu_smoke/model                   # tokens/s
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ftrl.llm.chat_template import END_OF_TEXT, IM_END
from ftrl.llm.engines.base import (
    ChatRequest,
    Generation,
    SamplingParams,
    TemplateEngine,
    effective_warpers,
    read_generation_defaults,
)

log = logging.getLogger(__name__)

# vLLM's value for "no top-k cut" in every release since 0.4 (newer ones also accept 0).
TOP_K_DISABLED = -1


def sampling_kwargs(params: SamplingParams, stop_token_ids: Sequence[int],
                    seed: int | None, model_defaults: dict[str, Any] | None = None,
                    max_tokens: int | None = None) -> dict[str, Any]:
    """Keyword arguments of one ``vllm.SamplingParams`` (one sample of one request).

    ``temperature == 0`` is vLLM's greedy mode; otherwise temperature and top-p shape the
    distribution, plus top-k and the repetition penalty when the params ask for them or inherit
    them from the model (``model_defaults``, its generation config; see ``effective_warpers``).
    ``max_tokens`` caps the response (room left in the context window).
    """
    params.validate()
    warpers = effective_warpers(params, model_defaults)
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": params.max_new_tokens if max_tokens is None else min(max_tokens, params.max_new_tokens),
        "stop_token_ids": list(stop_token_ids),
        "detokenize": False,  # the engine decodes the final ids itself (see to_generation)
        "top_k": warpers["top_k"] if warpers["top_k"] > 0 else TOP_K_DISABLED,
        "min_p": 0.0,
        "repetition_penalty": warpers["repetition_penalty"],
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": seed,
    }
    if params.greedy:
        kwargs.update(temperature=0.0, top_p=1.0)
    else:
        kwargs.update(temperature=params.temperature, top_p=warpers["top_p"])
    return kwargs


def context_limited(prompt_token_ids: Sequence[int]) -> Generation:
    """The empty turn of a prompt that fills the context window: its episode ends here (recorded)."""
    return Generation(text="", prompt_token_ids=list(prompt_token_ids), token_ids=[], finish_reason="context")


def expand_jobs(num_requests: int, params: SamplingParams) -> list[tuple[int, int | None]]:
    """``(request index, seed)`` for every sample, request-major; seeds are distinct per sample."""
    jobs: list[tuple[int, int | None]] = []
    for request in range(num_requests):
        for sample in range(params.n):
            seed = None if params.seed is None else params.seed + request * params.n + sample
            jobs.append((request, seed))
    return jobs


def to_generation(
    prompt_token_ids: Sequence[int],
    completion: Any,
    stop_token_ids: Sequence[int],
    decode: Callable[[list[int]], str],
) -> Generation:
    """One vLLM ``CompletionOutput`` as a :class:`Generation` with the stop token kept in the ids.

    vLLM reports ``finish_reason`` ``"stop"`` (``stop_reason`` is the stop token id, or ``None`` for
    the model's eos) or ``"length"``; releases differ in whether the stop token is already the last
    of ``token_ids``, so it is appended when missing. The text is decoded from the final ids (not
    vLLM's detokenized text) so it matches HFEngine byte for byte.
    """
    token_ids = [int(token) for token in completion.token_ids]
    reason = completion.finish_reason
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a generation with finish_reason={reason!r} (expected stop or "
                           "length); the request was aborted, often because the engine ran out of memory")
    stop_ids = [int(token) for token in stop_token_ids]
    if reason == "stop" and (not token_ids or token_ids[-1] not in stop_ids):
        stop_reason = getattr(completion, "stop_reason", None)
        if isinstance(stop_reason, int) and stop_reason in stop_ids:
            token_ids.append(stop_reason)
        elif stop_reason is None:
            token_ids.append(stop_ids[0])  # the eos, which stop_token_ids lists first
        else:
            raise RuntimeError(f"vLLM stopped on {stop_reason!r}, which is not one of the stop tokens "
                               f"{stop_ids}; this engine sets no string stops")
    return Generation(text=decode(token_ids), prompt_token_ids=list(prompt_token_ids), token_ids=token_ids,
                      finish_reason=reason)


def stop_token_ids_for(tokenizer: Any) -> list[int]:
    """eos first, then ``<|im_end|>`` and ``<|endoftext|>`` where the vocabulary has them."""
    vocabulary = tokenizer.get_vocab()
    candidates = [tokenizer.eos_token_id, vocabulary.get(IM_END), vocabulary.get(END_OF_TEXT)]
    stop_ids: list[int] = []
    for token_id in candidates:
        if token_id is not None and int(token_id) not in stop_ids:
            stop_ids.append(int(token_id))
    if not stop_ids:
        name = getattr(tokenizer, "name_or_path", "?")
        raise ValueError(f"tokenizer {name!r} defines no eos token to stop at")
    return stop_ids


def context_length(max_prompt_tokens: int, max_new_tokens: int, model_path: str | Path) -> int:
    """Context length vLLM reserves: prompt budget + response budget, capped by the model's window."""
    wanted = max_prompt_tokens + max_new_tokens
    config_file = Path(str(model_path)) / "config.json"
    if config_file.is_file():
        window = json.loads(config_file.read_text(encoding="utf-8")).get("max_position_embeddings")
        if isinstance(window, int) and window > 0:
            return min(wanted, window)
    return wanted


class VLLMEngine(TemplateEngine):
    """Generates assistant turns for many conversations with an offline ``vllm.LLM``.

    ``llm`` is a ``vllm.LLM`` (or anything with the same ``generate(prompts, sampling_params,
    use_tqdm=...)``); ``sampling_params_cls`` defaults to ``vllm.SamplingParams``, imported on the
    first call, and is injectable so the conversion logic runs without vLLM.
    """

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        enable_thinking: bool = False,
        max_model_len: int | None = None,
        sampling_params_cls: Callable[..., Any] | None = None,
        show_progress: bool = False,
        generation_defaults: dict[str, Any] | None = None,
    ) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.max_model_len = max_model_len
        self._sampling_params_cls = sampling_params_cls
        self.show_progress = show_progress
        self.stop_token_ids = stop_token_ids_for(tokenizer)
        # The model's generation_config.json warpers, applied only to params with inherit=true.
        self.generation_defaults = dict(generation_defaults or {})

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "auto",
        enable_thinking: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.7,
        max_model_len: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> VLLMEngine:
        try:
            import vllm
        except ImportError as error:
            raise ImportError("model.engine=vllm needs the vllm package on a CUDA machine: pip install vllm "
                              "(it pins its own torch; see docs/scale.md), or use model.engine=hf") from error
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        llm = vllm.LLM(model=path, tokenizer=path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                       trust_remote_code=trust_remote_code)
        log.info("vllm: model=%s tp=%d gpu_memory_utilization=%.2f max_model_len=%s dtype=%s", path,
                 tensor_parallel_size, gpu_memory_utilization, max_model_len, dtype)
        return cls(llm, tokenizer, enable_thinking=enable_thinking, max_model_len=max_model_len,
                   sampling_params_cls=vllm.SamplingParams, generation_defaults=read_generation_defaults(path))

    @classmethod
    def from_config(cls, cfg: Any, policy: Any, batch_size: int = 32) -> VLLMEngine:
        """The engine a run uses for ``policy``. vLLM batches continuously, so ``batch_size`` (the HF
        engine's sequences per forward pass) has no counterpart and is accepted for interface parity."""
        del batch_size
        if cfg.resources.device == "cpu":
            raise ValueError("model.engine=vllm needs a GPU but resources.device=cpu; choose a GPU profile "
                             "(resources=1x24gb|1x80gb|8x80gb|multinode) or model.engine=hf")
        return cls.from_pretrained(
            str(policy),
            dtype=cfg.model.dtype,
            enable_thinking=cfg.mode.enable_thinking,
            tensor_parallel_size=cfg.resources.tensor_parallel_size,
            gpu_memory_utilization=cfg.resources.gpu_memory_utilization,
            max_model_len=context_length(cfg.mode.max_prompt_tokens, cfg.max_new_tokens, policy),
            seed=cfg.seed,
            trust_remote_code=cfg.model.trust_remote_code,
        )

    # ------------------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[list[Generation]]:
        params.validate()
        if not requests:
            return []
        if params.inherit and not self.generation_defaults:
            log.warning("vllm: sampling inherits the model's generation config, but none was found; "
                        "top_k/top_p/repetition_penalty stay at the configured values")
        prompts = self.encode(requests)
        room = self._room(prompts)
        jobs = expand_jobs(len(requests), params)
        # A prompt that leaves no room ends its own episode ("context"), never the batch or the stage.
        runnable = [(request, seed) for request, seed in jobs if room[request] is None or room[request] >= 1]
        make_params = self._sampling_params_factory()
        outputs = self.llm.generate(
            [{"prompt_token_ids": prompts[request]} for request, _ in runnable],
            [make_params(**sampling_kwargs(params, self.stop_token_ids, seed, self.generation_defaults,
                                           max_tokens=room[request])) for request, seed in runnable],
            use_tqdm=self.show_progress,
        ) if runnable else []
        if len(outputs) != len(runnable):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(runnable)} prompts")

        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        results: list[list[Generation]] = [[] for _ in requests]
        produced = iter(outputs)
        for request, _ in jobs:
            if room[request] is not None and room[request] < 1:
                results[request].append(context_limited(prompts[request]))
                continue
            completion = next(produced).outputs[0]
            results[request].append(to_generation(prompts[request], completion, self.stop_token_ids, decode))
        limited = sum(1 for value in room if value is not None and value < 1)
        if limited:
            log.warning("vllm: %d of %d prompts fill the context of %s tokens; their episodes end there "
                        "(finish_reason=context)", limited, len(prompts), self.max_model_len)
        return results

    def _room(self, prompts: list[list[int]]) -> list[int | None]:
        """Response tokens each prompt leaves in the context window (None: no window set)."""
        if self.max_model_len is None:
            return [None] * len(prompts)
        return [self.max_model_len - len(prompt) for prompt in prompts]

    def _sampling_params_factory(self) -> Callable[..., Any]:
        if self._sampling_params_cls is None:
            import vllm

            self._sampling_params_cls = vllm.SamplingParams
        return self._sampling_params_cls

    def close(self) -> None:
        """Release the GPU memory vLLM holds, so the trainer (or the next round's engine) can use it."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm, engine
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a hard dependency
            pass
