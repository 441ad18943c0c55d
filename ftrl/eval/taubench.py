"""tau-bench (``eval.benchmarks: [taubench]``): tool-agent episodes against a simulated user, Pass^k.

Data: ``<eval.data_dir>/tau-bench/`` in FTRL's conversion (``tasks.jsonl``: instruction, gold
``actions`` as OpenAI tool calls, expected ``outputs``, ``data_source`` ``tau-bench/<domain>``; per
domain ``tools.json``, ``codes.json``, the database tables and ``wiki.md``), loaded by
:mod:`ftrl.envs.taubench`.

Protocol (the reference ``evaluation_taubench.py`` and tau-bench's tool-calling agent): the system
prompt is the domain's wiki; the simulated user answers the agent's greeting "Hi! How can I help you
today?" and that answer opens the agent's conversation. Then at most ``eval.taubench.max_steps``
agent steps: only the first tool call of a message is kept (``one_tool_only``) and runs on the
episode's own database (state rebuilt by :class:`ftrl.envs.executor.StatefulExecutor`, in the
sandbox); a message without a call goes to the user simulator, whose reply is the next user turn.
The episode ends when the user's reply contains ``###STOP###``, when the terminate tool is called
(see below), or at the step limit. All active episodes generate together (one batched agent call,
one batched user call per round; a finished episode's slot is refilled at once), and each finished
episode is appended to ``eval/<checkpoint>/taubench.jsonl`` (resumable per task and trial).

User simulator (``eval.taubench.user``): ``engine`` openai (default: gpt-4o-2024-08-06 at temperature 0,
512 tokens, as the reference), hf or vllm (a local model), or script (``user.script`` lines, then
``###STOP###``; for tests and smoke runs). Its prompt is ``ftrl/eval/taubench_user_prompt.txt`` (or
``user.prompt_file``): our own wording with the structure of tau-bench's user prompt, not its text.

Scoring (:func:`episode_reward`, pure: task + conversation -> 0.0 or 1.0): the conversation's tool
calls are replayed on a fresh database and the gold actions on another; reward 1 iff the two
databases hash the same and every expected output occurs (lower-cased; commas removed from the
message) in the agent's messages. ``eval.compat`` picks where the reference and tau-bench differ:

=====================  =============================================  ==============================================
                       official (tau-bench)                           ftrl (the reference script)
=====================  =============================================  ==============================================
outputs searched in    agent messages without a tool call             assistant messages *with* a tool call
                       (thinking text removed)                        (content as generated)
terminate tool         ``transfer_to_human_agents`` ends the episode  ``transform_to_user_agent`` (no such tool:
                       and is scored                                  never matches; the episode goes on)
scored when            the user stopped or the terminate tool ran     the user stopped (or that never-matching call)
gold replay            skips the terminate tool                       replays every action (no effect on the DB)
=====================  =============================================  ==============================================

An episode cut off by the step limit scores 0 in both. Pass^k is tau-bench's: per task, ``C(c, k) /
C(n, k)`` over its ``n = eval.taubench.trials`` trials with ``c`` successes, averaged over the tasks
of a domain; ``taubench/pass_k`` is the mean across the domains.

    python -m ftrl.run stages=[eval] eval.benchmarks=[taubench] model=api model.path=gpt-4o-mini
    python -m ftrl.run stages=[eval] eval.benchmarks=[taubench] eval.taubench.user.engine=script \\
        eval.taubench.user.script='[I need help with my order.]' eval.max_samples=2
    python -m pytest tests/test_eval_taubench.py -q
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrl.collect import EpisodeLog
from ftrl.envs import sandbox as sandbox_module
from ftrl.envs.executor import FAMILY, STATE_FIELD, StatefulExecutor, TurnContext
from ftrl.envs.taubench import DOMAINS, TAU_SUBDIR, Domain, load_domain
from ftrl.eval.data import benchmark_dir, benchmark_file
from ftrl.eval.runner import aggregate, cap_per_group, sample_key
from ftrl.llm.engines.base import ChatRequest, Generation, SamplingParams
from ftrl.llm.parsers import split_thinking
from ftrl.progress import progress as progress_reporter
from ftrl.types import make_tool_call

log = logging.getLogger(__name__)

NAME = "taubench"
GREETING = "Hi! How can I help you today?"
STOP = "###STOP###"
# The tool that ends an episode: tau-bench's, and the name the reference checks (which no domain has).
TERMINATE_TOOL = {"official": "transfer_to_human_agents", "ftrl": "transform_to_user_agent"}
COMPAT_MODES = tuple(TERMINATE_TOOL)
USER_PROMPT_FILE = Path(__file__).with_name("taubench_user_prompt.txt")
INSTRUCTION_PLACEHOLDER = "{instruction}"

_HASH_TOOL = "_ftrl_taubench_db_hash"
# Runs in the sandbox after an episode's replayed calls and returns the digest of the database it left
# (the sandbox never sends the database back). Equal digests <=> equal databases, as tau-bench's hash.
_HASH_SOURCE = f'''def {_HASH_TOOL}(data):
    import hashlib
    import json
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
'''


def _check_compat(compat: str) -> None:
    if compat not in COMPAT_MODES:
        raise ValueError(f"taubench: compat must be one of {list(COMPAT_MODES)}, got {compat!r}")


# ------------------------------------------------------------------------------------ data
def _data_root(folder: str | Path) -> Path:
    """The directory holding ``tau-bench/`` (what :func:`ftrl.envs.taubench.load_domain` reads)."""
    folder = Path(folder).expanduser()
    if folder.name != TAU_SUBDIR or not folder.is_dir():
        raise FileNotFoundError(f"taubench: '{folder}' is not a {TAU_SUBDIR}/ folder (the one holding "
                                "tasks.jsonl and one sub-folder per domain)")
    return folder.parent


def task_domain(task: Mapping[str, Any]) -> str:
    """``airline`` or ``retail`` from the task's ``data_source`` (``tau-bench/<domain>``)."""
    domain = str(task.get("data_source", "")).rpartition("/")[2]
    if domain not in DOMAINS:
        raise ValueError(f"taubench: task data_source {task.get('data_source')!r} names no domain of {list(DOMAINS)}")
    return domain


def load_tasks(folder: str | Path, domains: Sequence[str] = DOMAINS, max_tasks: int | None = None,
               max_per_domain: int | None = None) -> list[dict[str, Any]]:
    """The tasks of ``domains`` in file order, each with ``task_index`` (its line number from 0) and ``domain``."""
    path = benchmark_file(Path(folder) / "tasks.jsonl", NAME, "eval.data_dir")
    tasks = []
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        task = json.loads(line)
        domain = task_domain(task)
        if domain in domains:
            tasks.append({**task, "task_index": index, "domain": domain})
    if max_tasks is not None:
        tasks = tasks[:max_tasks]
    return [dict(task) for task in cap_per_group(tasks, lambda task: task["domain"], max_per_domain)]


# ------------------------------------------------------------------------------------ scoring
def _first_call(message: Mapping[str, Any]) -> dict[str, Any] | None:
    calls = message.get("tool_calls") or []
    return calls[0] if calls else None


def _call_name(call: Mapping[str, Any] | None) -> str | None:
    function = call.get("function") if isinstance(call, Mapping) else None
    return function.get("name") if isinstance(function, Mapping) else None


def scored_span(messages: Sequence[Mapping[str, Any]], compat: str) -> int | None:
    """How many leading messages the episode had when it ended; None if it never ended (step limit).

    It ends at the first user turn after the opening one that contains ``###STOP###``, or (after its
    output) at the first call of the compat mode's terminate tool.
    """
    _check_compat(compat)
    opening_seen = False
    for position, message in enumerate(messages):
        role = message.get("role")
        if role == "user":
            if opening_seen and STOP in str(message.get("content") or ""):
                return position + 1
            opening_seen = True
        elif role == "assistant" and _call_name(_first_call(message)) == TERMINATE_TOOL[compat]:
            following = position + 1
            if following < len(messages) and messages[following].get("role") == "tool":
                following += 1
            return following
    return None


def episode_calls(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tool calls an episode ran: the first call of each assistant message, in order."""
    return [call for message in messages if message.get("role") == "assistant"
            for call in [_first_call(message)] if call is not None]


def gold_calls(task: Mapping[str, Any], compat: str) -> list[dict[str, Any]]:
    """The task's actions as calls to replay (tau-bench skips its terminate tool; the reference does not)."""
    calls = []
    for index, action in enumerate(task.get("actions") or []):
        function = action["function"]
        if compat == "official" and function["name"] == TERMINATE_TOOL["official"]:
            continue
        calls.append(make_tool_call(function["name"], function["arguments"], f"gold_{index}"))
    return calls


def outputs_found(task: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], compat: str) -> bool:
    """Every expected output occurs in a searched agent message (see the module docstring)."""
    _check_compat(compat)
    texts = []
    for message in messages:
        if message.get("role") != "assistant":
            continue
        content = str(message.get("content") or "")
        if compat == "official" and not message.get("tool_calls"):
            texts.append(split_thinking(content)[1].lower().replace(",", ""))
        elif compat == "ftrl" and message.get("tool_calls"):
            texts.append(content.lower().replace(",", ""))
    return all(any(str(output).lower() in text for text in texts) for output in task.get("outputs") or [])


_hash_cache: dict[tuple[str, str, str, str], str] = {}
_hash_lock = threading.Lock()
_HASH_CACHE_SIZE = 4096


def _calls_key(domain: Domain, root: Path, calls: Sequence[Mapping[str, Any]]) -> tuple[str, str, str, str]:
    # What a call does is its function (name and arguments); ids differ between gold and episode calls.
    text = json.dumps([call.get("function") for call in calls], ensure_ascii=False, sort_keys=True, default=str)
    return (str(root), domain.name, domain.db_sha256, hashlib.sha256(text.encode("utf-8")).hexdigest())


def database_hashes(jobs: Sequence[tuple[Path, Domain, Sequence[Mapping[str, Any]]]], *, sandbox: Any = None,
                    timeout: float | None = None) -> list[str]:
    """The digest of each domain's fresh database after its calls, one sandbox job per distinct sequence.

    The tools are deterministic (the executor's premise), so a call sequence's digest is cached per process.
    """
    keys = [_calls_key(domain, root, calls) for root, domain, calls in jobs]
    with _hash_lock:
        missing = {key: job for key, job in zip(keys, jobs) if key not in _hash_cache}
    if missing:
        box = sandbox or sandbox_module.get_sandbox()
        order = list(missing)
        batch = []
        for key in order:
            _, domain, calls = missing[key]
            codes = {**domain.codes, _HASH_TOOL: _HASH_SOURCE}
            batch.append((codes, [*calls, make_tool_call(_HASH_TOOL, "{}", "db_hash")], {"data": domain.db}))
        results = box.map_calls(batch, timeout)
        with _hash_lock:
            if len(_hash_cache) + len(order) > _HASH_CACHE_SIZE:
                _hash_cache.clear()
            for key, outputs in zip(order, results):
                digest = outputs[-1]
                if len(digest) != 64:  # the hash call itself failed (a worker limit): never cache it
                    raise RuntimeError(f"taubench: hashing the database after the replay failed: {digest[:300]}")
                _hash_cache[key] = digest
    with _hash_lock:
        return [_hash_cache[key] for key in keys]


def episode_rewards(items: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]],
                    data_dir: str | Path, compat: str, *, sandbox: Any = None,
                    timeout: float | None = None) -> list[float]:
    """:func:`episode_reward` of many ``(task, messages)`` at once (one batch of sandbox jobs)."""
    _check_compat(compat)
    root = _data_root(data_dir)
    plans: list[tuple[int, int, list[Mapping[str, Any]]] | None] = []
    jobs: list[tuple[Path, Domain, Sequence[Mapping[str, Any]]]] = []
    for task, messages in items:
        span = scored_span(messages, compat)
        if span is None:
            plans.append(None)
            continue
        domain = load_domain(root, task_domain(task))
        scored = list(messages[:span])
        plans.append((len(jobs), len(jobs) + 1, scored))
        jobs.append((root, domain, episode_calls(scored)))
        jobs.append((root, domain, gold_calls(task, compat)))
    digests = database_hashes(jobs, sandbox=sandbox, timeout=timeout) if jobs else []
    rewards = []
    for (task, _), plan in zip(items, plans):
        if plan is None:
            rewards.append(0.0)
            continue
        episode, gold, scored = plan
        rewards.append(1.0 if digests[episode] == digests[gold] and outputs_found(task, scored, compat) else 0.0)
    return rewards


def episode_reward(task: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], data_dir: str | Path,
                   compat: str = "ftrl") -> float:
    """0.0 or 1.0 for one episode: ``task`` is a line of ``tasks.jsonl``, ``messages`` the agent's full
    conversation, ``data_dir`` the tau-bench folder (the one holding ``tasks.jsonl``).

    The conversation's tool calls (the first of each message) up to where the episode ended are replayed
    on a fresh database, the gold actions on another; 1.0 iff the databases are equal and every expected
    output was said (where ``compat`` searches: see the module docstring). An episode that never ended
    (no ``###STOP###`` from the user, no terminate call) scores 0.
    """
    return episode_rewards([(task, messages)], data_dir, compat)[0]


def pass_hat_k(successes: int, trials: int, k: int) -> float:
    """tau-bench's pass^k of one task: the chance that k trials drawn from ``trials`` all succeed."""
    if not 1 <= k <= trials:
        raise ValueError(f"pass^k: k must be in 1..{trials}, got {k}")
    return math.comb(successes, k) / math.comb(trials, k)


# ------------------------------------------------------------------------------------ user simulator
def user_prompt(instruction: str, template: str) -> str:
    return template.replace(INSTRUCTION_PLACEHOLDER, instruction)


def load_user_template(prompt_file: str | None) -> str:
    path = benchmark_file(prompt_file, NAME, "eval.taubench.user.prompt_file") if prompt_file else USER_PROMPT_FILE
    template = path.read_text(encoding="utf-8")
    if INSTRUCTION_PLACEHOLDER not in template:
        raise ValueError(f"taubench: the user prompt {path} has no {INSTRUCTION_PLACEHOLDER} placeholder")
    return template


class ScriptedUser:
    """A user-simulator engine that says ``lines`` in order (the first answers the greeting), then ``###STOP###``."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines)

    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[list[Generation]]:
        out = []
        for request in requests:
            said = sum(1 for message in request.messages if message.get("role") == "assistant")
            text = self.lines[said] if said < len(self.lines) else STOP
            out.append([Generation(text=text, prompt_token_ids=[], token_ids=[], finish_reason="stop",
                                   message={"role": "assistant", "content": text, "tool_calls": None})])
        return out


def build_user_engine(cfg: Any) -> Any:
    """The user simulator's engine from ``eval.taubench.user`` (and the run's device and dtype)."""
    user = cfg.eval.taubench.user
    if user.engine == "script":
        return ScriptedUser(user.script)
    if user.engine == "openai":
        from ftrl.llm.engines.openai import OpenAIEngine

        return OpenAIEngine.from_api_config(user.model, user.api)
    if user.engine == "hf":
        from ftrl.llm.engines.hf import HFEngine

        return HFEngine.from_pretrained(user.model, dtype=cfg.model.dtype, device=cfg.resources.device,
                                        enable_thinking=False, batch_size=cfg.eval.batch_size,
                                        trust_remote_code=cfg.model.trust_remote_code)
    if user.engine == "vllm":
        from ftrl.llm.engines.vllm import VLLMEngine

        return VLLMEngine.from_pretrained(user.model, dtype=cfg.model.dtype, enable_thinking=False,
                                          tensor_parallel_size=cfg.resources.tensor_parallel_size,
                                          gpu_memory_utilization=cfg.resources.gpu_memory_utilization,
                                          seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code)
    raise ValueError(f"eval.taubench.user.engine: unknown engine {user.engine!r}")


# ------------------------------------------------------------------------------------ protocol
@dataclass
class TauEpisode:
    """One task trial in flight: the agent's conversation and the user simulator's (roles flipped)."""

    index: int
    sample: dict[str, Any]
    record: dict[str, Any]  # what the stateful executor reads: the domain's ``state``
    messages: list[dict[str, Any]]
    user_messages: list[dict[str, Any]]
    waiting_for: str = "user"  # user | agent
    steps: int = 0
    end: str | None = None  # stop | terminate | max_steps | failed
    error: str | None = None
    responses: list[str] = field(default_factory=list)


def _agent_parser(family: str, parse_compat: str) -> Any:
    """The model family's parser with ``one_tool_only`` where the parser has it (the reference's call)."""
    from ftrl.registry import PARSERS

    parse = PARSERS.get(family)
    options: dict[str, Any] = {"compat": parse_compat}
    if "one_tool_only" in inspect.signature(parse).parameters:
        options["one_tool_only"] = True
    return functools.partial(parse, **options)


def _start(index: int, sample: dict[str, Any], domain: Domain, template: str) -> TauEpisode:
    state = {"family": FAMILY, "domain": domain.name, "db_sha256": domain.db_sha256}
    return TauEpisode(
        index=index, sample=sample, record={STATE_FIELD: json.dumps(state)},
        messages=[{"role": "system", "content": domain.wiki}],
        user_messages=[{"role": "system", "content": user_prompt(sample["instruction"], template)},
                       {"role": "user", "content": GREETING}],
    )


def _user_round(user_engine: Any, episodes: list[TauEpisode], params: SamplingParams, max_steps: int) -> None:
    generations = user_engine.generate([ChatRequest(messages=ep.user_messages) for ep in episodes], params)
    for episode, outputs in zip(episodes, generations):
        generation = outputs[0]
        text = generation.message.get("content") if generation.message else generation.text
        reply = split_thinking(str(text or ""))[1]
        if not reply:  # the reference drops such a task; here it counts as failed
            episode.end, episode.error = "failed", "the user simulator returned an empty message"
            continue
        opening = len(episode.user_messages) == 2
        episode.user_messages.append({"role": "assistant", "content": reply})
        episode.messages.append({"role": "user", "content": reply})
        if not opening and STOP in reply:
            episode.end = "stop"
        elif episode.steps >= max_steps:
            episode.end = "max_steps"
        else:
            episode.waiting_for = "agent"


def _agent_round(engine: Any, episodes: list[TauEpisode], tools: Mapping[str, list[dict[str, Any]]],
                 params: SamplingParams, parser: Any, execute: Any, compat: str, max_steps: int) -> None:
    requests = [ChatRequest(messages=ep.messages, tools=tools[ep.sample["domain"]]) for ep in episodes]
    generations = engine.generate(requests, params)
    calling = []
    for episode, outputs in zip(episodes, generations):
        generation = outputs[0]
        message = dict(generation.message or parser(generation.text))
        if message.get("tool_calls"):
            message["tool_calls"] = list(message["tool_calls"])[:1]  # one_tool_only
        else:
            message["tool_calls"] = None
        message["content"] = message.get("content") or ""
        episode.responses.append(generation.text)
        episode.messages.append(message)
        episode.steps += 1
        if message["tool_calls"]:
            calling.append(episode)
        else:
            # The user sees what the agent said (under official, without its thinking).
            said = split_thinking(message["content"])[1] if compat == "official" else message["content"]
            episode.user_messages.append({"role": "user", "content": said})
            episode.waiting_for = "user"
    if calling:
        results = execute([(ep.sample["codes"], ep.messages[-1]["tool_calls"], TurnContext(ep.record, ep.messages[:-1]))
                           for ep in calling])
        for episode, output in zip(calling, results):
            call = episode.messages[-1]["tool_calls"][0]
            episode.messages.append({"role": "tool", "content": output[0], "tool_call_id": call.get("id")})
            if _call_name(call) == TERMINATE_TOOL[compat]:
                episode.end = "terminate"
            elif episode.steps >= max_steps:
                episode.end = "max_steps"


def run_taubench(
    engine: Any,
    user_engine: Any,
    samples: Sequence[Mapping[str, Any]],
    out_path: Path,
    *,
    data_dir: str | Path,
    compat: str,
    params: SamplingParams,
    user_params: SamplingParams,
    parser: Any,
    execute: Any,
    max_steps: int = 30,
    batch_size: int = 32,
    user_template: str | None = None,
    model_name: str = "",
    sandbox: Any = None,
    reward_timeout: float | None = None,
    desc: str = "eval taubench",
) -> list[dict[str, Any]]:
    """Play every sample (a task trial) to its end, score it, append its row; every row (resumed ones too).

    ``samples`` carry the task fields plus ``id``, ``trial``, ``task_index`` and ``domain``.
    """
    _check_compat(compat)
    root = _data_root(data_dir)
    template = user_template if user_template is not None else load_user_template(None)
    domains = {name: load_domain(root, name) for name in sorted({s["domain"] for s in samples})}
    tools = {name: domain.tools for name, domain in domains.items()}
    codes = {name: domain.codes for name, domain in domains.items()}
    episode_log = EpisodeLog(out_path, key=sample_key)
    pending = [(i, s) for i, s in enumerate(samples) if not episode_log.check_key(i, s)]
    pending.reverse()
    active: list[TauEpisode] = []
    bar = progress_reporter(total=len(pending), desc=desc, unit="ep")
    while pending or active:
        while pending and len(active) < batch_size:
            index, sample = pending.pop()
            sample = {**sample, "codes": codes[sample["domain"]]}
            active.append(_start(index, sample, domains[sample["domain"]], template))
        asking = [ep for ep in active if ep.end is None and ep.waiting_for == "user"]
        if asking:
            _user_round(user_engine, asking, user_params, max_steps)
        acting = [ep for ep in active if ep.end is None and ep.waiting_for == "agent"]
        if acting:
            _agent_round(engine, acting, tools, params, parser, execute, compat, max_steps)
        finished = [ep for ep in active if ep.end is not None]
        if finished:
            _finish(finished, episode_log, str(data_dir), compat, model_name, sandbox, reward_timeout)
            bar.update(len(finished))
        active = [ep for ep in active if ep.end is None]
        bar.set_postfix(active=len(active), pending=len(pending))
    bar.close()
    rows = episode_log.read()
    if len(rows) != len(samples):
        raise RuntimeError(f"{out_path}: expected {len(samples)} episodes, found {len(rows)}")
    return rows


def _finish(finished: list[TauEpisode], episode_log: EpisodeLog, data_dir: str, compat: str, model_name: str,
            sandbox: Any, timeout: float | None) -> None:
    scorable = [ep for ep in finished if ep.end != "failed"]
    rewards = episode_rewards([(ep.sample, ep.messages) for ep in scorable], data_dir, compat,
                              sandbox=sandbox, timeout=timeout)
    reward_of = {id(ep): reward for ep, reward in zip(scorable, rewards)}
    for episode in finished:
        sample = episode.sample
        reward = reward_of.get(id(episode), 0.0)
        row = {
            "index": episode.index, "id": sample["id"], "task_index": sample["task_index"],
            "trial": sample["trial"], "group": sample["domain"], "data_source": sample["data_source"],
            "instruction": sample["instruction"], "model": model_name, "messages": episode.messages,
            "user_messages": episode.user_messages, "responses": episode.responses,
            "metrics": {"pass^1": reward}, "reward": reward, "end": episode.end, "steps": episode.steps,
            "failed": episode.end == "failed", "error": episode.error,
        }
        episode_log.append(episode.index, sample, [row])


def task_samples(tasks: Sequence[Mapping[str, Any]], trials: int) -> list[dict[str, Any]]:
    """One sample per (task, trial), task-major; ``id`` names domain, line, trial and the instruction's digest."""
    samples = []
    for task in tasks:
        digest = hashlib.sha1(str(task["instruction"]).encode("utf-8")).hexdigest()[:8]
        for trial in range(trials):
            samples.append({**task, "trial": trial,
                            "id": f"{task['domain']}/{task['task_index']}/{trial}/{digest}"})
    return samples


def summarize(rows: Sequence[Mapping[str, Any]], trials: int) -> dict[str, float]:
    """``taubench/pass_k`` (k = 1..trials) per domain and across domains, n (tasks), failed, episodes."""
    by_task: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[(row["group"], row["task_index"])].append(row)
    task_rows = []
    for (group, _), members in sorted(by_task.items()):
        n = len(members)
        c = sum(1 for row in members if float(row["reward"]) >= 1.0)
        metrics = {f"pass_{k}": pass_hat_k(c, n, k) for k in range(1, min(trials, n) + 1)}
        task_rows.append({"group": group, "metrics": metrics, "failed": any(row.get("failed") for row in members)})
    result = aggregate(task_rows, NAME, [f"pass_{k}" for k in range(1, trials + 1)])
    result[f"{NAME}/episodes"] = float(len(rows))
    return result


def evaluate(ctx: Any, engine: Any, checkpoint: str) -> dict[str, float]:
    """Benchmark entry (``eval.benchmarks: [taubench]``)."""
    cfg = ctx.cfg
    settings = cfg.eval.taubench
    folder = benchmark_dir(cfg.eval.data_dir, NAME, TAU_SUBDIR)
    tasks = load_tasks(folder, settings.domains, settings.max_tasks, cfg.eval.max_samples)
    if not tasks:
        raise ValueError(f"taubench: no tasks of {list(settings.domains)} in {folder / 'tasks.jsonl'}")
    samples = task_samples(tasks, settings.trials)
    box = sandbox_module.get_sandbox(workers=cfg.resources.sandbox_workers)
    execute = StatefulExecutor(box, timeout=cfg.reward.tool_timeout_s, data_dir=folder.parent)
    params = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                            repetition_penalty=cfg.eval.repetition_penalty, inherit=cfg.eval.inherit, n=1,
                    seed=cfg.seed)
    user_params = SamplingParams(temperature=settings.user.temperature, top_p=1.0, max_new_tokens=settings.user.max_tokens,
                         n=1, seed=cfg.seed)
    user_engine = build_user_engine(cfg)
    try:
        rows = run_taubench(
            engine, user_engine, samples, ctx.run_dir.eval_records(checkpoint, NAME), data_dir=folder,
            compat=cfg.eval.compat, params=params, user_params=user_params,
            parser=_agent_parser(cfg.model.parser, cfg.reward.compat), execute=execute,
            max_steps=settings.max_steps, batch_size=cfg.eval.batch_size,
            user_template=load_user_template(settings.user.prompt_file), model_name=checkpoint, sandbox=box,
            reward_timeout=cfg.reward.tool_timeout_s, desc=f"eval {checkpoint} taubench",
        )
    finally:
        close = getattr(user_engine, "close", None)
        if callable(close):
            close()
    return summarize(rows, settings.trials)
