"""Records that stages exchange: the reference sample format and the typed views over it.

A *sample* (environment or snapshot) is stored exactly in the FTRL reference schema (docs/reference.md §2):
``messages`` (list of chat messages), ``tools``/``codes``/``unsolved_set`` (JSON strings),
``solve_rate`` (float), ``answer``, ``data_source`` (scenario), ``split``. Files on disk always hold
that schema so they round-trip with the reference release and verl's dataset loader; code that
needs typed access goes through :class:`Sample`.

    python -c "from ftrl.types import Sample; print(Sample.__doc__)"
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCENARIOS: tuple[str, ...] = ("Single-Hop", "Parallel Single-Hop", "Multi-Hop", "Parallel Multi-Hop")
SPLITS: tuple[str, ...] = ("train", "test")
REFERENCE_FIELDS: tuple[str, ...] = (
    "messages", "tools", "codes", "unsolved_set", "solve_rate", "answer", "data_source", "split",
)

Message = dict[str, Any]
ToolCall = dict[str, Any]  # {"id", "type": "function", "function": {"name", "arguments": "<json>"}}


# The reference's tool-error text, spelling included ("occured"): every failed call becomes this message.
TOOL_ERROR_TEMPLATE = "an error occured when call {name}: {error}"
TOOL_ERROR_PREFIX = "an error occured when call"


def format_tool_error(name: Any, error: Any) -> str:
    """The tool message for a failed call, exactly as the reference writes it."""
    return TOOL_ERROR_TEMPLATE.format(name=name, error=error)


def is_tool_error(output: Any) -> bool:
    """Whether a tool message is the reference's error text (for any tool)."""
    return str(output).startswith(TOOL_ERROR_PREFIX)


def make_tool_call(name: Any, arguments: Any, call_id: str | None = None) -> ToolCall:
    """One OpenAI-style tool call, the shape every message, record and engine uses.

    ``arguments`` is a mapping (JSON-encoded here, non-ASCII kept) or an already encoded JSON string.
    ``call_id`` None leaves the ``id`` out (gold trajectories and replayed calls carry none).
    """
    encoded = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    call: ToolCall = {"type": "function", "function": {"name": name, "arguments": encoded}}
    if call_id is not None:
        call = {"id": call_id, **call}
    return call


def as_json_obj(value: Any) -> Any:
    """Decode a field that the reference stores as a JSON string; pass decoded values through."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return json.loads(value)
    return value


def count_answers(unsolved_set: Mapping[str, list]) -> int:
    return sum(len(answers) for answers in unsolved_set.values())


@dataclass
class Sample:
    """Typed view of one reference record (an environment, or a snapshot of one mid-episode)."""

    messages: list[Message]
    tools: list[dict]
    codes: dict[str, str]
    unsolved_set: dict[str, list[str]]
    answer: str
    data_source: str
    split: str
    solve_rate: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Sample:
        missing = [key for key in REFERENCE_FIELDS if key not in record and key != "solve_rate"]
        if missing:
            raise KeyError(f"record lacks reference field(s) {missing}; has {sorted(record)}")
        extra = {k: v for k, v in record.items() if k not in REFERENCE_FIELDS}
        return cls(
            messages=[dict(m) for m in as_json_obj(record["messages"])],
            tools=list(as_json_obj(record["tools"])),
            codes=dict(as_json_obj(record["codes"])),
            unsolved_set={k: list(v) for k, v in as_json_obj(record["unsolved_set"]).items()},
            answer=str(record["answer"]),
            data_source=str(record["data_source"]),
            split=str(record["split"]),
            solve_rate=float(record.get("solve_rate", 0.0) or 0.0),
            extra=extra,
        )

    def to_record(self) -> dict[str, Any]:
        """The reference schema: JSON strings for tools/codes/unsolved_set, extras kept after."""
        record = {
            "messages": self.messages,
            "tools": json.dumps(self.tools, ensure_ascii=False),
            "codes": json.dumps(self.codes, ensure_ascii=False),
            "unsolved_set": json.dumps(self.unsolved_set, ensure_ascii=False),
            "solve_rate": float(self.solve_rate),
            "answer": self.answer,
            "data_source": self.data_source,
            "split": self.split,
        }
        record.update(self.extra)
        return record

    @property
    def question(self) -> str:
        """The first user message: the reference uses it as the episode's identity."""
        for message in self.messages:
            if message.get("role") == "user":
                return str(message.get("content") or "")
        return str(self.messages[0].get("content") or "") if self.messages else ""

    @property
    def tool_names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]


@dataclass(frozen=True)
class RewardResult:
    """One scored turn: the scalar and the parts that explain it (logged as reward/* metrics)."""

    score: float
    calls: int = 0          # parsed tool calls p
    solved: int = 0         # newly solved sub-answers q
    unsolved_before: int = 0  # t
    malformed: bool = False  # no parsed call but tool-call markup left in the text
    empty: bool = False      # no parsed call and no text
    answered: bool = False   # final text contains the answer

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        return {
            f"{prefix}score": self.score,
            f"{prefix}calls": float(self.calls),
            f"{prefix}solved": float(self.solved),
            f"{prefix}malformed": float(self.malformed),
            f"{prefix}empty": float(self.empty),
            f"{prefix}answer": float(self.answered),
        }


@dataclass
class EpisodeResult:
    """A finished multi-turn episode: the conversation and the own-test metrics of docs/reference.md §8."""

    messages: list[Message]
    data_source: str
    calls: int
    solved: int
    total: int
    turns: int

    @property
    def solve_precision(self) -> float:
        # Reference behaviour: an episode with no calls counts precision 1.0.
        return self.solved / self.calls if self.calls > 0 else 1.0

    @property
    def solve_rate(self) -> float:
        return self.solved / self.total if self.total > 0 else 0.0

    @property
    def solve_f1(self) -> float:
        denominator = self.calls + self.total
        return 2 * self.solved / denominator if denominator > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "solve_precision": self.solve_precision,
            "solve_rate": self.solve_rate,
            "solve_f1": self.solve_f1,
        }
