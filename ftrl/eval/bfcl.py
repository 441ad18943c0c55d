"""BFCL (Berkeley Function-Calling Leaderboard): the official data and checkers of ``bfcl-eval``.

Beyond the paper. The entries, the possible answers, the AST checker, the multi-turn checker and
the stateful multi-turn backends all come from the ``bfcl-eval`` package (an optional extra: its full
dependency set is several GB and pins numpy, so it is installed without its dependencies, plus the
two the checkers need)::

    pip install --no-deps "bfcl-eval==2026.3.23" && pip install -e ".[bfcl]"

Protocol (the package's function-calling mode): the entry's functions go to the model as
``tools=`` (names with ``.`` renamed ``_``, BFCL types mapped to JSON-schema types; Java and
JavaScript parameters as strings, with the package's language hints), our parser reads the reply
(``ftrl.collect.parser_from_config``) and the calls reach the checkers as ``[{name: arguments}]``.
Single-turn categories: one generation. Multi-turn categories: the entry's user turns in order; in
each turn the model is asked again while it calls tools (at most ``MAXIMUM_STEP_LIMIT`` + 1
steps, else the entry is force-terminated and fails), the calls running on the package's backends
(a fresh instance per entry); a ``miss_func`` holdout turn adds its functions and the package's
"more functions" user line. The multi-turn checker then replays the model's calls and the gold
calls on fresh backends and compares state and results turn by turn.

Metrics: ``bfcl/<category>/accuracy`` (+ ``/n``, ``/failed``), ``bfcl/non_live`` (unweighted mean
of simple (itself the unweighted mean of python, java, javascript), multiple, parallel,
parallel_multiple), ``bfcl/live`` (sample-weighted mean of the four live AST categories),
``bfcl/irrelevance`` (mean of irrelevance and live_irrelevance), ``bfcl/multi_turn`` (unweighted
mean of the four multi-turn categories) and ``bfcl/overall`` (the leaderboard's 10/10/10/30 weights
over those four sections; the agentic section, weight 40, is not run). A section or category that
was not evaluated is left out (the leaderboard would count it as 0). No FTRL reference script
exists for BFCL, so ``eval.compat`` changes nothing here.

    python -m ftrl.run stages=[eval] eval.benchmarks=[bfcl] eval.bfcl.max_per_category=5 model=api ...
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import tempfile
import types
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrl.errors import MissingInputError
from ftrl.run_state import RunContext

NON_LIVE_AST = ("simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple")
LIVE_AST = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
IRRELEVANCE = ("irrelevance", "live_irrelevance")
MULTI_TURN = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
CATEGORIES = NON_LIVE_AST + LIVE_AST + IRRELEVANCE + MULTI_TURN
ALIASES = {"simple": ("simple_python", "simple_java", "simple_javascript"), "multi_turn": MULTI_TURN,
           "non_live": NON_LIVE_AST + ("irrelevance",), "live": LIVE_AST + ("live_irrelevance",), "all": CATEGORIES}
# The leaderboard's weights of its sections (agentic, 40, is not part of this benchmark).
SECTION_WEIGHTS = {"non_live": 10.0, "live": 10.0, "irrelevance": 10.0, "multi_turn": 30.0}
INSTALL = 'pip install --no-deps "bfcl-eval==2026.3.23" && pip install -e ".[bfcl]"'
PROJECT_ROOT_ENV = "BFCL_PROJECT_ROOT"
CHECKER_MODEL = "ftrl"  # the model name the AST checker sees (used only for names with '.')


# ------------------------------------------------------------------------------------ the package
class _NoRenaming:
    """Stands in for the package's model table: names reach the checker unrenamed (we map them back)."""

    underscore_to_dot = False


class _ModelTable(dict):
    def __missing__(self, key: str) -> _NoRenaming:
        return _NoRenaming()


_PACKAGE: dict[str, Any] = {}


def _project_root() -> str:
    """``$BFCL_PROJECT_ROOT``, else a private temp folder: the package writes folders there on import."""
    if not os.environ.get(PROJECT_ROOT_ENV):
        import atexit
        import shutil

        folder = tempfile.mkdtemp(prefix="ftrl-bfcl-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ[PROJECT_ROOT_ENV] = folder
    return os.environ[PROJECT_ROOT_ENV]


def bfcl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bfcl_eval") is not None


def package() -> types.SimpleNamespace:
    """The parts of ``bfcl-eval`` this module uses, imported once with its side effects kept out of the tree.

    The package's ``constants.model_config`` imports every model handler (openai, anthropic, ...);
    the AST checker only needs it for names with ``.``, so a stand-in table is given to the checker
    while it imports, unless the real module was already imported.
    """
    if _PACKAGE:
        return _PACKAGE["ns"]
    if not bfcl_available():
        raise MissingInputError(f"bfcl: the bfcl-eval package is not installed; install it with: {INSTALL}")
    root = _project_root()
    from bfcl_eval import utils
    from bfcl_eval.constants import default_prompts, type_mappings
    from bfcl_eval.constants.enums import Language

    stub_name = "bfcl_eval.constants.model_config"
    stubbed = stub_name not in sys.modules
    if stubbed:
        stub = types.ModuleType(stub_name)
        stub.MODEL_CONFIG_MAPPING = _ModelTable()
        sys.modules[stub_name] = stub
    try:
        from bfcl_eval.eval_checker.ast_eval import ast_checker
    finally:
        if stubbed:
            sys.modules.pop(stub_name, None)
            import bfcl_eval.constants as constants_pkg

            constants_pkg.__dict__.pop("model_config", None)
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker, multi_turn_utils

    _PACKAGE["ns"] = types.SimpleNamespace(
        utils=utils, ast_checker=ast_checker.ast_checker, Language=Language,
        multi_turn_checker=multi_turn_checker.multi_turn_checker, multi_turn_utils=multi_turn_utils,
        to_openapi=type_mappings.GORILLA_TO_OPENAPI, max_steps=default_prompts.MAXIMUM_STEP_LIMIT,
        more_functions=default_prompts.DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC, project_root=root,
    )
    return _PACKAGE["ns"]


def expand_categories(names: Sequence[str]) -> list[str]:
    """Config names -> the package's categories, in order, without duplicates (aliases: simple, multi_turn, ...)."""
    out: list[str] = []
    for name in names:
        members = ALIASES.get(name, (name,))
        for member in members:
            if member not in CATEGORIES:
                raise ValueError(f"eval.bfcl.categories: unknown category {name!r}; valid: "
                                 f"{', '.join(CATEGORIES + tuple(ALIASES))}")
            if member not in out:
                out.append(member)
    return out


# ------------------------------------------------------------------------------------ loader
def load_category(category: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The category's entries as samples: ``id``, ``category``, ``question`` (turns), ``function``
    (as shown to the model, with the package's language hints), ``checker_function`` (as the
    checker reads it), ``ground_truth`` (absent for irrelevance), and the multi-turn fields."""
    bfcl = package()
    shown = bfcl.utils.load_dataset_entry(category, include_prereq=False, include_language_specific_hint=True)
    raw = bfcl.utils.load_dataset_entry(category, include_prereq=False, include_language_specific_hint=False)
    raw_by_id = {entry["id"]: entry for entry in raw}
    gold = {} if category in IRRELEVANCE else {e["id"]: e["ground_truth"]
                                                for e in bfcl.utils.load_ground_truth_entry(category)}
    samples = []
    for entry in shown[:limit] if limit is not None else shown:
        sample = {"id": entry["id"], "category": category, "question": entry["question"],
                  "function": entry["function"], "checker_function": raw_by_id[entry["id"]]["function"]}
        if category not in IRRELEVANCE:
            sample["ground_truth"] = gold[entry["id"]]
        for key in ("initial_config", "involved_classes", "missed_function"):
            if key in entry:
                sample[key] = entry[key]
        samples.append(sample)
    return samples


# ------------------------------------------------------------------------------------ tools and calls
def _openapi_type(schema: dict[str, Any], mapping: Mapping[str, str]) -> None:
    kind = schema.get("type")
    schema["type"] = mapping.get(kind, "string") if kind is not None else "string"
    if schema["type"] == "object" and isinstance(schema.get("properties"), dict):
        for child in schema["properties"].values():
            _openapi_type(child, mapping)
    if schema["type"] == "array" and isinstance(schema.get("items"), dict):
        _openapi_type(schema["items"], mapping)


def to_tools(functions: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """BFCL function docs -> OpenAI tools, and {tool name: BFCL name} ('.' is not allowed in tool names)."""
    mapping = package().to_openapi
    tools, names = [], {}
    for function in functions:
        doc = copy.deepcopy(dict(function))
        name = re.sub(r"\.", "_", doc["name"])
        names[name] = doc["name"]
        parameters = doc.get("parameters") or {"properties": {}}
        parameters["type"] = "object"
        for child in (parameters.get("properties") or {}).values():
            _openapi_type(child, mapping)
        tools.append({"type": "function", "function": {"name": name, "description": doc.get("description", ""),
                                                       "parameters": parameters}})
    return tools, names


def calls_of(message: Mapping[str, Any] | None, names: Mapping[str, str] | None = None) -> list[dict[str, Any]] | None:
    """An assistant message's tool calls as ``[{name: arguments}]`` (BFCL names restored); None when a
    call's arguments are not a JSON object (the package's decoder fails on it too)."""
    calls = []
    for call in (message or {}).get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict) or not isinstance(function.get("name"), str):
            return None
        name = function["name"]
        calls.append({(names or {}).get(name, name): arguments})
    return calls


def execute_strings(calls: Sequence[Mapping[str, Any]]) -> list[str]:
    """``[{name: arguments}]`` -> the package's executable form ``name(key=repr(value), ...)``."""
    return [f"{name}({','.join(f'{key}={value!r}' for key, value in arguments.items())})"
            for call in calls for name, arguments in call.items()]


def _language(category: str) -> Any:
    bfcl = package()
    if category == "simple_java":
        return bfcl.Language.JAVA
    if category == "simple_javascript":
        return bfcl.Language.JAVASCRIPT
    return bfcl.Language.PYTHON


# ------------------------------------------------------------------------------------ scorers
def score_single_turn(sample: Mapping[str, Any], calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One single-turn entry (AST or irrelevance category) and the model's calls -> ``{accuracy, error}``.

    ``calls`` is ``[{name: arguments}]`` (``[]``: no call; None: a call that did not decode).
    Irrelevance: right iff no call (an undecodable reply or ``[{}]`` counts as none, as the package's
    relevance runner does). AST categories: no call or an undecodable one is wrong; otherwise the
    package's ``ast_checker`` decides.
    """
    category = sample["category"]
    empty = calls is None or len(calls) == 0 or (len(calls) == 1 and not calls[0])
    if category in IRRELEVANCE:
        return {"accuracy": 0.0 if not empty else 1.0,
                "error": "" if empty else "irrelevance_error:decoder_success"}
    if calls is None or not calls:
        return {"accuracy": 0.0, "error": "ast_decoder:decoder_failed"}
    bfcl = package()
    result = bfcl.ast_checker(sample["checker_function"], calls, sample["ground_truth"], _language(category),
                              category, CHECKER_MODEL)
    if result["valid"]:
        return {"accuracy": 1.0, "error": ""}
    return {"accuracy": 0.0, "error": f"{result.get('error_type', '')}: {result.get('error', '')}"}


def _forget_instances(tag: str) -> None:
    """Drop the backend instances the package cached for model name ``tag`` (all entries)."""
    cache = package().multi_turn_utils.__dict__
    prefix = re.sub(r"[-./:]", "_", tag)
    for name in [name for name in cache if name.startswith(prefix + "_")]:
        del cache[name]


def score_multi_turn(sample: Mapping[str, Any], turns: list[list[list[str]]], force_terminated: bool = False) -> dict[str, Any]:
    """One multi-turn entry and the model's decoded calls per turn per step -> ``{accuracy, error}``.

    ``turns[t]`` lists the steps of user turn ``t`` that made calls, each a list of
    ``name(key=value, ...)`` strings (:func:`execute_strings`). A force-terminated entry, or one
    whose turn count differs from the gold, fails (the package's runner); otherwise the package's
    ``multi_turn_checker`` replays both on fresh backends (a private model name, its cache cleared
    after) and decides.
    """
    gold = sample["ground_truth"]
    if force_terminated or len(turns) != len(gold):
        return {"accuracy": 0.0, "error": "multi_turn:force_terminated"}
    tag = f"ftrl_check_{uuid.uuid4().hex[:10]}"
    entry = {"id": sample["id"], "initial_config": sample.get("initial_config", {}),
             "involved_classes": sample["involved_classes"]}
    try:
        result = package().multi_turn_checker(turns, gold, entry, sample["category"], tag)
    finally:
        _forget_instances(tag)
    if result["valid"]:
        return {"accuracy": 1.0, "error": ""}
    return {"accuracy": 0.0, "error": f"{result.get('error_type', '')}: {result.get('error_message', '')}"}


# ------------------------------------------------------------------------------------ aggregation
def aggregate(rows: Sequence[Mapping[str, Any]], prefix: str = "bfcl") -> dict[str, float]:
    """Per-category accuracy, n, failed; the leaderboard's sections and the weighted overall."""
    by_category: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_category.setdefault(row["group"], []).append(row)
    result: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    count: dict[str, int] = {}
    for category in [c for c in CATEGORIES if c in by_category] + sorted(set(by_category) - set(CATEGORIES)):
        members = by_category[category]
        accuracy[category] = sum(float(r["metrics"]["accuracy"]) for r in members) / len(members)
        count[category] = len(members)
        result[f"{prefix}/{category}/accuracy"] = accuracy[category]
        result[f"{prefix}/{category}/n"] = float(len(members))
        result[f"{prefix}/{category}/failed"] = float(sum(bool(r.get("failed")) for r in members))

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    simple = mean([accuracy[c] for c in ALIASES["simple"] if c in accuracy])
    if simple is not None:
        result[f"{prefix}/simple/accuracy"] = simple
    parts = ([simple] if simple is not None else []) + [accuracy[c] for c in NON_LIVE_AST[3:] if c in accuracy]
    live_n = sum(count[c] for c in LIVE_AST if c in count)
    sections = {
        "non_live": mean(parts),
        "live": sum(accuracy[c] * count[c] for c in LIVE_AST if c in count) / live_n if live_n else None,
        "irrelevance": mean([accuracy[c] for c in IRRELEVANCE if c in accuracy]),
        "multi_turn": mean([accuracy[c] for c in MULTI_TURN if c in accuracy]),
    }
    weights = 0.0
    overall = 0.0
    for section, value in sections.items():
        if value is not None:
            result[f"{prefix}/{section}"] = value
            overall += SECTION_WEIGHTS[section] * value
            weights += SECTION_WEIGHTS[section]
    if weights:
        result[f"{prefix}/overall"] = overall / weights
    result[f"{prefix}/n"] = float(len(rows))
    result[f"{prefix}/failed"] = float(sum(bool(r.get("failed")) for r in rows))
    return result


# ------------------------------------------------------------------------------------ protocols
def _first_turn_request(sample: Mapping[str, Any]) -> Any:
    from ftrl.llm.engines.base import ChatRequest

    tools, _ = to_tools(sample["function"])
    return ChatRequest(messages=copy.deepcopy(sample["question"][0]), tools=tools)


def _reply_message(generation: Any, parser: Any) -> dict[str, Any]:
    return getattr(generation, "message", None) or parser(generation.text)


def run_single_turn(engine: Any, samples: Sequence[Mapping[str, Any]], out_path: Path, *, params: Any,
                    parser: Any, batch_size: int = 32, desc: str = "eval bfcl") -> list[dict[str, Any]]:
    """One generation per entry, scored at once; resumable per entry."""
    from ftrl.eval.runner import generate_once

    def score(sample: Mapping[str, Any], generation: Any) -> dict[str, Any]:
        message = _reply_message(generation, parser)
        _, names = to_tools(sample["function"])
        calls = calls_of(message, names)
        verdict = score_single_turn(sample, calls)
        return {"group": sample["category"], "calls": calls, "error": verdict["error"],
                "metrics": {"accuracy": verdict["accuracy"]}}

    return generate_once(engine, samples, out_path, params=params, request=_first_turn_request, score=score,
                         batch_size=batch_size, desc=desc)


class _MultiTurnEpisode:
    """One multi-turn entry being played: its messages, tools, backends (private model name) and calls."""

    def __init__(self, index: int, sample: Mapping[str, Any]) -> None:
        self.index, self.sample = index, sample
        self.functions = list(copy.deepcopy(sample["function"]))
        self.tools, self.names = to_tools(self.functions)
        self.messages: list[dict[str, Any]] = []
        self.turn = -1
        self.steps = 0
        self.turns: list[list[list[str]]] = []
        self.force_terminated = False
        self.done = False
        self.tag = f"ftrl_{uuid.uuid4().hex[:10]}"
        self.start_next_turn()

    def start_next_turn(self) -> None:
        self.turn += 1
        self.steps = 0
        if self.turn >= len(self.sample["question"]):
            self.done = True
            return
        message = copy.deepcopy(self.sample["question"][self.turn])
        holdout = (self.sample.get("missed_function") or {}).get(str(self.turn))
        if holdout:
            self.functions.extend(copy.deepcopy(holdout))
            self.tools, self.names = to_tools(self.functions)
            message = [{"role": "user", "content": package().more_functions}]
        self.messages.extend(message)
        self.turns.append([])

    def request(self) -> Any:
        from ftrl.llm.engines.base import ChatRequest

        return ChatRequest(messages=self.messages, tools=self.tools)

    def advance(self, message: dict[str, Any]) -> None:
        """The model's reply: execute its calls on the backends, or end the turn."""
        bfcl = package()
        self.messages.append(message)
        calls = calls_of(message, self.names)
        strings = execute_strings(calls) if calls else []
        if not strings:
            self.start_next_turn()
            return
        self.turns[-1].append(strings)
        category = self.sample["category"]
        results, _ = bfcl.multi_turn_utils.execute_multi_turn_func_call(
            strings, self.sample.get("initial_config", {}), self.sample["involved_classes"], self.tag,
            self.sample["id"], long_context=("long_context" in category), is_evaL_run=False)
        for call, result in zip(message.get("tool_calls") or [], results):
            self.messages.append({"role": "tool", "content": str(result), "tool_call_id": call.get("id")})
        self.steps += 1
        if self.steps > bfcl.max_steps:
            self.force_terminated = True
            self.done = True

    def close(self) -> None:
        _forget_instances(self.tag)


def run_multi_turn(engine: Any, samples: Sequence[Mapping[str, Any]], out_path: Path, *, params: Any,
                   parser: Any, batch_size: int = 32, model_name: str = "", desc: str = "eval bfcl") -> list[dict[str, Any]]:
    """Play the multi-turn entries (continuous batching: a finished entry's slot goes to the next one),
    score each as it ends and append its row; resumable per entry."""
    from ftrl.collect import EpisodeLog
    from ftrl.eval.runner import sample_key
    from ftrl.progress import progress as progress_reporter

    log = EpisodeLog(out_path, key=sample_key)
    pending = [(i, s) for i, s in enumerate(samples) if not log.check_key(i, s)]
    pending.reverse()
    active: list[_MultiTurnEpisode] = []
    bar = progress_reporter(total=len(pending), desc=desc, unit="entry")
    try:
        while pending or active:
            while pending and len(active) < batch_size:
                active.append(_MultiTurnEpisode(*pending.pop()))
            generations = engine.generate([episode.request() for episode in active], params)
            for episode, outputs in zip(active, generations):
                episode.advance(_reply_message(outputs[0], parser))
            for episode in [e for e in active if e.done]:
                active.remove(episode)
                episode.close()
                verdict = score_multi_turn(episode.sample, episode.turns, episode.force_terminated)
                row = {"index": episode.index, "id": episode.sample["id"], "group": episode.sample["category"],
                       "model": model_name, "messages": episode.messages, "calls": episode.turns,
                       "error": verdict["error"], "failed": episode.force_terminated,
                       "metrics": {"accuracy": verdict["accuracy"]}}
                log.append(episode.index, episode.sample, [row])
                bar.update(1)
    finally:
        for episode in active:
            episode.close()
        bar.close()
    rows = log.read()
    if len(rows) != len(samples):
        raise RuntimeError(f"{out_path}: expected {len(samples)} evaluated entries, found {len(rows)}")
    return rows


def evaluate_categories(engine: Any, categories: Sequence[str], out_dir: Path, *, params: Any, parser: Any,
                        limit: int | None = None, batch_size: int = 32, model_name: str = "",
                        desc: str = "eval bfcl") -> dict[str, float]:
    """Every category (``bfcl_<category>.jsonl`` under ``out_dir``), then the leaderboard aggregation."""
    rows: list[dict[str, Any]] = []
    for category in expand_categories(categories):
        samples = load_category(category, limit)
        path = Path(out_dir) / f"bfcl_{category}.jsonl"
        if category in MULTI_TURN:
            rows += run_multi_turn(engine, samples, path, params=params, parser=parser, batch_size=batch_size,
                                   model_name=model_name, desc=f"{desc} {category}")
        else:
            rows += run_single_turn(engine, samples, path, params=params, parser=parser, batch_size=batch_size,
                                    desc=f"{desc} {category}")
    return aggregate(rows)


def evaluate(ctx: RunContext, engine: Any, checkpoint: str) -> dict[str, float]:
    """Benchmark entry (``eval.benchmarks: [bfcl]``)."""
    from ftrl.collect import parser_from_config
    from ftrl.llm.engines.base import SamplingParams

    cfg = ctx.cfg
    limits = [v for v in (cfg.eval.max_samples, cfg.eval.bfcl.max_per_category) if v is not None]
    params = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                            repetition_penalty=cfg.eval.repetition_penalty, inherit=cfg.eval.inherit,
                            n=1, seed=cfg.seed)
    out_dir = ctx.run_dir.eval_records(checkpoint, "bfcl").parent
    return evaluate_categories(engine, cfg.eval.bfcl.categories, out_dir, params=params,
                               parser=parser_from_config(cfg), limit=min(limits) if limits else None,
                               batch_size=cfg.eval.batch_size, model_name=checkpoint, desc=f"eval {checkpoint}")
