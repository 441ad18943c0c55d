"""The packed forward (ftrl.llm.engines.packed) against the HF forward and HF generate, on a tiny model.

Log-probabilities, entropies and gradients agree to float rounding; packed decoding gives the
tokens ``generate`` gives, greedy and sampled (same seed), with prompts shared by n samples, across
turns that reuse the prefix cache, and with rows finishing at different times.

    OMP_NUM_THREADS=1 python -m pytest tests/test_packed.py -q
"""

from __future__ import annotations

import random

import pytest
import torch

from ftrl.config import TinyModelConfig
from ftrl.llm.engines.base import ChatRequest, SamplingParams
from ftrl.llm.engines.hf import HFEngine
from ftrl.llm.engines.packed import (
    Core,
    KVBatch,
    PrefixCache,
    continuation_logprobs,
    continuation_values,
    extend,
    unsupported_reason,
)
from ftrl.llm.tiny import build_tiny_model, build_tokenizer, builtin_corpus
from ftrl.train.batch import batch_logprobs, make_token_batch, response_logprobs, trim, value_predictions

torch.set_num_threads(1)
SHAPE = TinyModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=600, max_position_embeddings=512, copy_pretrain_steps=0)
QUESTIONS = ["Population of Oslo?", "How many people live in Oslo in 1990, roughly?", "Oslo",
             "Weather in Paris on 2024-01-10?", "Tell me the population of Oslo in the year 1990 please."]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(builtin_corpus(), vocab_size=SHAPE.vocab_size)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(SHAPE, tokenizer, seed=3).eval()


def _requests(questions: list[str] = QUESTIONS) -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": q}]) for q in questions]


def _ids(groups) -> list[list[list[int]]]:
    return [[g.token_ids for g in group] for group in groups]


def _random_rows(seed: int, vocab: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(11, vocab) for _ in range(rng.randint(1, 30))] for _ in range(3)]
    group = [0, 0, 0, 1, 2, 2]
    continuations = [[rng.randrange(11, vocab) for _ in range(rng.randint(0, 9))] for _ in group]
    continuations[1] = [5]
    return prompts, continuations, group


def test_the_tiny_model_is_covered_and_others_are_named(model) -> None:
    assert unsupported_reason(model) is None and unsupported_reason(model, training=True) is None
    model.config.model_type, saved = "gpt2", model.config.model_type
    try:
        assert "gpt2" in unsupported_reason(model)
    finally:
        model.config.model_type = saved


def test_logprobs_entropy_and_gradients_match_the_hf_forward(model, tokenizer) -> None:
    prompts, continuations, group = _random_rows(0, len(tokenizer))
    batch = make_token_batch([prompts[g] for g in group], continuations, tokenizer.pad_token_id)
    mask = batch.response_mask
    model.train()
    ours, entropy = continuation_logprobs(model, prompts, continuations, group, with_entropy=True)
    (ours * mask).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    theirs, their_entropy = response_logprobs(model, batch, with_entropy=True)
    (theirs * mask).sum().backward()
    model.eval()
    assert ours.shape == theirs.shape == mask.shape
    assert torch.allclose(ours * mask, theirs * mask, atol=1e-5)
    assert torch.allclose(entropy * mask, their_entropy * mask, atol=1e-5)
    assert float(ours[1, 0].detach()) != 0.0 and float((ours.detach() * (1 - mask)).abs().sum()) == 0.0
    for name, parameter in model.named_parameters():
        assert torch.allclose(grads[name], parameter.grad, atol=1e-5, rtol=1e-4), name
    model.zero_grad()
    # batch_logprobs finds the shared prompts itself and gives response_logprobs' shapes.
    again, _ = batch_logprobs(model, batch)
    assert again.shape == theirs.shape and torch.allclose(again * mask, theirs * mask, atol=1e-5)


def test_critic_values_and_gradients_match_the_padded_forward(model, tokenizer, tmp_path) -> None:
    """PPO's critic (a token-classification model) through the packed path: the value before each response
    token equals the padded forward's, and so do the value loss's gradients (dropout off, as in eval)."""
    from ftrl.llm.models import load_value_model

    model.save_pretrained(tmp_path)
    critic = load_value_model(str(tmp_path))
    torch.manual_seed(0)
    torch.nn.init.normal_(critic.score.weight, std=0.5)  # a head that is not zero, so values differ per token
    prompts, continuations, group = _random_rows(2, len(tokenizer))
    batch = make_token_batch([prompts[g] for g in group], continuations, tokenizer.pad_token_id)
    mask = batch.response_mask
    critic.eval()  # dropout off: the two paths draw different dropout masks in training mode
    ours = continuation_values(critic, prompts, continuations, group)
    (ours * mask).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in critic.named_parameters()}
    critic.zero_grad()
    trimmed = trim(batch)
    output = critic(input_ids=trimmed.input_ids, attention_mask=trimmed.attention_mask,
                    position_ids=trimmed.position_ids, use_cache=False).logits[..., 0]
    theirs = output[:, trimmed.prompt_length - 1: trimmed.prompt_length - 1 + mask.shape[1]]
    (theirs * mask).square().sum().backward()
    assert ours.shape == theirs.shape == mask.shape
    assert float((theirs * mask).abs().max()) > 0.1
    assert torch.allclose(ours * mask, theirs * mask, atol=1e-5)
    assert float((ours.detach() * (1 - mask)).abs().sum()) == 0.0
    for name, parameter in critic.named_parameters():  # float rounding, relative to the largest gradient
        scale = max(1.0, float(parameter.grad.abs().max()))
        assert torch.allclose(grads[name], parameter.grad, atol=1e-6 * scale, rtol=1e-4), name
    # value_predictions (the trainer's entry point) takes the packed path and gives the same values.
    with torch.no_grad():
        assert torch.allclose(value_predictions(critic, batch) * mask, theirs.detach() * mask, atol=1e-5)


@torch.inference_mode()
def test_extending_a_cache_equals_one_full_forward(model, tokenizer) -> None:
    prompts, _, _ = _random_rows(1, len(tokenizer))
    core = Core(model)
    cache = KVBatch(core, len(prompts), 64)
    extend(core, cache, [p[:2] for p in prompts])
    logits = extend(core, cache, [p[2:] for p in prompts])
    for row, prompt in enumerate(prompts):
        full = model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1]
        if len(prompt) > 2:
            assert torch.allclose(logits[row], full, atol=1e-5)
    step = extend(core, cache, [[7], [], [9]])
    assert float(step[1].abs().sum()) == 0.0
    assert torch.allclose(step[2], model(input_ids=torch.tensor([prompts[2] + [9]])).logits[0, -1], atol=1e-5)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_new_tokens=12),
    SamplingParams(temperature=1.0, max_new_tokens=10, n=4, seed=7),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, n=3, seed=1),
])
def test_packed_decoding_gives_generates_tokens(model, tokenizer, params) -> None:
    """Same tokens as HF generate, batch size 3 so the 5 x n sequences span several batches."""
    generate = HFEngine(model, tokenizer, batch_size=3).generate(_requests(), params)
    packed_engine = HFEngine(model, tokenizer, batch_size=3, decoder="packed")
    rng = torch.get_rng_state()
    packed = packed_engine.generate(_requests(), params)
    assert torch.equal(rng, torch.get_rng_state())
    assert _ids(packed) == _ids(generate)
    assert [[g.text for g in grp] for grp in packed] == [[g.text for g in grp] for grp in generate]
    assert [[g.finish_reason for g in grp] for grp in packed] == [[g.finish_reason for g in grp] for grp in generate]
    assert [[g.prompt_token_ids for g in grp] for grp in packed] == [[g.prompt_token_ids for g in grp]
                                                                     for grp in generate]


def test_later_turns_reuse_the_cache_and_decode_the_same(model, tokenizer) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    packed = HFEngine(model, tokenizer, batch_size=8, decoder="packed")
    generate = HFEngine(model, tokenizer, batch_size=8)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    for turn in range(3):
        requests = [ChatRequest(messages=list(c)) for c in conversations]
        ours, theirs = packed.generate(requests, params), generate.generate(requests, params)
        assert _ids(ours) == _ids(theirs), turn
        for conversation, (generation,) in zip(conversations, ours):
            conversation += [{"role": "assistant", "content": generation.text},
                             {"role": "user", "content": f"and then {turn}?"}]
    cache = packed.prefix_cache
    assert cache.hits >= 3 and cache.reused_tokens > 0
    assert len(cache.entries) <= cache.max_entries


def test_prefix_cache_finds_the_longest_shared_prefix_and_stays_bounded() -> None:
    cache = PrefixCache(budget_bytes=1 << 20, max_entries=2)
    kv = [(torch.zeros(1, 40, 2), torch.zeros(1, 40, 2))]
    first, second = list(range(40)), list(range(20)) + [99] * 20
    cache.add(first, kv)
    cache.add(second, kv)
    assert cache.lookup(list(range(35)) + [7])[0] == 35
    assert cache.lookup(list(range(20)) + [99, 99, 5])[0] == 22
    assert cache.lookup([1, 2, 3])[0] == 0
    cache.add(list(range(100, 140)), kv)
    assert len(cache.entries) == 2 and cache.lookup(list(range(40)))[0] == 20  # the first entry left


def test_the_prefix_cache_is_dropped_when_the_weights_change(tokenizer) -> None:
    model = build_tiny_model(SHAPE, tokenizer, seed=4).eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    engine = HFEngine(model, tokenizer, decoder="packed")
    requests = _requests(QUESTIONS[-1:])
    engine.generate(requests, params)
    assert len(engine.prefix_cache.entries) == 1
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)  # what an optimizer step or a load does: in place
    hits = engine.prefix_cache.hits
    assert _ids(engine.generate(requests, params)) == _ids(HFEngine(model, tokenizer).generate(requests, params))
    assert engine.prefix_cache.hits == hits  # nothing stale was reused
