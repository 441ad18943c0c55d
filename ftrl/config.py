"""Typed run configuration: the dataclass schema every Hydra composition is validated against once.

``load_run_config(cfg)`` merges a composed ``DictConfig`` into :class:`RunConfig` (unknown keys and
wrong types fail with the full key path), then ``RunConfig.validate()`` checks choices and
cross-field rules with messages that name the key and the valid options.

    python -m ftrl.run --cfg job          # print the composed config
    python -c "from ftrl.config import RunConfig; RunConfig().validate()"
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftrl.errors import ConfigError, check_choice, check_positive, did_you_mean
from ftrl.params import check_selectors, expand_module_kinds, parse_layer_range

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("build_envs", "collect", "train", "eval", "analyze")
# Stages a run does only when asked (stages=[...,intervene]); ALL_STAGES is the order every stage list follows.
OPTIONAL_STAGES: tuple[str, ...] = ("intervene",)
ALL_STAGES: tuple[str, ...] = STAGES + OPTIONAL_STAGES


@dataclass
class TinyModelConfig:
    """Shape of the offline Qwen3-shaped model built in-process (seeded)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 2048
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    # Synthetic in-context copying pretraining of the freshly initialised model (see
    # ftrl.llm.tiny.pretrain_copying): the skill real LLMs bring from pretraining. 0 disables it.
    copy_pretrain_steps: int = 800
    copy_pretrain_batch_size: int = 32
    copy_pretrain_lr: float = 2.0e-3


@dataclass
class ApiConfig:
    """OpenAI-compatible endpoint (API models, local vLLM servers)."""

    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 120.0
    price_per_mtok_in: float = 0.0
    price_per_mtok_out: float = 0.0


@dataclass
class ModelConfig:
    name: str = "tiny"
    # Local path or hub id; null for the tiny model, which is built in the run directory.
    path: str | None = None
    parser: str = "qwen"  # tool-call format family: qwen (Hermes <tool_call>) | llama31
    dtype: str = "float32"
    supports_thinking: bool = True
    engine: str = "hf"  # hf | vllm | openai
    # Caps the mode's response length (the tiny model's turns are short).
    max_new_tokens: int | None = 96
    warm_start: bool = True  # supervised warm start on gold trajectories before RL (tiny models)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    trust_remote_code: bool = False


@dataclass
class ModeConfig:
    name: str = "non_reasoning"
    enable_thinking: bool = False
    max_response_tokens: int = 1024
    max_prompt_tokens: int = 16384


@dataclass(frozen=True)
class ScalingDefaults:
    """The one default for complexity scaling (paper stage 4), shared by both environment builders.

    Scaling is a standard stage, not an option: each environment draws functional generalisation,
    parameter expansion and parameter-type generalisation with these probabilities, and always gets
    ``min_distractors..max_distractors`` distractor tools, so no environment is left unscaled.
    ``envs.procedural`` and ``envs.llm`` (and their YAML files) take their defaults from here.
    """

    functional_generalization: float = 0.5
    parameter_expansion: float = 0.5
    parameter_type_generalization: float = 0.5
    min_distractors: int = 1
    max_distractors: int = 2


SCALING = ScalingDefaults()


@dataclass
class ProceduralConfig:
    """Offline environment generator knobs (docs/reference.md §1: the four complexity-scaling strategies)."""

    num_train: int = 400
    num_test: int = 100
    # Relative frequency of each scenario; the keys are the scenario names without spaces/dashes.
    scenario_weights: dict[str, float] = field(
        default_factory=lambda: {"single_hop": 1.0, "parallel_single_hop": 1.0, "multi_hop": 1.0,
                                 "parallel_multi_hop": 1.0}
    )
    max_hops: int = 3
    max_parallel: int = 2
    # Complexity scaling: probability (0-1) that each strategy is applied to an environment ...
    functional_generalization: float = SCALING.functional_generalization
    parameter_expansion: float = SCALING.parameter_expansion
    parameter_type_generalization: float = SCALING.parameter_type_generalization
    # ... and how many distractor tools are added (a range).
    min_distractors: int = SCALING.min_distractors
    max_distractors: int = SCALING.max_distractors
    # Draw ids and answers from a fixed pool of this many values per kind, shared by train and test
    # (a small world vocabulary); null: fresh random values everywhere.
    id_pool_size: int | None = 16


@dataclass
class FilesConfig:
    train: str | None = None
    test: str | None = None


SEED_SOURCE_KINDS: tuple[str, ...] = ("jsonl", "datasets")


@dataclass
class SeedSourceConfig:
    """A QA dataset with gold answers as the builder's seeds (``envs.llm.seed_source``; off while ``kind`` is null).

    ``jsonl``: a local JSON-lines file. ``datasets``: anything ``datasets.load_dataset`` reads: a local
    data file (.parquet/.jsonl/.json/.csv), a local dataset directory (``save_to_disk`` ones too), or a
    hub id where the machine has network. Field names may be dotted paths into nested rows
    (``answers.text``); a list value gives its first element. Each row's answer is the environment's
    gold final answer.
    """

    kind: str | None = None  # null (no seed source) | jsonl | datasets
    path: str | None = None
    name: str | None = None  # datasets: the dataset's configuration name, if it has several
    split: str = "train"  # datasets: the split to read (ignored for jsonl)
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = "id"  # null or missing in a row: an id hashed from the question


@dataclass
class LLMBuildConfig:
    """The LLM environment builder (``envs=llm``, ``ftrl.builder``): endpoint, seeds, knobs, gates.

    The builder model is independent of the policy (``model``): any OpenAI-compatible endpoint, a
    hosted API or a local ``vllm serve``. Seeds come from ``seed_file`` (JSONL, one ``{"question"}``
    per line), ``seed_source`` (a QA dataset with gold answers) and/or are generated from ``topics``.
    The scaling knobs mean what they mean for ``envs.procedural``: a probability per environment, and
    a range of distractor tools (defaults: ``SCALING``, every environment scaled).
    """

    model: str = "gpt-4o-mini"
    # gpt-4o-mini's list prices (USD per million tokens), for the build report's cost line.
    api: ApiConfig = field(default_factory=lambda: ApiConfig(price_per_mtok_in=0.15, price_per_mtok_out=0.6))
    backoff_base_s: float = 1.0  # retry delays: base * 2**attempt (capped), or the server's Retry-After
    temperature: float = 0.0
    max_tokens: int = 4096
    json_mode: bool = True  # ask for response_format=json_object (OpenAI, vLLM); false for servers without it
    seed: int = 0  # knob draws and the train/test assignment of seeds without a split
    # Seeds: a JSONL of questions (optional "id", "split", "scenario" per line), and/or topics.
    seed_file: str | None = None
    seed_source: SeedSourceConfig = field(default_factory=SeedSourceConfig)
    topics: list[str] = field(default_factory=list)
    tasks_per_topic: int = 8
    scenario_weights: dict[str, float] = field(
        default_factory=lambda: {"single_hop": 1.0, "parallel_single_hop": 1.0, "multi_hop": 1.0,
                                 "parallel_multi_hop": 1.0}
    )
    test_fraction: float = 0.2
    max_tasks: int | None = None
    # Complexity scaling (probability per environment, and a range of distractor tools).
    functional_generalization: float = SCALING.functional_generalization
    parameter_expansion: float = SCALING.parameter_expansion
    parameter_type_generalization: float = SCALING.parameter_type_generalization
    min_distractors: int = SCALING.min_distractors
    max_distractors: int = SCALING.max_distractors
    # Structured outputs: repair requests after a malformed/invalid reply (0 = fail at once).
    max_repairs: int = 2
    # Gates.
    dedup_threshold: float = 0.9  # questions at least this similar (token Jaccard) are duplicates
    gate_timeout_s: float = 10.0
    reference_check: bool = False  # a reference model (default: the builder) must solve each env ...
    reference_model: str | None = None
    reference_max_turns: int = 5  # ... within this many turns
    # Prompts: a directory of <stage>.txt files and/or one file per stage, overriding the packaged ones.
    prompts_dir: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    # The set's name (its directory is <envs.sets_dir>/<set_name>-<content hash>) and the LLM cache.
    set_name: str = "llm"
    cache_dir: str | None = None  # null: <envs.sets_dir>/.cache


@dataclass
class TauBenchConfig:
    """tau-bench tools/codes/DB imported as a stateful environment family (``envs=taubench``)."""

    data_dir: str | None = None  # holds tau-bench/; null: the FTRL_DATA_DIR environment variable
    domains: list[str] = field(default_factory=lambda: ["airline", "retail"])
    include_policy: bool = True  # the domain's wiki.md as the system message
    test_fraction: float = 0.2
    seed: int = 0
    max_tasks: int | None = None
    embed_db: bool = False  # copy the DB into every record (self-contained, MBs each) instead of its hash


@dataclass
class EnvsConfig:
    name: str = "procedural"  # procedural | ftrl_files | llm | set | taubench
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    # Optional caps applied after loading (useful for quick runs on big sets).
    max_train: int | None = None
    max_test: int | None = None
    # Records failing the environment gate (ftrl.envs.gate; every source's records pass it in build_envs):
    # drop: drop them and report why (log + envs/manifest.json) | fail: refuse the set.
    invalid: str = "drop"
    llm: LLMBuildConfig = field(default_factory=LLMBuildConfig)
    taubench: TauBenchConfig = field(default_factory=TauBenchConfig)
    # Versioned environment sets (ftrl.envs.sets): where they live, and (envs=set) which to mix:
    # {name | name-hash | path: weight}; weight 1.0 takes a set's train split once, 0.5 half, 2.0 twice.
    sets_dir: str = "outputs/env_sets"
    mix: dict[str, float] = field(default_factory=dict)
    mix_seed: int = 0


@dataclass
class RewardConfig:
    name: str = "solve_f1"
    compat: str = "ftrl"  # ftrl: reproduce the reference exactly | fixed: strip thoughts, unique ids
    tool_timeout_s: float = 10.0
    # Tool outputs longer than this are cut (with a marker; counted in the collect stats). null: by compat,
    # ftrl = no cut (the reference does not cut), fixed = 20000 characters.
    max_tool_output_chars: int | None = None


@dataclass
class CollectConfig:
    max_turns: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    # Extra warpers (0 / 1.0: off). inherit=true takes top_k, top_p and repetition_penalty from the
    # model's generation_config.json, as the reference's HF generate(do_sample=True, temperature=1.0) does.
    top_k: int = 0
    repetition_penalty: float = 1.0
    inherit: bool = False
    batch_size: int = 32  # conversations generated together
    max_envs: int | None = None  # cap on environments per round (null: all train envs)


@dataclass
class CriticConfig:
    lr: float = 1e-5
    cliprange_value: float = 0.5
    warmup_steps: int = 0


@dataclass
class AlgorithmConfig:
    name: str = "grpo"  # grpo | reinforce_pp | ppo
    adv_estimator: str = "grpo"  # verl core_algos estimator: grpo | reinforce_plus_plus | gae
    norm_adv_by_std_in_grpo: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    use_critic: bool = False
    critic: CriticConfig = field(default_factory=CriticConfig)


@dataclass
class TrainConfig:
    name: str = "tiny"  # tiny (CPU demo) | reference (paper hyper-parameters)
    rounds: int = 3
    epochs_per_round: int = 1
    prompts_per_step: int = 16
    n: int = 8
    rollout_batch_size: int = 128  # sequences the native backend generates at once (memory bound)
    temperature: float = 1.0
    top_p: float = 1.0
    mini_batch_prompts: int = 16
    micro_batch_size: int = 64  # sequences per forward/backward (gradient accumulation)
    ppo_epochs: int = 1
    lr: float = 2e-4
    lr_scheduler: str = "constant"  # constant | cosine | linear
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "seq-mean-token-mean"
    use_kl_loss: bool = True
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    entropy_coeff: float = 0.0
    max_steps_per_round: int | None = 24
    save_every_steps: int = 10  # trainer state (weights, optimizer, RNG) for resume after a kill
    # Reward-hacking monitor (ftrl.train.monitor): rolling window of steps, and the alarm factors against
    # the warm start's calls per turn (above) and Solve-P of the sampled turns (below).
    monitor_window: int = 4
    monitor_calls_factor: float = 1.75
    monitor_precision_factor: float = 0.6
    gradient_checkpointing: bool = False
    # PPO's critic at this model scale (null: algorithm.critic's paper value). A fresh value head on a tiny
    # model needs a larger lr, a few critic-only steps and several critic passes per step to explain anything
    # within a round (see critic_settings).
    critic_lr: float | None = 1e-3
    critic_warmup_steps: int | None = None
    critic_epochs: int = 4  # critic updates per step (verl critic.ppo_epochs)
    # The value head's start: random (transformers' init, verl's) | zero (V = 0: the first advantages are the
    # whitened returns, no head noise on top)
    critic_head_init: str = "zero"
    # Round k's critic starts from round k-1's (its backbone and head, saved as <round>/train/critic), not from
    # the round's policy with a new head (native backend; verl starts every round's critic from the policy).
    critic_carry_over: bool = True


@dataclass(frozen=True)
class CriticSettings:
    """The critic's effective optimisation settings: the train config's scale overrides, else the algorithm's."""

    lr: float
    warmup_steps: int
    epochs: int
    head_init: str
    carry_over: bool


def critic_settings(algorithm: AlgorithmConfig, train: TrainConfig) -> CriticSettings:
    """``train.critic_*`` where set (per model scale, like ``train.lr``), else ``algorithm.critic.*``."""
    return CriticSettings(
        lr=algorithm.critic.lr if train.critic_lr is None else train.critic_lr,
        warmup_steps=algorithm.critic.warmup_steps if train.critic_warmup_steps is None else train.critic_warmup_steps,
        epochs=train.critic_epochs,
        head_init=train.critic_head_init,
        carry_over=train.critic_carry_over,
    )


@dataclass
class WarmupConfig:
    """Supervised warm start on gold trajectories (runs when model.warm_start is true)."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    num_trajectories: int | None = None  # null: every train environment


@dataclass
class FreezeConfig:
    name: str = "none"
    # Which parameters the selection covers: layer range ("0:0.5" fractions of depth, "0-13"
    # indices, null = all layers) x module kinds; plus an optional regex on parameter names.
    layers: str | None = None
    modules: list[str] = field(default_factory=list)
    regex: str | None = None
    # train: only the selection is trainable | freeze: everything but the selection is trainable
    action: str = "train"


@dataclass
class PeftConfig:
    name: str = "none"  # none | lora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])
    layers: str | None = None


@dataclass
class VerlConfig:
    """``backend=verl``: what the shared groups do not already say (see ``ftrl.train.verl_backend``).

    Hyper-parameters come from ``train``/``algorithm``/``mode``; GPUs, tensor parallel size and
    vLLM memory from ``resources``. ``overrides`` are raw verl overrides appended last (they win).
    """

    rollout_engine: str = "vllm"  # verl's async rollout server: vllm | sglang
    strategy: str = "fsdp"  # actor/ref/critic engine: fsdp | fsdp2 (freeze runs always use fsdp2)
    # Attention of the FSDP actor/ref/critic: sdpa (torch, always installed) | flash_attention_2 (needs
    # flash-attn; faster, and lets verl pack sequences without padding: use_remove_padding).
    attn_implementation: str = "sdpa"
    entropy_chunking: bool = True  # entropy over vocabulary chunks (150k-token vocabularies)
    use_dynamic_bsz: bool = True  # pack micro-batches by tokens (else train.micro_batch_size sequences)
    # Token budget per GPU micro-batch; null: one longest sequence (mode.max_prompt_tokens + response).
    ppo_max_token_len_per_gpu: int | None = None
    param_offload: bool = False  # FSDP parameter offload to CPU (actor)
    optimizer_offload: bool = False  # FSDP optimizer-state offload to CPU (actor)
    agent_workers: int = 8  # agent-loop worker processes that drive the rollout server
    keep_checkpoints: int = 1  # verl checkpoints kept per round (each holds optimizer state)
    python: str | None = None  # interpreter for the verl subprocesses; null: this one
    env: dict[str, str] = field(default_factory=dict)  # for the verl process and every Ray worker
    overrides: list[str] = field(default_factory=list)  # raw verl overrides, appended last

    def check(self, run: RunConfig) -> None:
        """Cross-field rules of the verl backend; messages name the key and the valid options."""
        check_choice("backend.verl.rollout_engine", self.rollout_engine, ("vllm", "sglang"))
        check_choice("backend.verl.strategy", self.strategy, ("fsdp", "fsdp2"))
        check_choice("backend.verl.attn_implementation", self.attn_implementation, ("sdpa", "flash_attention_2"))
        check_positive("backend.verl.agent_workers", self.agent_workers)
        check_positive("backend.verl.keep_checkpoints", self.keep_checkpoints)
        longest = run.mode.max_prompt_tokens + run.max_new_tokens
        if self.ppo_max_token_len_per_gpu is not None and self.ppo_max_token_len_per_gpu < longest:
            raise ConfigError(f"backend.verl.ppo_max_token_len_per_gpu: {self.ppo_max_token_len_per_gpu} cannot hold "
                              f"one sequence of mode.max_prompt_tokens + response tokens = {longest}; raise it or "
                              f"set null")
        for index, override in enumerate(self.overrides):
            if not isinstance(override, str) or "=" not in override:
                raise ConfigError(f"backend.verl.overrides[{index}]: {override!r} is not a verl override "
                                  f"'key=value' (e.g. 'actor_rollout_ref.rollout.enforce_eager=true')")
        for name in self.env:
            if not name.isidentifier():
                raise ConfigError(f"backend.verl.env: {name!r} is not a valid environment variable name")
        # verl's own limits, checked here so the run fails before collection instead of after it.
        check_choice("train.lr_scheduler (backend=verl)", run.train.lr_scheduler, ("constant", "cosine"))
        if run.train.mini_batch_prompts > run.train.prompts_per_step:
            raise ConfigError(f"train.mini_batch_prompts: {run.train.mini_batch_prompts} exceeds "
                              f"train.prompts_per_step={run.train.prompts_per_step} (verl needs mini <= batch)")
        if run.peft.name == "lora":
            if run.peft.layers is not None:
                raise ConfigError("peft.layers: verl's LoRA adapts every layer; layer-restricted LoRA needs "
                                  "backend=native")
            if run.peft.dropout:
                raise ConfigError(f"peft.dropout: verl's LoRA has no dropout; got {run.peft.dropout}, use 0.0")
            if run.freeze.name != "none":
                raise ConfigError(f"freeze={run.freeze.name} with peft=lora: verl's LoRA freezes every base "
                                  "weight, so a freeze policy has no effect there; use backend=native")
        gpus = run.resources.n_gpus_per_node * run.resources.nnodes
        if gpus < 1:
            log.warning("backend=verl trains on GPUs but resources.n_gpus_per_node=%d: the train stage will "
                        "refuse to start; choose a GPU profile (resources=1x24gb, 8x80gb, ...)",
                        run.resources.n_gpus_per_node)
            return
        if gpus % run.resources.tensor_parallel_size:
            raise ConfigError(f"resources.tensor_parallel_size: {run.resources.tensor_parallel_size} does not "
                              f"divide the {gpus} GPUs (n_gpus_per_node x nnodes)")
        if not self.use_dynamic_bsz and (run.train.prompts_per_step * run.train.n) % gpus:
            raise ConfigError(f"train.prompts_per_step x train.n = {run.train.prompts_per_step * run.train.n} "
                              f"sequences must split evenly over {gpus} GPUs")


@dataclass
class BackendConfig:
    name: str = "native"  # native | verl
    verl: VerlConfig = field(default_factory=VerlConfig)


@dataclass
class ResourcesConfig:
    name: str = "cpu"
    device: str = "cpu"  # auto | cpu | cuda
    num_threads: int | None = None  # torch intra-op threads on CPU (null: torch default)
    n_gpus_per_node: int = 0
    nnodes: int = 1
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.7
    sandbox_workers: int = 2


@dataclass
class ToolHopEvalConfig:
    """ToolHop (``eval.benchmarks: [toolhop]``): the three reference protocols and the data file."""

    modes: list[str] = field(default_factory=lambda: ["direct", "mandatory", "free"])
    max_turns: int = 9
    file: str | None = None  # null: <eval.data_dir>/toolhop/ToolHop.jsonl or ToolHop.json
    prompt_dir: str | None = None  # null: the packaged templates; a folder with <mode>.txt holding {question}


@dataclass
class UserSimConfig:
    """The tau-bench user simulator: any engine; the reference uses gpt-4o-2024-08-06, temperature 0."""

    engine: str = "openai"  # openai | hf | vllm | script
    model: str = "gpt-4o-2024-08-06"  # model name (openai) or local path / hub id (hf, vllm)
    api: ApiConfig = field(default_factory=ApiConfig)
    temperature: float = 0.0
    max_tokens: int = 512
    script: list[str] = field(default_factory=list)  # engine=script: fixed user lines, then ###STOP###
    # The user prompt template ({instruction} is replaced); null: ftrl/eval/taubench_user_prompt.txt
    prompt_file: str | None = None


@dataclass
class TauBenchEvalConfig:
    """tau-bench (``eval.benchmarks: [taubench]``): agent episodes against a simulated user."""

    domains: list[str] = field(default_factory=lambda: ["airline", "retail"])
    trials: int = 1  # pass^k is reported for k = 1 .. trials
    max_steps: int = 30
    max_tasks: int | None = None
    user: UserSimConfig = field(default_factory=UserSimConfig)


@dataclass
class RotBenchEvalConfig:
    """RoTBench (``eval.benchmarks: [rotbench]``): one ReAct generation per item, five noise levels."""

    turn: str = "first"  # first | third
    levels: list[str] = field(default_factory=lambda: ["clean", "slight", "medium", "heavy", "union"])
    file: str | None = None  # the FTRL release's RoTBench.jsonl instead of <data_dir>/rotbench/


@dataclass
class GeneralEvalConfig:
    """General ability (``eval.benchmarks: [general]``): MMLU, BBH, GSM8K, MATH, HumanEval, MBPP."""

    tasks: list[str] = field(default_factory=lambda: ["mmlu", "bbh", "gsm8k", "math", "humaneval", "mbpp"])
    file: str | None = None  # the FTRL release's General.jsonl; null: <data_dir>/general/ (+ packaged HumanEval)
    max_per_task: int | None = None  # null: eval.max_samples
    # task -> Hugging Face dataset id ("id[:config][@split]") or a local json/jsonl/parquet/csv file, read
    # through the optional `datasets` package for tasks that the files above do not hold.
    sources: dict[str, str] = field(default_factory=dict)
    prompts: str | None = None  # JSON of prompt templates for sources/HumanEval; null: the packaged one


@dataclass
class BfclEvalConfig:
    """BFCL (``eval.benchmarks: [bfcl]``, ``pip install -e .[bfcl]``): official data and checkers."""

    categories: list[str] = field(default_factory=lambda: [
        "simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
        "irrelevance", "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
        "live_irrelevance", "multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param",
        "multi_turn_long_context"])
    max_per_category: int | None = None


@dataclass
class EvalConfig:
    name: str = "own_test"
    benchmarks: list[str] = field(default_factory=lambda: ["ftrl_test"])
    max_turns: int = 20
    temperature: float = 0.0
    # 1.0: off. inherit=true takes repetition_penalty (and, when sampling, top_k/top_p) from the model's
    # generation_config.json, as the reference's evaluation does (Qwen2.5: 1.05 even when greedy).
    repetition_penalty: float = 1.0
    inherit: bool = False
    batch_size: int = 32
    max_samples: int | None = None  # per benchmark (per group where a benchmark has groups)
    checkpoints: str = "all"  # all: base, warmup and every round | last: only the final policy
    data_dir: str | None = None  # one folder per benchmark (toolhop/, tau-bench/, rotbench/, general/); FTRL_DATA_DIR
    # Scoring where the reference evaluation scripts and a benchmark's own scorer disagree:
    # ftrl = the reference (the paper's numbers) | official = the benchmark's scorer.
    compat: str = "ftrl"
    toolhop: ToolHopEvalConfig = field(default_factory=ToolHopEvalConfig)
    taubench: TauBenchEvalConfig = field(default_factory=TauBenchEvalConfig)
    rotbench: RotBenchEvalConfig = field(default_factory=RotBenchEvalConfig)
    general: GeneralEvalConfig = field(default_factory=GeneralEvalConfig)
    bfcl: BfclEvalConfig = field(default_factory=BfclEvalConfig)


@dataclass
class WandbConfig:
    project: str = "ftrl"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    name: str = "console"  # console | wandb
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class AnalysisConfig:
    """Compare two HF checkpoints directly (``stages=[analyze]``); null: the run's own checkpoints."""

    base: str | None = None
    target: str | None = None


# ------------------------------------------------------------------------------------ interventions
INTERVENTION_KINDS: tuple[str, ...] = ("revert", "transplant")
SELECTOR_KEYS: tuple[str, ...] = ("layers", "modules", "regex")
SELECTOR_FORMS = ("'all', a freeze policy name (conf/freeze/<name>.yaml: its layers x modules x regex), or "
                  "'layers=<range> modules=[<kind>,...] regex=<pattern>' (any of the three)")
FREEZE_POLICY_DIR = Path(__file__).resolve().parent.parent / "conf" / "freeze"


@dataclass(frozen=True)
class SelectorSpec:
    """A parameter selection in the freeze policies' grammar (``ftrl.params``): layers x module kinds x regex.

    ``text`` is the selector as written; all three parts None/empty (``all``) select every tensor.
    """

    text: str
    layers: str | None = None
    modules: tuple[str, ...] = ()
    regex: str | None = None

    @property
    def selects_all(self) -> bool:
        return self.layers is None and not self.modules and self.regex is None


def parse_selector(text: str, key: str = "selector") -> SelectorSpec:
    """Read ``all``, a freeze policy name, or ``layers=0:3 modules=[mlp] regex=...``; errors name ``key``.

    Only the syntax is checked here (the model's depth is checked when a checkpoint is at hand).
    """
    text = str(text).strip()
    if text in ("all", "*"):
        return SelectorSpec(text)
    if "=" not in text:
        return _policy_selector(text, key)
    fields: dict[str, str] = {}
    for token in re.split(r"\s+(?=(?:layers|modules|regex)=)", text):
        name, _, value = token.partition("=")
        if name.strip() not in SELECTOR_KEYS or name.strip() in fields:
            problem = "repeats" if name.strip() in fields else f"has an unknown part '{token}'"
            raise ConfigError(f"{key}: selector '{text}' {problem}; forms: {SELECTOR_FORMS}")
        fields[name.strip()] = value.strip()
    modules = tuple(m.strip().strip("'\"") for m in fields.get("modules", "").strip("[]").split(",") if m.strip())
    spec = SelectorSpec(text, fields.get("layers") or None, modules, fields.get("regex") or None)
    if spec.selects_all:
        raise ConfigError(f"{key}: selector '{text}' sets no layers, modules or regex; write 'all' to select "
                          f"every tensor")
    expand_module_kinds(spec.modules, key)
    if spec.layers is not None:
        check_layer_range_syntax(spec.layers, key)
    if spec.regex is not None:
        try:
            re.compile(spec.regex)
        except re.error as error:
            raise ConfigError(f"{key}: invalid regular expression {spec.regex!r}: {error}") from None
    return spec


def check_layer_range_syntax(spec: str, key: str) -> None:
    """Check a layer range without the model's depth (against a deep stand-in, which the message never names)."""
    depth = 1 << 16
    try:
        parse_layer_range(spec, depth, key)
    except ConfigError as error:
        message = str(error).split("; the model has")[0].replace(f"<= {depth}", "<= depth")
        raise ConfigError(message) from None


def _policy_selector(name: str, key: str) -> SelectorSpec:
    """The selection (layers x modules x regex, not the action) of freeze policy ``name``."""
    policies = sorted(p.stem for p in FREEZE_POLICY_DIR.glob("*.yaml"))
    if name not in policies:
        raise ConfigError(f"{key}: {name!r} is no freeze policy; forms: {SELECTOR_FORMS}; policies: {policies}"
                          f"{did_you_mean(name, policies)}")
    policy = OmegaConf.to_container(OmegaConf.load(FREEZE_POLICY_DIR / f"{name}.yaml"))
    assert isinstance(policy, dict)
    spec = SelectorSpec(name, policy.get("layers"), tuple(policy.get("modules") or ()), policy.get("regex"))
    if spec.selects_all:
        raise ConfigError(f"{key}: freeze policy '{name}' selects no parameter group (it trains everything); "
                          f"write 'all' to select every tensor")
    return spec


def parse_intervention(text: str, key: str = "intervention") -> tuple[str, SelectorSpec]:
    """``revert:<selector>`` or ``transplant:<selector>`` -> (kind, selector)."""
    kind, sep, selector = str(text).partition(":")
    if not sep:
        raise ConfigError(f"{key}: '{text}' is not '<kind>:<selector>' with kind in {list(INTERVENTION_KINDS)}")
    check_choice(key, kind.strip(), INTERVENTION_KINDS)
    return kind.strip(), parse_selector(selector, key)


@dataclass
class InterveneConfig:
    """The ``intervene`` stage (``ftrl.analysis.intervene``): from a base B and a trained T, build
    ``revert:<selector>`` (T with the selection set back to B) and ``transplant:<selector>`` (B with only
    the selection taken from T), plus a per-layer scan of transplants, and evaluate each on ``eval.benchmarks``."""

    base: str | None = None    # B: a checkpoint of this run (base, warmup, round<k>) or a path; null: warmup, else base
    target: str | None = None  # T: a checkpoint of this run or a path; null: the last round
    interventions: list[str] = field(default_factory=lambda: [
        "revert:paper_lower_mlp_only", "transplant:paper_lower_mlp_only", "revert:lower_mlp_only",
        "transplant:lower_mlp_only", "transplant:mlp_only", "transplant:attn_only"])
    scan: list[str] = field(default_factory=lambda: ["mlp", "attn"])  # per layer i: transplant:layers=i modules=[m]
    scan_layers: str | None = None  # layer range of the scan; null: every layer
    metric: str | None = None  # the metric of the plot and the summary lines; null: the first benchmark's headline
    keep: bool = False  # keep the intervened models (intervene/models/) after their evaluation

    def check(self) -> None:
        for index, text in enumerate(self.interventions):
            parse_intervention(text, f"intervene.interventions[{index}]")
        for index, module in enumerate(self.scan):
            expand_module_kinds([module], f"intervene.scan[{index}]")
        if self.scan_layers is not None:
            check_layer_range_syntax(self.scan_layers, "intervene.scan_layers")


@dataclass
class RunConfig:
    name: str = "default"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    run_dir: str = "outputs/default/base"
    dry_run: bool = False
    # Stages to run again although they are done (their outputs feed no other stage): eval, analyze.
    rerun: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    envs: EnvsConfig = field(default_factory=EnvsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    intervene: InterveneConfig = field(default_factory=InterveneConfig)

    # ------------------------------------------------------------------ validation
    def validate(self) -> RunConfig:
        """Check every key once, as the config loads; raise ConfigError naming the key and the valid options."""
        _check_stages(self.stages)
        _check_rerun(self.rerun)
        _check_model(self)
        _check_envs(self.envs)
        _check_reward_and_episodes(self)
        _check_algorithm_and_train(self)
        check_selectors(self.freeze, self.peft, num_layers=self.known_num_layers())
        _check_backend_and_resources(self)
        _check_eval_and_logger(self)
        self.intervene.check()
        return self

    def known_num_layers(self) -> int | None:
        """The policy's decoder depth when it can be known before loading: the tiny model's, or a local
        ``model.path``'s ``config.json``; None for hub ids and API models."""
        if self.model.path is None:
            return self.model.tiny.num_hidden_layers if self.model.name == "tiny" else None
        config_file = Path(self.model.path).expanduser() / "config.json"
        if not config_file.is_file():
            return None
        try:
            hf_config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            return None
        depth = hf_config.get("num_hidden_layers", (hf_config.get("text_config") or {}).get("num_hidden_layers"))
        return depth if isinstance(depth, int) else None

    # ------------------------------------------------------------------ helpers
    @property
    def max_new_tokens(self) -> int:
        """Response budget per turn: the mode's length, capped by the model's own cap if set."""
        if self.model.max_new_tokens is None:
            return self.mode.max_response_tokens
        return min(self.mode.max_response_tokens, self.model.max_new_tokens)


RERUNNABLE_STAGES: tuple[str, ...] = ("eval", "analyze", "intervene")


def _check_rerun(rerun: list[str]) -> None:
    for index, stage in enumerate(rerun):
        if stage in ALL_STAGES and stage not in RERUNNABLE_STAGES:
            raise ConfigError(f"rerun[{index}]: '{stage}' cannot be re-run in place: later stages were built on "
                              f"its outputs. Start a new run for that (name=<new name> or hydra.run.dir=<path>); "
                              f"rerun takes {list(RERUNNABLE_STAGES)}")
        check_choice(f"rerun[{index}]", stage, RERUNNABLE_STAGES)


def _check_stages(stages: list[str]) -> None:
    for index, stage in enumerate(stages):
        check_choice(f"stages[{index}]", stage, ALL_STAGES)
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stages: listed twice in {stages}")
    if [s for s in ALL_STAGES if s in stages] != list(stages):
        raise ConfigError(f"stages: must follow the pipeline order {list(ALL_STAGES)}, got {stages}")


def _check_model(run: RunConfig) -> None:
    from ftrl.registry import ENGINES, PARSERS

    model = run.model
    ENGINES.check(model.engine, "model.engine")
    PARSERS.check(model.parser, "model.parser")
    check_choice("model.dtype", model.dtype, ("float32", "bfloat16", "float16", "auto"))
    if model.name == "tiny" and model.path is None:
        tiny = model.tiny
        if tiny.hidden_size % tiny.num_attention_heads:
            raise ConfigError("model.tiny.hidden_size must be divisible by model.tiny.num_attention_heads")
        if tiny.num_attention_heads % tiny.num_key_value_heads:
            raise ConfigError("model.tiny.num_attention_heads must be divisible by num_key_value_heads")
    elif model.path is None and model.engine != "openai":
        raise ConfigError(f"model.path: required for model.name='{model.name}' (a local path or hub id)")
    if run.mode.enable_thinking and not model.supports_thinking:
        raise ConfigError(f"mode.enable_thinking=true but model '{model.name}' has supports_thinking=false")
    check_positive("mode.max_response_tokens", run.mode.max_response_tokens)


def _check_envs(envs: EnvsConfig) -> None:
    from ftrl.registry import ENV_SOURCES

    ENV_SOURCES.check(envs.name, "envs.name")
    check_choice("envs.invalid", envs.invalid, ("drop", "fail"))
    if envs.name == "ftrl_files" and not (envs.files.train or envs.files.test):
        raise ConfigError("envs.files.train / envs.files.test: envs=ftrl_files needs at least one path")
    proc = envs.procedural
    for key in ("functional_generalization", "parameter_expansion", "parameter_type_generalization"):
        value = getattr(proc, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"envs.procedural.{key}: must be a probability in [0, 1], got {value}")
    if proc.min_distractors > proc.max_distractors:
        raise ConfigError("envs.procedural.min_distractors must be <= envs.procedural.max_distractors")
    _validate_llm_build(envs.llm)
    for ref, weight in envs.mix.items():
        if weight is None or not weight > 0:
            raise ConfigError(f"envs.mix.{ref}: weight must be > 0, got {weight!r}")
    if not 0.0 <= envs.taubench.test_fraction < 1.0:
        raise ConfigError(f"envs.taubench.test_fraction: must be in [0, 1), got {envs.taubench.test_fraction}")
    for index, domain in enumerate(envs.taubench.domains):
        check_choice(f"envs.taubench.domains[{index}]", domain, ("airline", "retail"))


def _check_reward_and_episodes(run: RunConfig) -> None:
    from ftrl.registry import REWARDS

    REWARDS.check(run.reward.name, "reward.name")
    check_choice("reward.compat", run.reward.compat, ("ftrl", "fixed"))
    check_positive("reward.tool_timeout_s", run.reward.tool_timeout_s)
    if run.reward.max_tool_output_chars is not None:
        check_positive("reward.max_tool_output_chars", run.reward.max_tool_output_chars)
    check_positive("collect.max_turns", run.collect.max_turns)
    if run.collect.top_k < 0:
        raise ConfigError(f"collect.top_k: must be >= 0 (0: off), got {run.collect.top_k}")
    for key, value in (("collect.repetition_penalty", run.collect.repetition_penalty),
                       ("eval.repetition_penalty", run.eval.repetition_penalty)):
        check_positive(key, value)
    check_positive("eval.max_turns", run.eval.max_turns)


def _check_algorithm_and_train(run: RunConfig) -> None:
    from ftrl.registry import ADV_ESTIMATORS, ALGORITHMS

    algorithm, train = run.algorithm, run.train
    ALGORITHMS.check(algorithm.name, "algorithm.name")
    ADV_ESTIMATORS.check(algorithm.adv_estimator, "algorithm.adv_estimator")
    if algorithm.adv_estimator == "gae" and not algorithm.use_critic:
        raise ConfigError("algorithm.use_critic: adv_estimator=gae (PPO) needs a critic; set use_critic=true")
    if algorithm.adv_estimator != ALGORITHMS.get(algorithm.name).adv_estimator:
        log.info("algorithm=%s trains with algorithm.adv_estimator=%s (overridden; both backends use it)",
                 algorithm.name, algorithm.adv_estimator)
    check_choice("train.name", train.name, ("tiny", "reference"))
    check_choice("train.lr_scheduler", train.lr_scheduler, ("constant", "cosine", "linear"))
    check_choice("train.loss_agg_mode", train.loss_agg_mode,
                 ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
    check_choice("train.kl_loss_type", train.kl_loss_type, ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"))
    check_positive("train.rounds", train.rounds)
    check_positive("train.n", train.n)
    check_positive("train.rollout_batch_size", train.rollout_batch_size)
    check_positive("train.monitor_window", train.monitor_window)
    check_positive("train.critic_epochs", train.critic_epochs)
    check_choice("train.critic_head_init", train.critic_head_init, ("random", "zero"))
    if train.critic_lr is not None:
        check_positive("train.critic_lr", train.critic_lr)
    if train.critic_warmup_steps is not None and train.critic_warmup_steps < 0:
        raise ConfigError(f"train.critic_warmup_steps: must be >= 0 or null, got {train.critic_warmup_steps}")
    if not train.monitor_calls_factor > 1.0 or not 0.0 < train.monitor_precision_factor < 1.0:
        raise ConfigError(f"train.monitor_calls_factor must be > 1 and train.monitor_precision_factor in (0, 1), got "
                          f"{train.monitor_calls_factor}, {train.monitor_precision_factor}")
    if algorithm.adv_estimator == "grpo" and train.n < 2:
        raise ConfigError("train.n: GRPO needs at least 2 samples per prompt for a group baseline")
    if train.name == "tiny" and run.model.name != "tiny":
        log.warning("train=tiny (CPU demo hyper-parameters) with model=%s; real models want "
                    "train=reference or a +experiment= file", run.model.name)


def _check_backend_and_resources(run: RunConfig) -> None:
    from ftrl.registry import BACKENDS

    check_choice("peft.name", run.peft.name, ("none", "lora"))
    BACKENDS.check(run.backend.name, "backend.name")
    if run.backend.name == "verl":
        run.backend.verl.check(run)
    check_choice("resources.device", run.resources.device, ("auto", "cpu", "cuda"))
    check_positive("resources.sandbox_workers", run.resources.sandbox_workers)


def _check_eval_and_logger(run: RunConfig) -> None:
    from ftrl.registry import BENCHMARKS

    for index, name in enumerate(run.eval.benchmarks):
        BENCHMARKS.check(name, f"eval.benchmarks[{index}]")
    check_choice("eval.checkpoints", run.eval.checkpoints, ("all", "last"))
    check_choice("eval.compat", run.eval.compat, ("ftrl", "official"))
    _check_benchmark_settings(run.eval)
    check_choice("logger.name", run.logger.name, ("console", "wandb"))
    check_choice("logger.wandb.mode", run.logger.wandb.mode, ("offline", "online", "disabled"))


def _check_benchmark_settings(ev: EvalConfig) -> None:
    for index, mode in enumerate(ev.toolhop.modes):
        check_choice(f"eval.toolhop.modes[{index}]", mode, ("direct", "mandatory", "free"))
    check_positive("eval.toolhop.max_turns", ev.toolhop.max_turns)
    for index, domain in enumerate(ev.taubench.domains):
        check_choice(f"eval.taubench.domains[{index}]", domain, ("airline", "retail"))
    check_positive("eval.taubench.trials", ev.taubench.trials)
    check_positive("eval.taubench.max_steps", ev.taubench.max_steps)
    check_choice("eval.taubench.user.engine", ev.taubench.user.engine, ("openai", "hf", "vllm", "script"))
    check_choice("eval.rotbench.turn", ev.rotbench.turn, ("first", "third"))
    for index, level in enumerate(ev.rotbench.levels):
        check_choice(f"eval.rotbench.levels[{index}]", level, ("clean", "slight", "medium", "heavy", "union"))
    for index, task in enumerate(ev.general.tasks):
        check_choice(f"eval.general.tasks[{index}]", task, ("mmlu", "bbh", "gsm8k", "math", "humaneval", "mbpp"))
    for task in ev.general.sources:
        check_choice(f"eval.general.sources.{task}", task, ("mmlu", "bbh", "gsm8k", "math", "humaneval", "mbpp"))
    if ev.general.max_per_task is not None:
        check_positive("eval.general.max_per_task", ev.general.max_per_task)
    bfcl_names = ("simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
                  "irrelevance", "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
                  "live_irrelevance", "multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param",
                  "multi_turn_long_context", "simple", "multi_turn", "non_live", "live", "all")
    for index, category in enumerate(ev.bfcl.categories):
        check_choice(f"eval.bfcl.categories[{index}]", category, bfcl_names)
    if ev.bfcl.max_per_category is not None:
        check_positive("eval.bfcl.max_per_category", ev.bfcl.max_per_category)


def _validate_llm_build(llm: LLMBuildConfig) -> None:
    key = "envs.llm"
    for name in ("functional_generalization", "parameter_expansion", "parameter_type_generalization"):
        value = getattr(llm, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}.{name}: must be a probability in [0, 1], got {value}")
    if not 0 <= llm.min_distractors <= llm.max_distractors:
        raise ConfigError(f"{key}.min_distractors/max_distractors: need 0 <= min <= max, got "
                          f"{llm.min_distractors}, {llm.max_distractors}")
    if not 0.0 <= llm.test_fraction < 1.0:
        raise ConfigError(f"{key}.test_fraction: must be in [0, 1), got {llm.test_fraction}")
    if not 0.0 < llm.dedup_threshold <= 1.0:
        raise ConfigError(f"{key}.dedup_threshold: must be in (0, 1], got {llm.dedup_threshold}")
    check_positive(f"{key}.max_repairs", llm.max_repairs, allow_zero=True)
    check_positive(f"{key}.tasks_per_topic", llm.tasks_per_topic)
    check_positive(f"{key}.max_tokens", llm.max_tokens)
    check_positive(f"{key}.gate_timeout_s", llm.gate_timeout_s)
    check_positive(f"{key}.reference_max_turns", llm.reference_max_turns)
    check_positive(f"{key}.backoff_base_s", llm.backoff_base_s, allow_zero=True)
    check_positive(f"{key}.api.concurrency", llm.api.concurrency)
    check_positive(f"{key}.api.max_retries", llm.api.max_retries, allow_zero=True)
    check_positive(f"{key}.api.timeout_s", llm.api.timeout_s)
    if llm.temperature < 0:
        raise ConfigError(f"{key}.temperature: must be >= 0, got {llm.temperature}")
    scenario_keys = ("single_hop", "parallel_single_hop", "multi_hop", "parallel_multi_hop")
    for name, weight in llm.scenario_weights.items():
        check_choice(f"{key}.scenario_weights", name, scenario_keys)
        if weight is None or weight < 0:
            raise ConfigError(f"{key}.scenario_weights.{name}: must be >= 0, got {weight!r}")
    stages = ("seed", "decompose", "document", "integrate", "scale", "deploy", "repair")
    for stage in llm.prompts:
        check_choice(f"{key}.prompts", stage, stages)
    _validate_seed_source(llm.seed_source)


def _validate_seed_source(source: SeedSourceConfig) -> None:
    key = "envs.llm.seed_source"
    if source.kind is None:
        if source.path:
            raise ConfigError(f"{key}.kind: null, but {key}.path is set; set kind to one of {list(SEED_SOURCE_KINDS)}")
        return
    check_choice(f"{key}.kind", source.kind, SEED_SOURCE_KINDS)
    if not source.path:
        raise ConfigError(f"{key}.path: required with {key}.kind={source.kind} (a file, a directory or a dataset id)")
    for name in ("question_field", "answer_field", "id_field", "split"):
        value = getattr(source, name)
        if value is not None and not str(value).strip():
            raise ConfigError(f"{key}.{name}: must be a non-empty field name, got {value!r}")
    if source.question_field == source.answer_field:
        raise ConfigError(f"{key}.question_field/answer_field: both are {source.question_field!r}; "
                          "the question and the gold answer must be different fields")


def load_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Validate a composed config against the schema and return the typed, checked RunConfig."""
    schema = OmegaConf.structured(RunConfig)
    try:
        user = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        user = OmegaConf.masked_copy(user, [k for k in user if k != "hydra"]) if "hydra" in user else user
        merged = OmegaConf.merge(schema, user)
        run_config: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        unknown = unknown_key_message(key) if key else None
        if unknown:
            raise ConfigError(unknown) from None
        message = str(error.msg if hasattr(error, "msg") else error).strip().splitlines()[0]
        raise ConfigError(f"{key + ': ' if key else ''}{message}") from None
    return run_config.validate()


def schema_keys(path: str) -> list[str] | None:
    """The keys the schema allows under ``path`` (``""``: the top level); None if ``path`` is no section.

    Free-form mappings (``envs.mix``, ``backend.verl.env``, ...) allow any key and return None.
    """
    node: Any = RunConfig
    for part in [p for p in path.split(".") if p]:
        if not dataclasses.is_dataclass(node):
            return None
        types = typing.get_type_hints(node)
        if part not in types:
            return None
        node = types[part]
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else None


def unknown_key_message(key: str) -> str | None:
    """``"train.lrr: unknown key; valid keys of train: [...]; did you mean 'lr'?"``, or None if ``key`` is known
    (or lies under a free-form mapping)."""
    parent, _, leaf = key.rpartition(".")
    valid = schema_keys(parent)
    if valid is None or leaf in valid:
        return None
    where = parent or "the top level"
    return f"{key}: unknown key; valid keys of {where}: {sorted(valid)}{did_you_mean(leaf, valid)}"


def check_override_keys(overrides: list[str], groups: typing.Iterable[str] = ()) -> None:
    """Refuse command-line overrides of keys the schema does not have, before Hydra composes.

    Hydra would report ``Key 'lrr' is not in struct`` and suggest ``+train.lrr``, which then fails
    in validation; this names the valid keys of that section and the closest one instead. ``groups``
    are config groups without a schema key of their own (``+experiment=``, ``+debug=``).
    """
    skip = set(groups) | {"hydra"}
    for override in overrides:
        key, sep, _ = override.partition("=")
        key = key.strip().lstrip("+~")
        if not sep or not key or key.split(".")[0].split("/")[0] in skip or "/" in key or "@" in key:
            continue
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            message = unknown_key_message(".".join(parts[:depth]))
            if message:
                raise ConfigError(message)


def to_container(run_config: RunConfig) -> dict[str, Any]:
    """Plain-dict form for manifests, hashes and W&B."""
    return OmegaConf.to_container(OmegaConf.structured(run_config), resolve=True)  # type: ignore[return-value]
