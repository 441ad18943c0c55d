"""Turn context and the stateful tool executor: state rebuilt per turn by replaying the episode's calls.

Every stage that runs a model's tool calls (collection, the reward, evaluation, the warm start, the
environment builder's gate) goes through :class:`StatefulExecutor`: ``jobs[i]`` is ``(codes,
tool_calls)`` or ``(codes, tool_calls, TurnContext)``, and the result is one output list per job,
like ``Sandbox.map_calls``. A record without a ``state`` field is stateless and its calls go to the
sandbox as they are.

State across turns: tool functions of a stateful environment (tau-bench, ``ftrl.envs.taubench``)
receive the database as ``data`` and mutate it. Records must stay self-contained and the reward is
computed per snapshot, possibly out of order and in another process, so state is *derived, not
kept*: the executor runs a turn's calls after replaying every earlier call of the episode (read from
the history in the snapshot's messages) on a fresh copy of the database, all in one sandbox job (the
sandbox runs a job's calls in order on one worker, sharing one copy of ``extra_kwargs``). The tools
are deterministic, so the replay rebuilds exactly the state the earlier turns saw (the executor
checks the replayed outputs against the history and warns on a difference); two episodes never share
a copy, and a crashed worker loses nothing. The alternative, a per-episode session pinned to one
sandbox worker, would keep mutable state outside the records, could not score a snapshot out of
order, and would need crash recovery. The cost is re-running earlier calls (tau-bench tools are
dictionary look-ups) and sending the database to the worker once per turn (pickled, ~2-5 MB).

The record's ``state`` field (a JSON string) is ``{"family": "taubench", "domain", "db_sha256"[,
"db"]}``: the database is found by ``db_sha256`` in the data directory (and must hash the same, or
the executor refuses), or travels inside the record (``envs.taubench.embed_db=true``).

    python -m pytest tests/test_taubench_import.py tests/test_collect.py -q
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ftrl.envs import sandbox as sandbox_module
from ftrl.types import as_json_obj

log = logging.getLogger(__name__)

STATE_FIELD = "state"
FAMILY = "taubench"


@dataclass(frozen=True)
class TurnContext:
    """The episode a turn's calls belong to: its record (for ``state``) and the messages before the turn."""

    record: Mapping[str, Any]
    history: Sequence[Mapping[str, Any]]


def record_state(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The decoded ``state`` field, or None for a stateless environment."""
    if STATE_FIELD not in record or record[STATE_FIELD] in (None, ""):
        return None
    state = as_json_obj(record[STATE_FIELD])
    if not isinstance(state, dict) or state.get("family") != FAMILY:
        raise ValueError(
            f"record field '{STATE_FIELD}' must be {{'family': '{FAMILY}', 'domain', 'db_sha256'}}, "
            f"got {str(state)[:200]}"
        )
    return state


def replayed_calls(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every tool call the episode made before this turn, in order."""
    return [
        call
        for message in history
        if message.get("role") == "assistant"
        for call in (message.get("tool_calls") or [])
    ]


class DatabaseStore:
    """Initial databases by (domain, hash): from the record itself, or the data directory (verified)."""

    def __init__(self, data_dir: str | os.PathLike | None = None) -> None:
        self.data_dir = data_dir
        self._lock = threading.Lock()

    def get(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if "db" in state:
            return state["db"]
        # The loader belongs to the importer, which imports this module's state schema (hence here).
        from ftrl.envs.taubench import load_domain, resolve_data_dir

        domain = state.get("domain")
        with self._lock:
            loaded = load_domain(resolve_data_dir(self.data_dir), str(domain))
        if loaded.db_sha256 != state.get("db_sha256"):
            raise ValueError(
                f"tau-bench '{domain}': the database in the data directory hashes {loaded.db_sha256}, "
                f"but this environment was built on {state.get('db_sha256')}; point "
                "envs.taubench.data_dir / FTRL_DATA_DIR at the same data or rebuild the environments"
            )
        return loaded.db


class StatefulExecutor:
    """Runs turns of tool calls; stateful environments get their state rebuilt by replaying the history.

    ``jobs[i]`` is ``(codes, tool_calls)`` (stateless, passed to the sandbox as is) or ``(codes,
    tool_calls, TurnContext)``; a context whose record has no ``state`` is stateless too. Returns
    one output list per job, like ``Sandbox.map_calls``.
    """

    def __init__(
        self,
        sandbox: Any = None,
        timeout: float | None = None,
        data_dir: str | os.PathLike | None = None,
        check_replay: bool = True,
    ) -> None:
        self.sandbox = sandbox
        self.timeout = timeout
        self.databases = DatabaseStore(data_dir)
        self.check_replay = check_replay
        self.replay_mismatches = 0

    def __call__(self, jobs: Sequence[tuple[Any, ...]]) -> list[list[str]]:
        box = self.sandbox or sandbox_module.get_sandbox()
        prepared = []
        skips = []  # how many leading outputs of each job belong to the replay
        for index, job in enumerate(jobs):
            codes, calls = job[0], list(job[1])
            context = job[2] if len(job) > 2 else None
            if context is not None and not isinstance(context, TurnContext):
                raise TypeError(
                    f"jobs[{index}]: the third element must be a TurnContext, got {type(context).__name__}"
                )
            state = record_state(context.record) if context is not None else None
            if state is None:
                prepared.append((codes, calls))
                skips.append(0)
                continue
            replay = replayed_calls(context.history)
            prepared.append((codes, replay + calls, {"data": self.databases.get(state)}))
            skips.append(len(replay))
        results = box.map_calls(prepared, self.timeout)
        outputs = []
        for job, skip, result in zip(jobs, skips, results):
            if skip and self.check_replay:
                self._check(job[2].history, result[:skip])
            outputs.append(result[skip:])
        return outputs

    def _check(self, history: Sequence[Mapping[str, Any]], replayed: list[str]) -> None:
        recorded = {m.get("tool_call_id"): m.get("content") for m in history if m.get("role") == "tool"}
        calls = replayed_calls(history)
        for call, output in zip(calls, replayed):
            expected = recorded.get(call.get("id"))
            if expected is not None and expected != output:
                self.replay_mismatches += 1
                if self.replay_mismatches == 1:
                    log.warning(
                        "state replay: call %s returned %r now but %r in the episode; the tool is not "
                        "deterministic, so later turns may see another state",
                        call.get("function", {}).get("name"),
                        output[:120],
                        str(expected)[:120],
                    )
                return


def run_stateful_calls(
    sample: Mapping[str, Any],
    tool_calls: Sequence[Mapping[str, Any]],
    timeout: float | None = None,
    data_dir: str | os.PathLike | None = None,
) -> list[str]:
    """One turn's outputs for a snapshot record (its ``messages`` are the history): for the reward."""
    messages = as_json_obj(sample["messages"])
    codes = as_json_obj(sample["codes"])
    return StatefulExecutor(timeout=timeout, data_dir=data_dir)(
        [(codes, list(tool_calls), TurnContext(sample, messages))]
    )[0]


def executor_from_config(cfg: Any) -> StatefulExecutor:
    """The run's executor: the shared sandbox, ``reward.tool_timeout_s``, tau-bench data from the config."""
    sandbox_module.configure_sandbox(max_output_chars=sandbox_module.tool_output_limit(cfg))
    box = sandbox_module.get_sandbox(workers=cfg.resources.sandbox_workers)
    data_dir = cfg.envs.taubench.data_dir or getattr(cfg.eval, "data_dir", None)
    return StatefulExecutor(box, timeout=cfg.reward.tool_timeout_s, data_dir=data_dir)
