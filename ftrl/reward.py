"""The verifiable per-turn reward of FTRL: one source of truth for collection, training and eval.

A turn is scored against a *sample* (a reference record, docs/reference.md §2): its tool calls are parsed and
run locally, each output that answer-verifies against a still-unsolved sub-answer listed under the
same tool name solves it (each sub-answer once), and the variant turns p parsed calls and q newly
solved sub-answers into a scalar (rows are tried top to bottom)::

    case                                          solve_f1   solve_precision   solve_rate   solve_pr
    p >= 1                                        2q/(p+1)   q/p               q            q*q/p
    no parsed call, empty text                    -0.5       -0.5              -0.5         -0.5
    no parsed call, tool markup left in the text  -0.3       -0.3              -0.3         -0.3
    text contains the whole answer (normalised)   1/(1+t)    1/(1+t)           1/(1+t)      1/(1+t)
    sample already solved (solve_rate == 1)       0.5        0.5               0.5          0.5
    otherwise                                     0          0                 0            0

Tool markup is ``<tool_call>``, ``</tool_call>`` or ``<tool_parsed_response>``; the answer is
normalised as in the reference (lower-cased, commas dropped, stripped) and matched whole.

t is the number of sub-answers unsolved before the turn. ``compat="ftrl"`` reproduces the
reference (calls and answers inside ``<think>`` count); ``compat="fixed"`` scores only the text
after the thoughts and strips any run of trailing end-of-turn tokens.

Sample fields: ``codes`` and ``unsolved_set`` are required (JSON strings or mappings); ``answer``
may be missing or None (then the answer row never fires, as in the reference); ``solve_rate``
defaults to 0.0. A malformed sample raises ``KeyError`` (missing), ``TypeError`` (wrong shape) or
``ValueError`` (bad JSON or value) naming the field: that is a data bug. Model output never
raises: text whose calls cannot be parsed is scored as text without calls, and a call that cannot
be run counts as a failed call (p grows, q does not).

    python -m pytest tests/test_reward.py -q
    python -c "from ftrl.reward import answer_verify; print(answer_verify({'t': '1,234'}, '1234'))"
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ftrl.envs import sandbox
from ftrl.envs.verify import answer_verify, apply_tool_results, normalise_answer  # noqa: F401 (re-exported)
from ftrl.llm.parsers import check_compat, get_parser, has_tool_markup
from ftrl.registry import PARSERS, REWARDS
from ftrl.types import Message, RewardResult, ToolCall, as_json_obj, count_answers, format_tool_error

log = logging.getLogger(__name__)

# The p >= 1 row of the table, one function per variant: p parsed calls, q newly solved -> score.
# ``ftrl.registry.REWARDS`` maps each variant name to one of these.
def f1_formula(p: int, q: int) -> float:
    """solve_f1, the paper's reward: 2q/(p+1)."""
    return 2 * q / (p + 1)


def precision_formula(p: int, q: int) -> float:
    """solve_precision: q/p."""
    return q / p


def rate_formula(p: int, q: int) -> float:
    """solve_rate: q."""
    return float(q)


def pr_formula(p: int, q: int) -> float:
    """solve_pr: q*q/p (precision times count)."""
    return q * q / p


EMPTY_SCORE = -0.5
MALFORMED_SCORE = -0.3
ALREADY_SOLVED_SCORE = 0.5
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_end|>")


def strip_end_of_turn(response: str, compat: str = "ftrl") -> str:
    """Drop trailing end-of-turn tokens: once each (``<|endoftext|>`` then ``<|im_end|>``) under
    ftrl, any run of them under fixed."""
    text = response.strip()
    if compat == "ftrl":
        for token in END_OF_TURN_TOKENS:
            text = text.removesuffix(token).strip()
        return text
    while any(text.endswith(token) for token in END_OF_TURN_TOKENS):
        for token in END_OF_TURN_TOKENS:
            text = text.removesuffix(token).strip()
    return text


# --------------------------------------------------------------------------- sample fields


def _field(sample: Mapping[str, Any], key: str) -> Any:
    if key not in sample:
        raise KeyError(f"reward sample lacks field '{key}'; has {sorted(map(str, sample))}")
    try:
        return as_json_obj(sample[key])
    except ValueError as error:
        raise ValueError(f"reward sample field '{key}' is not valid JSON: {error}") from error


def read_codes(sample: Mapping[str, Any]) -> dict[str, str]:
    codes = _field(sample, "codes")
    if not isinstance(codes, Mapping):
        raise TypeError(
            f"reward sample field 'codes' must map tool name -> source, got {type(codes).__name__}"
        )
    return dict(codes)


def read_unsolved_set(sample: Mapping[str, Any]) -> dict[str, list[str]]:
    """A fresh copy of ``unsolved_set`` (the caller's sample is never mutated)."""
    unsolved = _field(sample, "unsolved_set")
    if not isinstance(unsolved, Mapping):
        raise TypeError(
            f"reward sample field 'unsolved_set' must map tool name -> [answers], got {type(unsolved).__name__}"
        )
    copy: dict[str, list[str]] = {}
    for name, answers in unsolved.items():
        if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
            raise TypeError(
                f"reward sample unsolved_set['{name}'] must be a list of strings, got {answers!r}"
            )
        copy[str(name)] = list(answers)
    return copy


def read_solve_rate(sample: Mapping[str, Any]) -> float:
    value = sample.get("solve_rate", 0.0)
    try:
        return float(value if value is not None else 0.0)
    except (TypeError, ValueError) as error:
        raise ValueError(f"reward sample field 'solve_rate' must be a number, got {value!r}") from error


def read_answer(sample: Mapping[str, Any]) -> str | None:
    answer = sample.get("answer")
    return None if answer is None else str(answer)


# --------------------------------------------------------------------------- scoring


def _parse(text: str, parser: Callable[[str], Message]) -> Message:
    try:
        message = parser(text)
    except Exception:  # a parser bug must not crash training: score the raw text instead
        log.exception("tool-call parser failed; scoring the turn as text without calls")
        return {"role": "assistant", "content": text, "tool_calls": None}
    return message


def _error_output(call: ToolCall, error: BaseException) -> str:
    name = call.get("function", {}).get("name") if isinstance(call, Mapping) else None
    return format_tool_error(name, error)


def run_tool_calls(codes: Mapping[str, str], tool_calls: Sequence[ToolCall], timeout: float) -> list[str]:
    """Outputs of ``sandbox.call_tools``, one per call; never raises.

    If the batch fails as a whole (or returns the wrong number of outputs), each call is retried
    alone so one pathological call cannot take the others' results with it.
    """
    try:
        outputs = list(sandbox.call_tools(codes, tool_calls, timeout))
        if len(outputs) == len(tool_calls):
            return outputs
    except Exception:  # noqa: BLE001 - the sandbox is another module: contain whatever it raises
        log.warning("sandbox.call_tools failed on a batch of %d calls; retrying one by one", len(tool_calls))
    outputs = []
    for call in tool_calls:
        try:
            outputs.append(str(sandbox.call_tools(codes, [call], timeout)[0]))
        except Exception as error:  # noqa: BLE001 - becomes that call's error output
            outputs.append(_error_output(call, error))
    return outputs


def _run_stateful(sample: Mapping[str, Any], tool_calls: Sequence[ToolCall], timeout: float) -> list[str]:
    from ftrl.envs.executor import run_stateful_calls

    try:
        return run_stateful_calls(sample, tool_calls, timeout)
    except Exception as error:  # noqa: BLE001 - a reward never raises on model output
        return [_error_output(call, error) for call in tool_calls]


def score_response(
    response: str,
    sample: Mapping[str, Any],
    variant: str = "solve_f1",
    compat: str = "ftrl",
    timeout: float = 10.0,
    parser: str = "qwen",
) -> RewardResult:
    """Score one generated turn against ``sample`` (see the module table)."""
    formula = REWARDS.get(variant)
    check_compat(compat)
    parse = get_parser(parser, compat)
    codes = read_codes(sample)
    unsolved = read_unsolved_set(sample)
    solve_rate = read_solve_rate(sample)
    answer = read_answer(sample)
    unsolved_before = count_answers(unsolved)

    text = strip_end_of_turn(response if isinstance(response, str) else str(response), compat)
    message = _parse(text, parse)
    tool_calls = message.get("tool_calls") or []
    if tool_calls:
        if sample.get("state"):
            # Stateful environments (tau-bench): the snapshot's history is replayed on a fresh copy
            # of the initial state before this turn's calls run (see ftrl.envs.executor).
            outputs = _run_stateful(sample, tool_calls, timeout)
        else:
            outputs = run_tool_calls(codes, tool_calls, timeout)
        try:
            solved = apply_tool_results(tool_calls, outputs, unsolved)
        except Exception:  # e.g. a sandbox output that answer_verify cannot read
            log.exception("matching tool outputs failed; counting no solved sub-answer")
            solved = 0
        score = formula(len(tool_calls), solved)
        return RewardResult(
            score=score, calls=len(tool_calls), solved=solved, unsolved_before=unsolved_before
        )

    content = message.get("content") or ""
    if not isinstance(content, str):
        content = str(content)
    if content == "":
        return RewardResult(score=EMPTY_SCORE, unsolved_before=unsolved_before, empty=True)
    if has_tool_markup(content):
        return RewardResult(score=MALFORMED_SCORE, unsolved_before=unsolved_before, malformed=True)
    # The whole answer string must occur (it is not split on ", " here, unlike answer_verify).
    if answer is not None and normalise_answer(answer) in normalise_answer(content):
        return RewardResult(score=1 / (1 + unsolved_before), unsolved_before=unsolved_before, answered=True)
    if solve_rate == 1.0:
        return RewardResult(score=ALREADY_SOLVED_SCORE, unsolved_before=unsolved_before)
    return RewardResult(score=0.0, unsolved_before=unsolved_before)


# --------------------------------------------------------------------------- named rewards


def get_reward(
    name: str, compat: str = "ftrl", parser: str = "qwen", timeout: float = 10.0
) -> Callable[[str, Mapping[str, Any]], float]:
    """The registered reward ``name`` with compat/parser/timeout bound: ``reward(response, sample)``.

    Raises ``UnknownNameError`` listing the registered rewards (or parsers), ``ValueError`` for an
    unknown compat mode or a non-positive timeout.
    """
    REWARDS.get(name)
    check_compat(compat)
    PARSERS.get(parser)
    if not timeout > 0:
        raise ValueError(f"reward tool timeout must be > 0 seconds, got {timeout!r}")

    def reward(response: str, sample: Mapping[str, Any]) -> float:
        return score_response(response, sample, name, compat, timeout, parser).score

    reward.__name__ = reward.__qualname__ = name
    return reward
