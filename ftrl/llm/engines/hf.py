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

``decoder="packed"`` (what runs use, :meth:`HFEngine.from_config`) decodes Llama-family models with
``ftrl.llm.engines.packed`` instead of ``generate``: the same batches, the same order and the same
random draws (``torch.multinomial`` is ``argmax(p / Exp(1))``, one (batch, vocab) draw per step), so
the tokens are those ``generate`` gives up to float rounding; but prompts shared by the n samples run
once, the turns of an episode reuse the keys and values of earlier turns (:class:`PrefixCache`),
finished rows leave the batch, and no step copies the cache. Settings it does not implement (a
repetition penalty, an unsupported model) fall back to ``generate``.

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
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ftrl.llm.chat_template import END_OF_TEXT, IM_END
from ftrl.llm.engines.base import (
    INHERITED_WARPERS,
    ChatRequest,
    Generation,
    SamplingParams,
    TemplateEngine,
    effective_warpers,
)
from ftrl.llm.engines.packed import (
    Core,
    KVBatch,
    PrefixCache,
    SharedKVBatch,
    decode_step,
    extend,
    unsupported_reason,
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
DECODERS: tuple[str, ...] = ("generate", "packed")
# The packed decoder's cache of earlier turns' keys and values (least recently used leave first).
PREFIX_CACHE_MB = 256


def _weights_version(model: torch.nn.Module) -> int:
    """Sum of the parameters' in-place modification counters: changes whenever a weight does."""
    return sum(parameter._version for parameter in model.parameters())


class HFEngine(TemplateEngine):
    """Generates assistant turns for many conversations with a transformers causal LM."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        enable_thinking: bool = False,
        batch_size: int = 32,
        device: torch.device | str | None = None,
        decoder: str = "generate",
        prefix_cache_mb: int = PREFIX_CACHE_MB,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"HFEngine batch_size must be >= 1, got {batch_size}")
        if decoder not in DECODERS:
            raise ValueError(f"HFEngine decoder must be one of {list(DECODERS)}, got {decoder!r}")
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
        self.decoder = decoder
        reason = unsupported_reason(model) if decoder == "packed" else None
        if reason is not None:
            log.info("HFEngine: packed decoding does not cover this model (%s); using generate", reason)
            self.decoder = "generate"
        # Keys/values of earlier turns, valid while the weights stay as they were (checked per call).
        use_cache = self.decoder == "packed" and prefix_cache_mb > 0
        self.prefix_cache = PrefixCache(prefix_cache_mb << 20, 2 * batch_size) if use_cache else None
        self._weights_version = _weights_version(self.model)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "float32",
        device: str = "auto",
        enable_thinking: bool = False,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        decoder: str = "generate",
    ) -> HFEngine:
        model, tokenizer = load_model_and_tokenizer(
            path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        return cls(model, tokenizer, enable_thinking=enable_thinking, batch_size=batch_size, decoder=decoder)

    @classmethod
    def from_config(cls, cfg: Any, policy: Any, batch_size: int = 32) -> HFEngine:
        """The engine a run uses for ``policy`` (dtype, device and thinking mode from the run config; packed decoding)."""
        return cls.from_pretrained(
            str(policy),
            dtype=cfg.model.dtype,
            device=cfg.resources.device,
            enable_thinking=cfg.mode.enable_thinking,
            batch_size=batch_size,
            trust_remote_code=cfg.model.trust_remote_code,
            decoder="packed",
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
        processors = self._packed_processors(params) if self.decoder == "packed" else None
        version = _weights_version(self.model)
        if self.prefix_cache is not None and version != self._weights_version:
            self.prefix_cache.clear()  # an optimizer step (or a load) changed the weights in place
        self._weights_version = version
        was_training = self.model.training
        self.model.eval()
        try:
            with self._seeded(params.seed), torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    batch_prompts = [prompts[job_request[job]] for job in batch]
                    if processors is None:
                        outputs = self._generate_batch(batch_prompts, generation_config)
                    else:
                        outputs = self._packed_batch(batch_prompts, params, processors)
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

    # ------------------------------------------------------------------------------ packed decoding
    def _packed_processors(self, params: SamplingParams) -> LogitsProcessorList | None:
        """The warpers ``generate`` would apply, in its order; None when packed decoding cannot match it."""
        warpers = effective_warpers(params, self.model_generation_defaults())
        if warpers["repetition_penalty"] != 1.0:
            return None
        processors = LogitsProcessorList()
        if params.greedy:
            return processors
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if warpers["top_k"] != 0:
            processors.append(TopKLogitsWarper(top_k=warpers["top_k"], min_tokens_to_keep=1))
        if warpers["top_p"] < 1.0:
            processors.append(TopPLogitsWarper(top_p=warpers["top_p"], min_tokens_to_keep=1))
        return processors

    def _prefill(self, core: Core, prompts: list[list[int]], capacity: int,
                 ) -> tuple[KVBatch | SharedKVBatch, torch.Tensor]:
        """One cache row per distinct prompt, earlier turns' keys/values reused; rows back in ``prompts`` order."""
        distinct: dict[tuple[int, ...], int] = {}
        row_of = [distinct.setdefault(tuple(prompt), len(distinct)) for prompt in prompts]
        cache = KVBatch(core, len(distinct), capacity)
        new_tokens = []
        for row, prompt in enumerate(distinct):
            reused, layers = self.prefix_cache.lookup(prompt) if self.prefix_cache is not None else (0, None)
            reused = min(reused, len(prompt) - 1)  # the last prompt token must run to give the first logits
            if layers is not None and reused > 0:
                cache.load(row, layers, reused)
            else:
                reused = 0
            new_tokens.append(list(prompt[reused:]))
        logits = extend(core, cache, new_tokens)
        if len(distinct) == len(prompts):
            return cache, logits
        # Samples of one prompt share its keys/values; each sample's own tokens go to its own rows.
        rows = torch.as_tensor(row_of, dtype=torch.long, device=core.device)
        own_capacity = capacity - max(map(len, prompts))  # the new tokens
        return SharedKVBatch(core, cache, rows, own_capacity), logits.index_select(0, rows)

    def _packed_batch(self, prompts: list[list[int]], params: SamplingParams,
                      processors: LogitsProcessorList) -> list[Generation]:
        """``generate``'s loop for one batch, on :mod:`ftrl.llm.engines.packed` (see the module docstring)."""
        core = Core(self.model)
        cache, logits = self._prefill(core, prompts, max(map(len, prompts)) + params.max_new_tokens)
        count, limit = len(prompts), params.max_new_tokens
        stop_ids = torch.as_tensor(self.stop_token_ids, device=core.device)
        tokens = torch.full((count, limit), self.pad_token_id, dtype=torch.long)
        lengths = torch.zeros(count, dtype=torch.long)
        running = torch.arange(count)  # the sequences still generating ...
        slots = torch.arange(count, device=core.device)  # ... and their cache rows
        for step in range(limit):
            scores = processors(None, logits)
            if params.greedy:
                chosen = scores.argmax(dim=-1)
            else:  # torch.multinomial(p, 1) is argmax(p / q), q ~ Exp(1) drawn for every row of the batch
                draws = torch.empty((count, scores.shape[-1]), dtype=scores.dtype).exponential_(1)
                chosen = (torch.softmax(scores, dim=-1) / draws[running].to(scores.device)).argmax(dim=-1)
            tokens[running, step] = chosen.cpu()
            lengths[running] += 1
            done = torch.isin(chosen, stop_ids) | (step + 1 == limit)
            if self.prefix_cache is not None and bool(done.any()):
                self._remember(prompts, tokens, lengths, running[done.cpu()], slots[done], cache)
            keep = ~done
            if not bool(keep.any()):
                break
            running, slots, chosen = running[keep.cpu()], slots[keep], chosen[keep]
            if len(slots) <= cache.rows // 2:  # drop finished rows from the cache once they are half of it
                cache.select(slots)
                slots = torch.arange(len(slots), device=core.device)
            logits = decode_step(core, cache, slots, chosen)
        responses = [row[:n].tolist() for row, n in zip(tokens, lengths.tolist())]
        stop_set = set(self.stop_token_ids)
        finish = ["stop" if r and r[-1] in stop_set else "length" for r in responses]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return [Generation(text=text, prompt_token_ids=list(prompt), token_ids=response, finish_reason=reason)
                for text, prompt, response, reason in zip(texts, prompts, responses, finish)]

    def _remember(self, prompts: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor,
                  sequences: torch.Tensor, slots: torch.Tensor, cache: KVBatch | SharedKVBatch) -> None:
        """Keep finished rows' keys/values (prompt + response but its last token) for the next turn."""
        for sequence, slot in zip(sequences.tolist(), slots.tolist()):
            length = int(cache.lengths[slot])
            ids = prompts[sequence] + tokens[sequence, : int(lengths[sequence])].tolist()
            self.prefix_cache.add(ids[:length], cache.export(slot, length))

    def model_generation_defaults(self) -> dict[str, object]:
        """top_k / top_p / repetition_penalty of the model's generation config (what ``inherit`` takes)."""
        config = self.model.generation_config
        return {key: getattr(config, key) for key in INHERITED_WARPERS if getattr(config, key, None) is not None}

    def close(self) -> None:
        """Release the model and the GPU memory it holds (before verl or vLLM starts in this process tree)."""
        model, self.model = self.model, None
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
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
