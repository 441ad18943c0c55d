"""HFEngine: batched chat generation on the tiny model (greedy, sampling, stops, ids vs text).

A tiny model is trained for a few seconds to answer every prompt with one fixed tool call and
``<|im_end|>``, so stopping, tag decoding and text/id consistency are checked on real output.

    OMP_NUM_THREADS=1 python -m pytest tests/test_hf_engine.py -q
"""

from __future__ import annotations

import pytest
import torch

from ftrl.config import TinyModelConfig
from ftrl.llm.engines.base import ChatRequest, Generation, SamplingParams
from ftrl.llm.engines.hf import HFEngine
from ftrl.llm.tiny import build_tiny_model, build_tokenizer, builtin_corpus, create_tiny_base

torch.set_num_threads(1)

SMALL = TinyModelConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=600,
    max_position_embeddings=512,
    copy_pretrain_steps=0,
)
TOOL = {
    "type": "function",
    "function": {
        "name": "get_population",
        "description": "Population of a city in a year",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
            "required": ["city", "year"],
        },
    },
}
REPLY = '<tool_call>\n{"name": "get_population", "arguments": {"city": "Oslo", "year": 1990}}\n</tool_call>'
QUESTIONS = [
    "Population of Oslo?",
    "How many people live in Oslo in 1990, roughly?",
    "Oslo",
    "Tell me the population of Oslo in the year 1990 please, thanks.",
]


def _requests(questions: list[str] = QUESTIONS) -> list[ChatRequest]:
    return [
        ChatRequest(messages=[{"role": "user", "content": question}], tools=[TOOL]) for question in questions
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(builtin_corpus(), vocab_size=SMALL.vocab_size)


@pytest.fixture(scope="module")
def base_model(tokenizer):
    return build_tiny_model(SMALL, tokenizer, seed=0)


@pytest.fixture(scope="module")
def trained_model(tokenizer):
    """Fit REPLY + <|im_end|> after every question's prompt (loss on the reply only)."""
    model = build_tiny_model(SMALL, tokenizer, seed=1)
    engine = HFEngine(model, tokenizer)
    reply_ids = tokenizer(REPLY + "<|im_end|>", add_special_tokens=False)["input_ids"]
    sequences, masks = [], []
    for prompt in engine.encode(_requests()):
        sequences.append(prompt + reply_ids)
        masks.append([0] * len(prompt) + [1] * len(reply_ids))
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    labels = torch.tensor(
        [
            [t if m else -100 for t, m in zip(s, mask)] + [-100] * (width - len(s))
            for s, mask in zip(sequences, masks)
        ]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(60):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.05
    return model


def _ids(generations: list[list[Generation]]) -> list[list[list[int]]]:
    return [[generation.token_ids for generation in group] for group in generations]


def test_render_applies_tools_and_thinking_switch(base_model, tokenizer):
    request = _requests()[0]
    off = HFEngine(base_model, tokenizer, enable_thinking=False).render(request)
    on = HFEngine(base_model, tokenizer, enable_thinking=True).render(request)
    assert off.startswith("<|im_start|>system\n# Tools\n") and '"name": "get_population"' in off
    assert off.endswith("Population of Oslo?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on == off[: -len("<think>\n\n</think>\n\n")]


def test_trained_reply_stops_at_eos_and_ids_match_text(trained_model, tokenizer):
    engine = HFEngine(trained_model, tokenizer)
    results = engine.generate(_requests(), SamplingParams(temperature=0.0, max_new_tokens=60))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for request, (generation,) in zip(_requests(), results):
        assert generation.text == REPLY  # tool tags survive skip_special_tokens
        assert generation.finish_reason == "stop"
        assert generation.token_ids[-1] == eos and eos not in generation.token_ids[:-1]
        assert len(generation.token_ids) < 60
        assert tokenizer.decode(generation.token_ids, skip_special_tokens=True) == generation.text
        assert tokenizer.decode(generation.prompt_token_ids) == engine.render(request)


def test_length_limit_is_reported(trained_model, tokenizer):
    ((generation,),) = HFEngine(trained_model, tokenizer).generate(
        _requests()[:1], SamplingParams(temperature=0.0, max_new_tokens=3)
    )
    assert generation.finish_reason == "length"
    assert len(generation.token_ids) == 3
    assert generation.text == '<tool_call>\n{"name": "get_population", "arguments": {"city": "'


def test_greedy_is_deterministic_and_batching_invariant(base_model, tokenizer):
    questions = QUESTIONS + ["Weather in Paris on 2024-01-10?", "x"]
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    batched = HFEngine(base_model, tokenizer, batch_size=32).generate(_requests(questions), params)
    assert _ids(batched) == _ids(
        HFEngine(base_model, tokenizer, batch_size=32).generate(_requests(questions), params)
    )
    one_at_a_time = HFEngine(base_model, tokenizer, batch_size=1)
    singles = [one_at_a_time.generate([request], params)[0] for request in _requests(questions)]
    assert _ids(batched) == _ids(singles)
    # The prompts differ in length, so batching sorted them; every result is back at its request.
    assert [group[0].prompt_token_ids for group in batched] == one_at_a_time.encode(_requests(questions))


def test_sampling_shapes_seed_and_rng_isolation(base_model, tokenizer):
    engine = HFEngine(base_model, tokenizer, batch_size=5)  # 12 sequences -> batches of 5, 5, 2
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6, n=4, seed=7)
    rng_before = torch.get_rng_state()
    first = engine.generate(_requests()[:3], params)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert [len(group) for group in first] == [4, 4, 4]
    prompts = engine.encode(_requests()[:3])
    for group, prompt in zip(first, prompts):
        assert all(generation.prompt_token_ids == prompt for generation in group)
        assert all(generation.finish_reason in ("stop", "length") for generation in group)
        assert all(tokenizer.decode(g.token_ids, skip_special_tokens=True) == g.text for g in group)
    assert _ids(first) == _ids(engine.generate(_requests()[:3], params))
    other_seed = engine.generate(
        _requests()[:3], SamplingParams(temperature=1.0, max_new_tokens=6, n=4, seed=8)
    )
    assert _ids(first) != _ids(other_seed)
    assert len({tuple(g.token_ids) for group in first for g in group}) > 1


def test_sampling_uses_the_full_distribution(base_model, tokenizer):
    """transformers would cut to the 50 likeliest tokens unless top_k=0 is passed (docs/reference.md §9)."""
    engine = HFEngine(base_model, tokenizer, batch_size=256)
    (group,) = engine.generate(
        _requests()[:1], SamplingParams(temperature=1.0, max_new_tokens=1, n=256, seed=0)
    )
    assert len({generation.token_ids[0] for generation in group}) > 50
    config = engine._generation_config(SamplingParams(temperature=0.7, top_p=0.9))
    assert (config.do_sample, config.top_k, config.top_p, config.temperature) == (True, 0, 0.9, 0.7)
    assert config.repetition_penalty == 1.0 and config.use_cache


def test_from_pretrained_matches_in_memory_engine(tmp_path, tokenizer, base_model):
    path = create_tiny_base(SMALL, builtin_corpus(), tmp_path / "tiny", seed=0)
    loaded = HFEngine.from_pretrained(str(path), device="cpu", batch_size=4)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert _ids(loaded.generate(_requests(), params)) == _ids(
        HFEngine(base_model, tokenizer).generate(_requests(), params)
    )
    assert loaded.stop_token_ids == [2, 0]


def test_invalid_parameters_are_rejected(base_model, tokenizer):
    engine = HFEngine(base_model, tokenizer)
    with pytest.raises(ValueError, match="SamplingParams.top_p must be in"):
        engine.generate(_requests()[:1], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="SamplingParams.n must be >= 1"):
        engine.generate(_requests()[:1], SamplingParams(n=0))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        HFEngine(base_model, tokenizer, batch_size=0)
    assert engine.generate([], SamplingParams()) == []
