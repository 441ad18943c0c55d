"""ToolHop: 995 multi-hop questions, each with its own locally runnable tools (Direct / Mandatory / Free).

Loader (:func:`load_samples`): the Hugging Face release's ``ToolHop.json`` (a JSON list of ``{id,
question, answer, tools: {name: schema}, functions: [source, ...]}``, a function's name read from its
``def NAME(``) or the FTRL release's ``ToolHop.jsonl`` (``functions`` as ``{name: source}``); both
become ``{id, question, answer, tools, functions: {name: source}}``.

Protocols (the reference's ``evaluation_toolhop.py``), one metric group per mode:

- ``Direct``: one generation on the question, no tools.
- ``Mandatory`` / ``Free``: the sample's tools are shown; at most ``eval.toolhop.max_turns`` (9)
  turns, every call of a turn runs in the sandbox, the episode stops at the first turn without
  calls. The two differ only in the prompt (Mandatory asks for a tool at every step). They run
  through ``ftrl.collect.run_episodes`` (batched, continuous batching) on reference records.

Prompts are the data files ``ftrl/eval/toolhop_prompts/<mode>.txt`` (our wording with the reference's
structure and ``{question}`` placeholder; ``eval.toolhop.prompt_dir`` replaces them).

Scorer (:func:`score_messages`, pure). ``ftrl`` (the reference): correct iff the last message is an
assistant message with non-empty content and ``answer_verify(content, gold)`` holds, or, in that
case, ``messages[-2]`` is a tool message whose content verifies; the scored content includes the
thinking text (the reference parses the raw generation, thoughts included). ``official`` (ToolHop's
rule): same structure, but the match is ``gold.rstrip('.0').lower() in
content.rstrip('.0').replace(',', '').lower()`` on the visible content. ``ac_no_think`` is the same
rule on the visible content only (think blocks removed).

Rows go to ``eval/<checkpoint>/toolhop_<mode>.jsonl`` (one file per mode, resumable per sample).

    python -m ftrl.run stages=[build_envs,eval] eval.benchmarks=[toolhop] eval.data_dir=tests/fixtures +debug=smoke
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrl.collect import Episode, EpisodeLog, run_episodes
from ftrl.envs.verify import answer_verify
from ftrl.errors import MissingInputError
from ftrl.eval.data import benchmark_dir, benchmark_file
from ftrl.eval.runner import aggregate, generate_once, sample_key
from ftrl.llm.parsers import THINK_CLOSE, THINK_OPEN, split_thinking
from ftrl.run_state import RunContext

log = logging.getLogger(__name__)

BENCHMARK = "toolhop"
MODES = {"direct": "Direct", "mandatory": "Mandatory", "free": "Free"}
METRICS = ("ac", "ac_no_think")
PROMPT_DIR = Path(__file__).with_name("toolhop_prompts")
PLACEHOLDER = "{question}"
DATA_FILES = ("ToolHop.jsonl", "ToolHop.json")
_DEF = re.compile(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", re.MULTILINE)


# ------------------------------------------------------------------------------------- loader
def function_name(source: str) -> str:
    """The name of the first ``def NAME(`` in a function's source (the HF release's list layout)."""
    match = _DEF.search(source)
    if match is None:
        raise ValueError(f"no 'def NAME(' in function source: {source[:120]!r}")
    return match.group(1)


def normalise_sample(raw: Mapping[str, Any], position: int = 0) -> dict[str, Any]:
    """One ToolHop item in either layout -> ``{id, question, answer, tools, functions}``.

    ``tools`` stays ``{name: schema}``; ``functions`` becomes ``{name: source}`` (a list of sources is
    keyed by each source's ``def NAME(``). ``id`` is the item's own id, else a hash of the question.
    """
    where = f"item {position}"
    for key in ("question", "answer", "tools", "functions"):
        if key not in raw:
            raise ValueError(f"ToolHop {where}: missing field '{key}' (has {sorted(raw)})")
    functions = raw["functions"]
    if isinstance(functions, str):
        functions = json.loads(functions)
    if isinstance(functions, list):
        functions = {function_name(source): source for source in functions}
    if not isinstance(functions, dict):
        raise TypeError(f"ToolHop {where}: 'functions' must be a list of sources or a {{name: source}} "
                        f"object, got {type(functions).__name__}")
    tools = raw["tools"]
    if isinstance(tools, str):
        tools = json.loads(tools)
    if isinstance(tools, list):  # tolerate a list of schemas (plain or {"type": "function", ...})
        tools = {(t.get("function") or t)["name"]: (t.get("function") or t) for t in tools}
    missing = sorted(set(tools) - set(functions))
    if missing:
        log.warning("ToolHop %s: tools without code %s (their calls will return an error)", where, missing)
    question = str(raw["question"])
    sample_id = raw.get("id")
    if sample_id is None:
        sample_id = hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]
    return {"id": str(sample_id), "question": question, "answer": str(raw["answer"]),
            "tools": dict(tools), "functions": dict(functions)}


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """Read ``ToolHop.json`` (a JSON list) or ``ToolHop.jsonl`` (one item a line); the layout is sniffed."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        items = json.loads(text)
    else:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    samples = [normalise_sample(item, i) for i, item in enumerate(items)]
    ids = [s["id"] for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ToolHop ids")
    return samples


def data_file(cfg: Any) -> Path:
    """``eval.toolhop.file``, else ``<eval.data_dir>/toolhop/ToolHop.jsonl`` (or ``ToolHop.json``)."""
    if cfg.eval.toolhop.file:
        return benchmark_file(cfg.eval.toolhop.file, BENCHMARK, "eval.toolhop.file")
    folder = benchmark_dir(cfg.eval.data_dir, BENCHMARK, "toolhop")
    for name in DATA_FILES:
        if (folder / name).is_file():
            return folder / name
    raise MissingInputError(f"{BENCHMARK}: neither {' nor '.join(str(folder / n) for n in DATA_FILES)} exists; "
                            "put the data there or set eval.toolhop.file=<path>")


def load_prompts(prompt_dir: str | None, modes: Sequence[str]) -> dict[str, str]:
    """The template of each mode: ``<mode>.txt`` from ``eval.toolhop.prompt_dir`` or the packaged ones."""
    folder = Path(prompt_dir).expanduser() if prompt_dir else PROMPT_DIR
    key = "eval.toolhop.prompt_dir" if prompt_dir else "the packaged ftrl/eval/toolhop_prompts"
    templates = {}
    for mode in modes:
        path = folder / f"{mode}.txt"
        if not path.is_file():
            raise MissingInputError(f"{BENCHMARK}: no prompt template '{path}' ({key}); the folder needs "
                                    f"one <mode>.txt per mode in {list(modes)}")
        template = path.read_text(encoding="utf-8").rstrip("\n")
        if PLACEHOLDER not in template:
            raise ValueError(f"{BENCHMARK}: prompt template '{path}' lacks the {PLACEHOLDER} placeholder")
        templates[mode] = template
    return templates


def render_prompt(template: str, question: str) -> str:
    return template.replace(PLACEHOLDER, question)


def tool_schemas(sample: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The tools shown to the model: ``sample["tools"].values()`` as OpenAI function tools."""
    return [{"type": "function", "function": dict(schema)} for schema in sample["tools"].values()]


def episode_record(sample: Mapping[str, Any], mode: str, template: str) -> dict[str, Any]:
    """A sample as a reference record for ``run_episodes`` (nothing to solve: ``unsolved_set`` empty)."""
    return {
        "id": f"{mode}/{sample['id']}",
        "messages": [{"role": "user", "content": render_prompt(template, sample["question"])}],
        "tools": json.dumps(tool_schemas(sample), ensure_ascii=False),
        "codes": json.dumps(sample["functions"], ensure_ascii=False),
        "unsolved_set": "{}",
        "answer": sample["answer"],
        "data_source": f"ToolHop/{MODES[mode]}",
        "split": "test",
    }


# ------------------------------------------------------------------------------------- scorer
def official_match(content: str, gold: str) -> bool:
    """ToolHop's own rule: ``gold.rstrip('.0').lower() in content.rstrip('.0').replace(',', '').lower()``.

    ``rstrip('.0')`` strips a *set of characters*: "100" becomes "1", "0" becomes "" (matches anything).
    """
    return gold.rstrip(".0").lower() in content.rstrip(".0").replace(",", "").lower()


def full_content(message: Mapping[str, Any]) -> str:
    """The turn's content with its thoughts, as the reference saw the raw generation."""
    content = message.get("content") or ""
    thinking = message.get("reasoning_content")
    if thinking:
        return f"{THINK_OPEN}\n{thinking}\n{THINK_CLOSE}\n\n{content}".strip()
    return content


def visible_content(message: Mapping[str, Any]) -> str:
    """The turn's content without thoughts (a separate ``reasoning_content`` or think blocks)."""
    return split_thinking(message.get("content") or "")[1]


def _correct(messages: Sequence[Mapping[str, Any]], gold: str, content: str, match: Any) -> bool:
    if not messages or messages[-1].get("role") != "assistant" or not content:
        return False  # ran out of turns (a tool message is last) or an empty answer
    if match(content, gold):
        return True
    previous = messages[-2] if len(messages) > 1 else {}
    return previous.get("role") == "tool" and match(str(previous.get("content") or ""), gold)


def score_messages(messages: Sequence[Mapping[str, Any]], gold: str, compat: str = "ftrl") -> dict[str, float]:
    """Per-sample metrics of a finished conversation: ``ac`` (under ``compat``) and ``ac_no_think``.

    ``ftrl``: ``answer_verify`` on the last assistant content *with* its thinking (the reference),
    else on a tool message just before it. ``official``: :func:`official_match` on the visible
    content (and the tool message). ``ac_no_think`` applies the compat's match to the visible content.
    """
    if compat not in ("ftrl", "official"):
        raise ValueError(f"compat must be 'ftrl' or 'official', got {compat!r}")
    gold = str(gold)
    last = messages[-1] if messages else {}
    match = answer_verify if compat == "ftrl" else official_match
    visible = visible_content(last)
    scored = full_content(last) if compat == "ftrl" else visible
    return {"ac": float(_correct(messages, gold, scored, match)),
            "ac_no_think": float(_correct(messages, gold, visible, match))}


def _row(mode: str, sample_id: str, messages: list[dict], gold: str, compat: str, **extra: Any) -> dict[str, Any]:
    ran_out = not messages or messages[-1].get("role") != "assistant"
    return {"group": MODES[mode], "sample_id": sample_id, "mode": mode, "data_source": f"ToolHop/{MODES[mode]}",
            "answer": gold, "messages": messages, "metrics": score_messages(messages, gold, compat),
            "failed": ran_out, **extra}


# ------------------------------------------------------------------------------------ protocols
def run_direct(engine: Any, samples: Sequence[Mapping[str, Any]], out_path: Path, *, template: str,
               params: Any, parser: Any, compat: str, batch_size: int, model_name: str = "") -> list[dict]:
    """One generation per question, no tools (``Direct``)."""
    from ftrl.llm.engines.base import ChatRequest

    keyed = [{"id": f"direct/{s['id']}", "sample": s} for s in samples]

    def prompt(item: Mapping[str, Any]) -> list[dict]:
        return [{"role": "user", "content": render_prompt(template, item["sample"]["question"])}]

    def score(item: Mapping[str, Any], generation: Any) -> dict[str, Any]:
        message = getattr(generation, "message", None) or parser(generation.text)
        sample = item["sample"]
        return _row("direct", sample["id"], [*prompt(item), message], sample["answer"], compat,
                    model=model_name, turns=1)

    return generate_once(engine, keyed, out_path, params=params,
                         request=lambda item: ChatRequest(messages=prompt(item), tools=None), score=score,
                         batch_size=batch_size, desc=f"eval toolhop/Direct {model_name}".strip())


def run_with_tools(engine: Any, samples: Sequence[Mapping[str, Any]], mode: str, out_path: Path, *,
                   template: str, params: Any, parser: Any, execute: Any, max_turns: int, compat: str,
                   batch_size: int, model_name: str = "") -> list[dict]:
    """``Mandatory`` / ``Free``: the multi-turn tool protocol through the shared episode loop."""
    records = [episode_record(sample, mode, template) for sample in samples]
    by_id = {record["id"]: sample for record, sample in zip(records, samples)}
    episode_log = EpisodeLog(out_path, key=sample_key)
    todo = [(i, record) for i, record in enumerate(records) if not episode_log.check_key(i, record)]

    def on_done(episode: Episode) -> None:
        sample = by_id[episode.record["id"]]
        row = _row(mode, sample["id"], episode.messages, sample["answer"], compat, index=episode.index,
                   id=episode.record["id"], model=model_name, turns=episode.turns, calls=episode.calls,
                   responses=episode.responses)
        episode_log.append(episode.index, episode.record, [row])

    run_episodes(engine, todo, params=params, max_turns=max_turns, parser=parser, execute=execute,
                 on_done=on_done, batch_size=batch_size, desc=f"eval toolhop/{MODES[mode]} {model_name}".strip())
    rows = episode_log.read()
    if len(rows) != len(records):
        raise RuntimeError(f"{out_path}: expected {len(records)} evaluated samples, found {len(rows)}")
    return rows


def evaluate_toolhop(engine: Any, samples: Sequence[Mapping[str, Any]], out_dir: Path, *, modes: Sequence[str],
                     templates: Mapping[str, str], params: Any, parser: Any, execute: Any, max_turns: int = 9,
                     compat: str = "ftrl", batch_size: int = 32, model_name: str = "") -> dict[str, float]:
    """Run every mode on ``samples`` (rows in ``out_dir/toolhop_<mode>.jsonl``) and aggregate."""
    rows: list[dict] = []
    for mode in modes:
        out_path = Path(out_dir) / f"{BENCHMARK}_{mode}.jsonl"
        if mode == "direct":
            rows += run_direct(engine, samples, out_path, template=templates[mode], params=params, parser=parser,
                               compat=compat, batch_size=batch_size, model_name=model_name)
        else:
            rows += run_with_tools(engine, samples, mode, out_path, template=templates[mode], params=params,
                                   parser=parser, execute=execute, max_turns=max_turns, compat=compat,
                                   batch_size=batch_size, model_name=model_name)
    return aggregate(rows, BENCHMARK, METRICS)


def evaluate(ctx: RunContext, engine: Any, checkpoint: str) -> dict[str, float]:
    """Benchmark entry (``eval.benchmarks: [toolhop]``)."""
    from ftrl.collect import executor_from_config, parser_from_config
    from ftrl.llm.engines.base import SamplingParams

    cfg = ctx.cfg
    options = cfg.eval.toolhop
    path = data_file(cfg)
    samples = load_samples(path)
    if cfg.eval.max_samples is not None:
        samples = samples[: cfg.eval.max_samples]  # the groups (modes) share the questions
    if not samples:
        raise ValueError(f"{path} holds no ToolHop questions")
    templates = load_prompts(options.prompt_dir, options.modes)
    params = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                            repetition_penalty=cfg.eval.repetition_penalty, inherit=cfg.eval.inherit,
                            n=1, seed=cfg.seed)
    execute = executor_from_config(cfg) if any(mode != "direct" for mode in options.modes) else None
    out_dir = ctx.run_dir.eval_records(checkpoint, BENCHMARK).parent
    log.info("toolhop: %d questions from %s, modes %s, compat=%s", len(samples), path, options.modes,
             cfg.eval.compat)
    return evaluate_toolhop(engine, samples, out_dir, modes=options.modes, templates=templates, params=params,
                            parser=parser_from_config(cfg), execute=execute, max_turns=options.max_turns,
                            compat=cfg.eval.compat, batch_size=cfg.eval.batch_size, model_name=checkpoint)
