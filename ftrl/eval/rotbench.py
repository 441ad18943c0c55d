"""RoTBench: tool selection (TS), parameter identification (PI) and content filling (CF) under noise.

Each item is a ReAct conversation (system prompt listing the tools as JSON, the user query, for the
third-turn set two earlier assistant/observation rounds) and a list of acceptable gold answers
``Thought: ...\\nAction: <tool>\\nAction Input: {json}``. The model answers once, as raw text (no
``tools=``); the scorer reads the first action of that text and compares it with the golds. Items come
in five noise levels (``clean``, ``slight``, ``medium``, ``heavy``, ``union``: tool and parameter
names misspelt, reversed, randomised, ...); these are the metric groups.

Two scoring rules (``eval.compat``), both pure functions of (sample, response text):

* ``ftrl`` (:func:`score_ftrl`, the reference ``evaluation_rotbench.py``): tool = the text between
  the first ``"Action: "`` and the next ``"Action Input: "`` (stripped); parameters = ``json.loads``
  of the text between the first and second ``"Action Input: "`` (stripped), which must be a dict
  (an empty one counts); anything unreadable scores 0/0/0. TS if some gold names that tool, PI if
  such a gold has the same key set, CF if such a gold has the same *multiset of values* (keys not
  paired with values). The raw generation is scored, thinking text included.
* ``official`` (:func:`score_official`, RoTBench's ``Code/Evaluation/evaluate.py``): tool = the text
  from 8 characters after the first ``"Action:"`` up to the first ``"Action Input:"`` (one trailing
  newline dropped, nothing else stripped); parameters = ``json.loads`` of everything from 14
  characters after ``"Action Input:"``; an unreadable, empty or string value scores 0/0/0. The answer
  ``finish`` matches a gold naming the *last* tool of the system prompt's list (however the noise
  renamed it); for CF, keys whose gold value is the string ``"None"`` are dropped from both sides and
  the dicts must be equal (key by key), except that CF is automatically right when the gold tool is
  the last (finish) or second-to-last (ask_to_user) tool of the list, or is literally named
  ``finish`` / ``ask_to_user``. Thinking text is removed before scoring.

Metrics: ``rotbench/<level>/<ts|pi|cf>`` per level, ``rotbench/<ts|pi|cf>`` the mean over levels,
with ``n`` and ``failed`` (answers with no readable action) per level and overall.

    python -m ftrl.run stages=[eval] model=api model.path=<served> eval.benchmarks=[rotbench] \\
        eval.data_dir=<dir holding rotbench/>
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrl.errors import ConfigError, MissingInputError

BENCHMARK = "rotbench"
LEVELS = ("clean", "slight", "medium", "heavy", "union")
TURN_FOLDERS = {"first": "First_Turn", "third": "Third_Turn"}
METRICS = ("ts", "pi", "cf")
COMPAT_MODES = ("ftrl", "official")
# RoTBench's "function" turns (tool results in the third-turn items) are shown to the model as a user
# message with this prefix: the ReAct convention, and a role every chat API accepts without call ids.
OBSERVATION_PREFIX = "Observation: "
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_OBSERVATION_ROLES = ("function", "observation", "tool")

Scores = dict[str, float]


# ------------------------------------------------------------------------------------ loading
def to_messages(conversation: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """RoTBench ``{"from", "value"}`` turns (or chat messages) -> chat messages the engines take."""
    messages = []
    for turn in conversation:
        role = str(turn.get("from", turn.get("role", "")))
        content = turn.get("value", turn.get("content", ""))
        if not isinstance(content, str):
            raise TypeError(f"RoTBench turn of role '{role}' has non-text content: {content!r:.80}")
        if role in _OBSERVATION_ROLES:
            messages.append({"role": "user", "content": OBSERVATION_PREFIX + content})
        elif role in _ROLES:
            messages.append({"role": _ROLES[role], "content": content})
        else:
            raise ValueError(f"RoTBench turn with unknown role '{role}'")
    return messages


def load_folder(folder: Path, turn: str, levels: Sequence[str]) -> list[dict[str, Any]]:
    """Samples from RoTBench's ``Data/<First|Third>_Turn/<level>.json`` files (``folder`` holds both turns)."""
    samples = []
    for level in levels:
        path = folder / TURN_FOLDERS[turn] / f"{level}.json"
        if not path.is_file():
            raise MissingInputError(f"{BENCHMARK}: no such file '{path}' (eval.data_dir holds rotbench/"
                                    f"{TURN_FOLDERS[turn]}/{level}.json; eval.rotbench.turn={turn}, "
                                    f"eval.rotbench.levels)")
        items = json.loads(path.read_text(encoding="utf-8"))
        for index, item in enumerate(items):
            conversation = item["conversations"]
            golds = conversation[-1]["value"]
            samples.append({
                "id": f"{turn}/{level}/{index}",
                "level": level,
                "scenario": item.get("scenario"),
                "messages": to_messages(conversation[:-1]),
                "answer": [golds] if isinstance(golds, str) else list(golds),
                "data_source": f"RoTBench/{TURN_FOLDERS[turn]}/{level}",
            })
    return samples


def level_of(data_source: str) -> str | None:
    """The noise level a ``data_source`` names (the last level word in it), or None."""
    words = re.split(r"[^a-z]+", data_source.lower())
    found = [word for word in words if word in LEVELS]
    return found[-1] if found else None


def turn_of(data_source: str) -> str | None:
    """``first``/``third`` when ``data_source`` names a turn, else None."""
    words = set(re.split(r"[^a-z]+", data_source.lower()))
    named = [turn for turn in TURN_FOLDERS if turn in words]
    return named[0] if len(named) == 1 else None


def load_jsonl(path: Path, turn: str, levels: Sequence[str]) -> list[dict[str, Any]]:
    """Samples from the FTRL release's ``RoTBench.jsonl`` (``{messages, answer, data_source}`` lines).

    The level comes from ``data_source``; lines whose ``data_source`` names the other turn are skipped
    (a file whose sources name no turn is taken as the configured one).
    """
    samples = []
    counts: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        source = str(record.get("data_source", "RoTBench"))
        level = level_of(source)
        if level is None:
            raise ValueError(f"{path}:{number}: data_source '{source}' names no RoTBench noise level "
                             f"({', '.join(LEVELS)}); eval.rotbench.file")
        named_turn = turn_of(source)
        if level not in levels or (named_turn is not None and named_turn != turn):
            continue
        golds = record["answer"]
        index = counts.get(source, 0)
        counts[source] = index + 1
        samples.append({
            "id": f"{source}/{index}",
            "level": level,
            "messages": to_messages(record["messages"]),
            "answer": [golds] if isinstance(golds, str) else list(golds),
            "data_source": source,
        })
    return samples


def load_samples(cfg: Any) -> list[dict[str, Any]]:
    """The configured items: ``eval.rotbench.file`` if set, else ``<eval.data_dir>/rotbench/``."""
    from ftrl.eval.data import benchmark_dir, benchmark_file

    rot = cfg.eval.rotbench
    if rot.turn not in TURN_FOLDERS:
        raise ConfigError(f"eval.rotbench.turn='{rot.turn}': choose one of {', '.join(TURN_FOLDERS)}")
    if rot.file:
        samples = load_jsonl(benchmark_file(rot.file, BENCHMARK, "eval.rotbench.file"), rot.turn, rot.levels)
        where = rot.file
    else:
        folder = benchmark_dir(cfg.eval.data_dir, BENCHMARK, "rotbench")
        samples = load_folder(folder, rot.turn, rot.levels)
        where = str(folder)
    if not samples:
        raise MissingInputError(f"{BENCHMARK}: no items for turn '{rot.turn}' and levels {list(rot.levels)} in "
                                f"{where}")
    return samples


# ------------------------------------------------------------------------------------ scoring
def _ftrl_action(text: str) -> tuple[str, Any]:
    """The reference's reading; raises on anything it cannot read."""
    tool = text.split("Action: ")[1].split("Action Input: ")[0].strip()
    params = json.loads(text.split("Action Input: ")[1].strip())
    if not isinstance(params, dict):
        raise TypeError(f"parameters should be a dict, got {type(params).__name__}")
    return tool, params


def score_ftrl(response: str, golds: Sequence[str]) -> Scores:
    """TS/PI/CF as the reference computes them (see the module docstring)."""
    answers = [_ftrl_action(gold) for gold in golds]
    ts = pi = cf = 0.0
    try:
        tool, params = _ftrl_action(response)
    except Exception:  # noqa: BLE001 - the reference scores any unreadable answer 0
        return {"ts": 0.0, "pi": 0.0, "cf": 0.0, "parsed": 0.0}
    try:
        for gold_tool, gold_params in answers:
            if gold_tool != tool:
                continue
            ts = 1.0
            if gold_params.keys() != params.keys():
                continue
            pi = 1.0
            # Values as a bag: which key holds which value is not checked. An unhashable value raises
            # here and ends the search, keeping TS/PI found so far (as the reference's try block does).
            if Counter(gold_params.values()) == Counter(params.values()):
                cf = 1.0
                break
    except TypeError:
        pass
    return {"ts": ts, "pi": pi, "cf": cf, "parsed": 1.0}


def _official_action(text: str) -> tuple[str, Any]:
    """RoTBench's reading: fixed offsets after the first markers; params 0 when unreadable."""
    start = text.find("Action:") + 8
    end = text.find("Action Input:")
    tool = text[start:end].removesuffix("\n")
    try:
        params = json.loads(text[end + 14:])
    except ValueError:
        return tool, 0
    if isinstance(params, str):
        return tool, 0
    return tool, params


def tool_names(system_prompt: str) -> list[str]:
    """The tool names of a RoTBench system prompt (its JSON list, from the first ``[`` to the last ``]``)."""
    try:
        tools = json.loads(system_prompt[system_prompt.find("["):system_prompt.rfind("]") + 1])
        return [str(tool.get("name")) for tool in tools]
    except (ValueError, AttributeError):
        return []


def score_official(response: str, golds: Sequence[str], tools: Sequence[str]) -> Scores:
    """TS/PI/CF as RoTBench's ``evaluate.py`` computes them (see the module docstring).

    ``tools`` are the names listed in the item's system prompt, in order: the last one is the finish
    tool, the one before it ask_to_user (noise may rename both).
    """
    finish_name = tools[-1] if tools else "finish"
    ask_name = tools[-2] if len(tools) > 1 else "ask_to_user"
    tool, params = _official_action(response)
    # evaluate.py skips an answer whose parameters are unreadable or falsy ({} , [], 0, null), and would
    # crash on an empty tool name; both score 0 here.
    if not params or not tool:
        return {"ts": 0.0, "pi": 0.0, "cf": 0.0, "parsed": 0.0}
    answers = [_official_action(gold) for gold in golds]

    def matches(gold_tool: str, answer_tool: str) -> tuple[bool, str]:
        # "finish" stands for the (renamed) last tool; the renaming sticks for the golds after it.
        if gold_tool == finish_name and answer_tool == "finish":
            answer_tool = gold_tool
        return gold_tool == answer_tool, answer_tool

    ts = pi = cf = 0.0
    answer_tool = tool
    for gold_tool, _ in answers:
        same, answer_tool = matches(gold_tool, answer_tool)
        if same:
            ts = 1.0
            break
    if not isinstance(params, dict):  # a truthy non-dict (list, number): evaluate.py fails past TS
        return {"ts": ts, "pi": 0.0, "cf": 0.0, "parsed": 1.0}
    answer_tool = tool
    for gold_tool, gold_params in answers:
        same, answer_tool = matches(gold_tool, answer_tool)
        if same and isinstance(gold_params, dict) and gold_params.keys() == params.keys():
            pi = 1.0
            break
    answer_tool = tool
    remaining = dict(params)  # evaluate.py deletes "None" keys from one copy across all golds
    for gold_tool, gold_params in answers:
        same, answer_tool = matches(gold_tool, answer_tool)
        if not same or not isinstance(gold_params, dict) or gold_params.keys() != remaining.keys():
            continue
        dropped = [key for key, value in gold_params.items() if value == "None"]
        gold_kept = {key: value for key, value in gold_params.items() if key not in dropped}
        for key in dropped:
            del remaining[key]
        # CF is automatic for the finish / ask_to_user tools: the last two listed, or so named.
        if gold_tool in (finish_name, ask_name, "finish", "ask_to_user") or gold_kept == remaining:
            cf = 1.0
            break
    return {"ts": ts, "pi": pi, "cf": cf, "parsed": 1.0}


def score_sample(sample: Mapping[str, Any], response: str, compat: str = "ftrl") -> Scores:
    """The pure scorer: ``{"ts", "pi", "cf", "parsed"}`` of one answer text for one item."""
    if compat == "ftrl":
        return score_ftrl(response, sample["answer"])
    if compat == "official":
        from ftrl.llm.parsers import split_thinking

        system = next((m["content"] for m in sample["messages"] if m["role"] == "system"), "")
        return score_official(split_thinking(response)[1], sample["answer"], tool_names(system))
    raise ConfigError(f"eval.compat='{compat}': choose one of {', '.join(COMPAT_MODES)}")


def score_row(sample: Mapping[str, Any], response: str, compat: str) -> dict[str, Any]:
    """The stored row's scored part: group, metrics, failed (no readable action)."""
    scores = score_sample(sample, response, compat)
    return {"group": sample["level"], "data_source": sample.get("data_source"), "compat": compat,
            "metrics": {name: scores[name] for name in METRICS}, "failed": not scores["parsed"]}


# ------------------------------------------------------------------------------------ protocol
def evaluate_samples(engine: Any, samples: Sequence[Mapping[str, Any]], out_path: Path, *, params: Any,
                     compat: str = "ftrl", batch_size: int = 32, desc: str = "eval rotbench") -> dict[str, float]:
    """One generation per item (resumable), scored under ``compat``; the aggregated metrics.

    Rows store the raw response; every row is scored again under the current rule, so rows written
    by an earlier (killed) run count exactly as new ones.
    """
    from ftrl.eval.runner import aggregate, generate_once
    from ftrl.llm.engines.base import ChatRequest

    rows = generate_once(
        engine, samples, out_path, params=params,
        request=lambda sample: ChatRequest(messages=[dict(m) for m in sample["messages"]]),
        score=lambda sample, generation: score_row(sample, generation.text, compat),
        batch_size=batch_size, desc=desc,
    )
    rescored = [{**row, **score_row(samples[row["index"]], row["response"], compat)} for row in rows]
    return aggregate(rescored, BENCHMARK, METRICS)


def evaluate(ctx: Any, engine: Any, checkpoint: str) -> dict[str, float]:
    """Benchmark entry (``eval.benchmarks: [rotbench]``)."""
    from ftrl.eval.runner import cap_per_group
    from ftrl.llm.engines.base import SamplingParams

    cfg = ctx.cfg
    samples = cap_per_group(load_samples(cfg), lambda sample: sample["level"], cfg.eval.max_samples)
    params = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                            repetition_penalty=cfg.eval.repetition_penalty, inherit=cfg.eval.inherit,
                            n=1, seed=cfg.seed)
    return evaluate_samples(engine, samples, ctx.run_dir.eval_records(checkpoint, BENCHMARK), params=params,
                            compat=cfg.eval.compat, batch_size=cfg.eval.batch_size,
                            desc=f"eval {checkpoint} rotbench")
