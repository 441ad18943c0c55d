"""Tool-call parsers: reference (compat=ftrl) behaviour pinned case by case, and the fixed mode.

OMP_NUM_THREADS=1 python -m pytest tests/test_parsers.py -q
"""

from __future__ import annotations

import datetime as real_datetime
import json

import pytest

from ftrl.llm import parsers
from ftrl.llm.parsers import (
    format_qwen_tool_calls,
    get_parser,
    has_tool_markup,
    parse_llama31,
    parse_qwen,
    split_thinking,
    tolerant_json_loads,
)
from ftrl.registry import UnknownNameError
from ftrl.types import make_tool_call

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
POPULATION = '{"name": "get_population", "arguments": {"city": "Oslo", "year": 2020}}'


def block(payload: str) -> str:
    return f"<tool_call>\n{payload}\n</tool_call>"


def calls_of(message: dict) -> list[tuple[object, dict]]:
    return [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"] or []
    ]


# --------------------------------------------------------------------------- Qwen, both modes


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_single_call_message_shape(compat: str) -> None:
    message = parse_qwen(block(WEATHER), compat=compat)
    assert message["role"] == "assistant"
    assert message["content"] == ""
    [call] = message["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_parallel_calls_keep_order_and_text_before(compat: str) -> None:
    text = "Let me look both up.\n" + block(WEATHER) + "\n" + block(POPULATION)
    message = parse_qwen(text, compat=compat)
    assert message["content"] == "Let me look both up."
    assert calls_of(message) == [
        ("get_weather", {"city": "Paris"}),
        ("get_population", {"city": "Oslo", "year": 2020}),
    ]


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_malformed_json_in_one_of_two_calls_is_skipped(compat: str) -> None:
    text = block('{"name": "get_weather", "arguments": {"city": "Paris"') + block(POPULATION)
    assert calls_of(parse_qwen(text, compat=compat)) == [("get_population", {"city": "Oslo", "year": 2020})]


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_arguments_as_json_string_are_decoded(compat: str) -> None:
    text = block('{"name": "get_weather", "arguments": "{\\"city\\": \\"Köln\\"}"}')
    [call] = parse_qwen(text, compat=compat)["tool_calls"]
    assert call["function"]["arguments"] == '{"city": "Köln"}'  # ensure_ascii=False


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
@pytest.mark.parametrize(
    "payload",
    [
        '{"arguments": {"city": "Paris"}}',  # no name
        '{"name": "", "arguments": {}}',  # empty name
        '{"name": "get_weather"}',  # no arguments
        '{"name": "get_weather", "arguments": "not json"}',
        '["get_weather", {"city": "Paris"}]',  # not an object
    ],
)
def test_unusable_call_leaves_whole_text_as_content(compat: str, payload: str) -> None:
    text = "  I will call.\n" + block(payload) + "  "
    message = parse_qwen(text, compat=compat)
    assert message["tool_calls"] is None
    assert message["content"] == text.strip()


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_no_calls_is_stripped_text(compat: str) -> None:
    message = parse_qwen("\n  The answer is 42.  \n", compat=compat)
    assert message == {"role": "assistant", "content": "The answer is 42.", "tool_calls": None}


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_unterminated_last_call_still_parses(compat: str) -> None:
    assert calls_of(parse_qwen("<tool_call>\n" + WEATHER, compat=compat)) == [
        ("get_weather", {"city": "Paris"})
    ]


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_truncated_call_is_not_a_call(compat: str) -> None:
    text = '<tool_call>\n{"name": "get_weather", "argu'
    assert parse_qwen(text, compat=compat) == {"role": "assistant", "content": text, "tool_calls": None}


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_one_tool_only_keeps_the_first(compat: str) -> None:
    message = parse_qwen(block(WEATHER) + block(POPULATION), compat=compat, one_tool_only=True)
    assert calls_of(message) == [("get_weather", {"city": "Paris"})]


# --------------------------------------------------------------------------- reference quirks


def test_ftrl_parses_calls_inside_thoughts() -> None:
    text = "<think>\nMaybe " + block(WEATHER) + "\n</think>\nParis is sunny."
    message = parse_qwen(text, compat="ftrl")
    assert message["content"] == "<think>\nMaybe"
    assert calls_of(message) == [("get_weather", {"city": "Paris"})]


def test_fixed_ignores_calls_inside_thoughts_and_reports_them() -> None:
    text = "<think>\nMaybe " + block(WEATHER) + "\n</think>\nParis is sunny."
    message = parse_qwen(text, compat="fixed")
    assert message["tool_calls"] is None
    assert message["content"] == "Paris is sunny."
    assert message["reasoning_content"] == "Maybe " + block(WEATHER)


def test_fixed_handles_template_opened_thoughts() -> None:
    # Qwen3's template opens <think> in the prompt, so the output starts inside the thought.
    text = "I need the weather " + block(POPULATION) + "</think>\n\nChecking.\n" + block(WEATHER)
    fixed = parse_qwen(text, compat="fixed")
    assert fixed["content"] == "Checking."
    assert calls_of(fixed) == [("get_weather", {"city": "Paris"})]
    assert fixed["reasoning_content"].startswith("I need the weather")
    # The reference starts the calls at the first tag, inside the thought; the part that holds
    # "</think>" does not start with the tag and is dropped, so only the thought's call survives.
    ftrl = parse_qwen(text, compat="ftrl")
    assert ftrl["content"] == "I need the weather"
    assert calls_of(ftrl) == [("get_population", {"city": "Oslo", "year": 2020})]


def test_ftrl_drops_calls_after_text_between_blocks_fixed_keeps_them() -> None:
    text = block(WEATHER) + "\nand also\n" + block(POPULATION) + "\ntrailing words"
    assert [name for name, _ in calls_of(parse_qwen(text, compat="ftrl"))] == ["get_weather"]
    assert [name for name, _ in calls_of(parse_qwen(text, compat="fixed"))] == [
        "get_weather",
        "get_population",
    ]


def test_ftrl_character_set_strip_of_the_opening_tag() -> None:
    # The reference strips the *characters* of "<tool_call>", so letters from that set before the
    # JSON vanish too; a doubled tag is also swallowed. Fixed mode wants the JSON right after it.
    text = '<tool_call>lcat{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert calls_of(parse_qwen(text, compat="ftrl")) == [("get_weather", {"city": "Paris"})]
    assert parse_qwen(text, compat="fixed")["tool_calls"] is None
    doubled = "<tool_call><tool_call>" + WEATHER + "</tool_call>"
    assert len(parse_qwen(doubled, compat="ftrl")["tool_calls"]) == 1
    assert len(parse_qwen(doubled, compat="fixed")["tool_calls"]) == 1


def test_ftrl_accepts_what_the_reference_accepts_fixed_does_not() -> None:
    odd = block('{"name": "get_weather", "arguments": "[1, 2]"}') + block('{"name": 7, "arguments": {}}')
    assert calls_of(parse_qwen(odd, compat="ftrl")) == [("get_weather", [1, 2]), (7, {})]
    assert parse_qwen(odd, compat="fixed")["tool_calls"] is None


def test_fixed_tolerates_junk_after_the_json() -> None:
    text = "<tool_call>  " + WEATHER + " }}\n</tool_call>"
    assert calls_of(parse_qwen(text, compat="fixed")) == [("get_weather", {"city": "Paris"})]
    assert parse_qwen(text, compat="ftrl")["tool_calls"] is None


def test_ftrl_ids_come_from_the_clock_and_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = real_datetime.datetime(2025, 1, 1, 12, 0, 0, 123456)

    class FrozenClock(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    monkeypatch.setattr(parsers.datetime, "datetime", FrozenClock)
    first, second = parse_qwen(block(WEATHER) + block(WEATHER), compat="ftrl")["tool_calls"]
    assert first["id"] == second["id"] == "call_" + parsers.sha256(str(frozen).encode()).hexdigest()
    assert len(first["id"]) == len("call_") + 64


def test_fixed_ids_are_unique() -> None:
    ids = [c["id"] for _ in range(50) for c in parse_qwen(block(WEATHER) * 4, compat="fixed")["tool_calls"]]
    assert len(ids) == 200 and len(set(ids)) == 200


def test_unknown_compat_names_the_valid_modes() -> None:
    with pytest.raises(
        ValueError, match=r"unknown compat mode 'fix'.*\['fixed', 'ftrl'\].*did you mean 'fixed'"
    ):
        parse_qwen("x", compat="fix")


# --------------------------------------------------------------------------- thinking and markup


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no thoughts here", (None, "no thoughts here")),
        ("<think>\nplan\n</think>\n\nanswer", ("plan", "answer")),
        ("plan</think>\nanswer", ("plan", "answer")),  # template-opened block
        ("intro <think>unfinished", ("unfinished", "intro")),
        ("<think>a</think>mid<think>b</think>end", ("a\n\nb", "midend")),
        ("<think></think>answer", ("", "answer")),
    ],
)
def test_split_thinking(text: str, expected: tuple) -> None:
    assert split_thinking(text) == expected


def test_has_tool_markup() -> None:
    assert has_tool_markup("x <tool_call> y")
    assert has_tool_markup("</tool_call>")
    assert has_tool_markup("<tool_parsed_response>")
    assert not has_tool_markup("tool_call")
    assert not has_tool_markup("")
    assert not has_tool_markup(None)


# --------------------------------------------------------------------------- Llama 3.1


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_llama31_tagged_call(compat: str) -> None:
    text = 'Looking it up. <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>'
    message = parse_llama31(text, compat=compat)
    assert message["content"] == "Looking it up."
    assert calls_of(message) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_llama31_untagged_json_and_repairs(compat: str) -> None:
    # Decoding with skip_special_tokens drops the tag: a bare JSON call still counts.
    bare = parse_llama31('{"name": "get_weather", "parameters": {"city": "Paris"}}', compat=compat)
    assert bare["content"] == ""
    assert calls_of(bare) == [("get_weather", {"city": "Paris"})]
    truncated = parse_llama31(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Par', compat=compat
    )
    assert calls_of(truncated) == [("get_weather", {"city": "Par"})]
    as_string = parse_llama31('{"name": "f", "parameters": "{\\"a\\": 1,}"}', compat=compat)
    assert calls_of(as_string) == [("f", {"a": 1})]
    python_style = parse_llama31("<|python_tag|>{'name': 'f', 'parameters': {'flag': True}}", compat=compat)
    assert calls_of(python_style) == [("f", {"flag": True})]


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
def test_llama31_plain_text_is_content(compat: str) -> None:
    assert parse_llama31("  Paris is sunny.  ", compat=compat) == {
        "role": "assistant",
        "content": "Paris is sunny.",
        "tool_calls": None,
    }
    assert (
        parse_llama31("<|python_tag|>[]", compat=compat)["tool_calls"] is None
    )  # the reference crashed here


def test_llama31_modes_differ_on_multiple_calls_and_prose_json() -> None:
    text = (
        '<|python_tag|>{"name": "a", "parameters": {}}<|python_tag|>[{"name": "b", "parameters": {"x": 1}}]'
    )
    assert [name for name, _ in calls_of(parse_llama31(text, compat="ftrl"))] == ["a"]
    assert [name for name, _ in calls_of(parse_llama31(text, compat="fixed"))] == ["a", "b"]
    prose = 'For example {"name": "a", "parameters": {}} is a call.'
    assert calls_of(parse_llama31(prose, compat="ftrl")) == [("a", {})]
    assert parse_llama31(prose, compat="fixed")["tool_calls"] is None


def test_tolerant_json_loads() -> None:
    assert tolerant_json_loads('x {"a": [1, 2') == {"a": [1, 2]}
    assert tolerant_json_loads('{"a": "b\\"}", }') == {"a": 'b"}'}
    assert tolerant_json_loads("no json at all") is None
    assert tolerant_json_loads("{" * 5000) is None


# --------------------------------------------------------------------------- registry


def test_get_parser_binds_compat_and_rejects_unknown_family() -> None:
    text = "<think>" + block(WEATHER) + "</think>done"
    assert get_parser("qwen", "ftrl")(text)["tool_calls"] is not None
    assert get_parser("qwen", "fixed")(text)["tool_calls"] is None
    assert get_parser("llama31", "fixed")('<|python_tag|>{"name": "f", "parameters": {}}')["tool_calls"]
    with pytest.raises(UnknownNameError, match=r"unknown tool-call parser 'qwen3'.*\['llama31', 'qwen'\]"):
        get_parser("qwen3", "ftrl")


# --------------------------------------------------------------------------- Qwen formatter

FORMAT_CASES = {
    "one call": [("get_weather", {"city": "Paris"})],
    "several calls": [("get_population", {"city": "Oslo", "year": 2020}), ("get_weather", {"city": "Rome"}),
                      ("list_all", {})],
    "non-ascii": [("météo", {"ville": "Zürich", "note": "晴れ ☀", "quote": 'say "hi"\n\\'})],
    "nested": [("book", {"trip": {"legs": [{"from": "A", "to": "B", "stops": [1, 2.5, None]}], "ok": True}})],
}


def reference_calls(case: str) -> list[dict]:
    return [make_tool_call(name, arguments, f"call_{i}") for i, (name, arguments) in enumerate(FORMAT_CASES[case])]


@pytest.mark.parametrize("compat", ["ftrl", "fixed"])
@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_format_then_parse_gives_the_same_calls(case: str, compat: str) -> None:
    calls = reference_calls(case)
    message = parse_qwen(format_qwen_tool_calls(calls), compat=compat)
    assert message["content"] == ""
    assert calls_of(message) == list(FORMAT_CASES[case])
    # The encoded arguments come back byte for byte (both sides use json.dumps, non-ASCII kept).
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == [c["function"]["arguments"] for c in calls]


def test_format_is_the_documented_text() -> None:
    calls = reference_calls("several calls")
    assert format_qwen_tool_calls(calls) == "\n".join(
        [block(POPULATION), block('{"name": "get_weather", "arguments": {"city": "Rome"}}'),
         block('{"name": "list_all", "arguments": {}}')]
    )
    assert format_qwen_tool_calls([]) == ""


@pytest.mark.parametrize("content", ["", "Let me check."])
@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_format_equals_the_chat_template_rendering(case: str, content: str) -> None:
    from ftrl.llm.chat_template import render_chat

    calls = reference_calls(case)
    rendered = render_chat([{"role": "assistant", "content": content, "tool_calls": calls}])
    text = "\n".join(part for part in (content, format_qwen_tool_calls(calls)) if part)
    assert rendered == f"<|im_start|>assistant\n{text}<|im_end|>\n"


def test_format_accepts_every_shape_the_template_accepts() -> None:
    from ftrl.llm.chat_template import render_chat

    calls = [
        {"name": "bare", "arguments": {"x": "é"}},  # bare call, dict arguments (the template's tojson)
        {"function": {"name": "compact", "arguments": '{"x":1}'}},  # a string is written verbatim
        {"type": "function", "function": {"name": "no_arguments"}},  # missing arguments -> {}
        {"type": "function", "function": {"name": "null_arguments", "arguments": None}},
    ]
    text = format_qwen_tool_calls(calls)
    assert render_chat([{"role": "assistant", "content": "", "tool_calls": calls}]) == (
        f"<|im_start|>assistant\n{text}<|im_end|>\n"
    )
    assert '{"name": "compact", "arguments": {"x":1}}' in text
    assert '{"name": "no_arguments", "arguments": {}}' in text
    assert [name for name, _ in calls_of(parse_qwen(text))] == ["bare", "compact", "no_arguments", "null_arguments"]
