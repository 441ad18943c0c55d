"""verl backend: step-level FTRL rounds trained by an unpatched verl 0.9.1 in a subprocess.

``train_round(ctx, k)`` turns round k's snapshots into one verl job and its result into the
round's HF checkpoint, so the next collection round and the eval stage load it like a native one:

1. snapshots -> ``rounds/r{k}/train/verl_train.parquet`` in verl's dataset schema (below); a
   snapshot whose prompt, rendered with its own tools, exceeds ``mode.max_prompt_tokens`` is
   dropped here (verl's own length filter cannot see per-row tools);
2. :func:`verl_overrides` (a pure function of the RunConfig) -> the override list, checked against
   verl's own ``ppo_trainer`` config and ``validate_config`` before anything starts;
3. ``python -m verl.trainer.main_ppo <overrides>`` runs with its log in ``verl.log``; the exact
   command and environment are in ``verl_command.sh`` (run it to repeat the job by hand);
4. the last verl checkpoint is merged with ``python -m verl.model_merger merge --backend fsdp``
   into ``rounds/r{k}/checkpoint`` (HF safetensors); verl's metrics become ``history.jsonl``.

A killed job resumes: verl restarts from its last checkpoint (``trainer.resume_mode=auto``), and a
job whose final checkpoint exists is not launched again, only merged.

Dataset schema (one row per snapshot; what ``verl.utils.dataset.RLHFDataset`` reads)::

    prompt        the snapshot's messages (list of {role, content, tool_calls, tool_call_id, ...})
    data_source   scenario name (reward_fn_key)
    agent_name    "ftrl_step": the agent loop of ftrl.train.verl_agent_loop (per-row tools)
    reward_model  {style: "rule", ground_truth: answer}
    extra_info    {index, split, tools, codes, unsolved_set (JSON strings), solve_rate, answer,
                   state, messages (JSON strings; stateful tau-bench rows only, else null)}

Parquet stores the messages as structs: every message gets every key any message has (None where
absent) and lists may come back as numpy arrays; :func:`messages_from_row` undoes both, so the agent
loop renders exactly what the native backend renders. Tool-call arguments are stored as their
JSON string (the form the parser writes); a non-string tool-call name (possible under compat=ftrl)
is stored as its JSON text.

Algorithm: verl gets ``algorithm.adv_estimator`` as configured, the key the native trainer reads
(``ftrl.registry.ALGORITHMS`` gives each option's estimator: grpo -> grpo, reinforce_pp ->
reinforce_plus_plus, ppo -> gae with a critic initialised from the round's policy). The reward is
``ftrl.reward.score_response`` through ``ftrl/train/verl_reward.py``; freeze policies apply inside
verl's actor before the FSDP wrap through ``ftrl/train/verl_worker.py``.

    python -m ftrl.run model=qwen3_8b train=reference backend=verl dry_run=true
    python -m pytest tests/test_verl_backend.py -q
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftrl.artifacts import (
    FREEZE_POLICY_JSON,
    FREEZE_REPORT_JSON,
    HISTORY_JSONL,
    VERL_AGENT_LOOP_YAML,
    VERL_CHECKPOINTS_DIR,
    VERL_COMMAND_SH,
    VERL_HYDRA_DIR,
    VERL_LOG,
    VERL_MERGE_LOG,
    VERL_METRICS_JSONL,
    VERL_TRAIN_PARQUET,
    RunDir,
    atomic_dir,
    atomic_path,
    write_json,
)
from ftrl.config import RunConfig, critic_settings
from ftrl.run_state import RunContext
from ftrl.tracking import read_verl_metrics_file, verl_metrics_to_ftrl

log = logging.getLogger(__name__)

AGENT_NAME = "ftrl_step"
AGENT_LOOP_TARGET = "ftrl.train.verl_agent_loop.FTRLStepAgentLoop"
PROMPT_KEY = "prompt"
# The agent loop decodes each response with its special tokens kept (as the native trainer does) and
# passes that text to the reward through verl's extra_info under this key.
RESPONSE_TEXT_KEY = "ftrl_response_text"
REWARD_FUNCTION_PATH = "pkg://ftrl.train.verl_reward"
REWARD_FUNCTION_NAME = "compute_score"
WORKER_HOOK_MODULE = "ftrl.train.verl_worker"
FREEZE_FILE_ENV = "FTRL_VERL_FREEZE_FILE"
# The reward metric the native trainer logs as reward/score is verl's critic/score/mean.
_SNAPSHOT_JSON_FIELDS: tuple[str, ...] = ("tools", "codes", "unsolved_set")
STATE_KEY = "state"
# What backend=verl needs in the interpreter that runs verl (module: what to install). verl 0.9.1's
# default trainer (trainer.use_v1=true, the supported one) imports transfer_queue at start.
GPU_INSTALL = "pip install -e '.[gpu]'  (verl[vllm]==0.9.1: vllm==0.24.0, torch==2.11.0, transformers==5.9.0, " \
              "tensordict==0.10.0, TransferQueue; docs/scale.md)"
VERL_RUNTIME_MODULES: dict[str, str] = {
    "verl": "verl==0.9.1",
    "transfer_queue": "TransferQueue (verl's verl-core extra)",
    "tensordict": "tensordict==0.10.0",
    "ray": "ray[default]",
}


# ------------------------------------------------------------------------------------ round files
@dataclass(frozen=True)
class VerlRoundFiles:
    """Files of one verl round under ``rounds/r{k}/train/``."""

    train_dir: Path

    @classmethod
    def of(cls, run_dir: RunDir | str | os.PathLike, k: int) -> VerlRoundFiles:
        root = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        return cls(Path(os.path.abspath(root.train_dir(k))))

    @property
    def data(self) -> Path:
        return self.train_dir / VERL_TRAIN_PARQUET

    @property
    def agent_loops(self) -> Path:
        return self.train_dir / VERL_AGENT_LOOP_YAML

    @property
    def freeze_policy(self) -> Path:
        return self.train_dir / FREEZE_POLICY_JSON

    @property
    def freeze_report(self) -> Path:
        return self.train_dir / FREEZE_REPORT_JSON

    @property
    def checkpoints(self) -> Path:
        return self.train_dir / VERL_CHECKPOINTS_DIR

    @property
    def metrics(self) -> Path:
        return self.train_dir / VERL_METRICS_JSONL

    @property
    def earlier_metrics(self) -> Path:
        """verl's metrics of earlier (killed) attempts: its file logger truncates the file when it restarts."""
        return self.train_dir / (Path(VERL_METRICS_JSONL).stem + ".earlier.jsonl")

    @property
    def command_script(self) -> Path:
        return self.train_dir / VERL_COMMAND_SH

    @property
    def log(self) -> Path:
        return self.train_dir / VERL_LOG

    @property
    def merge_log(self) -> Path:
        return self.train_dir / VERL_MERGE_LOG

    @property
    def hydra_dir(self) -> Path:
        return self.train_dir / VERL_HYDRA_DIR

    @property
    def history(self) -> Path:
        return self.train_dir / HISTORY_JSONL


# ------------------------------------------------------------------------------------ dataset rows
def _json_text(value: Any) -> str:
    """A field the reference stores as a JSON string: kept verbatim if it already is one."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _call_for_parquet(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") if isinstance(call.get("function"), Mapping) else call
    name = function.get("name")
    arguments = function.get("arguments")
    return {
        "id": None if call.get("id") is None else str(call.get("id")),
        "type": call.get("type", "function"),
        "function": {
            "name": name if isinstance(name, str) or name is None else json.dumps(name, ensure_ascii=False),
            "arguments": arguments if isinstance(arguments, str) or arguments is None
            else json.dumps(arguments, ensure_ascii=False),
        },
    }


def _message_for_parquet(message: Mapping[str, Any]) -> dict[str, Any]:
    row = dict(message)
    content = row.get("content")
    if content is not None and not isinstance(content, str):
        row["content"] = json.dumps(content, ensure_ascii=False)
    if row.get("tool_calls"):
        row["tool_calls"] = [_call_for_parquet(call) for call in row["tool_calls"]]
    return row


def verl_row(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    """One snapshot (reference record) as a row of verl's dataset schema (module docstring)."""
    from ftrl.types import as_json_obj

    missing = [key for key in ("messages", "tools", "codes", "unsolved_set", "data_source", "answer")
               if key not in record or record[key] is None]
    if missing:
        # A missing answer would become "" and make the reward's "answer in the text" branch fire on every turn.
        raise KeyError(f"snapshot {index} lacks field(s) {missing}; has {sorted(record)}")
    answer = str(record["answer"])
    messages = [_message_for_parquet(m) for m in as_json_obj(record["messages"])]
    stateful = bool(record.get(STATE_KEY))
    return {
        PROMPT_KEY: messages,
        "data_source": str(record["data_source"]),
        "agent_name": AGENT_NAME,
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {
            "index": index,
            "split": str(record.get("split", "train")),
            **{key: _json_text(record[key]) for key in _SNAPSHOT_JSON_FIELDS},
            "solve_rate": float(record.get("solve_rate") or 0.0),
            "answer": answer,
            # Stateful environments (tau-bench): the reward replays the history on the initial state,
            # so it needs both; stateless rows leave them null (the prompt column has the messages).
            STATE_KEY: _json_text(record[STATE_KEY]) if stateful else None,
            "messages": json.dumps(as_json_obj(record["messages"]), ensure_ascii=False) if stateful else None,
        },
    }


def write_verl_parquet(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write verl dataset rows atomically; the message struct is the union of all messages' keys."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        table = pa.Table.from_pylist(list(rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(f"{path}: snapshot rows cannot share one Parquet schema: {error}") from None
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _plain(value: Any) -> Any:
    """numpy arrays / tuples -> lists, mappings -> dicts, recursively (what Parquet readers return)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return [_plain(item) for item in value]
    return value


def messages_from_row(raw_prompt: Any) -> list[dict[str, Any]]:
    """The snapshot messages of a dataset row, as the native trainer had them.

    Drops the keys Parquet filled with None for messages that never had them (``content`` stays,
    even when None) and turns arrays back into lists.
    """
    messages = []
    for message in _plain(raw_prompt):
        if not isinstance(message, dict) or "role" not in message:
            raise TypeError(f"dataset row message is not a {{role, content}} object: {message!r}")
        clean = {key: value for key, value in message.items() if value is not None or key == "content"}
        messages.append(clean)
    return messages


def tools_from_row(extra_info: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    """The row's own tool schemas (``extra_info.tools``, a JSON string), or None when it has none."""
    if not extra_info or extra_info.get("tools") in (None, ""):
        return None
    tools = _plain(json.loads(extra_info["tools"]) if isinstance(extra_info["tools"], str) else extra_info["tools"])
    if not isinstance(tools, list):
        raise TypeError(f"extra_info.tools must be a JSON list of tool schemas, got {type(tools).__name__}")
    return tools or None


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                  enable_thinking: bool) -> str:
    """The prompt text both backends train on (HFEngine.render with the mode's thinking switch)."""
    return tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                         add_generation_prompt=True, enable_thinking=enable_thinking,
                                         tokenize=False)


def build_verl_rows(records: Sequence[Mapping[str, Any]], tokenizer: Any, max_prompt_tokens: int,
                    enable_thinking: bool, batch_size: int = 256) -> tuple[list[dict[str, Any]], int]:
    """Rows for every snapshot whose rendered prompt fits ``max_prompt_tokens``; returns (rows, dropped)."""
    from ftrl.types import as_json_obj

    rows: list[dict[str, Any]] = []
    dropped = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        texts = [render_prompt(tokenizer, as_json_obj(r["messages"]), as_json_obj(r["tools"]) or None,
                               enable_thinking) for r in chunk]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for record, length in zip(chunk, lengths):
            if length <= max_prompt_tokens:
                rows.append(verl_row(record, len(rows)))
            else:
                dropped += 1
    return rows, dropped


def agent_loop_yaml() -> str:
    """verl's ``agent_loop_config_path`` file: our agent loop under the rows' ``agent_name``."""
    return f"- name: {AGENT_NAME}\n  _target_: {AGENT_LOOP_TARGET}\n"


# ------------------------------------------------------------------------------------ overrides
_BARE_VALUE = re.compile(r"[A-Za-z_/.~][A-Za-z0-9_./~-]*")
_RESERVED_WORDS = {"true", "false", "null", "nan", "inf"}
_BACKSLASHES_BEFORE_SPECIAL = re.compile(r"\\+(?='|\$\{|$)")


def hydra_value(value: Any) -> str:
    """A Python value written as a Hydra override value that parses back to the same value.

    Strings are quoted unless they are plain identifiers/paths (run directories hold ``=`` and
    ``,``, which Hydra would read as a sweep); ``${`` is escaped so nothing is interpolated.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"cannot pass {value!r} to verl")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if _BARE_VALUE.fullmatch(value) and value.lower() not in _RESERVED_WORDS:
            return value
        # Hydra reads a backslash literally unless it precedes a quote, "${" or the closing quote.
        escaped = _BACKSLASHES_BEFORE_SPECIAL.sub(lambda m: m.group(0) * 2, value)
        escaped = escaped.replace("'", "\\'").replace("${", "\\${")
        return f"'{escaped}'"
    raise TypeError(f"no Hydra override form for {type(value).__name__}: {value!r}")


class _OverrideList:
    """Ordered ``key=value`` overrides; ``add`` marks keys that verl's config does not have (``+``)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def set(self, key: str, value: Any) -> None:
        self.items.append(f"{key}={hydra_value(value)}")

    def add(self, key: str, value: Any) -> None:
        self.items.append(f"+{key}={hydra_value(value)}")


def worker_env(cfg: RunConfig, root: RunDir, k: int) -> dict[str, str]:
    """Environment every Ray worker of the job needs (passed through verl's ray runtime_env)."""
    files = VerlRoundFiles.of(root, k)
    env = {"VERL_FILE_LOGGER_PATH": str(files.metrics)}
    if cfg.freeze.name != "none":
        env[FREEZE_FILE_ENV] = str(files.freeze_policy)
    env.update({str(key): str(value) for key, value in cfg.backend.verl.env.items()})
    return env


def planned_steps(cfg: RunConfig, num_prompts: int) -> int:
    """Training steps (one batch of ``train.prompts_per_step`` prompts each) verl takes on ``num_prompts``.

    verl's dataloader drops the last partial batch of every epoch; the native trainer keeps it.
    """
    steps = (num_prompts // cfg.train.prompts_per_step) * cfg.train.epochs_per_round
    if cfg.train.max_steps_per_round is not None:
        steps = min(steps, cfg.train.max_steps_per_round)
    return steps


def fsdp_strategy(cfg: RunConfig) -> str:
    """``backend.verl.strategy``, except that freeze runs use FSDP2 (FSDP1 keeps gradient buffers for frozen tensors)."""
    return "fsdp2" if cfg.freeze.name != "none" else cfg.backend.verl.strategy


@dataclass(frozen=True)
class _RoundPlan:
    """What every section of a round's verl overrides reads."""

    cfg: RunConfig
    root: RunDir
    k: int
    files: VerlRoundFiles
    policy: str
    num_prompts: int | None
    token_budget: int


def _data_overrides(o: _OverrideList, p: _RoundPlan) -> None:
    """Data: the round's snapshots; validation never runs (val_files only has to load)."""
    cfg = p.cfg
    files = p.files
    train = p.cfg.train
    response_tokens = p.cfg.max_new_tokens
    o.set("data.train_files", str(files.data))
    o.set("data.val_files", str(files.data))
    o.set("data.val_max_samples", 1)
    o.set("data.prompt_key", PROMPT_KEY)
    o.set("data.reward_fn_key", "data_source")
    o.set("data.max_prompt_length", cfg.mode.max_prompt_tokens)
    o.set("data.max_response_length", response_tokens)
    o.set("data.train_batch_size", train.prompts_per_step)
    o.set("data.filter_overlong_prompts", False)  # done by build_verl_rows, which sees per-row tools
    o.set("data.shuffle", True)
    o.set("data.seed", cfg.seed)
    o.add("data.apply_chat_template_kwargs.enable_thinking", cfg.mode.enable_thinking)


def _model_overrides(o: _OverrideList, p: _RoundPlan) -> None:
    """Model: the round's starting policy."""
    cfg = p.cfg
    policy = p.policy
    train = p.cfg.train
    o.set("actor_rollout_ref.model.path", policy)
    o.set("actor_rollout_ref.model.trust_remote_code", cfg.model.trust_remote_code)
    o.set("actor_rollout_ref.model.enable_gradient_checkpointing", train.gradient_checkpointing)
    # verl builds actor and ref with flash_attention_2 unless told otherwise (flash-attn is not installed
    # by the gpu extra); packing without padding needs flash-attn's varlen kernels, so sdpa pads.
    attention = cfg.backend.verl.attn_implementation
    o.add("actor_rollout_ref.model.override_config.attn_implementation", attention)
    o.set("actor_rollout_ref.model.use_remove_padding", attention == "flash_attention_2")
    if cfg.freeze.name != "none":
        o.set("actor_rollout_ref.model.external_lib", WORKER_HOOK_MODULE)
    if cfg.peft.name == "lora":
        o.set("actor_rollout_ref.model.lora_rank", cfg.peft.r)
        o.set("actor_rollout_ref.model.lora_alpha", cfg.peft.alpha)
        o.set("actor_rollout_ref.model.target_modules", list(cfg.peft.target_modules))


def _actor_overrides(o: _OverrideList, p: _RoundPlan) -> None:
    """Actor: loss, batches, optimizer."""
    cfg = p.cfg
    verl = p.cfg.backend.verl
    train = p.cfg.train
    token_budget = p.token_budget
    uses_kl = p.cfg.train.use_kl_loss
    actor = "actor_rollout_ref.actor"
    o.set(f"{actor}.strategy", fsdp_strategy(cfg))
    o.set(f"{actor}.ppo_mini_batch_size", train.mini_batch_prompts)
    o.set(f"{actor}.use_dynamic_bsz", verl.use_dynamic_bsz)
    if verl.use_dynamic_bsz:
        o.set(f"{actor}.ppo_max_token_len_per_gpu", token_budget)
    else:
        o.set(f"{actor}.ppo_micro_batch_size_per_gpu", train.micro_batch_size)
        o.set("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", train.micro_batch_size)
        if uses_kl:
            o.set("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", train.micro_batch_size)
    o.set(f"{actor}.ppo_epochs", train.ppo_epochs)
    o.set(f"{actor}.clip_ratio", train.clip_ratio_low)
    o.set(f"{actor}.clip_ratio_low", train.clip_ratio_low)
    o.set(f"{actor}.clip_ratio_high", train.clip_ratio_high)
    o.set(f"{actor}.clip_ratio_c", train.clip_ratio_c)
    o.set(f"{actor}.loss_agg_mode", train.loss_agg_mode)
    o.set(f"{actor}.entropy_coeff", train.entropy_coeff)
    o.set(f"{actor}.entropy_from_logits_with_chunking", verl.entropy_chunking)
    o.set(f"{actor}.use_kl_loss", uses_kl)
    o.set(f"{actor}.kl_loss_coef", train.kl_loss_coef)
    o.set(f"{actor}.kl_loss_type", train.kl_loss_type)
    o.set(f"{actor}.optim.lr", train.lr)
    o.set(f"{actor}.optim.lr_scheduler_type", train.lr_scheduler)
    o.set(f"{actor}.optim.lr_warmup_steps", train.lr_warmup_steps)
    o.set(f"{actor}.optim.weight_decay", train.weight_decay)
    o.set(f"{actor}.optim.clip_grad", train.grad_clip)
    o.set(f"{actor}.fsdp_config.param_offload", verl.param_offload)
    o.set(f"{actor}.fsdp_config.optimizer_offload", verl.optimizer_offload)
    if cfg.freeze.name != "none" and fsdp_strategy(cfg) == "fsdp":
        # FSDP1 flattens each layer's tensors into one parameter, which must share requires_grad
        # unless the original parameters are kept.
        o.set(f"{actor}.fsdp_config.use_orig_params", True)


def _rollout_overrides(o: _OverrideList, p: _RoundPlan) -> None:
    """Rollout: n samples of one next turn per snapshot, from verl's async server."""
    cfg = p.cfg
    files = p.files
    verl = p.cfg.backend.verl
    train = p.cfg.train
    rollout = "actor_rollout_ref.rollout"
    o.set(f"{rollout}.name", verl.rollout_engine)
    o.set(f"{rollout}.n", train.n)
    o.set(f"{rollout}.temperature", train.temperature)
    o.set(f"{rollout}.top_p", train.top_p)
    o.set(f"{rollout}.seed", cfg.seed)
    o.set(f"{rollout}.tensor_model_parallel_size", cfg.resources.tensor_parallel_size)
    o.set(f"{rollout}.gpu_memory_utilization", cfg.resources.gpu_memory_utilization)
    # vLLM otherwise reserves KV cache for the model's whole window (40k-128k tokens).
    o.set(f"{rollout}.max_model_len", cfg.mode.max_prompt_tokens + cfg.max_new_tokens)
    o.set(f"{rollout}.agent.agent_loop_config_path", str(files.agent_loops))
    o.set(f"{rollout}.agent.default_agent_loop", AGENT_NAME)
    o.set(f"{rollout}.agent.num_workers", verl.agent_workers)


def _reward_overrides(o: _OverrideList, p: _RoundPlan) -> None:
    """Reward: the native reward function, with the run's variant/compat/parser/timeout bound."""
    cfg = p.cfg
    o.set("reward.reward_manager.name", "naive")
    o.set("reward.custom_reward_function.path", REWARD_FUNCTION_PATH)
    o.set("reward.custom_reward_function.name", REWARD_FUNCTION_NAME)
    reward_kwargs = "reward.custom_reward_function.reward_kwargs"
    o.add(f"{reward_kwargs}.variant", cfg.reward.name)
    o.add(f"{reward_kwargs}.compat", cfg.reward.compat)
    o.add(f"{reward_kwargs}.parser", cfg.model.parser)
    o.add(f"{reward_kwargs}.timeout", float(cfg.reward.tool_timeout_s))
    from ftrl.envs.sandbox import tool_output_limit

    o.add(f"{reward_kwargs}.max_output_chars", tool_output_limit(cfg))


def _algorithm_overrides(o: _OverrideList, p: _RoundPlan) -> None:
    """Algorithm: advantages; KL only as a loss (never in the reward), as in the paper."""
    algorithm = p.cfg.algorithm
    o.set("algorithm.adv_estimator", algorithm.adv_estimator)  # the key the native trainer reads too
    o.set("algorithm.gamma", algorithm.gamma)
    o.set("algorithm.lam", algorithm.lam)
    o.set("algorithm.norm_adv_by_std_in_grpo", algorithm.norm_adv_by_std_in_grpo)
    o.set("algorithm.use_kl_in_reward", False)


def _critic_overrides(o: _OverrideList, p: _RoundPlan) -> None:
    """Critic (PPO): a value model initialised from the round's policy."""
    cfg = p.cfg
    policy = p.policy
    verl = p.cfg.backend.verl
    train = p.cfg.train
    algorithm = p.cfg.algorithm
    token_budget = p.token_budget
    o.set("critic.enable", algorithm.use_critic)
    if algorithm.use_critic:
        o.set("critic.strategy", fsdp_strategy(cfg))
        o.set("critic.model.path", policy)
        o.add("critic.model.override_config.attn_implementation", verl.attn_implementation)
        o.set("critic.model.use_remove_padding", verl.attn_implementation == "flash_attention_2")
        o.set("critic.model.trust_remote_code", cfg.model.trust_remote_code)
        o.set("critic.model.enable_gradient_checkpointing", train.gradient_checkpointing)
        critic = critic_settings(algorithm, train)
        o.set("critic.optim.lr", critic.lr)
        o.set("critic.ppo_epochs", critic.epochs)
        o.set("critic.optim.weight_decay", train.weight_decay)
        o.set("critic.optim.clip_grad", train.grad_clip)
        o.set("critic.cliprange_value", algorithm.critic.cliprange_value)
        if verl.use_dynamic_bsz:
            o.set("critic.ppo_max_token_len_per_gpu", token_budget)
        else:
            o.set("critic.ppo_micro_batch_size_per_gpu", train.micro_batch_size)
        o.set("trainer.critic_warmup", critic.warmup_steps)
        if critic.carry_over:
            log.warning("train.critic_carry_over applies to the native backend; verl starts each round's critic "
                        "from the round's policy (train=reference sets it false)")


def _trainer_overrides(o: _OverrideList, p: _RoundPlan) -> None:
    """Trainer: resources, length of the round, checkpoints, logging."""
    cfg = p.cfg
    files = p.files
    verl = p.cfg.backend.verl
    train = p.cfg.train
    root = p.root
    k = p.k
    num_prompts = p.num_prompts
    o.set("trainer.n_gpus_per_node", cfg.resources.n_gpus_per_node)
    o.set("trainer.nnodes", cfg.resources.nnodes)
    o.set("trainer.total_epochs", train.epochs_per_round)
    if num_prompts is not None:
        o.set("trainer.total_training_steps", planned_steps(cfg, num_prompts))
    elif train.max_steps_per_round is not None:
        o.set("trainer.total_training_steps", train.max_steps_per_round)
    o.set("trainer.save_freq", train.save_every_steps)
    o.set("trainer.test_freq", -1)
    o.set("trainer.val_before_train", False)
    o.set("trainer.resume_mode", "auto")
    o.set("trainer.default_local_dir", str(files.checkpoints))
    o.set("trainer.max_actor_ckpt_to_keep", verl.keep_checkpoints)
    o.set("trainer.max_critic_ckpt_to_keep", verl.keep_checkpoints)
    o.set("trainer.project_name", cfg.logger.wandb.project)
    o.set("trainer.experiment_name", f"{cfg.name}-r{k}")
    # verl logs to its console and a metrics file only; after the round our tracker replays those
    # metrics under the shared names into the job's one W&B run (verl's own W&B logger would open
    # a second run per round).
    o.set("trainer.logger", ["console", "file"])
    for name, value in worker_env(cfg, root, k).items():
        o.add(f"ray_kwargs.ray_init.runtime_env.env_vars.{name}", value)


_OVERRIDE_SECTIONS = (_data_overrides, _model_overrides, _actor_overrides, _rollout_overrides, _reward_overrides, _algorithm_overrides, _critic_overrides, _trainer_overrides)


def verl_overrides(cfg: RunConfig, run_dir: RunDir | str | os.PathLike, k: int, *,
                   policy: str | os.PathLike | None = None, num_prompts: int | None = None) -> list[str]:
    """The verl override list for round ``k`` of ``cfg`` (pure: no file is read or written).

    ``policy`` defaults to the round's starting policy (``RunContext.policy_for_round``);
    ``num_prompts`` (the snapshot rows) fixes ``trainer.total_training_steps`` exactly, so verl's
    last step (the one that saves the final checkpoint) is the last step it takes. Without it, only
    ``train.max_steps_per_round`` caps the steps.
    """
    root = RunDir(os.path.abspath(run_dir.root if isinstance(run_dir, RunDir) else run_dir))
    files = VerlRoundFiles.of(root, k)
    if policy is None:
        policy = RunContext(cfg=cfg, run_dir=root).policy_for_round(k)
    policy = os.fspath(policy)
    if policy.startswith((".", "~")):  # verl runs in another directory: make explicit local paths absolute
        policy = os.path.abspath(os.path.expanduser(policy))
    plan = _RoundPlan(cfg=cfg, root=root, k=k, files=files, policy=policy, num_prompts=num_prompts,
                      token_budget=cfg.backend.verl.ppo_max_token_len_per_gpu
                      or (cfg.mode.max_prompt_tokens + cfg.max_new_tokens))
    o = _OverrideList()
    for section in _OVERRIDE_SECTIONS:
        section(o, plan)
    return o.items + list(cfg.backend.verl.overrides)


def python_executable(cfg: RunConfig) -> str:
    return cfg.backend.verl.python or sys.executable


def main_ppo_command(cfg: RunConfig, run_dir: RunDir, k: int, overrides: Sequence[str]) -> list[str]:
    """``python -m verl.trainer.main_ppo <overrides>`` with verl's Hydra run directory in the round."""
    files = VerlRoundFiles.of(run_dir, k)
    # verl's Hydra app changes into its run directory (version_base=None), so every path above is
    # absolute; keep that directory (and its .hydra record of the composed config) in the round.
    return [python_executable(cfg), "-m", "verl.trainer.main_ppo", *overrides,
            f"hydra.run.dir={hydra_value(str(files.hydra_dir))}"]


def verl_command(ctx: RunContext, k: int, num_prompts: int | None = None) -> list[str]:
    """The argv of round k's verl job (``python -m verl.trainer.main_ppo ...``); writes nothing."""
    overrides = verl_overrides(ctx.cfg, ctx.run_dir, k, num_prompts=num_prompts)
    return main_ppo_command(ctx.cfg, ctx.run_dir, k, overrides)


# ------------------------------------------------------------------------------------ verl's config
def verl_config_dir() -> Path:
    import verl

    return Path(verl.__file__).resolve().parent / "trainer" / "config"


@contextmanager
def _verl_hydra() -> Iterator[None]:
    """Hydra initialised on verl's own config directory, whatever Hydra app is running around us.

    verl's config groups (model/, algorithm/, data/...) collide with ours, so they are never put on
    our search path; the surrounding app's GlobalHydra and version base are restored afterwards.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton
    from hydra.version import VersionBase

    # Set the running app's GlobalHydra aside (the way hydra.initialize backs it up) and put the very
    # same object back afterwards.
    saved = Singleton._instances.pop(GlobalHydra, None)
    saved_base = VersionBase.instance().version_base
    try:
        # version_base=None: the setting verl's own @hydra.main uses.
        with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None):
            yield
    finally:
        Singleton._instances.pop(GlobalHydra, None)
        if saved is not None:
            Singleton._instances[GlobalHydra] = saved
        VersionBase.instance().version_base = saved_base


def compose_verl_config(overrides: Sequence[str]) -> Any:
    """verl's ``ppo_trainer`` config with ``overrides`` applied, composed as ``main_ppo`` would."""
    from hydra import compose

    with _verl_hydra():
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def validate_verl_config(config: Any) -> None:
    """verl's own ``validate_config`` with the arguments ``main_ppo`` derives from the config."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


def check_verl_overrides(overrides: Sequence[str]) -> Any:
    """Compose + validate (what ``main_ppo`` does before starting Ray); raise a ValueError naming the problem."""
    try:
        config = compose_verl_config(overrides)
        validate_verl_config(config)
    except Exception as error:  # Hydra, OmegaConf, verl asserts and instantiation errors alike
        raise ValueError(f"verl rejects the override list: {type(error).__name__}: {error}") from error
    return config


# ------------------------------------------------------------------------------------ subprocesses
def subprocess_env(cfg: RunConfig, run_dir: RunDir, k: int) -> dict[str, str]:
    """What the verl driver process gets on top of ours (Ray workers get ``worker_env`` too)."""
    extra = dict(worker_env(cfg, RunDir(os.path.abspath(run_dir.root)), k))
    source_root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.environ.get("PYTHONPATH")
    # Ray workers on this node inherit it, so ftrl's reward, agent loop and worker hook import even
    # from a source checkout (other nodes need `pip install -e .`).
    extra["PYTHONPATH"] = source_root + (os.pathsep + pythonpath if pythonpath else "")
    extra.setdefault("TOKENIZERS_PARALLELISM", "false")
    return extra


def command_script(command: Sequence[str], env: Mapping[str, str], k: int) -> str:
    """``verl_command.sh``: the environment on top of the caller's, then the exact argv."""
    lines = ["#!/usr/bin/env bash",
             f"# verl training of round {k}, written by ftrl.train.verl_backend (run it to repeat the job)",
             "set -euo pipefail"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    lines.append("exec " + " \\\n    ".join(shlex.quote(part) for part in command))
    return "\n".join(lines) + "\n"


def _run_logged(command: Sequence[str], log_path: Path, env: Mapping[str, str], what: str) -> None:
    """Run ``command``, copying its output to ``log_path`` and our stdout; raise with the log tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **env}, bufsize=1)
        for line in process.stdout or ():
            handle.write(line)
            sys.stdout.write(line)
        code = process.wait()
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
        raise RuntimeError(f"{what} exited with code {code}; full log: {log_path}\n--- last lines ---\n{tail}")


_ROLLOUT_PACKAGES = {"vllm": "vllm==0.24.0", "sglang": "sglang==0.5.12"}


def missing_verl_runtime(python: str, rollout_engine: str = "vllm") -> dict[str, str]:
    """Modules the verl job needs that ``python`` cannot import: {module: what to install}."""
    needed = dict(VERL_RUNTIME_MODULES)
    needed[rollout_engine] = _ROLLOUT_PACKAGES.get(rollout_engine, rollout_engine)
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        import importlib.util

        absent = [name for name in needed if importlib.util.find_spec(name) is None]
    else:
        probe = ("import importlib.util, json, sys; "
                 "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
        out = subprocess.run([python, "-c", probe, *needed], capture_output=True, text=True, check=False, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"backend.verl.python={python} does not run: {out.stderr.strip()[-500:]}")
        absent = json.loads(out.stdout.strip().splitlines()[-1])
    return {name: needed[name] for name in absent}


def check_verl_runtime(cfg: RunConfig) -> None:
    """Fail before verl starts (and before Ray spends minutes) when its interpreter lacks a package."""
    python = python_executable(cfg)
    missing = missing_verl_runtime(python, cfg.backend.verl.rollout_engine)
    if missing:
        raise RuntimeError(f"backend=verl: {python} cannot import {sorted(missing)} "
                           f"({', '.join(missing.values())}); verl 0.9.1's trainer (trainer.use_v1=true) imports "
                           f"transfer_queue at start. Install the pinned GPU set: {GPU_INSTALL}")


def latest_checkpoint(checkpoints: Path) -> tuple[int, Path] | None:
    """(step, actor directory) of verl's last saved checkpoint under ``trainer.default_local_dir``."""
    marker = Path(checkpoints) / "latest_checkpointed_iteration.txt"
    if not marker.is_file():
        return None
    text = marker.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise ValueError(f"{marker}: expected a step number, found {text!r}")
    actor = Path(checkpoints) / f"global_step_{int(text)}" / "actor"
    if not actor.is_dir():
        raise FileNotFoundError(f"{marker} names step {text} but {actor} is missing")
    return int(text), actor


def merge_command(python: str, actor_dir: Path, target_dir: Path, trust_remote_code: bool = False) -> list[str]:
    command = [python, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
               "--local_dir", str(actor_dir), "--target_dir", str(target_dir)]
    return command + (["--trust-remote-code"] if trust_remote_code else [])


def merge_checkpoint(python: str, actor_dir: Path, target_dir: Path, log_path: Path, env: Mapping[str, str],
                     trust_remote_code: bool = False) -> Path:
    """Merge a verl FSDP actor checkpoint into an HF safetensors directory, atomically."""
    target_dir = Path(target_dir)
    with atomic_dir(target_dir, if_exists="replace") as staging:
        _run_logged(merge_command(python, actor_dir, staging, trust_remote_code), log_path, env,
                    "verl.model_merger")
        if not any(staging.glob("*.safetensors")):
            raise RuntimeError(f"verl.model_merger wrote no safetensors into {staging}; see {log_path}")
    return target_dir


# ------------------------------------------------------------------------------------ metrics
def history_rows(metrics_path: Path, k: int, step_offset: int,
                 earlier_path: Path | None = None) -> list[dict[str, Any]]:
    """verl's file-logger lines (``{"step", "data"}``) as native-style history rows, by step.

    ``earlier_path`` holds the lines of attempts killed before (kept by :func:`keep_earlier_metrics`);
    a step logged again after a resume keeps its latest values.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for path in (earlier_path, metrics_path):
        if path is None or not Path(path).is_file():
            continue
        for step, metrics in read_verl_metrics_file(path):
            by_step[step] = {"round": k, "step": step, "global_step": step_offset + step,
                             **verl_metrics_to_ftrl(metrics)}
    return [by_step[step] for step in sorted(by_step)]


def keep_earlier_metrics(files: VerlRoundFiles) -> None:
    """Before verl (re)starts: move its metrics file's lines to ``earlier_metrics`` (verl reopens it with "wb")."""
    if not files.metrics.is_file() or files.metrics.stat().st_size == 0:
        return
    text = files.metrics.read_text(encoding="utf-8")
    with open(files.earlier_metrics, "a", encoding="utf-8") as handle:
        handle.write(text if text.endswith("\n") else text + "\n")
    files.metrics.unlink()


# ------------------------------------------------------------------------------------ stage entry
def _load_tokenizer(policy: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy, trust_remote_code=trust_remote_code)


def prepare_round(ctx: RunContext, k: int) -> dict[str, Any]:
    """Write round k's dataset, agent-loop file and freeze policy; return the command and its env.

    Everything ``train_round`` does before launching verl, so it can be checked without GPUs.
    """
    from ftrl.envs.io import read_records

    cfg, rd = ctx.cfg, ctx.run_dir
    files = VerlRoundFiles.of(rd, k)
    snapshots_path = rd.snapshots(k)
    if not snapshots_path.exists():
        raise FileNotFoundError(f"{snapshots_path} is missing: the collect stage of round {k} must run first")
    policy = ctx.policy_for_round(k)
    if Path(str(policy)) == Path(str(rd.base_model)):
        from ftrl.llm.tiny import ensure_base_model

        ensure_base_model(ctx)
    tokenizer = _load_tokenizer(str(policy), cfg.model.trust_remote_code)
    records = read_records(snapshots_path)
    rows, dropped = build_verl_rows(records, tokenizer, cfg.mode.max_prompt_tokens, cfg.mode.enable_thinking)
    if dropped:
        log.warning("verl round %d: dropped %d of %d snapshots longer than mode.max_prompt_tokens=%d", k, dropped,
                    len(records), cfg.mode.max_prompt_tokens)
    steps = planned_steps(cfg, len(rows))
    if steps < 1:
        raise ValueError(f"round {k}: {len(rows)} snapshots make no full batch of train.prompts_per_step="
                         f"{cfg.train.prompts_per_step} (verl drops partial batches); collect more "
                         f"(collect.max_envs) or lower train.prompts_per_step")
    if len(rows) % cfg.train.prompts_per_step:
        log.info("verl round %d: the last %d of %d snapshots do not fill a batch and are skipped each epoch", k,
                 len(rows) % cfg.train.prompts_per_step, len(rows))
    files.train_dir.mkdir(parents=True, exist_ok=True)
    write_verl_parquet(files.data, rows)
    files.agent_loops.write_text(agent_loop_yaml(), encoding="utf-8")
    if cfg.freeze.name != "none":
        write_json(files.freeze_policy, asdict(cfg.freeze))
    # A local directory given relative to here must stay findable from verl's run directory.
    launch_policy = os.path.abspath(policy) if Path(str(policy)).exists() else str(policy)
    overrides = verl_overrides(cfg, rd, k, policy=launch_policy, num_prompts=len(rows))
    check_verl_overrides(overrides)
    command = main_ppo_command(cfg, rd, k, overrides)
    env = subprocess_env(cfg, rd, k)
    files.command_script.write_text(command_script(command, env, k), encoding="utf-8")
    files.command_script.chmod(0o755)
    log.info("verl round %d: %d snapshots (%d dropped), %d steps, policy=%s; command in %s", k, len(rows), dropped,
             steps, policy, files.command_script)
    return {"command": command, "env": env, "steps": steps, "snapshots": len(rows), "dropped": dropped,
            "policy": str(policy), "files": files}


def train_round(ctx: RunContext, k: int) -> dict[str, Any]:
    """``train`` stage for round k on the verl backend: prepare, run verl, merge, record metrics."""
    cfg, rd = ctx.cfg, ctx.run_dir
    gpus = cfg.resources.n_gpus_per_node * cfg.resources.nnodes
    if gpus < 1:
        raise RuntimeError(f"backend=verl needs GPUs but resources.n_gpus_per_node={cfg.resources.n_gpus_per_node}; "
                           "choose a GPU profile (resources=1x24gb, 1x80gb, 8x80gb, multinode) or backend=native")
    plan = prepare_round(ctx, k)
    files: VerlRoundFiles = plan["files"]
    done = latest_checkpoint(files.checkpoints)
    if done is not None and done[0] >= plan["steps"]:
        log.info("verl round %d: checkpoint of the last step %d exists; not launching verl again", k, done[0])
    else:
        check_verl_runtime(cfg)
        keep_earlier_metrics(files)
        _run_logged(plan["command"], files.log, plan["env"], "verl.trainer.main_ppo")
        done = latest_checkpoint(files.checkpoints)
        if done is None:
            raise RuntimeError(f"verl finished but saved no checkpoint under {files.checkpoints}; see {files.log}")
    step, actor_dir = done
    if step < plan["steps"]:
        raise RuntimeError(f"verl's last checkpoint is step {step} of {plan['steps']}; see {files.log}")
    info: dict[str, Any] = {"steps": step, "snapshots": plan["snapshots"], "dropped": plan["dropped"]}
    if cfg.freeze.name != "none":
        # The actor writes the report while it builds the model; without it the policy never ran.
        if not files.freeze_report.is_file():
            raise RuntimeError(f"freeze={cfg.freeze.name}: verl's actor never reported applying the policy "
                               f"({files.freeze_report} is missing), so the round trained every parameter")
        report = json.loads(files.freeze_report.read_text(encoding="utf-8"))
        if report.get("policy") != cfg.freeze.name:
            raise RuntimeError(f"{files.freeze_report} reports policy {report.get('policy')!r}, not "
                               f"freeze={cfg.freeze.name}; remove {files.checkpoints} to train the round again")
        info["freeze"] = report
    checkpoint = merge_checkpoint(python_executable(cfg), actor_dir, rd.checkpoint_dir(f"round{k}"),
                                  files.merge_log, plan["env"], cfg.model.trust_remote_code)
    info["checkpoint"] = str(checkpoint)

    from ftrl.train.native import read_history

    offset = sum(len(read_history(VerlRoundFiles.of(rd, j).history)) for j in range(1, k))
    history = history_rows(files.metrics, k, offset, files.earlier_metrics)
    files.history.write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")
    if ctx.tracker is not None:
        for row in history:
            ctx.tracker.log({key: v for key, v in row.items() if isinstance(v, float)}, step=row["global_step"])
    if history and "reward/score" in history[0]:
        info.update(reward_first=history[0]["reward/score"], reward_last=history[-1]["reward/score"])
    log.info("verl round %d: merged step %d into %s", k, step, checkpoint)
    return info

