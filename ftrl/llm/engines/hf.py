"""Batched chat generation with transformers' ``generate`` (CPU or one GPU).

:class:`HFEngine` renders each request with the tokenizer's chat template (``tools=`` and
``enable_thinking=``), sorts all ``len(requests) * n`` sequences by prompt length so each batch
carries little padding, left-pads, generates, and puts the results back in request order. It
samples on-policy (temperature and top-p only: ``top_k=0`` is passed because transformers otherwise
applies ``top_k=50``, and other warpers from the model's generation config are neutralised) or
decodes greedily when ``temperature == 0``. A turn ends at ``<|im_end|>`` or ``<|endoftext|>``
(plus any eos of the model's generation config). Each :class:`Generation` carries the response ids
up to and including the stop token and their decoding without special tokens, which keeps the tool
tags; the trainer reuses ``prompt_token_ids + token_ids`` directly for log-probabilities.

    python -c "from ftrl.llm.engines.hf import HFEngine; from ftrl.llm.engines.base import *; \
e = HFEngine.from_pretrained('/tmp/tiny', device='cpu'); \
print(e.generate([ChatRequest([{'role': 'user', 'content': 'Hi'}])], SamplingParams(max_new_tokens=8)))"
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ftrl.llm.chat_template import END_OF_TEXT, IM_END
from ftrl.llm.engines.base import (
    INHERITED_WARPERS,
    ChatRequest,
    Generation,
    SamplingParams,
    TemplateEngine,
    effective_warpers,
)
from ftrl.llm.models import load_model_and_tokenizer, prepare_tokenizer_for_generation, resolve_device

log = logging.getLogger(__name__)

# Generation-config entries a model may ship (e.g. Qwen2.5's repetition_penalty=1.05) that would
# make sampling off-policy; set to their no-op values on every call.
_NEUTRAL_WARPERS: dict[str, object] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_length": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
}


class HFEngine(TemplateEngine):
    """Generates assistant turns for many conversations with a transformers causal LM."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        enable_thinking: bool = False,
        batch_size: int = 32,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"HFEngine batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = prepare_tokenizer_for_generation(tokenizer)
        self.enable_thinking = enable_thinking
        self.batch_size = batch_size
        if device is None:
            self.device = next(model.parameters()).device
        else:
            self.device = resolve_device(device) if isinstance(device, str) else device
            self.model.to(self.device)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.stop_token_ids = self._stop_token_ids()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "float32",
        device: str = "auto",
        enable_thinking: bool = False,
        batch_size: int = 32,
        trust_remote_code: bool = False,
    ) -> HFEngine:
        model, tokenizer = load_model_and_tokenizer(
            path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        return cls(model, tokenizer, enable_thinking=enable_thinking, batch_size=batch_size)

    @classmethod
    def from_config(cls, cfg: Any, policy: Any, batch_size: int = 32) -> HFEngine:
        """The engine a run uses for ``policy`` (dtype, device and thinking mode from the run config)."""
        return cls.from_pretrained(
            str(policy),
            dtype=cfg.model.dtype,
            device=cfg.resources.device,
            enable_thinking=cfg.mode.enable_thinking,
            batch_size=batch_size,
            trust_remote_code=cfg.model.trust_remote_code,
        )

    # ------------------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[list[Generation]]:
        params.validate()
        prompts = self.encode(requests)
        # One job per (request, sample); sorting by prompt length keeps batches nearly unpadded.
        job_request = [index for index in range(len(requests)) for _ in range(params.n)]
        order = sorted(range(len(job_request)), key=lambda job: len(prompts[job_request[job]]))
        results: list[Generation | None] = [None] * len(job_request)
        generation_config = self._generation_config(params)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._seeded(params.seed), torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    outputs = self._generate_batch(
                        [prompts[job_request[job]] for job in batch], generation_config
                    )
                    for job, generation in zip(batch, outputs):
                        results[job] = generation
        finally:
            self.model.train(was_training)
        return [results[index * params.n : (index + 1) * params.n] for index in range(len(requests))]  # type: ignore[misc]

    def _generate_batch(
        self, prompts: list[list[int]], generation_config: GenerationConfig
    ) -> list[Generation]:
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=generation_config,
        )
        stop_ids = set(self.stop_token_ids)
        responses: list[list[int]] = []
        finish_reasons: list[str] = []
        for row in output[:, width:].tolist():
            # Rows that stopped early are padded afterwards; cut right after the first stop token.
            end = next((position for position, token in enumerate(row) if token in stop_ids), None)
            responses.append(row if end is None else row[: end + 1])
            finish_reasons.append("length" if end is None else "stop")
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return [
            Generation(text=text, prompt_token_ids=list(prompt), token_ids=response, finish_reason=reason)
            for text, prompt, response, reason in zip(texts, prompts, responses, finish_reasons)
        ]

    def model_generation_defaults(self) -> dict[str, object]:
        """top_k / top_p / repetition_penalty of the model's generation config (what ``inherit`` takes)."""
        config = self.model.generation_config
        return {key: getattr(config, key) for key in INHERITED_WARPERS if getattr(config, key, None) is not None}

    def close(self) -> None:
        """Release the model and the GPU memory it holds (before verl or vLLM starts in this process tree)."""
        model, self.model = self.model, None
        if model is None:
            return
        with contextlib.suppress(Exception):
            model.to("cpu")
        del model
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        options: dict[str, object] = dict(_NEUTRAL_WARPERS)
        # Off unless asked for (collect.top_k / repetition_penalty) or inherited from the model (inherit).
        warpers = effective_warpers(params, self.model_generation_defaults())
        options["repetition_penalty"] = warpers["repetition_penalty"]
        options.update(
            max_new_tokens=params.max_new_tokens,
            eos_token_id=list(self.stop_token_ids),
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        if params.greedy:
            # Sampling knobs at their defaults so a model's sampling preset neither applies nor warns.
            options.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
        else:
            options.update(do_sample=True, temperature=params.temperature, top_p=warpers["top_p"],
                           top_k=warpers["top_k"])
        if getattr(self.model.generation_config, "min_p", None) is not None:
            options["min_p"] = 0.0  # keeps every token; None would fall back to the model's value
        return GenerationConfig(**options)

    def _stop_token_ids(self) -> list[int]:
        candidates: list[int | None] = [self.tokenizer.eos_token_id]
        vocabulary = self.tokenizer.get_vocab()
        candidates += [vocabulary.get(token) for token in (IM_END, END_OF_TEXT)]
        configured = self.model.generation_config.eos_token_id
        candidates += configured if isinstance(configured, list) else [configured]
        stop_ids: list[int] = []
        for token_id in candidates:
            if token_id is not None and int(token_id) not in stop_ids:
                stop_ids.append(int(token_id))
        if not stop_ids:
            raise ValueError(f"tokenizer {self.tokenizer.name_or_path!r} defines no eos token to stop at")
        return stop_ids

    @contextlib.contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Seed torch for one call and restore the global RNG afterwards; no seed: use it as is."""
        if seed is None:
            yield
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
