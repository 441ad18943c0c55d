"""The verifiable reward: the table of docs/reference.md §4 row by row for all four variants, on a
small environment whose tools are real Python run through the sandbox; answer_verify edge cases;
never-raise fuzz.

    OMP_NUM_THREADS=1 python -m pytest tests/test_reward.py -q
"""

from __future__ import annotations

import copy
import json
import random

import pytest

from ftrl import reward as reward_module
from ftrl.errors import UnknownNameError
from ftrl.registry import REWARDS
from ftrl.reward import (
    answer_verify,
    apply_tool_results,
    get_reward,
    score_response,
    strip_end_of_turn,
)
from ftrl.types import RewardResult

CODES = {
    "get_weather": (
        "def get_weather(city):\n"
        "    table = {'paris': {'city': 'Paris', 'temperature': '18 C', 'sky': 'sunny'},\n"
        "             'oslo': {'city': 'Oslo', 'temperature': '-3 C', 'sky': 'snow'}}\n"
        "    if city.lower() not in table:\n"
        "        raise ValueError(f'no weather station in {city}')\n"
        "    return table[city.lower()]\n"
    ),
    "get_population": "def get_population(city):\n    return {'city': city, 'population': 2148000}\n",
    "echo": "def echo(text):\n    return text\n",
    "explode": "def explode():\n    raise RuntimeError('boom')\n",
}
# Three sub-answers; the population is written with thousands separators on purpose.
UNSOLVED = {"get_weather": ["18 C", "-3 C"], "get_population": ["2,148,000"]}
ANSWER = "Paris"


def make_sample(unsolved: dict | None = None, solve_rate_value: float = 0.0, as_json: bool = True) -> dict:
    unsolved = UNSOLVED if unsolved is None else unsolved
    return {
        "messages": [{"role": "user", "content": "Which city is warmer, Paris or Oslo?"}],
        "codes": json.dumps(CODES) if as_json else copy.deepcopy(CODES),
        "unsolved_set": json.dumps(unsolved) if as_json else copy.deepcopy(unsolved),
        "solve_rate": solve_rate_value,
        "answer": ANSWER,
        "data_source": "Parallel Single-Hop",
        "split": "train",
    }


def call(name: str, **arguments: object) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


PARIS = call("get_weather", city="Paris")
OSLO = call("get_weather", city="Oslo")
ROME = call("get_weather", city="Rome")  # the tool raises
POPULATION = call("get_population", city="Paris")
VARIANTS = ("solve_f1", "solve_precision", "solve_rate", "solve_pr")


def scores(response: str, sample: dict | None = None, compat: str = "ftrl") -> dict[str, float]:
    sample = make_sample() if sample is None else sample
    return {v: score_response(response, sample, v, compat=compat).score for v in VARIANTS}


# --------------------------------------------------------------------------- p >= 1 rows


@pytest.mark.parametrize(
    ("response", "p", "q", "expected"),
    [
        # expected = (solve_f1 2q/(p+1), solve_precision q/p, solve_rate q, solve_pr q*q/p)
        (ROME, 1, 0, (0.0, 0.0, 0.0, 0.0)),
        (PARIS, 1, 1, (1.0, 1.0, 1.0, 1.0)),
        (PARIS + OSLO, 2, 2, (4 / 3, 1.0, 2.0, 2.0)),
        (PARIS + PARIS, 2, 1, (2 / 3, 0.5, 1.0, 0.5)),  # a duplicate cannot solve "18 C" twice
        (PARIS + call("nope") + POPULATION, 3, 2, (1.0, 2 / 3, 2.0, 4 / 3)),  # unknown tool counts in p
        (PARIS + OSLO + POPULATION, 3, 3, (1.5, 1.0, 3.0, 3.0)),
        (call("explode") + PARIS, 2, 1, (2 / 3, 0.5, 1.0, 0.5)),  # a raising tool is a failed call
    ],
)
def test_rows_with_tool_calls(response: str, p: int, q: int, expected: tuple[float, ...]) -> None:
    result = score_response(response, make_sample(), "solve_f1")
    assert (result.calls, result.solved, result.unsolved_before) == (p, q, 3)
    assert scores(response) == pytest.approx(dict(zip(VARIANTS, expected)), abs=1e-12)


def test_output_must_match_under_the_same_tool_name() -> None:
    # echo returns "18 C", but "18 C" is expected from get_weather only.
    result = score_response(call("echo", text="18 C") + PARIS, make_sample(), "solve_rate")
    assert (result.calls, result.solved, result.score) == (2, 1, 1.0)


def test_commas_in_numbers_match_and_population_is_solved() -> None:
    assert score_response(POPULATION, make_sample(), "solve_rate").solved == 1


# --------------------------------------------------------------------------- rows without calls


@pytest.mark.parametrize(
    "response", ["", "   \n", "<|im_end|>", "<|endoftext|>", " <|im_end|>\n<|endoftext|> "]
)
def test_empty_text_is_minus_half(response: str) -> None:
    assert scores(response) == dict.fromkeys(VARIANTS, -0.5)
    assert score_response(response, make_sample()).empty


@pytest.mark.parametrize(
    "response",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',  # broken JSON
        "I would call </tool_call> now",
        "<tool_parsed_response> Paris",  # markup wins over the answer row
        "<tool_call>" + json.dumps({"name": "", "arguments": {}}) + "</tool_call>",
    ],
)
def test_markup_without_a_parsed_call_is_minus_point_three(response: str) -> None:
    assert scores(response) == dict.fromkeys(VARIANTS, -0.3)
    assert score_response(response, make_sample()).malformed


@pytest.mark.parametrize(
    ("unsolved", "expected"), [(UNSOLVED, 1 / 4), ({"get_weather": ["-3 C"]}, 1 / 2), ({}, 1.0)]
)
def test_answer_row_is_one_over_one_plus_unsolved(unsolved: dict, expected: float) -> None:
    sample = make_sample(unsolved, solve_rate_value=1.0 if not unsolved else 0.5)
    # The answer row comes before the solve_rate == 1 row.
    assert scores("It is warmer in PARIS today.<|im_end|>", sample) == pytest.approx(
        dict.fromkeys(VARIANTS, expected)
    )
    assert score_response("paris", sample).answered


def test_answer_is_matched_whole_and_normalised() -> None:
    sample = make_sample()
    sample["answer"] = "1,234 km, north"
    assert score_response("It is 1234 KM NORTH of here", sample).score == 0.25
    # Not split on ", " (unlike answer_verify): both parts present but apart is not the answer.
    assert score_response("north, then 1234 km", sample).score == 0.0
    sample["answer"] = ""  # as the reference: the empty answer is in every text
    assert score_response("anything", sample).score == 0.25
    del sample["answer"]  # no answer: the row never fires
    assert score_response("Paris", sample).score == 0.0


def test_already_solved_is_half_and_otherwise_zero() -> None:
    assert scores("All done.", make_sample({}, solve_rate_value=1.0)) == dict.fromkeys(VARIANTS, 0.5)
    assert scores("I do not know.", make_sample()) == dict.fromkeys(VARIANTS, 0.0)


# --------------------------------------------------------------------------- compat


def test_thoughts_count_under_ftrl_and_not_under_fixed() -> None:
    call_in_thought = "<think>Let me check " + PARIS + "</think>\nIt is Paris."
    assert score_response(call_in_thought, make_sample(), compat="ftrl").calls == 1
    fixed = score_response(call_in_thought, make_sample(), compat="fixed")
    assert (fixed.calls, fixed.score, fixed.answered) == (0, 0.25, True)

    answer_in_thought = "<think>Probably Paris.</think>\nI cannot tell."
    assert score_response(answer_in_thought, make_sample(), compat="ftrl").score == 0.25
    assert score_response(answer_in_thought, make_sample(), compat="fixed").score == 0.0

    only_thinking = "<think>Paris? " + PARIS  # cut off inside the thought
    assert score_response(only_thinking, make_sample(), compat="fixed").score == -0.5

    markup_in_thought = "<think>no <tool_call> yet</think>I do not know."
    assert score_response(markup_in_thought, make_sample(), compat="ftrl").score == -0.3
    assert score_response(markup_in_thought, make_sample(), compat="fixed").score == 0.0


def test_end_of_turn_stripping() -> None:
    assert strip_end_of_turn(" x <|im_end|><|endoftext|> ", "ftrl") == "x"
    # The reference removes each token once, in that order; fixed removes any run.
    assert strip_end_of_turn("<|im_end|><|im_end|>", "ftrl") == "<|im_end|>"
    assert strip_end_of_turn("x<|endoftext|><|im_end|><|endoftext|>", "fixed") == "x"
    assert score_response("<|im_end|><|im_end|>", make_sample(), compat="ftrl").score == 0.0
    assert score_response("<|im_end|><|im_end|>", make_sample(), compat="fixed").score == -0.5
    assert score_response(PARIS + "<|im_end|>", make_sample()).score == 1.0


# --------------------------------------------------------------------------- sample handling


def test_json_string_and_dict_samples_score_the_same_and_are_not_mutated() -> None:
    response = PARIS + OSLO + POPULATION
    for as_json in (True, False):
        sample = make_sample(as_json=as_json)
        before = copy.deepcopy(sample)
        assert score_response(response, sample, "solve_rate").score == 3.0
        assert score_response(response, sample, "solve_rate").score == 3.0  # nothing consumed
        assert sample == before


def test_malformed_sample_raises_naming_the_field() -> None:
    sample = make_sample()
    del sample["codes"]
    with pytest.raises(KeyError, match="lacks field 'codes'"):
        score_response(PARIS, sample)
    with pytest.raises(ValueError, match="'unsolved_set' is not valid JSON"):
        score_response(PARIS, {**make_sample(), "unsolved_set": "{not json"})
    with pytest.raises(TypeError, match=r"unsolved_set\['get_weather'\] must be a list of strings"):
        score_response(PARIS, make_sample({"get_weather": "18 C"}))
    with pytest.raises(TypeError, match="'codes' must map tool name -> source"):
        score_response(PARIS, {**make_sample(), "codes": "[1, 2]"})
    with pytest.raises(ValueError, match="'solve_rate' must be a number"):
        score_response(PARIS, {**make_sample(), "solve_rate": "high"})


# --------------------------------------------------------------------------- apply_tool_results


def test_apply_tool_results_consumes_each_answer_once() -> None:
    calls = [{"function": {"name": "get_weather"}}] * 3 + [{"function": {"name": 5}}]
    outputs = ['{"temperature": "18 C"}', '{"temperature": "18 C"}', "-3 C and 18 C", "18 C"]
    unsolved = {"get_weather": ["18 C", "-3 C", "18 C"]}
    assert apply_tool_results(calls, outputs, unsolved) == 3
    assert unsolved == {"get_weather": []}


# --------------------------------------------------------------------------- answer_verify


@pytest.mark.parametrize(
    ("predict", "golden", "expected"),
    [
        ("Paris and Oslo", "oslo, paris", True),  # every part, any order
        ("Paris", "paris, oslo", False),
        ("population 1,234", "1234", True),  # commas dropped on both sides
        ("population 1234", "1,234", True),
        ("a, b", "a,b", False),  # "a,b" is one part "ab"; the predict becomes "a b"
        ("PARIS", "paris", True),
        ({"temp": "18 C", "city": "Köln"}, "köln", True),  # dict -> JSON, non-ASCII kept
        (["x", 1], '["x" 1]', True),  # list -> '["x", 1]' -> '["x" 1]'
        (1234, "1,234", True),
        (None, "none", True),
        (18.0, "18", True),
        ("anything", "", True),  # the empty golden part is in every string
        ("anything", "anything, ", True),  # trailing ", " yields an empty part
        ("", "x", False),
        ("category", "cat", True),  # substring, not word, semantics
    ],
)
def test_answer_verify(predict: object, golden: str, expected: bool) -> None:
    assert answer_verify(predict, golden) is expected


def test_answer_verify_rejects_non_string_golden() -> None:
    with pytest.raises(TypeError, match="golden answer must be a string"):
        answer_verify("1", 1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- named rewards


def test_named_rewards_and_get_reward() -> None:
    sample = make_sample()
    response = PARIS + PARIS
    named = {name: get_reward(name)(response, sample) for name in REWARDS.names()}
    assert named == pytest.approx({"solve_f1": 2 / 3, "solve_pr": 0.5, "solve_precision": 0.5, "solve_rate": 1.0})
    thought = "<think>" + PARIS + "</think>"
    assert get_reward("solve_rate")(thought, sample) == 1.0
    assert get_reward("solve_rate", compat="fixed")(thought, sample) == -0.5
    with pytest.raises(
        UnknownNameError, match=r"unknown reward 'solve_f2'.*'solve_f1'.*did you mean 'solve_f1'"
    ):
        get_reward("solve_f2")
    with pytest.raises(UnknownNameError, match="unknown tool-call parser"):
        get_reward("solve_f1", parser="mistral")
    with pytest.raises(ValueError, match="unknown compat mode"):
        get_reward("solve_f1", compat="strict")
    with pytest.raises(UnknownNameError, match="unknown reward 'f1'"):
        score_response("x", sample, "f1")


def test_reward_registry_is_the_one_formula_table() -> None:
    # (p calls, q solved) -> the p >= 1 row of the reward table, for each registered variant.
    expected = {"solve_f1": 2 * 2 / 4, "solve_precision": 2 / 3, "solve_rate": 2.0, "solve_pr": 4 / 3}
    assert {name: REWARDS.get(name)(3, 2) for name in REWARDS.names()} == pytest.approx(expected)


def test_llama31_parser_family() -> None:
    response = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert get_reward("solve_f1", parser="llama31")(response, make_sample()) == 1.0


# --------------------------------------------------------------------------- never raises


def test_sandbox_failure_becomes_failed_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_call_tools(codes, tool_calls, timeout):
        raise RuntimeError("sandbox down")

    monkeypatch.setattr(reward_module.sandbox, "call_tools", broken_call_tools)
    result = score_response(PARIS + OSLO, make_sample(), "solve_f1")
    assert (result.calls, result.solved, result.score) == (2, 0, 0.0)


def adversarial_texts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = [
        "<tool_call>",
        "</tool_call>",
        "<think>",
        "</think>",
        "<tool_parsed_response>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|python_tag|>",
        "{",
        "}",
        "[",
        "]",
        '"',
        "\\",
        ":",
        ",",
        "name",
        "arguments",
        '{"name": ',
        '"arguments": ',
        "null",
        "NaN",
        "1e999",
        "\x00",
        "\ud800",
        "é",
        "👍🏽",
        "\u202e",
        "\n",
        " ",
        "Paris",
        '{"name": "get_weather", "arguments": ',
        '{"city": 5}',
        '{"name": {"x": 1}, "arguments": {}}',
    ]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    texts += [
        "<tool_call>" + "[" * 100_000 + "</tool_call>",  # deeper than the JSON decoder's recursion limit
        "<tool_call>" + '{"a":' * 50_000 + "</tool_call>",
        "<think>" * 10_000 + "x" + "</think>" * 10_000,
        "Paris " * 200_000,  # ~1.2 MB
        "<tool_call>" * 20_000,
        '<tool_call>{"name": "get_weather", "arguments": {"city": ["Paris"]}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>',
        '<tool_call>{"name": ["get_weather"], "arguments": {}}</tool_call>',  # unhashable name (ftrl)
        '<tool_call>{"name": "get_weather", "arguments": "[1]"}</tool_call>',
        '<tool_call>{"name": "__import__", "arguments": {"name": "os"}}</tool_call>',
    ]
    return texts


def test_reward_never_raises_on_model_output() -> None:
    sample = make_sample()
    for text in adversarial_texts():
        for variant, compat, parser in (("solve_f1", "ftrl", "qwen"), ("solve_pr", "fixed", "qwen")):
            result = score_response(text, sample, variant, compat=compat, parser=parser)
            assert isinstance(result, RewardResult) and isinstance(result.score, float)
            assert -0.5 <= result.score <= 3.0
        assert isinstance(get_reward("solve_rate", parser="llama31", compat="fixed")(text, sample), float)
        assert isinstance(get_reward("solve_f1", parser="llama31")(text, sample), float)
