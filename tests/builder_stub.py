"""A local OpenAI-compatible server that plays the builder LLM from recorded replies, and a policy.

Builder requests (no ``tools`` field) are answered from ``fixtures/env_builder/replies.json``: the
stage is read from the first line of the prompt ("... - stage: <name>"), the entry is the one whose
``match`` occurs in the prompt, and the reply is the one for this attempt (the number of assistant
messages already in the conversation: 0 for the first request, k for the k-th repair request).

Policy requests (with ``tools``) play the gold chain of the environment whose question opens the
conversation: turn k returns the calls of gold turn k, then "The answer is <answer>.". Questions in
``refuse`` are answered at once without calls (a model that cannot solve them).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from openai_stub import Reply, StubServer, completion

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "env_builder"
SEEDS = FIXTURES / "seeds.jsonl"


def load_fixtures() -> list[dict[str, Any]]:
    return json.loads((FIXTURES / "replies.json").read_text(encoding="utf-8"))["fixtures"]


class BuilderServer(StubServer):
    def __init__(self, fixtures: list[dict[str, Any]] | None = None) -> None:
        self.fixtures = fixtures if fixtures is not None else load_fixtures()
        self.down: set[tuple[str, str]] = set()  # (stage, match) pairs answered with HTTP 503
        self.gold: dict[str, tuple[list, str]] = {}
        self.refuse: set[str] = set()
        self.stages: list[str] = []
        self._stage_lock = threading.Lock()
        super().__init__(self.respond)

    def learn(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Make the policy side know these environments' gold chains."""
        for record in records:
            question = next(m["content"] for m in record["messages"] if m["role"] == "user")
            self.gold[question] = (json.loads(record["gold_calls"]), record["answer"])

    def respond(self, body: dict[str, Any]) -> Reply:
        if body.get("tools"):
            return self.policy(body)
        prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")
        found = re.search(r"stage: (\w+)", prompt.splitlines()[0])
        stage = found.group(1) if found else "?"
        with self._stage_lock:
            self.stages.append(stage)
        matches = [f for f in self.fixtures if f["stage"] == stage and f["match"] in prompt]
        if len(matches) != 1:
            return Reply(
                400,
                {"error": {"message": f"{len(matches)} fixtures match a '{stage}' request: {prompt[:300]}"}},
            )
        if (stage, matches[0]["match"]) in self.down:
            return Reply(503, {"error": {"message": "overloaded"}})
        attempt = sum(1 for m in body["messages"] if m["role"] == "assistant")
        replies = matches[0]["replies"]
        reply = replies[min(attempt, len(replies) - 1)]
        return Reply(200, completion(reply if isinstance(reply, str) else json.dumps(reply)))

    def policy(self, body: dict[str, Any]) -> Reply:
        question = next(m["content"] for m in body["messages"] if m["role"] == "user")
        if question not in self.gold:
            return Reply(400, {"error": {"message": f"unknown environment {question!r}"}})
        turns, answer = self.gold[question]
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if question in self.refuse or turn >= len(turns):
            return Reply(
                200, completion("I do not know." if question in self.refuse else f"The answer is {answer}.")
            )
        calls = [
            {
                "id": f"call_{turn}_{i}",
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
            }
            for i, c in enumerate(turns[turn])
        ]
        return Reply(200, completion(None, calls, finish_reason="tool_calls"))
