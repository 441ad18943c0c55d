"""Typed records the five builder stages exchange (seed task -> scenario -> docs -> tool set -> deployed env).

Every record is a plain dataclass that round-trips through JSON (``to_dict``/``from_dict``), so a
stage's inputs and outputs can be logged, cached and inspected. The scenario types are the
reference's ``data_source`` names (``ftrl.types.SCENARIOS``).

    python -c "from ftrl.builder.records import Scenario; help(Scenario)"
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SeedTask:
    """A question to turn into an environment (from the user's JSONL or generated from a topic)."""

    task_id: str
    question: str
    origin: str  # "file:<path>:<line>" or "topic:<topic>"
    split: str | None = None  # train | test; None: assigned by envs.llm.test_fraction
    scenario: str | None = None  # a requested scenario type (topic-generated seeds), else the LLM decides
    # The gold final answer (seed_file "answer", a seed_source row's answer field): the environment's
    # final answer is exactly this, checked by decompose and again by the gate.
    reference_answer: str | None = None


@dataclass
class SubQuestion:
    id: str
    question: str
    answer: str
    depends_on: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    """Stage 1 output: the task decomposed into sub-questions with known sub-answers."""

    task: SeedTask
    scenario_type: str
    sub_questions: list[SubQuestion]
    final_answer: str

    def sub_question(self, sub_id: str) -> SubQuestion:
        return next(sq for sq in self.sub_questions if sq.id == sub_id)

    def levels(self) -> dict[str, int]:
        """Turn index of each sub-question: 0 without dependencies, else 1 + its deepest dependency."""
        levels: dict[str, int] = {}

        def level(sub_id: str) -> int:
            if sub_id not in levels:
                deps = self.sub_question(sub_id).depends_on
                levels[sub_id] = 1 + max(level(dep) for dep in deps) if deps else 0
            return levels[sub_id]

        for sq in self.sub_questions:
            level(sq.id)
        return levels


@dataclass
class GoldCall:
    """The call that answers one sub-question."""

    sub_question_id: str
    name: str
    arguments: dict[str, Any]

    def as_call(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": copy.deepcopy(self.arguments)}


@dataclass
class Documented:
    """Stage 2 output: one tool document (OpenAI function schema) and its gold call per sub-question."""

    scenario: Scenario
    tools: list[dict[str, Any]]
    calls: list[GoldCall]


@dataclass
class Probe:
    """A call the gate makes to check one scaled feature (stage 4) of an answering tool.

    Built from a gold call: the same tool and arguments with one scaled feature exercised (another
    value of a functional-generalisation selector, a new optional parameter, the gold value in an
    alternative type or in the array form). ``expect_answer``: the output must contain the
    sub-answer (same question, other form); otherwise it must merely work (another fact).
    """

    strategy: str
    feature: str  # e.g. "optional parameter 'unit'", "type integer of 'city'", "array form of 'city'"
    parameter: str  # the one parameter it varies
    sub_question_id: str
    name: str
    arguments: dict[str, Any]
    expect_answer: bool = True

    def as_call(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": copy.deepcopy(self.arguments)}


@dataclass
class ToolSet:
    """Stages 3-4 output: the (merged, scaled) tools, the gold calls, and any distractor tools."""

    scenario: Scenario
    tools: list[dict[str, Any]]
    calls: list[GoldCall]
    # Each tool -> the stage-2 (document) tools it came from, one per sub-question it answers.
    merged_from: dict[str, list[str]] = field(default_factory=dict)
    distractors: list[dict[str, Any]] = field(default_factory=list)
    distractor_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments"}
    strategies: list[str] = field(default_factory=list)  # complexity-scaling strategies applied (and checked)
    probes: list[Probe] = field(default_factory=list)  # calls the gate makes to exercise the scaled features
    documented: dict[str, str] = field(default_factory=dict)  # sub-question id -> its stage-2 tool
    features: dict[str, str] = field(default_factory=dict)  # "tool.parameter" -> the strategy that added it

    @property
    def all_tools(self) -> list[dict[str, Any]]:
        return self.tools + self.distractors


def merged_from(documented: dict[str, str], calls: list[GoldCall]) -> dict[str, list[str]]:
    """Each tool of ``calls`` -> the stage-2 tools of the sub-questions it answers (sorted, no repeats)."""
    merged: dict[str, set[str]] = {}
    for call in calls:
        merged.setdefault(call.name, set()).add(documented.get(call.sub_question_id, call.name))
    return {name: sorted(sources) for name, sources in merged.items()}


@dataclass
class Deployed:
    """Stage 5 output: Python source per tool (answering tools and distractors)."""

    toolset: ToolSet
    codes: dict[str, str]


@dataclass
class StageFailure:
    """Why a seed task did not become an environment: the stage, a short reason key, and details."""

    task_id: str
    question: str
    stage: str
    reason: str
    detail: str = ""
    transient: bool = False  # an endpoint failure: not cached, retried by the next run
    strategies: list[str] = field(default_factory=list)  # the scaling strategies blamed, if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tool_name(tool: dict[str, Any]) -> str:
    return str(tool["function"]["name"])
