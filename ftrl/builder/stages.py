"""The five builder stages (and seed generation), each a function from typed records to typed records.

=================  ==========================  ===========================================================
stage              in -> out                   what the LLM is asked; what is checked before passing on
=================  ==========================  ===========================================================
seed (optional)    topics -> SeedTask          questions about a topic, one per requested scenario type
decompose          SeedTask -> Scenario        sub-questions, sub-answers, dependencies, final answer;
                                               the declared scenario must match the dependency graph,
                                               every part of the final answer must be some sub-answer;
                                               a gold answer (QA seeds) is the final answer, verbatim
document           Scenario -> Documented      exactly one OpenAI function schema + answering call per
                                               sub-question (n tools for n sub-questions); schemas valid,
                                               calls satisfy them, a dependent call takes its
                                               dependency's answer as input
integrate          Documented -> ToolSet       merge overlapping tools (n -> m <= n), every tool used, with
                                               ``merged_from`` (each tool -> its stage-2 tools); skipped
                                               when n == 1
scale              ToolSet -> ToolSet          the complexity-scaling strategies drawn for this task
                                               (knobs of envs.llm, every one checked and turned into
                                               probes by ``ftrl.builder.scaling``); skipped when none
deploy             ToolSet -> Deployed         Python source per tool: one top-level ``def name(...)``
                                               that compiles and accepts the schema's parameters
=================  ==========================  ===========================================================

Every stage returns ``(outputs, failures)``: an item that fails (a reply that stays malformed or
invalid after the bounded repairs, an endpoint error) becomes a :class:`StageFailure` with the
stage, a reason key and the evidence. Items run concurrently (``envs.llm.api.concurrency``).

    python -m pytest tests/test_env_builder.py -q
"""

from __future__ import annotations

import ast
import json
import logging
import random
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ftrl.builder.llm import Ledger, StageError, StructuredLLM
from ftrl.builder.prompts import PromptSet
from ftrl.builder.records import (
    Deployed,
    Documented,
    GoldCall,
    Scenario,
    SeedTask,
    StageFailure,
    SubQuestion,
    ToolSet,
    merged_from,
    tool_name,
)
from ftrl.builder.scaling import SCALING_NOT_APPLIED, STRATEGIES, STRATEGY_TEXT, ScaleCheck
from ftrl.builder.schema import (
    DECOMPOSE_SCHEMA,
    DEPLOY_SCHEMA,
    DOCUMENT_SCHEMA,
    INTEGRATE_SCHEMA,
    SCALE_SCHEMA,
    SEED_SCHEMA,
    check_arguments,
    check_tool_schema,
    classify_structure,
    validate,
)
from ftrl.config import SCALING
from ftrl.envs.gate import parse_python
from ftrl.envs.verify import answer_verify, normalise_answer
from ftrl.llm.engines.openai import MissingAPIKeyError
from ftrl.types import SCENARIOS

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

SCENARIO_KEYS: dict[str, str] = {name.lower().replace(" ", "_").replace("-", "_"): name for name in SCENARIOS}


@dataclass
class Knobs:
    """Complexity-scaling knobs (probabilities per environment, and a distractor range).

    The defaults are the one shared default of both builders (``ftrl.config.SCALING``): all four
    strategies on, so ``python -m ftrl.builder`` with no flags scales every environment.
    """

    functional_generalization: float = SCALING.functional_generalization
    parameter_expansion: float = SCALING.parameter_expansion
    parameter_type_generalization: float = SCALING.parameter_type_generalization
    min_distractors: int = SCALING.min_distractors
    max_distractors: int = SCALING.max_distractors
    seed: int = 0

    def draw(self, task_id: str) -> tuple[list[str], int]:
        """The strategies applied to ``task_id`` and its number of distractors (seeded per task)."""
        rng = random.Random(f"{self.seed}:{task_id}")
        chosen = [name for name in STRATEGIES[:3] if rng.random() < getattr(self, name)]
        distractors = rng.randint(self.min_distractors, self.max_distractors)
        return chosen + (["distractors"] if distractors else []), distractors


@dataclass
class StageContext:
    """What the stages share: the LLM, the prompts, the knobs, per-task accounting, concurrency."""

    llm: StructuredLLM
    prompts: PromptSet
    knobs: Knobs = field(default_factory=Knobs)
    concurrency: int = 8
    ledgers: dict[str, Ledger] = field(default_factory=dict)

    def ledger(self, task_id: str) -> Ledger:
        return self.ledgers.setdefault(task_id, Ledger())


def _task_of(item: Any) -> SeedTask:
    if isinstance(item, SeedTask):
        return item
    if isinstance(item, Scenario):
        return item.task
    if isinstance(item, (Documented, ToolSet)):
        return item.scenario.task
    return item.toolset.scenario.task


def run_stage(
    stage: str, items: Sequence[In], work: Callable[[In, Ledger], Out], ctx: StageContext
) -> tuple[list[Out], list[StageFailure]]:
    """Apply ``work`` to every item concurrently; failures are recorded, order is kept."""

    def one(item: In) -> Out | StageFailure:
        task = _task_of(item)
        try:
            return work(item, ctx.ledger(task.task_id))
        except StageError as error:
            return StageFailure(
                task.task_id, task.question, stage, error.reason, error.detail, error.transient, error.strategies
            )
        except MissingAPIKeyError:
            raise  # a setup error: every item would fail the same way
        except Exception as error:
            log.exception("builder stage %s crashed on task %s", stage, task.task_id)
            return StageFailure(
                task.task_id,
                task.question,
                stage,
                "internal_error",
                f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}",
            )

    if len(items) > 1 and ctx.concurrency > 1:
        with ThreadPoolExecutor(max_workers=min(ctx.concurrency, len(items))) as pool:
            results = list(pool.map(one, items))
    else:
        results = [one(item) for item in items]
    outputs = [r for r in results if not isinstance(r, StageFailure)]
    failures = [r for r in results if isinstance(r, StageFailure)]
    return outputs, failures


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=1)


# ------------------------------------------------------------------------------------ seeds
def allocate_scenarios(count: int, weights: dict[str, float], offset: int = 0) -> list[str]:
    """``count`` scenario types in proportion to ``weights`` (config keys), largest remainders first.

    ``offset`` rotates the tie-breaking so that small counts per topic still cover every scenario
    across topics.
    """
    named = {SCENARIO_KEYS[key]: float(value) for key, value in weights.items() if value and value > 0}
    if not named:
        raise ValueError(f"envs.llm.scenario_weights: at least one weight must be > 0, got {dict(weights)}")
    total = sum(named.values())
    order = [SCENARIOS[(i + offset) % len(SCENARIOS)] for i in range(len(SCENARIOS))]
    shares = {s: count * named.get(s, 0.0) / total for s in order}
    counts = {s: int(shares[s]) for s in order}
    for scenario in sorted(order, key=lambda s: -(shares[s] - counts[s]))[: count - sum(counts.values())]:
        counts[scenario] += 1
    return [s for s in order for _ in range(counts[s])]


def generate_seeds(
    topics: Sequence[str], per_topic: int, weights: dict[str, float], ctx: StageContext
) -> tuple[list[SeedTask], list[StageFailure]]:
    """Seed tasks written by the LLM, ``per_topic`` per topic, one per allocated scenario type."""
    from ftrl.builder.seeds import task_id_for

    def work(index_topic: tuple[int, str], ledger: Ledger) -> list[SeedTask]:
        index, topic = index_topic
        scenarios = allocate_scenarios(per_topic, weights, offset=index)
        prompt = ctx.prompts["seed"].render(
            topic=topic,
            count=per_topic,
            scenarios="\n".join(f"{i + 1}. {s}" for i, s in enumerate(scenarios)),
        )

        def check(value: Any) -> list[str]:
            errors = validate(value, SEED_SCHEMA)
            if not errors and len(value["questions"]) < per_topic:
                errors.append(
                    f"$.questions: {per_topic} questions were asked for, got {len(value['questions'])}"
                )
            return errors

        reply = ctx.llm.ask(prompt, check, ledger)
        return [
            SeedTask(
                task_id_for(item["question"]), item["question"].strip(), f"topic:{topic}", scenario=scenario
            )
            for item, scenario in zip(reply["questions"], scenarios)
        ]

    tasks: list[SeedTask] = []
    failures: list[StageFailure] = []
    items = list(enumerate(topics))

    def one(item: tuple[int, str]) -> list[SeedTask] | StageFailure:
        topic_id = f"topic:{item[1]}"
        try:
            return work(item, ctx.ledger(topic_id))
        except StageError as error:
            return StageFailure(
                topic_id,
                f"(questions about {item[1]})",
                "topics",
                error.reason,
                error.detail,
                error.transient,
            )

    with ThreadPoolExecutor(max_workers=max(1, min(ctx.concurrency, len(items) or 1))) as pool:
        for result in pool.map(one, items):
            if isinstance(result, StageFailure):
                failures.append(result)
            else:
                tasks.extend(result)
    return tasks, failures


# ------------------------------------------------------------------------------------ 1. decompose
def _dependency_errors(sub_questions: list[dict[str, Any]]) -> list[str]:
    ids = [str(sq["id"]) for sq in sub_questions]
    errors = []
    if len(set(ids)) != len(ids):
        errors.append(f"$.sub_questions: ids must be unique, got {ids}")
        return errors
    graph = {str(sq["id"]): [str(dep) for dep in sq["depends_on"]] for sq in sub_questions}
    for node, deps in graph.items():
        for dep in deps:
            if dep not in graph or dep == node:
                errors.append(
                    f"sub-question '{node}' depends on '{dep}', which is not another sub-question id ({ids})"
                )
    if errors:
        return errors
    state: dict[str, int] = {}

    def cyclic(node: str) -> bool:
        if state.get(node) == 1:
            return True
        if state.get(node) == 2:
            return False
        state[node] = 1
        if any(cyclic(dep) for dep in graph[node]):
            return True
        state[node] = 2
        return False

    if any(cyclic(node) for node in graph):
        errors.append("the dependencies form a cycle; a sub-question can only depend on earlier ones")
    return errors


GROUNDED = (
    "- The gold answer to the question is known: {gold}. \"final_answer\" must be exactly this text. The "
    "sub-answers are the true facts that lead to it, and the last hop's answer contains it; do not invent or "
    "alter facts. Where you do not know an intermediate fact, decompose so that every fact used is one you know."
)
UNGROUNDED = (
    "- Use true facts where they are known. Only where the truth cannot be known (live data such as today's "
    "weather, private records) choose plausible concrete answers: the environment is a simulation whose tools "
    "will return them."
)


def same_answer(a: str, b: str) -> bool:
    """Equal in the reference's comparison form (case, commas, outer and inner whitespace ignored)."""
    return " ".join(normalise_answer(a).split()) == " ".join(normalise_answer(b).split())


def _decompose_errors(value: Any, task: SeedTask) -> list[str]:
    errors = validate(value, DECOMPOSE_SCHEMA)
    if errors:
        return errors
    subs = value["sub_questions"]
    errors = _dependency_errors(subs)
    if errors:
        return errors
    structure = classify_structure({str(sq["id"]): [str(d) for d in sq["depends_on"]] for sq in subs})
    if structure != value["scenario"]:
        errors.append(f"$.scenario is '{value['scenario']}' but the dependencies describe '{structure}'")
    if task.scenario and value["scenario"] != task.scenario:
        errors.append(f"$.scenario must be '{task.scenario}' (requested), got '{value['scenario']}'")
    answers = [str(sq["answer"]).strip() for sq in subs]
    if any(not answer for answer in answers):
        errors.append("every sub-question needs a non-empty answer")
    final = str(value["final_answer"]).strip()
    if task.reference_answer is not None and not same_answer(final, task.reference_answer):
        errors.append(f"$.final_answer is {final!r} but the gold answer is {task.reference_answer!r}; "
                      "final_answer must be exactly the gold answer")
        final = task.reference_answer
    for part in final.split(", "):
        if not any(answer_verify(answer, part) for answer in answers):
            errors.append(f"final answer part {part!r} is not contained in any sub-answer {answers}")
    return errors


def decompose(tasks: Sequence[SeedTask], ctx: StageContext) -> tuple[list[Scenario], list[StageFailure]]:
    """Stage 1: scenario type, sub-questions with sub-answers and dependencies, final answer.

    With a gold answer the final answer is the gold answer verbatim (compared in the reference's
    normal form, then replaced by it), so the environment is grounded in the dataset's answer.
    """

    def work(task: SeedTask, ledger: Ledger) -> Scenario:
        hints = f"Scenario type to build: {task.scenario}\n" if task.scenario else ""
        grounding = GROUNDED.format(gold=json.dumps(task.reference_answer, ensure_ascii=False)) if (
            task.reference_answer is not None) else UNGROUNDED
        prompt = ctx.prompts["decompose"].render(question=task.question, hints=hints, grounding=grounding)
        value = ctx.llm.ask(prompt, lambda reply: _decompose_errors(reply, task), ledger)
        final = str(value["final_answer"]).strip()
        return Scenario(
            task=task,
            scenario_type=value["scenario"],
            sub_questions=[
                SubQuestion(
                    str(sq["id"]),
                    sq["question"].strip(),
                    str(sq["answer"]).strip(),
                    [str(d) for d in sq["depends_on"]],
                )
                for sq in value["sub_questions"]
            ],
            final_answer=task.reference_answer if task.reference_answer is not None else final,
        )

    return run_stage("decompose", tasks, work, ctx)


# ------------------------------------------------------------------------------------ shared checks
def _uses_dependency(arguments: dict[str, Any], dependency_answers: list[str]) -> bool:
    text = json.dumps(arguments, ensure_ascii=False)
    return any(answer_verify(text, answer) for answer in dependency_answers)


def check_calls(scenario: Scenario, tools: list[dict[str, Any]], calls: list[dict[str, Any]]) -> list[str]:
    """Each sub-question has exactly one call; it names a tool, fits its schema and chains its inputs."""
    errors = []
    by_name = {
        tool_name(tool): tool
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    }
    ids = [sq.id for sq in scenario.sub_questions]
    seen = [str(call["sub_question_id"]) for call in calls]
    missing = [i for i in ids if i not in seen]
    if missing:
        errors.append(f"no call answers sub-question(s) {missing}; every one of {ids} needs exactly one call")
    for i in sorted(set(seen)):
        if seen.count(i) > 1:
            errors.append(f"sub-question '{i}' has {seen.count(i)} calls; give exactly one")
        if i not in ids:
            errors.append(f"call for unknown sub-question '{i}' (valid: {ids})")
    for call in calls:
        sub_id = str(call["sub_question_id"])
        tool = by_name.get(call["name"])
        if tool is None:
            errors.append(
                f"the call for '{sub_id}' names '{call['name']}', which is not a tool ({sorted(by_name)})"
            )
            continue
        errors.extend(check_arguments(tool, call["arguments"], where=f"the call for '{sub_id}'"))
        if sub_id in ids:
            deps = scenario.sub_question(sub_id).depends_on
            dep_answers = [scenario.sub_question(dep).answer for dep in deps]
            if deps and not _uses_dependency(call["arguments"], dep_answers):
                errors.append(
                    f"the call for '{sub_id}' depends on {deps} but none of their answers {dep_answers} "
                    "appears in its arguments"
                )
    unused = [name for name in by_name if name not in {call["name"] for call in calls}]
    if unused:
        errors.append(f"tool(s) {unused} answer no sub-question; every tool needs a call (remove the others)")
    return errors


def check_tools(tools: list[Any], label: str = "tools") -> list[str]:
    errors = []
    for index, tool in enumerate(tools):
        errors.extend(check_tool_schema(tool, f"{label}[{index}]"))
    names = [tool_name(tool) for tool in tools if not check_tool_schema(tool)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        errors.append(f"{label}: tool names must be unique, repeated: {duplicates}")
    return errors


def _gold_calls(calls: list[dict[str, Any]], scenario: Scenario) -> list[GoldCall]:
    order = {sq.id: index for index, sq in enumerate(scenario.sub_questions)}
    gold = [GoldCall(str(c["sub_question_id"]), c["name"], dict(c["arguments"])) for c in calls]
    return sorted(gold, key=lambda call: order[call.sub_question_id])


def _calls_view(scenario: Scenario, calls: list[GoldCall]) -> str:
    return _dump(
        [
            {
                "sub_question_id": c.sub_question_id,
                "name": c.name,
                "arguments": c.arguments,
                "must_return": scenario.sub_question(c.sub_question_id).answer,
            }
            for c in calls
        ]
    )


# ------------------------------------------------------------------------------------ 2. document
def _document_errors(value: Any, scenario: Scenario) -> list[str]:
    """Exactly one tool per sub-question, each its own name; schemas valid; the calls fit them."""
    errors = validate(value, DOCUMENT_SCHEMA)
    if errors:
        return errors
    tools = [entry["tool"] for entry in value["tools"]]
    for index, tool in enumerate(tools):
        errors.extend(check_tool_schema(tool, f"$.tools[{index}].tool"))
    if errors:
        return errors
    ids = [sq.id for sq in scenario.sub_questions]
    if len(tools) != len(ids):
        errors.append(
            f"$.tools: write exactly one tool per sub-question ({len(ids)} sub-questions {ids}), got {len(tools)}"
        )
    names = [tool_name(tool) for tool in tools]
    shared = sorted({name for name in names if names.count(name) > 1})
    if shared:
        errors.append(
            f"tool name(s) {shared} are used for several sub-questions; give every sub-question its own tool "
            "(the integrate stage merges them later)"
        )
    calls = [
        {"sub_question_id": e["sub_question_id"], "name": tool_name(e["tool"]), "arguments": e["arguments"]}
        for e in value["tools"]
    ]
    return errors + check_calls(scenario, tools, calls)


def document(scenarios: Sequence[Scenario], ctx: StageContext) -> tuple[list[Documented], list[StageFailure]]:
    """Stage 2: exactly one tool document (OpenAI function schema) and its answering call per sub-question."""

    def work(scenario: Scenario, ledger: Ledger) -> Documented:
        prompt = ctx.prompts["document"].render(
            question=scenario.task.question,
            count=len(scenario.sub_questions),
            sub_questions=_dump(
                [
                    {"id": sq.id, "question": sq.question, "answer": sq.answer, "depends_on": sq.depends_on}
                    for sq in scenario.sub_questions
                ]
            ),
        )
        value = ctx.llm.ask(prompt, lambda reply: _document_errors(reply, scenario), ledger)
        calls = [
            {"sub_question_id": e["sub_question_id"], "name": tool_name(e["tool"]), "arguments": e["arguments"]}
            for e in value["tools"]
        ]
        return Documented(scenario, [entry["tool"] for entry in value["tools"]], _gold_calls(calls, scenario))

    return run_stage("document", scenarios, work, ctx)


# ------------------------------------------------------------------------------------ 3. integrate
def _merged_from_errors(claimed: Any, derived: dict[str, list[str]]) -> list[str]:
    """The reply's ``merged_from`` must say what its calls say (each tool -> the tools it replaces)."""
    if claimed is None:
        return []
    claimed = {str(k): sorted(str(x) for x in v) for k, v in claimed.items()}
    if claimed == derived:
        return []
    return [
        (f"$.merged_from is {json.dumps(claimed)} but the calls say {json.dumps(derived)} (each tool maps to the "
        "input tools of the sub-questions it answers)")
    ]


def integrate(
    documented: Sequence[Documented], ctx: StageContext
) -> tuple[list[ToolSet], list[StageFailure]]:
    """Stage 3: merge tools with overlapping function (n -> m <= n); one tool needs no LLM call.

    Each sub-question's stage-2 tool is kept (``ToolSet.documented``), so ``merged_from`` (each
    tool -> the stage-2 tools it came from) follows from the calls; a reply's own ``merged_from``
    must agree with it.
    """

    def work(item: Documented, ledger: Ledger) -> ToolSet:
        scenario = item.scenario
        documented_by = {call.sub_question_id: call.name for call in item.calls}
        if len(item.tools) == 1:
            return ToolSet(scenario, item.tools, item.calls, merged_from(documented_by, item.calls),
                           documented=documented_by)
        prompt = ctx.prompts["integrate"].render(
            question=scenario.task.question, tools=_dump(item.tools), calls=_calls_view(scenario, item.calls)
        )

        def check(value: Any) -> list[str]:
            errors = validate(value, INTEGRATE_SCHEMA)
            if errors:
                return errors
            errors = check_tools(value["tools"])
            if errors:
                return errors
            if len(value["tools"]) > len(item.tools):
                errors.append(
                    f"integration must not add tools: {len(item.tools)} in, {len(value['tools'])} out"
                )
            errors += check_calls(scenario, value["tools"], value["calls"])
            if errors:
                return errors
            derived = merged_from(documented_by, _gold_calls(value["calls"], scenario))
            return _merged_from_errors(value.get("merged_from"), derived)

        value = ctx.llm.ask(prompt, check, ledger)
        calls = _gold_calls(value["calls"], scenario)
        return ToolSet(scenario, value["tools"], calls, merged_from(documented_by, calls), documented=documented_by)

    return run_stage("integrate", documented, work, ctx)


# ------------------------------------------------------------------------------------ 4. scale
@dataclass
class _ScaleRequest:
    """One task's complexity-scaling request: the strategies drawn for it and how to check the answer.

    ``check`` keeps the last reply's unmet strategies (``failed``) and probes (``probes``), so a
    reply that never applies a drawn strategy fails as ``scaling_not_applied`` naming it.
    """

    item: ToolSet
    strategies: list[str]
    num_distractors: int
    failed: dict[str, list[str]] = field(default_factory=dict)
    probes: list[Any] = field(default_factory=list)
    features: dict[str, str] = field(default_factory=dict)

    def prompt(self, ctx: StageContext) -> str:
        text = "\n".join(f"- {STRATEGY_TEXT[s].format(n=self.num_distractors)}" for s in self.strategies)
        return ctx.prompts["scale"].render(
            question=self.item.scenario.task.question,
            tools=_dump(self.item.tools),
            calls=_calls_view(self.item.scenario, self.item.calls),
            strategies=text,
            num_distractors=self.num_distractors,
        )

    def check(self, value: Any) -> list[str]:
        """Errors of the LLM's answer (empty: accepted), in the order the model is told about them."""
        self.failed, self.probes, self.features = {}, [], {}
        errors = validate(value, SCALE_SCHEMA)
        if errors:
            return errors
        errors = check_tools(value["tools"]) + check_tools(
            [d["tool"] for d in value["distractors"]], "distractors"
        )
        if errors:
            return errors
        errors = check_calls(self.item.scenario, value["tools"], value["calls"])
        if errors:
            return errors  # the strategies are judged on calls that fit the tools
        distractor_errors = self._distractor_errors(value)
        if distractor_errors and "distractors" in self.strategies:
            self.failed["distractors"] = distractor_errors
        judged = ScaleCheck(
            self.strategies, self.item.tools, self.item.calls, value["tools"], value["calls"],
            list(value.get("alternatives") or []),
        ).run()
        self.failed.update(judged.errors)
        self.probes, self.features = judged.probes, judged.features
        return distractor_errors + [error for strategy_errors in judged.errors.values() for error in strategy_errors]

    def _distractor_errors(self, value: Any) -> list[str]:
        errors: list[str] = []
        names = {tool_name(tool) for tool in value["tools"]}
        if len(value["distractors"]) != self.num_distractors:
            errors.append(
                f"$.distractors: exactly {self.num_distractors} distractor tool(s) were asked for, "
                f"got {len(value['distractors'])}"
            )
        for entry in value["distractors"]:
            if tool_name(entry["tool"]) in names:
                errors.append(f"distractor '{tool_name(entry['tool'])}' has the name of an answering tool")
            errors.extend(
                check_arguments(
                    entry["tool"],
                    entry["example_arguments"],
                    where=f"the example call of distractor '{tool_name(entry['tool'])}'",
                )
            )
        return errors

    def result(self, value: Any) -> ToolSet:
        scenario = self.item.scenario
        calls = _gold_calls(value["calls"], scenario)
        return ToolSet(
            scenario,
            value["tools"],
            calls,
            merged_from(self.item.documented, calls),
            [entry["tool"] for entry in value["distractors"]],
            [{"name": tool_name(entry["tool"]), "arguments": entry["example_arguments"]}
             for entry in value["distractors"]],
            list(self.strategies),
            list(self.probes),
            dict(self.item.documented),
            dict(self.features),
        )


@dataclass
class _Scaler:
    """The scale stage's work on one item (a callable for :func:`run_stage`)."""

    ctx: StageContext

    def __call__(self, item: ToolSet, ledger: Ledger) -> ToolSet:
        strategies, num_distractors = self.ctx.knobs.draw(item.scenario.task.task_id)
        if not strategies:
            return item
        request = _ScaleRequest(item, strategies, num_distractors)
        try:
            value = self.ctx.llm.ask(request.prompt(self.ctx), request.check, ledger)
        except StageError as error:
            if error.transient or not request.failed:
                raise
            unmet = [s for s in STRATEGIES if s in request.failed]
            shown = "; ".join(f"{s}: {' / '.join(request.failed[s][:2])}" for s in unmet)
            raise StageError(SCALING_NOT_APPLIED, f"not applied: {shown}", strategies=unmet) from error
        return request.result(value)


def scale(toolsets: Sequence[ToolSet], ctx: StageContext) -> tuple[list[ToolSet], list[StageFailure]]:
    """Stage 4: apply the complexity-scaling strategies drawn for each task and check each one happened.

    None drawn: unchanged. A reply that, after the bounded repairs, still misses a drawn strategy
    fails as ``scaling_not_applied`` with the strategies named (``StageFailure.strategies``).
    """
    return run_stage("scale", toolsets, _Scaler(ctx), ctx)


# ------------------------------------------------------------------------------------ 5. deploy
def check_source(name: str, source: str, tool: dict[str, Any]) -> list[str]:
    """The source defines exactly ``def name(...)`` at top level and accepts the schema's parameters."""
    try:
        module = parse_python(source)
    except SyntaxError as error:
        return [f"codes['{name}'] is not valid Python: {error.msg} (line {error.lineno})"]
    body = [
        node
        for node in module.body
        if not (isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant))
    ]
    functions = [node for node in body if isinstance(node, ast.FunctionDef) and node.name == name]
    if not functions:
        return [f"codes['{name}'] must define `def {name}(...)`"]
    others = [node for node in body if node is not functions[0]]
    errors = []
    if others:
        kinds = sorted({type(node).__name__ for node in others})
        errors.append(
            f"codes['{name}'] has top-level statements besides `def {name}` ({', '.join(kinds)}); the "
            "runtime only sees the function, so move imports, tables and helpers inside its body"
        )
    args = functions[0].args
    accepted = {a.arg for a in args.args + args.kwonlyargs}
    properties = tool["function"].get("parameters", {}).get("properties", {})
    required = set(tool["function"].get("parameters", {}).get("required", []))
    if args.kwarg is None:
        missing = [p for p in properties if p not in accepted]
        if missing:
            errors.append(f"`def {name}` does not accept parameter(s) {missing} of its schema")
    with_default = {a.arg for a in args.args[len(args.args) - len(args.defaults) :]} | {
        a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None
    }
    no_default = [a.arg for a in args.args + args.kwonlyargs if a.arg not in with_default]
    optional_without_default = [p for p in no_default if p in properties and p not in required]
    if optional_without_default:
        errors.append(f"`def {name}`: optional parameter(s) {optional_without_default} need default values")
    unknown = [p for p in no_default if p not in properties]
    if unknown:
        errors.append(f"`def {name}` requires parameter(s) {unknown} that its schema does not declare")
    return errors


def _deploy_cases(item: ToolSet) -> dict[str, list[dict[str, Any]]]:
    """Per tool, the calls it must support: the gold calls and the scaled-feature probes (null: any fact)."""
    scenario = item.scenario
    cases: dict[str, list[dict[str, Any]]] = {}
    for call in item.calls:
        cases.setdefault(call.name, []).append(
            {"arguments": call.arguments, "result_contains": scenario.sub_question(call.sub_question_id).answer}
        )
    for probe in item.probes:
        answer = scenario.sub_question(probe.sub_question_id).answer if probe.expect_answer else None
        cases.setdefault(probe.name, []).append({"arguments": probe.arguments, "result_contains": answer})
    return cases


def deploy(toolsets: Sequence[ToolSet], ctx: StageContext) -> tuple[list[Deployed], list[StageFailure]]:
    """Stage 5: Python source per tool; valid calls (gold and probes) work, invalid ones raise."""

    def work(item: ToolSet, ledger: Ledger) -> Deployed:
        scenario = item.scenario
        cases = _deploy_cases(item)
        answers = sorted({sq.answer for sq in scenario.sub_questions})
        distractors = [
            {"tool": tool, "example_arguments": call["arguments"]}
            for tool, call in zip(item.distractors, item.distractor_calls)
        ]
        prompt = ctx.prompts["deploy"].render(
            tools=_dump(item.tools),
            cases=_dump(cases),
            distractors=_dump(distractors) if distractors else "(none)",
            answers=json.dumps(answers, ensure_ascii=False),
        )
        tools = {tool_name(tool): tool for tool in item.all_tools}

        def check(value: Any) -> list[str]:
            errors = validate(value, DEPLOY_SCHEMA)
            if errors:
                return errors
            codes = value["codes"]
            missing = [name for name in tools if name not in codes]
            if missing:
                errors.append(f"$.codes lacks the tool(s) {missing}")
            extra = [name for name in codes if name not in tools]
            if extra:
                errors.append(f"$.codes has unknown tool(s) {extra}; the tools are {sorted(tools)}")
            for name, source in codes.items():
                if name in tools:
                    errors.extend(check_source(name, source, tools[name]))
            return errors

        value = ctx.llm.ask(prompt, check, ledger)
        return Deployed(item, {name: value["codes"][name] for name in tools})

    return run_stage("deploy", toolsets, work, ctx)
