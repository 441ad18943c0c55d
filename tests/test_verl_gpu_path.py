"""The verl path's first GPU start (issue 13), checked on CPU.

Stateful (tau-bench) rows keep their state through the verl reward path; a resumed round keeps the
metrics of the steps before the kill; an empty generation in the agent loop is handled; a missing
transfer_queue (or vLLM) fails before verl starts; attention, vLLM context and FSDP choices reach verl.

    OMP_NUM_THREADS=1 python -m pytest tests/test_verl_gpu_path.py -q
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ftrl.config import TauBenchConfig
from ftrl.reward import score_response
from ftrl.train import verl_backend as vb
from ftrl.train.verl_reward import compute_score, sample_from_extra_info

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _call(call_id: str, name: str, **arguments: Any) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _text(calls: list[dict]) -> str:
    return "".join("<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]}) + "\n</tool_call>"
                   for c in calls) + "<|im_end|>"


@pytest.mark.skipif(not (DATA / "tau-bench").is_dir(), reason="tau-bench data not present")
def test_stateful_row_scores_through_verl_like_the_native_reward(monkeypatch: pytest.MonkeyPatch) -> None:
    from ftrl.envs.executor import StatefulExecutor, TurnContext
    from ftrl.envs.taubench import build_taubench_envs
    from ftrl.reward import apply_tool_results

    monkeypatch.setenv("FTRL_DATA_DIR", str(DATA))
    records, _ = build_taubench_envs(TauBenchConfig(data_dir=str(DATA), domains=["retail"], max_tasks=3,
                                                    test_fraction=0.0))
    record = next(r for r in records["train"] if len(json.loads(r["gold_calls"])) >= 2)
    turns = json.loads(record["gold_calls"])
    # The snapshot after the first gold turn: its history is what the state replay rebuilds.
    first = [_call(f"c0_{i}", c["name"], **c["arguments"]) for i, c in enumerate(turns[0])]
    outputs = StatefulExecutor(data_dir=str(DATA))([(json.loads(record["codes"]), first,
                                                     TurnContext(record, list(record["messages"])))])[0]
    unsolved = json.loads(record["unsolved_set"])
    apply_tool_results(first, outputs, unsolved)
    snapshot = {**record, "unsolved_set": json.dumps(unsolved),
                "messages": list(record["messages"]) + [{"role": "assistant", "content": "", "tool_calls": first}]
                + [{"role": "tool", "content": o, "tool_call_id": c["id"]} for c, o in zip(first, outputs)]}
    response = _text(turns[1])

    row = vb.verl_row(snapshot, 0)
    assert row["extra_info"]["state"] == snapshot["state"] and row["extra_info"]["messages"]
    pq_row = json.loads(json.dumps(row))  # what the Parquet round trip gives back for these string fields
    native = score_response(response, snapshot)
    verl = compute_score(pq_row["data_source"], response, pq_row["reward_model"]["ground_truth"],
                         {**pq_row["extra_info"], vb.RESPONSE_TEXT_KEY: response})
    assert native.solved >= 1 and native.score > 0
    assert verl["score"] == native.score and verl["solved"] == native.solved
    # Before the fix the reward sample had neither state nor messages: the tools ran without a database.
    stateless = {key: value for key, value in pq_row["extra_info"].items() if key not in ("state", "messages")}
    assert score_response(response, sample_from_extra_info(stateless)).solved == 0


def test_stateless_rows_carry_no_state_and_a_missing_answer_is_refused() -> None:
    record = {"messages": [{"role": "user", "content": "q"}], "tools": "[]", "codes": "{}", "unsolved_set": "{}",
              "data_source": "s", "answer": "42"}
    row = vb.verl_row(record, 0)
    assert row["extra_info"]["state"] is None and row["extra_info"]["messages"] is None
    assert sample_from_extra_info(row["extra_info"]).keys() == {"codes", "unsolved_set", "solve_rate", "answer"}
    with pytest.raises(KeyError, match="answer"):
        vb.verl_row({k: v for k, v in record.items() if k != "answer"}, 1)
    with pytest.raises(KeyError, match="answer"):
        sample_from_extra_info({"codes": "{}", "unsolved_set": "{}"})


def test_resume_keeps_the_metrics_of_the_steps_before_the_kill(tmp_path: Path) -> None:
    files = vb.VerlRoundFiles(tmp_path)
    line = lambda step, score: json.dumps({"step": step, "data": {"critic/score/mean": score}}) + "\n"
    files.metrics.write_text(line(1, 0.1) + line(2, 0.2) + line(3, 0.3), encoding="utf-8")  # killed after 3
    vb.keep_earlier_metrics(files)  # what train_round does before verl restarts (its logger truncates)
    assert not files.metrics.exists()
    files.metrics.write_text(line(3, 0.35) + line(4, 0.4), encoding="utf-8")  # resumed from the step-2 checkpoint
    rows = vb.history_rows(files.metrics, k=1, step_offset=10, earlier_path=files.earlier_metrics)
    assert [(r["step"], r["global_step"], r["reward/score"]) for r in rows] == [
        (1, 11, 0.1), (2, 12, 0.2), (3, 13, 0.35), (4, 14, 0.4)]


def test_missing_transfer_queue_fails_before_verl_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("transfer_queue", "vllm") else real(name, *a))
    missing = vb.missing_verl_runtime(sys.executable, "vllm")
    assert set(missing) == {"transfer_queue", "vllm"} and missing["vllm"] == "vllm==0.24.0"
    cfg = SimpleNamespace(backend=SimpleNamespace(verl=SimpleNamespace(python=None, rollout_engine="vllm")))
    with pytest.raises(RuntimeError, match=r"transfer_queue.*pip install -e '\.\[gpu\]'"):
        vb.check_verl_runtime(cfg)  # type: ignore[arg-type]


def test_gpu_extra_pins_one_working_set() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text("utf-8"))
    gpu = project["project"]["optional-dependencies"]["gpu"]
    for pin in ("verl[vllm]==0.9.1", "vllm==0.24.0", "torch==2.11.0", "transformers==5.9.0", "tensordict==0.10.0"):
        assert pin in gpu, pin
    assert any(item.startswith("TransferQueue==") for item in gpu)


def test_empty_generation_is_handled_by_the_agent_loop() -> None:
    pytest.importorskip("verl")
    from ftrl.train.verl_agent_loop import FTRLStepAgentLoop

    class Server:
        async def generate(self, **kwargs: Any) -> Any:
            return SimpleNamespace(token_ids=[], log_probs=[], num_preempted=None, stop_reason="aborted",
                                   extra_fields={})

    loop = FTRLStepAgentLoop.__new__(FTRLStepAgentLoop)
    loop.response_length = 8
    loop.server_manager = Server()
    loop.tokenizer = SimpleNamespace(eos_token_id=7, pad_token_id=0, decode=lambda ids, **kw: "")

    async def tokens(messages: Any, tools: Any = None) -> list[int]:
        return [1, 2, 3]

    loop.ct_build_initial_tokens = tokens  # type: ignore[method-assign]
    raw = [{"role": "user", "content": "hi"}]
    out = asyncio.run(loop.run({"temperature": 1.0}, raw_prompt=raw, extra_info={"tools": "[]"}))
    assert out.response_ids == [7] and out.response_mask == [0] and out.prompt_ids == [1, 2, 3]
    assert out.extra_fields[vb.RESPONSE_TEXT_KEY] == ""


def test_tool_output_cut_is_a_setting_off_under_compat_ftrl_and_counted() -> None:
    from ftrl.config import RunConfig
    from ftrl.envs.sandbox import CUT_OUTPUT_CHARS, UNCUT_OUTPUT_CHARS, Sandbox, tool_output_limit

    config = RunConfig()
    assert config.reward.compat == "ftrl" and tool_output_limit(config) == UNCUT_OUTPUT_CHARS  # the reference
    config.reward.compat = "fixed"
    assert tool_output_limit(config) == CUT_OUTPUT_CHARS
    config.reward.max_tool_output_chars = 100
    assert tool_output_limit(config) == 100
    assert vb.verl_overrides(config, "/runs/x", 1, policy="/m")[0]  # composes with the setting
    assert "+reward.custom_reward_function.reward_kwargs.max_output_chars=100" in vb.verl_overrides(
        config, "/runs/x", 1, policy="/m")

    codes = {"big": "def big(n):\n    return 'x' * n\n"}
    call = lambda n: {"id": "c", "type": "function",
                      "function": {"name": "big", "arguments": json.dumps({"n": n})}}
    box = Sandbox(workers=1, max_output_chars=100)
    try:
        short, long = box.call_tools(codes, [call(50)], 10.0)[0], box.call_tools(codes, [call(500)], 10.0)[0]
        assert short == "x" * 50 and long.startswith("x" * 100) and "truncated by the sandbox" in long
        assert box.stats["outputs_cut"] == 1
    finally:
        box.close()
