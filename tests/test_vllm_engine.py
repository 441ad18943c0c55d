"""VLLMEngine without vLLM: sampling-parameter mapping, prompts, seeds and output conversion on CPU.

vLLM needs a GPU and is not installed here, so the engine runs against a fake ``LLM`` that records
what it is asked and answers with vLLM-shaped outputs built from the real tiny tokenizer; the
sampling parameters are built by a recording stand-in for ``vllm.SamplingParams``.

    OMP_NUM_THREADS=1 python -m pytest tests/test_vllm_engine.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from omegaconf import OmegaConf

from ftrl.config import RunConfig
from ftrl.llm.chat_template import END_OF_TEXT, IM_END
from ftrl.llm.engines.base import ChatRequest, SamplingParams
from ftrl.llm.engines.vllm import (
    TOP_K_DISABLED,
    VLLMEngine,
    context_length,
    expand_jobs,
    sampling_kwargs,
    stop_token_ids_for,
    to_generation,
)
from ftrl.llm.tiny import build_tokenizer, builtin_corpus

ROOT = Path(__file__).resolve().parent.parent
TOOL = {
    "type": "function",
    "function": {
        "name": "get_population",
        "description": "Population of a city in a year",
        "parameters": {"type": "object", "required": ["city", "year"],
                       "properties": {"city": {"type": "string"}, "year": {"type": "integer"}}},
    },
}
REPLY = '<tool_call>\n{"name": "get_population", "arguments": {"city": "Oslo", "year": 1990}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(builtin_corpus(), vocab_size=600)


@dataclass
class FakeCompletion:
    token_ids: list[int]
    finish_reason: str
    stop_reason: Any = None
    text: str = "vLLM's own detokenization (ignored by the engine)"


@dataclass
class FakeLLM:
    """Answers every prompt with ``reply_ids``; records prompts and sampling parameters."""

    reply_ids: list[int]
    finish_reason: str = "stop"
    stop_reason: Any = None
    calls: list[tuple[list[dict], list[dict]]] = field(default_factory=list)

    def generate(self, prompts: list[dict], sampling_params: list[dict], use_tqdm: bool = True) -> list[Any]:
        self.calls.append((prompts, sampling_params))
        return [SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[self._completion()])
                for prompt in prompts]

    def _completion(self) -> FakeCompletion:
        return FakeCompletion(list(self.reply_ids), self.finish_reason, self.stop_reason)


def _engine(tokenizer: Any, llm: FakeLLM, enable_thinking: bool = False,
            max_model_len: int | None = None) -> VLLMEngine:
    return VLLMEngine(llm, tokenizer, enable_thinking=enable_thinking, max_model_len=max_model_len,
                      sampling_params_cls=lambda **kwargs: kwargs)


def _requests(*questions: str) -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": q}], tools=[TOOL]) for q in questions]


# ----------------------------------------------------------------------------------- pure mapping
def test_sampling_kwargs_sampled_are_on_policy() -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64, n=16, seed=3)
    kwargs = sampling_kwargs(params, [5, 9], 42)
    assert kwargs == {"n": 1, "max_tokens": 64, "stop_token_ids": [5, 9], "detokenize": False,
                      "top_k": TOP_K_DISABLED, "min_p": 0.0, "repetition_penalty": 1.0,
                      "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": 42, "temperature": 0.7,
                      "top_p": 0.9}
    assert TOP_K_DISABLED == -1


def test_sampling_kwargs_temperature_zero_is_greedy_and_resets_top_p() -> None:
    kwargs = sampling_kwargs(SamplingParams(temperature=0.0, top_p=0.5, max_new_tokens=8), [1], None)
    assert kwargs["temperature"] == 0.0 and kwargs["top_p"] == 1.0 and kwargs["seed"] is None


def test_sampling_kwargs_reject_invalid_params() -> None:
    with pytest.raises(ValueError, match="top_p"):
        sampling_kwargs(SamplingParams(top_p=0.0), [1], None)


def test_expand_jobs_gives_each_sample_its_own_seed() -> None:
    assert expand_jobs(2, SamplingParams(n=3, seed=100)) == [
        (0, 100), (0, 101), (0, 102), (1, 103), (1, 104), (1, 105)]
    assert expand_jobs(2, SamplingParams(n=1, seed=None)) == [(0, None), (1, None)]


def test_stop_tokens_are_eos_then_im_end_and_endoftext(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    stops = stop_token_ids_for(tokenizer)
    assert stops[0] == tokenizer.eos_token_id
    assert set(stops) == {vocab[IM_END], vocab[END_OF_TEXT], tokenizer.eos_token_id}
    assert len(stops) == len(set(stops))


def test_to_generation_appends_missing_stop_token_and_decodes_itself(tokenizer) -> None:
    im_end = tokenizer.get_vocab()[IM_END]
    stops = stop_token_ids_for(tokenizer)
    body = tokenizer(REPLY, add_special_tokens=False)["input_ids"]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    stopped_on_id = to_generation([1, 2], FakeCompletion(body, "stop", stop_reason=im_end), stops, decode)
    assert stopped_on_id.token_ids == body + [im_end]
    assert stopped_on_id.text == REPLY  # tool tags kept, <|im_end|> dropped
    assert stopped_on_id.prompt_token_ids == [1, 2] and stopped_on_id.finish_reason == "stop"

    with_stop = FakeCompletion(body + [im_end], "stop", stop_reason=im_end)
    already_there = to_generation([1], with_stop, stops, decode)
    assert already_there.token_ids == body + [im_end]

    eos = to_generation([1], FakeCompletion(body, "stop", stop_reason=None), stops, decode)
    assert eos.token_ids == body + [stops[0]]

    truncated = to_generation([1], FakeCompletion(body[:3], "length"), stops, decode)
    assert truncated.token_ids == body[:3] and truncated.finish_reason == "length"


def test_to_generation_rejects_aborts_and_string_stops(tokenizer) -> None:
    stops = stop_token_ids_for(tokenizer)
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        to_generation([1], FakeCompletion([4], "abort"), stops, str)
    with pytest.raises(RuntimeError, match="'</tool_call>'"):
        to_generation([1], FakeCompletion([4], "stop", stop_reason="</tool_call>"), stops, str)


def test_context_length_is_capped_by_the_model_window(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    assert context_length(16384, 1024, tmp_path) == 2048
    assert context_length(512, 256, tmp_path) == 768
    assert context_length(16384, 8192, "Qwen/Qwen3-8B") == 24576  # hub id: no local config to cap by


# ----------------------------------------------------------------------------------- engine
def test_generate_renders_rows_tools_and_thinking_and_keeps_request_order(tokenizer) -> None:
    im_end = tokenizer.get_vocab()[IM_END]
    body = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    llm = FakeLLM(reply_ids=body + [im_end], stop_reason=im_end)
    engine = _engine(tokenizer, llm, enable_thinking=False)
    requests = _requests("Population of Oslo?", "Oslo in 1990, roughly?")
    results = engine.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=32, n=2, seed=7))

    prompts, params = llm.calls[0]
    assert len(prompts) == 4 and len(params) == 4
    rendered = engine.render(requests[1])
    assert "get_population" in rendered and "<think>\n\n</think>" in rendered
    assert rendered.endswith("<think>\n\n</think>\n\n")
    expected_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prompts[2]["prompt_token_ids"] == expected_ids and prompts[3]["prompt_token_ids"] == expected_ids
    assert [p["seed"] for p in params] == [7, 8, 9, 10]
    assert all(p["max_tokens"] == 32 and p["temperature"] == 1.0 for p in params)

    assert [len(r) for r in results] == [2, 2]
    assert results[1][0].prompt_token_ids == expected_ids
    assert results[0][1].token_ids == body + [im_end] and results[0][1].text == REPLY


def test_thinking_mode_leaves_the_think_block_to_the_model(tokenizer) -> None:
    engine = _engine(tokenizer, FakeLLM(reply_ids=[1]), enable_thinking=True)
    assert "</think>" not in engine.render(_requests("Population of Oslo?")[0])


def test_overlong_prompt_ends_its_episode_not_the_batch(tokenizer) -> None:
    im_end = tokenizer.get_vocab()[IM_END]
    llm = FakeLLM(reply_ids=[1, im_end], stop_reason=im_end)
    short, long = _requests("Oslo?", "Population of Oslo in 1990, and of Bergen, and of Trondheim, please? " * 6)
    engine = _engine(tokenizer, llm)
    short_len, long_len = (len(ids) for ids in engine.encode([short, long]))
    engine.max_model_len = (short_len + long_len) // 2
    results = engine.generate([short, long], SamplingParams(max_new_tokens=4096, n=2))
    prompts, params = llm.calls[0]
    assert len(prompts) == 2  # only the prompt that fits reached vLLM, capped to the room left
    assert all(p["max_tokens"] == engine.max_model_len - short_len for p in params)
    assert [g.finish_reason for g in results[0]] == ["stop", "stop"]
    assert [(g.finish_reason, g.text, g.token_ids) for g in results[1]] == [("context", "", [])] * 2


def test_from_config_refuses_a_cpu_profile() -> None:
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.engine = "vllm"
    cfg.resources.device = "cpu"
    with pytest.raises(ValueError, match="resources.device=cpu"):
        VLLMEngine.from_config(OmegaConf.to_object(cfg), "/nonexistent", batch_size=8)


def test_registry_resolves_vllm_without_importing_vllm() -> None:
    code = ("import sys, ftrl.run; from ftrl.registry import ENGINES; cls = ENGINES.get('vllm'); "
            "print(cls.__name__, 'vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["VLLMEngine", "False"]
