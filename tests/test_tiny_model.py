"""Tiny offline model: chat template, local tokenizer, seeded Qwen3 model, save/load round trip.

OMP_NUM_THREADS=1 python -m pytest tests/test_tiny_model.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftrl.config import TinyModelConfig
from ftrl.llm.chat_template import TOOL_TAGS, render_chat
from ftrl.llm.models import count_parameters, load_model_and_tokenizer, resolve_device, resolve_dtype
from ftrl.llm.tiny import (
    atomic_words_from_records,
    build_tiny_model,
    build_tokenizer,
    builtin_corpus,
    corpus_from_records,
    create_tiny_base,
    main,
    pretrain_copying,
)

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

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

# A full FTRL-style episode in the reference format: parallel calls (arguments as a JSON string and
# as a dict), two tool results, a final answer that carries an inline thought, a follow-up question.
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
            },
        ],
    },
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    {"role": "tool", "content": "rain", "tool_call_id": "c2"},
    {
        "role": "assistant",
        "content": "<think>\nboth known\n</think>\n\nParis: sunny. Rome: rain.",
        "tool_calls": None,
    },
    {"role": "user", "content": "Thanks!"},
]

TOOLS_SECTION = (
    "# Tools\n\nYou can call the functions below to help with the user request.\n\n"
    "Their JSON schemas, one per line, are inside <tools></tools>:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    "</tools>\n\nTo call a function, answer with one block per call:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)

EXPECTED_CONVERSATION = (
    "<|im_start|>system\nYou are helpful.\n\n"
    + TOOLS_SECTION
    + "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
    + "<|im_start|>assistant\n"
    + '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>\n'
    + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
    + "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
    + "<tool_response>\nrain\n</tool_response><|im_end|>\n"
    + "<|im_start|>assistant\nParis: sunny. Rome: rain.<|im_end|>\n"
    + "<|im_start|>user\nThanks!<|im_end|>\n"
    + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(builtin_corpus(), vocab_size=SMALL.vocab_size)


# ----------------------------------------------------------------------------------------- template
def test_full_conversation_renders_to_expected_text():
    rendered = render_chat(CONVERSATION, [WEATHER_TOOL], add_generation_prompt=True, enable_thinking=False)
    assert rendered == EXPECTED_CONVERSATION


def test_tools_without_system_message_open_their_own_system_turn():
    rendered = render_chat([{"role": "user", "content": "Hi"}], [WEATHER_TOOL])
    assert rendered == "<|im_start|>system\n" + TOOLS_SECTION + "<|im_start|>user\nHi<|im_end|>\n"


def test_system_message_without_tools_and_empty_reference_assistant_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": None},
    ]
    assert render_chat(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n"
    )


def test_thinking_switch_and_kept_thoughts():
    user = [{"role": "user", "content": "Hi"}]
    assert render_chat(user, add_generation_prompt=True, enable_thinking=True).endswith(
        "<|im_start|>assistant\n"
    )
    # Left unset, thinking stays on (the Qwen3 default).
    assert render_chat(user, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert render_chat(user, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    answered = [
        {"role": "assistant", "content": "<think>\nplan\n</think>\n\nDone."},
        {"role": "assistant", "content": "Ok.", "reasoning_content": "check"},
    ]
    assert (
        render_chat(answered)
        == "<|im_start|>assistant\nDone.<|im_end|>\n<|im_start|>assistant\nOk.<|im_end|>\n"
    )
    assert render_chat(answered, keep_thoughts=True) == (
        "<|im_start|>assistant\n<think>\nplan\n</think>\n\nDone.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\ncheck\n</think>\n\nOk.<|im_end|>\n"
    )


def test_text_before_calls_and_bare_calls():
    message = {
        "role": "assistant",
        "content": "Looking up.",
        "tool_calls": [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": None}],
    }
    assert render_chat([message]) == (
        "<|im_start|>assistant\nLooking up.\n"
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_unknown_role_is_rejected_with_valid_roles():
    with pytest.raises(
        Exception, match='unknown message role "narrator"; valid: system, user, assistant, tool'
    ):
        render_chat([{"role": "narrator", "content": "x"}])


def test_tokenizer_template_matches_render_chat(tokenizer):
    via_tokenizer = tokenizer.apply_chat_template(
        CONVERSATION, tools=[WEATHER_TOOL], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert via_tokenizer == EXPECTED_CONVERSATION


# ----------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_deterministic(tokenizer):
    again = build_tokenizer(builtin_corpus(), vocab_size=SMALL.vocab_size)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert again(EXPECTED_CONVERSATION)["input_ids"] == tokenizer(EXPECTED_CONVERSATION)["input_ids"]
    assert len(tokenizer) == SMALL.vocab_size


def test_special_tokens_and_tool_tags(tokenizer):
    reserved = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *TOOL_TAGS]
    assert [tokenizer.convert_tokens_to_ids(token) for token in reserved] == list(range(11))
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for tag in TOOL_TAGS:
        assert tokenizer.tokenize(tag) == [tag]
    text = (
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        '<tool_call>\n{"name": "f"}\n</tool_call><|im_end|><|endoftext|>'
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        'assistant\n<think>\n\n</think>\n\n<tool_call>\n{"name": "f"}\n</tool_call>'
    )


def test_pre_tokenizer_keeps_arguments_identical_across_contexts(tokenizer):
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    paris, year = ids("Paris"), ids("2023")
    assert len(paris) == 1 and len(year) == 4  # one capitalised word; one token per digit
    question = ids("What is the population of Paris in 2023?")
    call = ids('{"name": "get_population", "arguments": {"city": "Paris", "year": 2023}}')
    result = ids("Paris had 2023 people")
    for sequence in (question, call, result):
        assert paris[0] in sequence
        assert any(sequence[i : i + 4] == year for i in range(len(sequence)))
    assert ids("\n\n") == ids("\n") * 2


def test_any_text_round_trips(tokenizer):
    text = "Zürich 東京 emoji 😀 tab\tend ~`|"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_too_small_vocab_and_empty_corpus_are_rejected():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="corpus is empty"):
        build_tokenizer([], vocab_size=600)


def test_tokenizer_save_load_round_trip_offline(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.eos_token_id, loaded.pad_token_id) == (2, 0)
    assert loaded(EXPECTED_CONVERSATION)["input_ids"] == tokenizer(EXPECTED_CONVERSATION)["input_ids"]
    ids = loaded("<tool_call>x</tool_call><|im_end|>")["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"


# ----------------------------------------------------------------------------------------- corpus
def test_corpus_from_records_covers_prompts_outputs_answers_and_gold_calls():
    record = {
        "messages": [{"role": "user", "content": "Population of Oslo in 1990?"}],
        "tools": json.dumps([WEATHER_TOOL]),
        "codes": json.dumps({"get_weather": "def get_weather(city):\n    return 'sunny'\n"}),
        "unsolved_set": json.dumps({"get_population": ["473344"]}),
        "answer": "473344",
        "gold_calls": json.dumps([[{"name": "get_population", "arguments": {"city": "Oslo", "year": 1990}}]]),
    }
    corpus = corpus_from_records([record])
    assert (
        render_chat(record["messages"], [WEATHER_TOOL], add_generation_prompt=True, enable_thinking=False)
        in corpus
    )
    assert "<|im_start|>user\n<tool_response>\n473344\n</tool_response><|im_end|>\n" in corpus
    assert "<|im_start|>assistant\n473344<|im_end|>\n" in corpus
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_population", "arguments": '
        '{"city": "Oslo", "year": 1990}}\n</tool_call><|im_end|>\n'
    ) in corpus
    with pytest.raises(KeyError, match="record 0 lacks field 'tools'"):
        corpus_from_records([{"messages": []}])


# ----------------------------------------------------------------------------------------- model
def _expected_parameter_count(cfg: TinyModelConfig, vocab: int) -> int:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = (
        2 * cfg.hidden_size * cfg.num_attention_heads * head_dim
        + 2 * cfg.hidden_size * cfg.num_key_value_heads * head_dim
        + 2 * head_dim
    )  # q/o, k/v, q/k norms
    layer = attention + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size
    return vocab * cfg.hidden_size + cfg.num_hidden_layers * layer + cfg.hidden_size


def test_model_build_is_seeded_and_sized(tokenizer):
    rng_before = torch.get_rng_state()
    first = build_tiny_model(SMALL, tokenizer, seed=3)
    second = build_tiny_model(SMALL, tokenizer, seed=3)
    other = build_tiny_model(SMALL, tokenizer, seed=4)
    assert torch.equal(rng_before, torch.get_rng_state())
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    assert not torch.equal(
        first_state["model.embed_tokens.weight"], other.state_dict()["model.embed_tokens.weight"]
    )
    assert first.config.vocab_size == len(tokenizer) == 600
    assert count_parameters(first) == (_expected_parameter_count(SMALL, 600),) * 2 == (112_512, 112_512)
    assert _expected_parameter_count(TinyModelConfig(), 2048) == 1_246_592  # the default tiny model
    assert first.generation_config.eos_token_id == [2, 0]


def test_model_build_rejects_bad_shapes(tokenizer):
    with pytest.raises(ValueError, match="hidden_size=66 must be divisible by num_attention_heads=4"):
        build_tiny_model(TinyModelConfig(hidden_size=66, num_attention_heads=4), tokenizer, seed=0)


def test_create_tiny_base_round_trips_and_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = create_tiny_base(SMALL, builtin_corpus(), tmp_path / "tiny", seed=5)
    assert out == tmp_path / "tiny"
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert create_tiny_base(SMALL, builtin_corpus(), out, seed=5) == out
    assert weights.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging directory left

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = build_tiny_model(SMALL, build_tokenizer(builtin_corpus(), SMALL.vocab_size), seed=5)
    ids = torch.tensor([tokenizer("<|im_start|>user\nWeather in Paris?<|im_end|>\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    info = json.loads((out / "ftrl_tiny.json").read_text())
    assert (info["seed"], info["vocab_size"], info["parameters"]) == (5, 600, 112_512)

    loaded, loaded_tokenizer = load_model_and_tokenizer(str(out))
    assert loaded_tokenizer.padding_side == "left" and loaded_tokenizer.pad_token == "<|endoftext|>"
    assert not loaded.training


def test_create_tiny_base_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="not a complete model"):
        create_tiny_base(SMALL, builtin_corpus(), tmp_path, seed=0)


def test_load_helpers_validate_names(tmp_path):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; valid"):
        resolve_dtype("fp8")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model_and_tokenizer(str(tmp_path))


def test_count_parameters_separates_frozen(tokenizer):
    model = build_tiny_model(SMALL, tokenizer, seed=0)
    for parameter in model.model.layers[0].parameters():
        parameter.requires_grad_(False)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert count_parameters(model) == (112_512 - layer, 112_512)


def test_cli_builds_and_prints(tmp_path, capsys):
    main(
        [
            "--out",
            str(tmp_path / "cli"),
            "--hidden-size",
            "64",
            "--num-hidden-layers",
            "2",
            "--intermediate-size",
            "128",
            "--vocab-size",
            "600",
        ]
    )
    printed = capsys.readouterr().out
    assert "parameters: 112,512 (trainable 112,512); vocab 600" in printed
    assert "'<tool_call>'" in printed
    assert Path(tmp_path / "cli" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------- atomic words
ATOMIC_RECORD = {
    "messages": [{"role": "user", "content": "Which warehouse stores product P73?"}],
    "tools": json.dumps([{"type": "function", "function": {
        "name": "get_product_warehouse", "description": "Warehouse of a product.",
        "parameters": {"type": "object", "properties": {"product_id": {"type": "string"}}}}}]),
    "codes": json.dumps({"get_product_warehouse": "def get_product_warehouse(product_id):\n    return 'W12'\n"}),
    "unsolved_set": json.dumps({"get_product_warehouse": ["W12"]}),
    "answer": "W12",
    "gold_calls": json.dumps([[{"name": "get_product_warehouse", "arguments": {"product_id": "P73"}}]]),
}


def test_atomic_words_are_names_ids_and_answers():
    words = atomic_words_from_records([ATOMIC_RECORD, {**ATOMIC_RECORD, "answer": "a sentence, W12"}])
    assert words == ["P73", "W12", "get_product_warehouse", "product_id"]  # sorted; "a sentence" is no word


def test_atomic_words_are_single_tokens_in_every_context():
    tokenizer = build_tokenizer(builtin_corpus(), vocab_size=700, atomic_words=["P73", "get_product_warehouse"])
    contexts = ["Which warehouse stores product P73?", '{"product_id": "P73"}', "P73,P73.",
                '{"name": "get_product_warehouse", "arguments": {}}']
    p73 = tokenizer.convert_tokens_to_ids("P73")
    for text in contexts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer(contexts[0], add_special_tokens=False)["input_ids"].count(p73) == 1
    assert tokenizer(contexts[2], add_special_tokens=False)["input_ids"].count(p73) == 2
    assert len(tokenizer) <= 700


def test_copy_pretraining_teaches_copying_and_is_seeded():
    words = [f"Q{n}" for n in range(10, 30)]
    tokenizer = build_tokenizer(builtin_corpus(), vocab_size=600, atomic_words=words)
    losses = []
    for _ in range(2):
        model = build_tiny_model(SMALL, tokenizer, seed=0)
        losses.append(pretrain_copying(model, tokenizer, steps=120, seed=0, batch_size=16, lr=3e-3))
    assert losses[0] == losses[1]
    first, last = sum(losses[0][:10]) / 10, sum(losses[0][-10:]) / 10
    assert last < 0.5 * first, (first, last)
