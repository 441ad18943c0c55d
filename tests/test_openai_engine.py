"""OpenAIEngine against a local OpenAI-compatible server (real HTTP on 127.0.0.1).

Retries and backoff on 429/5xx (delays recorded, not slept), timeouts, the concurrency cap, token
and cost accounting, tool-call replies parsed into the reference message shape, the API key read
from the named environment variable, and the registry wiring (``model.engine=openai``).

    OMP_NUM_THREADS=1 python -m pytest tests/test_openai_engine.py -q
"""

from __future__ import annotations

import json
import logging
import re
import threading

import pytest
from openai_stub import Reply, StubServer, completion

from ftrl.config import RunConfig
from ftrl.llm.engines.base import ChatRequest, SamplingParams
from ftrl.llm.engines.openai import APIError, MissingAPIKeyError, OpenAIEngine, to_wire_messages

USER = [{"role": "user", "content": "hi"}]


def _engine(server: StubServer, **kwargs) -> tuple[OpenAIEngine, list[float]]:
    delays: list[float] = []
    options = {"api_key": "", "max_retries": 3, "timeout_s": 5.0, "backoff_base_s": 0.25, **kwargs}
    return OpenAIEngine("stub-model", server.base_url, sleep=delays.append, **options), delays


def _scripted(replies: list[Reply]):
    queue = list(replies)
    lock = threading.Lock()

    def respond(body: dict) -> Reply:
        with lock:
            return queue.pop(0) if len(queue) > 1 else queue[0]

    return respond


def test_retries_429_and_500_with_exponential_backoff_or_retry_after() -> None:
    replies = [
        Reply(429, {"error": {"message": "slow down"}}),
        Reply(500, {"error": {"message": "boom"}}),
        Reply(503, {"error": {"message": "busy"}}, headers={"Retry-After": "0.75"}),
        Reply(200, completion("done")),
    ]
    with StubServer(_scripted(replies)) as server:
        engine, delays = _engine(server)
        [result] = engine.chat(USER)
    assert result.text == "done"
    assert delays == [0.25, 0.5, 0.75]  # base * 2**attempt, then the server's Retry-After
    usage = engine.usage
    assert (usage.attempts, usage.retries, usage.requests) == (4, 3, 1)
    assert len(server.requests) == 4


def test_backoff_is_capped_and_retries_are_bounded() -> None:
    with StubServer(lambda body: Reply(502, {"error": {"message": "bad gateway"}})) as server:
        engine, delays = _engine(server, max_retries=4, backoff_base_s=1.0, backoff_max_s=3.0)
        with pytest.raises(APIError, match="failed after 5 attempts: HTTP 502") as error:
            engine.chat(USER)
    assert error.value.status == 502 and error.value.retryable
    assert delays == [1.0, 2.0, 3.0, 3.0]
    assert len(server.requests) == 5 and engine.usage.requests == 0


def test_client_errors_are_not_retried() -> None:
    with StubServer(lambda body: Reply(400, {"error": {"message": "unknown model"}})) as server:
        engine, delays = _engine(server)
        with pytest.raises(APIError, match="refused the request: HTTP 400.*unknown model") as error:
            engine.chat(USER)
    assert error.value.status == 400 and not error.value.retryable
    assert delays == [] and len(server.requests) == 1


def test_a_timed_out_request_is_retried() -> None:
    replies = [Reply(200, completion("late"), delay_s=0.6), Reply(200, completion("on time"))]
    with StubServer(_scripted(replies)) as server:
        engine, delays = _engine(server, timeout_s=0.15, max_retries=2)
        [result] = engine.chat(USER)
    assert result.text == "on time"
    assert delays == [0.25] and engine.usage.retries == 1


def test_timeouts_exhaust_retries_with_a_clear_error() -> None:
    with StubServer(lambda body: Reply(200, completion("late"), delay_s=0.4)) as server:
        engine, _ = _engine(server, timeout_s=0.1, max_retries=1)
        with pytest.raises(APIError, match="failed after 2 attempts: timed out after 0.1 s"):
            engine.chat(USER)


def test_concurrency_cap_holds_across_threads() -> None:
    with StubServer(lambda body: Reply(200, completion("ok"), delay_s=0.05)) as server:
        engine, _ = _engine(server, concurrency=2)
        requests = [ChatRequest(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(8)]
        results = engine.generate(requests, SamplingParams(max_new_tokens=8))
    assert [r[0].text for r in results] == ["ok"] * 8
    assert server.max_in_flight == 2
    assert [
        body["messages"][0]["content"]
        for body in sorted(server.requests, key=lambda b: b["messages"][0]["content"])
    ] == [f"q{i}" for i in range(8)]


def test_tokens_and_cost_are_accounted() -> None:
    with StubServer(
        lambda body: Reply(200, completion("x", prompt_tokens=1000, completion_tokens=500))
    ) as server:
        engine, _ = _engine(server, price_per_mtok_in=2.0, price_per_mtok_out=8.0)
        for _ in range(3):
            engine.chat(USER)
    usage = engine.usage
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (3, 3000, 1500)
    assert usage.cost_usd == pytest.approx(3 * (1000 * 2.0 + 500 * 8.0) / 1e6)  # 0.018 USD


def test_tool_call_replies_become_reference_messages() -> None:
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}},
    ]
    with StubServer(lambda body: Reply(200, completion(None, calls, finish_reason="tool_calls"))) as server:
        engine, _ = _engine(server)
        history = [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    }
                ],
            },
            {"role": "tool", "content": "cold", "tool_call_id": "c0"},
        ]
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        [[generation]] = engine.generate(
            [ChatRequest(history, tools)], SamplingParams(temperature=0.0, max_new_tokens=64, seed=7)
        )
    assert generation.message == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
            },
        ],
    }
    assert generation.finish_reason == "stop" and generation.token_ids == []
    assert generation.text == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    )
    sent = server.requests[0]
    assert sent["model"] == "stub-model" and sent["max_tokens"] == 64 and sent["seed"] == 7 and sent["n"] == 1
    assert sent["tools"] == tools
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    assert sent["messages"][2] == {"role": "tool", "content": "cold", "tool_call_id": "c0"}


def test_length_finish_and_servers_that_ignore_n() -> None:
    with StubServer(lambda body: Reply(200, completion("cut", finish_reason="length"))) as server:
        engine, _ = _engine(server)
        [generations] = engine.generate([ChatRequest(USER)], SamplingParams(n=3, max_new_tokens=4))
    assert [g.finish_reason for g in generations] == ["length"] * 3
    assert [body["n"] for body in server.requests] == [3, 2, 1]


def test_api_key_comes_from_the_named_environment_variable(monkeypatch) -> None:
    monkeypatch.delenv("FTRL_TEST_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="FTRL_TEST_KEY is not set.*api_key_env=''"):
        OpenAIEngine("m", "http://127.0.0.1:9/v1", api_key_env="FTRL_TEST_KEY")
    monkeypatch.setenv("FTRL_TEST_KEY", "sk-test-123")
    with StubServer(lambda body: Reply(200, completion("ok"))) as server:
        OpenAIEngine("m", server.base_url, api_key_env="FTRL_TEST_KEY").chat(USER)
        OpenAIEngine("m", server.base_url, api_key_env="").chat(USER)
    assert server.headers[0]["Authorization"] == "Bearer sk-test-123"
    assert "Authorization" not in server.headers[1]


def test_model_engine_openai_builds_from_the_run_config(monkeypatch) -> None:
    from ftrl.llm.engines import build_engine

    monkeypatch.setenv("FTRL_TEST_KEY", "k")
    cfg = RunConfig()
    cfg.model.engine, cfg.model.name, cfg.model.path = "openai", "api", "served-model"
    cfg.model.api.base_url, cfg.model.api.api_key_env, cfg.model.api.concurrency = (
        "http://h:1/v1",
        "FTRL_TEST_KEY",
        3,
    )
    cfg.validate()
    engine = build_engine(cfg, cfg.model.path, batch_size=4)
    assert isinstance(engine, OpenAIEngine)
    assert (engine.model, engine.base_url, engine.concurrency, engine.api_key) == (
        "served-model",
        "http://h:1/v1",
        3,
        "k",
    )
    rendered = json.loads(engine.render(ChatRequest(USER)))
    assert rendered == {"model": "served-model", "messages": USER}


def test_wire_messages_reject_unknown_roles() -> None:
    with pytest.raises(ValueError, match=r"messages\[0\]: role 'bot'"):
        to_wire_messages([{"role": "bot", "content": "x"}])


def _dead_endpoint() -> str:
    """A local URL nothing listens on: every request fails with a refused connection."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _engine_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ftrl.llm.engines.openai" and r.levelno >= logging.WARNING]


def test_a_dead_endpoint_is_reported_once_with_the_schedule_then_summarised(caplog) -> None:
    """45 concurrent requests to an endpoint that refuses connections: two lines, not one per request."""
    delays: list[float] = []
    engine = OpenAIEngine("stub-model", _dead_endpoint(), api_key="", concurrency=45, max_retries=5,
                          timeout_s=5.0, sleep=delays.append)
    requests = [ChatRequest(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(45)]
    with caplog.at_level(logging.DEBUG, logger="ftrl.llm.engines.openai"), \
            pytest.raises(APIError, match="failed after 6 attempts: connection failed"):
        engine.generate(requests, SamplingParams(max_new_tokens=8))
    warnings = _engine_warnings(caplog)
    assert len(warnings) == 2, warnings
    first, summary = warnings
    assert "connection failed" in first
    assert "retrying each request: 5 retries after 1, 2, 4, 8, 16 s (31 s in all" in first
    assert "counted, not logged one by one; a summary follows" in first
    # The batch stops at its first error; requests not started by then are cancelled, so up to 45 ran.
    counts = re.search(r"still failing: (\d+) failed attempts by (\d+) requests over [\d.]+ s, (\d+) requests given "
                       r"up; last error: connection failed", summary)
    assert counts, summary
    attempts, requests_run, given_up = map(int, counts.groups())
    assert attempts == 6 * requests_run and given_up == requests_run and 1 <= requests_run <= 45
    assert len(delays) == 5 * requests_run == engine.usage.retries


def test_requests_outside_a_batch_and_a_recovery_are_summarised(caplog) -> None:
    engine = OpenAIEngine("stub-model", _dead_endpoint(), api_key="", max_retries=1, sleep=lambda s: None)
    with caplog.at_level(logging.INFO, logger="ftrl.llm.engines.openai"):
        for _ in range(3):  # the environment builder calls chat() from its own threads
            with pytest.raises(APIError):
                engine.chat(USER)
        engine.close()
    warnings = _engine_warnings(caplog)
    assert len(warnings) == 3, warnings  # the first failure, the first give-up, the close
    assert "1 retries after 1 s" in warnings[0]
    assert "2 failed attempts by 1 requests" in warnings[1] and "1 requests given up" in warnings[1]
    assert "6 failed attempts by 3 requests" in warnings[2] and "3 requests given up" in warnings[2]

    caplog.clear()
    replies = [Reply(503, {"error": {"message": "busy"}}), Reply(503, {"error": {"message": "busy"}}),
               Reply(200, completion("back"))]
    with StubServer(_scripted(replies)) as server, caplog.at_level(logging.INFO, logger="ftrl.llm.engines.openai"):
        engine, delays = _engine(server)
        [result] = engine.chat(USER)
    assert result.text == "back" and delays == [0.25, 0.5]
    assert len(_engine_warnings(caplog)) == 1
    [recovered] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "answering again; 2 failed attempts by 1 requests" in recovered
