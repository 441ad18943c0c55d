"""tau-bench evaluation: the pure scorer on the shared data (gold replay of all 165 tasks), each compat
difference with both values, Pass^k, the batched protocol with a scripted user (resume included), and
one run end to end through the OpenAI-compatible engine against a local stub server.

    python -m pytest tests/test_eval_taubench.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ftrl.envs import sandbox as sandbox_module
from ftrl.envs.executor import StatefulExecutor
from ftrl.envs.taubench import load_domain
from ftrl.eval import taubench as tb
from ftrl.llm.engines.base import Generation, SamplingParams
from ftrl.llm.parsers import get_parser
from ftrl.types import is_tool_error, make_tool_call

DATA = Path(os.environ.get("FTRL_DATA_DIR", "")) / "tau-bench"
pytestmark = pytest.mark.skipif(not (DATA / "tasks.jsonl").is_file(), reason="no tau-bench data (FTRL_DATA_DIR)")
READ_ONLY = ("get_", "find_", "search_", "calculate", "list_", "transfer_", "think")


@pytest.fixture(scope="module")
def tasks() -> list[dict]:
    return [json.loads(line) for line in (DATA / "tasks.jsonl").read_text().splitlines()]


def _call(action: dict, call_id: str) -> dict:
    return make_tool_call(action["function"]["name"], action["function"]["arguments"], call_id)


def gold_conversation(task: dict, drop: int | None = None, outputs_in_call: bool = False) -> list[dict]:
    """The gold actions as the agent's calls, the outputs said in an answer, then the user stops (or the
    terminate tool, where the task has it, ends the episode as tau-bench's agent would)."""
    messages = [{"role": "system", "content": "policy"}, {"role": "user", "content": "Hi, I need help."}]
    terminate = None
    for index, action in enumerate(task["actions"]):
        if index == drop:
            continue
        if action["function"]["name"] == "transfer_to_human_agents":
            terminate = action
            continue
        messages += [{"role": "assistant", "content": "", "tool_calls": [_call(action, f"c{index}")]},
                     {"role": "tool", "content": "(output)", "tool_call_id": f"c{index}"}]
    said = "Done: " + " ; ".join(task["outputs"])
    if outputs_in_call:  # the answer is the content of a message that also calls a (read-only) tool
        call = make_tool_call("calculate", {"expression": "1 + 1"}, "say")
        messages += [{"role": "assistant", "content": said, "tool_calls": [call]},
                     {"role": "tool", "content": "2", "tool_call_id": "say"}]
    else:
        messages += [{"role": "assistant", "content": said, "tool_calls": None}, {"role": "user", "content": "ok"}]
    if terminate is not None:
        messages += [{"role": "assistant", "content": "", "tool_calls": [_call(terminate, "t")]},
                     {"role": "tool", "content": "Transfer successful", "tool_call_id": "t"}]
    else:
        messages += [{"role": "assistant", "content": "Anything else?", "tool_calls": None},
                     {"role": "user", "content": "No, thanks. ###STOP###"}]
    return messages


# ------------------------------------------------------------------------------------ gold replay
def test_gold_replay_scores_one_on_all_165_tasks_in_official_mode(tasks: list[dict]) -> None:
    assert len(tasks) == 165
    rewards = tb.episode_rewards([(task, gold_conversation(task)) for task in tasks], DATA, "official")
    assert rewards == [1.0] * 165
    assert tb.episode_reward(tasks[0], gold_conversation(tasks[0]), DATA, "official") == 1.0


def test_dropping_one_db_changing_action_scores_zero(tasks: list[dict]) -> None:
    """For every task with a write action that succeeds in the gold replay, leaving it out scores 0."""
    root = DATA.parent
    jobs = []
    for task in tasks:
        domain = load_domain(root, tb.task_domain(task))
        jobs.append((domain.codes, tb.gold_calls(task, "ftrl"), {"data": domain.db}))
    outputs = sandbox_module.get_sandbox().map_calls(jobs, 10.0)
    items = []
    for task, results in zip(tasks, outputs):
        writes = [i for i, (action, out) in enumerate(zip(task["actions"], results))
                  if not action["function"]["name"].startswith(READ_ONLY) and not is_tool_error(out)
                  and not out.startswith("Error")]
        if writes:
            items.append((task, gold_conversation(task, drop=writes[-1])))
    assert len(items) == 134  # 165 - 29 tasks without a succeeding write (9 without any action)
    assert tb.episode_rewards(items, DATA, "official") == [0.0] * len(items)


# ------------------------------------------------------------------------------------ compat pins
def _with_outputs(tasks: list[dict]) -> dict:
    return tasks[8]  # airline: cancel + book, outputs ['327', '1000', '1786']


def test_outputs_searched_in_answers_official_vs_call_messages_ftrl(tasks: list[dict]) -> None:
    task = _with_outputs(tasks)
    assert task["outputs"] == ["327", "1000", "1786"]
    in_answer = gold_conversation(task)
    in_call = gold_conversation(task, outputs_in_call=True)
    assert tb.episode_reward(task, in_answer, DATA, "official") == 1.0
    assert tb.episode_reward(task, in_answer, DATA, "ftrl") == 0.0
    assert tb.episode_reward(task, in_call, DATA, "official") == 0.0
    assert tb.episode_reward(task, in_call, DATA, "ftrl") == 1.0


def test_commas_are_removed_from_the_message_and_case_ignored(tasks: list[dict]) -> None:
    task = _with_outputs(tasks)
    messages = gold_conversation(task)
    messages[-4]["content"] = "REFUND 327, NEW TOTAL 1,000 AND 1,786"
    assert tb.episode_reward(task, messages, DATA, "official") == 1.0
    messages[-4]["content"] = "refund 327 and 1000 (then 1.786)"
    assert tb.episode_reward(task, messages, DATA, "official") == 0.0


def test_thinking_text_does_not_count_as_said_under_official(tasks: list[dict]) -> None:
    task = _with_outputs(tasks)
    messages = gold_conversation(task)
    messages[-4]["content"] = "<think>327 1000 1786</think>Done."
    assert tb.episode_reward(task, messages, DATA, "official") == 0.0
    call_thinking = gold_conversation(task, outputs_in_call=True)
    call_thinking[-6]["content"] = "<think>327 1000 1786</think>"
    assert tb.episode_reward(task, call_thinking, DATA, "ftrl") == 1.0  # the reference keeps it


def test_terminate_tool_ends_and_scores_under_official_only(tasks: list[dict]) -> None:
    task = tasks[13]  # airline: the only action is transfer_to_human_agents
    assert [a["function"]["name"] for a in task["actions"]] == ["transfer_to_human_agents"]
    messages = gold_conversation(task)  # ends at the transfer call, the user never says ###STOP###
    assert messages[-2]["tool_calls"][0]["function"]["name"] == "transfer_to_human_agents"
    assert tb.episode_reward(task, messages, DATA, "official") == 1.0
    assert tb.episode_reward(task, messages, DATA, "ftrl") == 0.0  # never ended: only STOP ends it
    stopped = [*messages, {"role": "assistant", "content": "bye", "tool_calls": None},
               {"role": "user", "content": "###STOP###"}]
    assert tb.episode_reward(task, stopped, DATA, "ftrl") == 1.0
    # The reference's terminate name ends an ftrl episode (it is no tool: the call fails, the DB is unchanged).
    named = [*messages, {"role": "assistant", "content": "",
                         "tool_calls": [make_tool_call("transform_to_user_agent", {}, "x")]}]
    assert tb.episode_reward(task, named, DATA, "ftrl") == 1.0
    assert tb.scored_span(named, "ftrl") == len(named)


def test_an_episode_that_never_ended_scores_zero_in_both(tasks: list[dict]) -> None:
    task = tasks[0]
    messages = gold_conversation(task)[:-1]  # the step limit came before the user stopped
    assert tb.episode_reward(task, messages, DATA, "official") == 0.0
    assert tb.episode_reward(task, messages, DATA, "ftrl") == 0.0
    opening_stop = gold_conversation(task)[:-1]
    opening_stop[1]["content"] = "###STOP###"  # a stop in the opening message does not end the episode
    assert tb.scored_span(opening_stop, "official") is None


def test_calls_after_the_end_are_not_replayed_and_only_the_first_call_counts(tasks: list[dict]) -> None:
    task = tasks[0]
    messages = gold_conversation(task)
    late = [*messages, {"role": "assistant", "content": "", "tool_calls": [_call(task["actions"][0], "late")]}]
    assert tb.episode_reward(task, late, DATA, "official") == 1.0
    doubled = gold_conversation(task)
    first = doubled[2]["tool_calls"][0]
    doubled[2]["tool_calls"] = [first, dict(first, id="again")]  # a second call in one message is ignored
    assert tb.episode_reward(task, doubled, DATA, "official") == 1.0


def test_pass_hat_k() -> None:
    assert tb.pass_hat_k(2, 4, 1) == 0.5
    assert tb.pass_hat_k(2, 4, 2) == pytest.approx(1 / 6)
    assert tb.pass_hat_k(1, 4, 2) == 0.0 and tb.pass_hat_k(4, 4, 4) == 1.0
    rows = [{"group": "airline", "task_index": 0, "reward": r, "failed": False} for r in (1.0, 1.0, 0.0)]
    rows += [{"group": "retail", "task_index": 5, "reward": r, "failed": f} for r, f in ((1.0, False), (0.0, True),
                                                                                      (0.0, False))]
    metrics = tb.summarize(rows, trials=3)
    assert metrics["taubench/airline/pass_1"] == pytest.approx(2 / 3)
    assert metrics["taubench/airline/pass_2"] == pytest.approx(1 / 3)
    assert metrics["taubench/retail/pass_1"] == pytest.approx(1 / 3)
    assert metrics["taubench/retail/pass_2"] == 0.0
    assert metrics["taubench/pass_1"] == pytest.approx(0.5)
    assert metrics["taubench/pass_3"] == 0.0
    assert (metrics["taubench/n"], metrics["taubench/failed"], metrics["taubench/episodes"]) == (2.0, 1.0, 6.0)


# ------------------------------------------------------------------------------------ protocol
class GoldAgent:
    """Plays each task's gold actions (found by the opening user line), then says its outputs."""

    def __init__(self, tasks: list[dict], terminate_first: bool = False) -> None:
        self.by_opening = {f"task {i}": task for i, task in enumerate(tasks)}
        self.requests = 0
        self.terminate_first = terminate_first

    def generate(self, requests, params):
        out = []
        for request in requests:
            self.requests += 1
            task = self.by_opening[request.messages[1]["content"]]
            done = sum(1 for m in request.messages if m["role"] == "tool")
            actions = task["actions"]
            if self.terminate_first and done == 0:
                call = make_tool_call("transfer_to_human_agents", {"summary": "help"}, "t0")
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
            elif done < len(actions):
                message = {"role": "assistant", "content": "",
                           "tool_calls": [_call(actions[done], f"a{done}"), _call(actions[done], "extra")]}
            else:
                message = {"role": "assistant", "content": "Done: " + " ; ".join(task["outputs"]), "tool_calls": None}
            out.append([Generation("", [], [], "stop", message=message)])
        return out


class OpeningUser(tb.ScriptedUser):
    """Answers the greeting with the task's id (so the agent knows the task), then follows the script."""

    def generate(self, requests, params):
        out = super().generate(requests, params)
        for request, outputs in zip(requests, out):
            if sum(1 for m in request.messages if m["role"] == "assistant") == 0:
                opening = request.messages[0]["content"].split("TASK=")[1].split("\n")[0]
                outputs[0] = Generation(opening, [], [], "stop")
        return out


def _play(tmp_path: Path, tasks: list[dict], indices: list[int], agent, compat: str, max_steps: int = 30,
          lines=()) -> list[dict]:
    """Play tasks[i] for i in ``indices``; the user's opening line is "task <i>" (so the agent finds its task)."""
    chosen = [{**tasks[i], "task_index": i, "domain": tb.task_domain(tasks[i]),
               "instruction": tasks[i]["instruction"] + f"\nTASK=task {i}"} for i in indices]
    rows = tb.run_taubench(
        agent, OpeningUser(list(lines)), tb.task_samples(chosen, trials=1), tmp_path / "taubench.jsonl",
        data_dir=DATA, compat=compat, params=SamplingParams(temperature=0), user_params=SamplingParams(temperature=0),
        parser=get_parser("qwen"), execute=StatefulExecutor(timeout=10.0, data_dir=DATA.parent),
        max_steps=max_steps, batch_size=4, user_template="Instruction: {instruction}",
    )
    return sorted(rows, key=lambda row: row["index"])


def test_batched_episodes_with_a_scripted_user_score_and_resume(tmp_path: Path, tasks: list[dict]) -> None:
    indices = [0, 2, 8, 50, 51, 53]  # airline and retail, with and without outputs; 6 episodes, 4 at a time
    agent = GoldAgent(tasks)
    rows = _play(tmp_path, tasks, indices, agent, "official")
    assert [row["reward"] for row in rows] == [1.0] * 6
    assert [row["end"] for row in rows] == ["stop"] * 6
    first = rows[0]
    assert first["messages"][0]["content"] == load_domain(DATA.parent, "airline").wiki
    assert first["user_messages"][1] == {"role": "user", "content": tb.GREETING}
    assert first["messages"][1] == {"role": "user", "content": "task 0"}
    assert all(len(m["tool_calls"]) == 1 for m in first["messages"] if m.get("tool_calls"))  # one_tool_only
    assert first["steps"] == len(tasks[0]["actions"]) + 1
    assert tb.summarize(rows, 1)["taubench/pass_1"] == 1.0
    # Resume: a second run plays nothing and returns the same rows.
    before = agent.requests
    again = _play(tmp_path, tasks, indices, agent, "official")
    assert agent.requests == before and [r["id"] for r in again] == [r["id"] for r in rows]


def test_terminate_and_step_limit_in_the_protocol(tmp_path: Path, tasks: list[dict]) -> None:
    official = _play(tmp_path / "o", tasks, [13], GoldAgent(tasks, terminate_first=True), "official")
    assert (official[0]["end"], official[0]["steps"], official[0]["reward"]) == ("terminate", 1, 1.0)
    # ftrl: transfer_to_human_agents does not end the episode; the agent answers, the user stops.
    ftrl = _play(tmp_path / "f", tasks, [13], GoldAgent(tasks, terminate_first=True), "ftrl")
    assert (ftrl[0]["end"], ftrl[0]["reward"]) == ("stop", 1.0)
    limited = _play(tmp_path / "l", tasks, [2], GoldAgent(tasks), "official", max_steps=3)
    assert (limited[0]["end"], limited[0]["steps"], limited[0]["reward"]) == ("max_steps", 3, 0.0)


def test_user_prompt_is_our_own_data_file_with_the_placeholder() -> None:
    template = tb.load_user_template(None)
    assert "{instruction}" in template and "###STOP###" in template
    assert tb.user_prompt("Fly to Paris.", template).count("Fly to Paris.") == 1
    reply = tb.ScriptedUser(["first", "second"]).generate
    one = reply([tb.ChatRequest([{"role": "user", "content": tb.GREETING}])], SamplingParams())[0][0].text
    three = reply([tb.ChatRequest([{"role": "assistant", "content": "x"}] * 2)], SamplingParams())[0][0].text
    assert (one, three) == ("first", "###STOP###")


# ------------------------------------------------------------------------------------ end to end
def test_end_to_end_through_the_openai_engine_with_a_scripted_user(tmp_path: Path, tasks: list[dict]) -> None:
    """``python -m ftrl.run stages=[eval] eval.benchmarks=[taubench] model=api`` against a stub server that
    plays the first task of each domain perfectly (airline) or makes one wrong booking (retail)."""
    from hydra import compose, initialize_config_dir
    from openai_stub import Reply, StubServer, completion

    import ftrl.run  # noqa: F401  (registers the config resolvers)
    from ftrl.config import load_run_config
    from ftrl.pipeline import run_pipeline

    airline, retail = tasks[0], tasks[50]
    wikis = {load_domain(DATA.parent, "airline").wiki: airline, load_domain(DATA.parent, "retail").wiki: retail}

    def respond(body: dict) -> Reply:
        messages = body["messages"]
        task = wikis[messages[0]["content"]]
        assert body["tools"] and messages[1] == {"role": "user", "content": "I need to sort something out."}
        done = sum(1 for m in messages if m["role"] == "tool")
        if done < len(task["actions"]):
            function = dict(task["actions"][done]["function"])
            if task is retail and done == len(task["actions"]) - 1:
                function["arguments"] = function["arguments"].replace('"payment_method_id": "', '"payment_method_id": "x')
            call = {"id": f"call_{done}", "type": "function", "function": function}
            return Reply(body=completion(None, [call]))
        return Reply(body=completion("All done."))

    with StubServer(respond) as server:
        root = Path(__file__).resolve().parent.parent
        overrides = [f"run_dir={tmp_path / 'run'}", "model=api", "model.path=stub-model",
                     f"model.api.base_url={server.base_url}", "model.api.api_key_env=''", "stages=[eval]",
                     "eval.benchmarks=[taubench]", f"eval.data_dir={DATA.parent}", "eval.max_samples=1",
                     "eval.compat=official"]
        with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
            cfg = load_run_config(compose(config_name="config", overrides=overrides))
        cfg.eval.taubench.user.engine = "script"
        cfg.eval.taubench.user.script = ["I need to sort something out."]
        run_pipeline(cfg)
        requests = len(server.requests)
    run = tmp_path / "run"
    metrics_files = list((run / "eval").glob("*/metrics.json"))
    assert len(metrics_files) == 1
    metrics = json.loads(metrics_files[0].read_text())
    assert metrics["taubench/airline/pass_1"] == 1.0
    assert metrics["taubench/retail/pass_1"] == 0.0  # the exchange was charged to a payment method that fails
    assert metrics["taubench/pass_1"] == 0.5
    assert (metrics["taubench/n"], metrics["taubench/failed"]) == (2.0, 0.0)
    assert requests == len(airline["actions"]) + 1 + len(retail["actions"]) + 1
    rows = [json.loads(line) for line in (metrics_files[0].parent / "taubench.jsonl").read_text().splitlines()]
    assert sorted(row["end"] for row in rows) == ["stop", "stop"]


def test_an_empty_user_reply_fails_the_episode(tmp_path: Path, tasks: list[dict]) -> None:
    class SilentUser:
        def generate(self, requests, params):
            return [[Generation("<think>hmm</think>", [], [], "stop")] for _ in requests]

    chosen = [{**tasks[0], "task_index": 0, "domain": "airline"}]
    rows = tb.run_taubench(
        GoldAgent(tasks), SilentUser(), tb.task_samples(chosen, trials=2), tmp_path / "t.jsonl", data_dir=DATA,
        compat="ftrl", params=SamplingParams(temperature=0), user_params=SamplingParams(temperature=0),
        parser=get_parser("qwen"), execute=StatefulExecutor(timeout=10.0, data_dir=DATA.parent))
    assert [(row["end"], row["failed"], row["reward"], row["trial"]) for row in rows] == [
        ("failed", True, 0.0, 0), ("failed", True, 0.0, 1)]
    metrics = tb.summarize(rows, trials=2)
    assert (metrics["taubench/airline/pass_1"], metrics["taubench/airline/pass_2"]) == (0.0, 0.0)
    assert (metrics["taubench/n"], metrics["taubench/failed"], metrics["taubench/episodes"]) == (1.0, 1.0, 2.0)


def test_missing_data_names_the_benchmark_path_and_key(tmp_path: Path) -> None:
    from ftrl.artifacts import RunDir
    from ftrl.config import RunConfig
    from ftrl.errors import MissingInputError
    from ftrl.run_state import RunContext

    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    cfg.eval.data_dir = str(tmp_path)
    with pytest.raises(MissingInputError, match=r"taubench: no folder '.*tau-bench' \(from eval.data_dir="):
        tb.evaluate(RunContext(cfg=cfg, run_dir=RunDir(cfg.run_dir)), engine=None, checkpoint="base")
    (tmp_path / "tau-bench").mkdir()
    with pytest.raises(MissingInputError, match=r"taubench: no such file .*tasks.jsonl"):
        tb.load_tasks(tmp_path / "tau-bench")
    with pytest.raises(MissingInputError, match="eval.taubench.user.prompt_file"):
        tb.load_user_template(str(tmp_path / "nope.txt"))
