"""ToolHop: both data layouts, the three protocols, the pure scorer in both compat modes, end to end.

The fixtures (tests/fixtures/toolhop/) are synthetic ToolHop items with fictional facts, in the HF
layout (``ToolHop.json``) and the FTRL layout (``ToolHop.jsonl``); no ToolHop data is reachable here.

    OMP_NUM_THREADS=1 python -m pytest tests/test_eval_toolhop.py -q
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from openai_stub import Reply, StubServer, completion

from ftrl.envs.executor import StatefulExecutor
from ftrl.errors import MissingInputError
from ftrl.eval import toolhop
from ftrl.eval.toolhop import (
    episode_record,
    function_name,
    load_prompts,
    load_samples,
    official_match,
    score_messages,
)
from ftrl.llm.engines.base import Generation, SamplingParams
from ftrl.llm.parsers import get_parser
from ftrl.types import make_tool_call

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
HF_FILE = FIXTURES / "toolhop" / "ToolHop.json"
FTRL_FILE = FIXTURES / "toolhop" / "ToolHop.jsonl"

# The gold chain of each fixture question: one call per hop, in order (synthetic facts).
CHAINS = {
    "In which year was the founder of the Verdant Quill Society born?": [
        ("founder_of_organization", {"organization": "Verdant Quill Society"}),
        ("birth_year_of_person", {"name": "Mirela Ostrova"})],
    "What is the capital of the country where the Glasswing Observatory is located?": [
        ("observatory_country", {"observatory": "Glasswing Observatory"}),
        ("capital_of_country", {"country": "Pelloria"})],
    "How many letters are in the last name of the author of 'The Salt Cartographer'?": [
        ("author_of_book", {"title": "The Salt Cartographer"}),
        ("extract_last_name", {"full_name": "Tobias Wrenfield"}),
        ("count_letters", {"text": "Wrenfield"})],
    "On what date was the composer of the opera 'Ember Tide' born?": [
        ("composer_of_opera", {"opera": "Ember Tide"}),
        ("birth_date_of_person", {"name": "Ilse Marrow"})],
    "What is the population of the hometown of the chess champion Oren Halvik?": [
        ("hometown_of_person", {"name": "Oren Halvik"}),
        ("population_of_town", {"town": "Brackmoor"})],
}
EXECUTE = StatefulExecutor(timeout=10.0)


def _user(text: str = "q") -> dict:
    return {"role": "user", "content": text}


def _assistant(content: str, reasoning: str | None = None, calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": content, "tool_calls": calls}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def _tool(content: str) -> dict:
    return {"role": "tool", "content": content, "tool_call_id": "call_1"}


def _both(messages: list[dict], gold: str) -> tuple[float, float]:
    return score_messages(messages, gold, "ftrl")["ac"], score_messages(messages, gold, "official")["ac"]


# ------------------------------------------------------------------------------------- loader
def test_both_layouts_load_to_the_same_samples() -> None:
    hf, ftrl = load_samples(HF_FILE), load_samples(FTRL_FILE)
    assert [s["id"] for s in hf] == ["th-001", "th-002", "th-003", "th-004", "th-005"]
    assert len(ftrl) == 5 and all(len(s["id"]) == 12 for s in ftrl)  # no ids there: a hash of the question
    strip = [{k: v for k, v in s.items() if k != "id"} for s in hf]
    assert strip == [{k: v for k, v in s.items() if k != "id"} for s in ftrl]
    third = hf[2]
    assert third["answer"] == "9"
    assert sorted(third["functions"]) == sorted(third["tools"]) == ["author_of_book", "count_letters",
                                                                   "extract_last_name"]
    assert function_name("import re\n\ndef  helper_x (a):\n    return a\ndef other(): pass") == "helper_x"
    with pytest.raises(ValueError, match="no 'def NAME\\('"):
        function_name("lambda x: x")


def test_the_fixtures_gold_chains_reach_the_answers_in_the_sandbox() -> None:
    for sample in load_samples(HF_FILE):
        output = None
        for name, arguments in CHAINS[sample["question"]]:
            [[output]] = EXECUTE([(sample["functions"], [make_tool_call(name, arguments, "c")])])
            assert "error" not in output, (name, output)
        assert sample["answer"] in output


def test_data_file_resolution_and_clear_errors(tmp_path) -> None:
    from ftrl.config import RunConfig

    cfg = RunConfig()
    cfg.eval.data_dir = str(FIXTURES)
    assert toolhop.data_file(cfg) == FTRL_FILE  # the FTRL release first
    cfg.eval.toolhop.file = str(HF_FILE)
    assert toolhop.data_file(cfg) == HF_FILE
    cfg.eval.toolhop.file = str(tmp_path / "nope.json")
    with pytest.raises(MissingInputError, match="eval.toolhop.file"):
        toolhop.data_file(cfg)
    cfg.eval.toolhop.file = None
    (tmp_path / "toolhop").mkdir()
    cfg.eval.data_dir = str(tmp_path)
    with pytest.raises(MissingInputError, match=r"ToolHop.jsonl.*eval.toolhop.file"):
        toolhop.data_file(cfg)
    cfg.eval.data_dir = str(tmp_path / "absent")
    with pytest.raises(MissingInputError, match="toolhop.*eval.data_dir"):
        toolhop.data_file(cfg)


def test_prompt_templates_are_data_files_and_can_be_overridden(tmp_path) -> None:
    packaged = load_prompts(None, ["direct", "mandatory", "free"])
    for template in packaged.values():
        assert template.endswith("Question: {question}") and "<answer>" in template
    assert "tool" not in packaged["direct"]
    assert "every step" in packaged["mandatory"] and "every step" not in packaged["free"]
    (tmp_path / "free.txt").write_text("Q={question}\n")
    assert load_prompts(str(tmp_path), ["free"]) == {"free": "Q={question}"}
    with pytest.raises(MissingInputError, match="direct.txt.*eval.toolhop.prompt_dir"):
        load_prompts(str(tmp_path), ["direct"])
    (tmp_path / "direct.txt").write_text("no placeholder")
    with pytest.raises(ValueError, match="placeholder"):
        load_prompts(str(tmp_path), ["direct"])


def test_episode_record_is_a_reference_record() -> None:
    sample = load_samples(HF_FILE)[0]
    record = episode_record(sample, "mandatory", "Go. Question: {question}")
    assert record["id"] == "mandatory/th-001" and record["data_source"] == "ToolHop/Mandatory"
    assert record["messages"] == [_user(f"Go. Question: {sample['question']}")]
    assert json.loads(record["tools"]) == [{"type": "function", "function": s} for s in sample["tools"].values()]
    assert json.loads(record["codes"]) == sample["functions"] and record["unsolved_set"] == "{}"


# ------------------------------------------------------------------------------------- scorer
def test_scorer_cases_on_which_both_modes_agree() -> None:
    gold = "Santa Vessa"
    right = [_user(), _assistant("<answer>Santa Vessa</answer>")]
    assert _both(right, gold) == (1.0, 1.0)
    assert _both([_user(), _assistant("<answer>Kelm</answer>")], gold) == (0.0, 0.0)
    # the answer only in the tool output just before a non-empty final turn counts
    via_tool = [_user(), _assistant("", calls=[make_tool_call("f", {}, "call_1")]), _tool('{"capital": "Santa Vessa"}'),
                _assistant("I could not tell.")]
    assert _both(via_tool, gold) == (1.0, 1.0)
    # ... but not when the final turn is empty
    assert _both([*via_tool[:-1], _assistant("")], gold) == (0.0, 0.0)
    # running out of turns (the last message is a tool result) fails even with the answer in it
    assert _both(via_tool[:-1], gold) == (0.0, 0.0)
    # a tool output earlier than messages[-2] does not count
    assert _both([*via_tool, _user("more?"), _assistant("no idea")], gold) == (0.0, 0.0)


def test_compat_multi_part_gold() -> None:
    # answer_verify splits the gold on ", " and wants every part somewhere; ToolHop wants the whole string
    messages = [_user(), _assistant("<answer>Pelloria ... Santa Vessa</answer>")]
    assert _both(messages, "Santa Vessa, Pelloria") == (1.0, 0.0)


def test_compat_commas_in_the_gold() -> None:
    # ftrl drops commas on both sides; ToolHop only in the content, so a gold "12,500" never matches
    messages = [_user(), _assistant("<answer>12,500</answer>")]
    assert _both(messages, "12,500") == (1.0, 0.0)


def test_compat_rstrip_of_dot_and_zero_characters() -> None:
    # ToolHop's rstrip('.0') strips characters: gold "100" becomes "1", gold "3.0" becomes "3"
    assert _both([_user(), _assistant("<answer>1</answer>")], "100") == (0.0, 1.0)
    assert _both([_user(), _assistant("<answer>3</answer>")], "3.0") == (0.0, 1.0)
    # and a gold "0" becomes "", which every non-empty answer contains
    assert _both([_user(), _assistant("<answer>none</answer>")], "0") == (0.0, 1.0)
    assert official_match("<answer>1903-04-17</answer>", "1903-04-17") and official_match("x 9.0", "9")


def test_compat_thinking_text_is_scored_under_ftrl_only() -> None:
    gold = "1874"
    # an API/fixed-parser message: thoughts in reasoning_content
    separate = [_user(), _assistant("<answer>1875</answer>", reasoning="Mirela was born in 1874? no...")]
    # the ftrl parser keeps the raw text, thoughts included, in content
    inline = [_user(), _assistant("<think>\nborn in 1874?\n</think>\n\n<answer>1875</answer>")]
    for messages in (separate, inline):
        ftrl, official = score_messages(messages, gold, "ftrl"), score_messages(messages, gold, "official")
        assert (ftrl["ac"], official["ac"]) == (1.0, 0.0)
        assert ftrl["ac_no_think"] == official["ac_no_think"] == 0.0
    # thoughts only, no visible answer: ftrl sees non-empty content, ToolHop an empty answer
    only_thoughts = [_user(), _assistant("", reasoning="it is 1874")]
    assert _both(only_thoughts, gold) == (1.0, 0.0)
    assert score_messages(only_thoughts, gold, "ftrl")["ac_no_think"] == 0.0
    with pytest.raises(ValueError, match="compat"):
        score_messages(separate, gold, "fixed")


# ------------------------------------------------------------------------------------ protocols
class ChainEngine:
    """A fake local engine writing Qwen-style text: follows each question's gold chain, then answers.

    ``wrong`` questions are answered wrongly after one hop, ``loop`` questions call a tool forever, and a request
    without tools (Direct) gets ``direct_answer`` (or the right answer for ``direct_right``).
    """

    def __init__(self, wrong=(), loop=(), direct_right=(), parallel=False, think=False) -> None:
        self.wrong, self.loop, self.direct_right, self.parallel = set(wrong), set(loop), set(direct_right), parallel
        self.think = think  # Direct answers think of the right answer, then give a wrong one
        self.requests = 0
        self.answers = {s["question"]: s["answer"] for s in load_samples(HF_FILE)}

    def reply(self, messages: list[dict], tools: list | None) -> str:
        question = next(q for q in CHAINS if q in messages[0]["content"])
        answer = self.answers[question]
        if not tools:
            thoughts = f"<think>\nmaybe {answer}\n</think>\n\n" if self.think else ""
            return f"{thoughts}<answer>{answer if question in self.direct_right else 'unknown'}</answer>"
        hops = sum(m["role"] == "assistant" for m in messages)
        chain = CHAINS[question]
        if question in self.loop:
            name, arguments = chain[0]
        elif question in self.wrong and hops == 1:  # gives up early: the last tool output lacks the answer
            return "<answer>wrong</answer>"
        elif hops < len(chain):
            name, arguments = chain[hops]
        else:
            return f"<answer>{answer}</answer>"
        call = f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"
        return call + "\n" + call if self.parallel else call

    def generate(self, requests, params):
        self.requests += len(requests)
        return [[Generation(self.reply(r.messages, r.tools), [], [], "stop")] for r in requests]


def _run(engine, out_dir: Path, modes=("direct", "mandatory", "free"), compat="ftrl", max_turns=9, samples=None):
    return toolhop.evaluate_toolhop(
        engine, samples or load_samples(HF_FILE), out_dir, modes=list(modes), templates=load_prompts(None, modes),
        params=SamplingParams(temperature=0.0, max_new_tokens=64), parser=get_parser("qwen", "ftrl"),
        execute=EXECUTE, max_turns=max_turns, compat=compat, batch_size=2)


def test_protocols_metrics_and_resume(tmp_path) -> None:
    questions = list(CHAINS)
    engine = ChainEngine(wrong=[questions[1]], loop=[questions[2]], direct_right=[questions[0]])
    metrics = _run(engine, tmp_path)
    # Direct: 1/5 right; Mandatory and Free: one wrong answer, one out of turns (failed) -> 3/5
    assert metrics["toolhop/Direct/ac"] == pytest.approx(0.2)
    assert metrics["toolhop/Mandatory/ac"] == metrics["toolhop/Free/ac"] == pytest.approx(0.6)
    assert metrics["toolhop/ac"] == pytest.approx((0.2 + 0.6 + 0.6) / 3)
    assert metrics["toolhop/ac_no_think"] == metrics["toolhop/ac"]
    assert (metrics["toolhop/n"], metrics["toolhop/failed"]) == (15.0, 2.0)
    assert (metrics["toolhop/Free/n"], metrics["toolhop/Free/failed"], metrics["toolhop/Direct/failed"]) == (5, 1, 0)
    rows = [json.loads(line) for line in (tmp_path / "toolhop_free.jsonl").read_text().splitlines()]
    by_question = {row["messages"][0]["content"].split("Question: ")[-1]: row for row in rows}
    looped = by_question[questions[2]]
    assert looped["turns"] == 9 and looped["failed"] and looped["messages"][-1]["role"] == "tool"
    chained = by_question[questions[4]]
    assert chained["turns"] == 3 and chained["calls"] == 2 and chained["metrics"]["ac"] == 1.0
    mandatory = (tmp_path / "toolhop_mandatory.jsonl").read_text()
    assert "every step" in mandatory and "every step" not in (tmp_path / "toolhop_free.jsonl").read_text()
    # direct requests: 5; tool modes: (3 + 2 + 9 + 3 + 3) turns each
    assert engine.requests == 5 + 2 * (3 + 2 + 9 + 3 + 3)
    # resume: nothing is generated again and the metrics are the same
    again = ChainEngine()
    assert _run(again, tmp_path) == metrics and again.requests == 0


def test_a_killed_evaluation_resumes_per_question(tmp_path) -> None:
    first = _run(ChainEngine(), tmp_path, modes=("direct", "free"))
    for name in ("toolhop_direct", "toolhop_free"):  # lose the last finished question of each mode
        for path in (tmp_path / f"{name}.jsonl", tmp_path / f"{name}.progress.jsonl"):
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("".join(lines[:-1]))
    engine = ChainEngine()
    assert _run(engine, tmp_path, modes=("direct", "free")) == first
    last = list(CHAINS)[-1]
    assert engine.requests == 1 + len(CHAINS[last]) + 1  # that question again, nothing else
    rows = (tmp_path / "toolhop_free.jsonl").read_text().splitlines()
    assert len(rows) == 5 and json.loads(rows[-1])["messages"][0]["content"].endswith(last)


def test_reasoning_mode_scores_thoughts_under_ftrl_and_records_the_stripped_ac(tmp_path) -> None:
    ftrl = _run(ChainEngine(think=True), tmp_path / "ftrl", modes=("direct",))
    official = _run(ChainEngine(think=True), tmp_path / "official", modes=("direct",), compat="official")
    assert (ftrl["toolhop/Direct/ac"], ftrl["toolhop/Direct/ac_no_think"]) == (1.0, 0.0)
    assert (official["toolhop/Direct/ac"], official["toolhop/Direct/ac_no_think"]) == (0.0, 0.0)


def test_all_calls_of_a_turn_run_and_the_official_mode(tmp_path) -> None:
    engine = ChainEngine(parallel=True)
    metrics = _run(engine, tmp_path, modes=("free",), compat="official", max_turns=4)
    rows = [json.loads(line) for line in (tmp_path / "toolhop_free.jsonl").read_text().splitlines()]
    assert all(row["calls"] == 2 * (row["turns"] - 1) for row in rows if not row["failed"])
    assert sum(row["failed"] for row in rows) == 0
    assert metrics["toolhop/Free/ac"] == metrics["toolhop/ac"] == 1.0
    assert set(metrics) == {"toolhop/Free/ac", "toolhop/Free/ac_no_think", "toolhop/Free/n", "toolhop/Free/failed",
                            "toolhop/ac", "toolhop/ac_no_think", "toolhop/n", "toolhop/failed"}


# ------------------------------------------------------------------------ end to end (OpenAI API)
def _api_responder(right_direct: str):
    """An OpenAI-compatible model: follows the gold chain with structured tool calls, then answers."""
    answers = {s["question"]: s["answer"] for s in load_samples(HF_FILE)}
    lock = threading.Lock()

    def respond(body: dict) -> Reply:
        messages = body["messages"]
        question = next(q for q in CHAINS if q in messages[0]["content"])
        if not body.get("tools"):
            with lock:
                return Reply(200, completion(f"<answer>{answers[question] if question == right_direct else 'x'}"
                                             "</answer>"))
        hops = sum(m["role"] == "assistant" for m in messages)
        chain = CHAINS[question]
        if hops < len(chain):
            name, arguments = chain[hops]
            return Reply(200, completion(None, [{"id": f"call_{hops}", "type": "function",
                                                 "function": {"name": name, "arguments": json.dumps(arguments)}}]))
        return Reply(200, completion(f"The answer is <answer>{answers[question]}</answer>"))

    return respond


def test_end_to_end_through_the_openai_engine_and_the_eval_stage(tmp_path) -> None:
    from ftrl.config import RunConfig
    from ftrl.pipeline import run_pipeline

    right = list(CHAINS)[3]
    with StubServer(_api_responder(right)) as server:
        cfg = RunConfig()
        cfg.run_dir = str(tmp_path / "run")
        cfg.stages = ["eval"]
        cfg.model.engine, cfg.model.name, cfg.model.path = "openai", "api", "stub-model"
        cfg.model.api.base_url, cfg.model.api.api_key_env = server.base_url, ""
        cfg.eval.benchmarks = ["toolhop"]
        cfg.eval.data_dir = str(FIXTURES)
        cfg.eval.max_samples = 4
        cfg.validate()
        summary = run_pipeline(cfg)
        requests = len(server.requests)
    metrics = summary["evals"][0]["metrics"]
    assert metrics["toolhop/Direct/ac"] == 0.25
    assert metrics["toolhop/Mandatory/ac"] == metrics["toolhop/Free/ac"] == 1.0
    assert metrics["toolhop/ac"] == pytest.approx(0.75)
    assert (metrics["toolhop/n"], metrics["toolhop/failed"]) == (12.0, 0.0)
    # 4 direct requests; each tool mode: hops + 1 turns per question (2, 2, 3, 2 hops)
    assert requests == 4 + 2 * (3 + 3 + 4 + 3)
    saved = json.loads((tmp_path / "run" / "eval" / "base" / "metrics.json").read_text())
    assert saved == metrics
    rows = (tmp_path / "run" / "eval" / "base" / "toolhop_mandatory.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert "Mirela Ostrova" in first["messages"][2]["content"]
