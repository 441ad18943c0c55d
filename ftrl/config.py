"""Typed run configuration: the dataclass schema every Hydra composition is validated against once.

``load_run_config(cfg)`` merges a composed ``DictConfig`` into :class:`RunConfig` (unknown keys and
wrong types fail with the full key path), then ``RunConfig.validate()`` checks choices and
cross-field rules with messages that name the key and the valid options.

    python -m ftrl.run --cfg job          # print the composed config
    python -c "from ftrl.config import RunConfig; RunConfig().validate()"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftrl.registry import unknown_choice_message

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("build_envs", "collect", "train", "eval", "analyze")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the valid options."""


def _check_choice(key: str, value: Any, choices: tuple[Any, ...] | list[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {unknown_choice_message('value', value, [str(c) for c in choices])}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value!r}")


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
    path: Optional[str] = None
    parser: str = "qwen"  # tool-call format family: qwen (Hermes <tool_call>) | llama31
    dtype: str = "float32"
    supports_thinking: bool = True
    engine: str = "hf"  # hf | vllm | openai
    # Caps the mode's response length (the tiny model's turns are short).
    max_new_tokens: Optional[int] = None
    warm_start: bool = False  # supervised warm start on gold trajectories before RL (tiny models)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    trust_remote_code: bool = False


@dataclass
class ModeConfig:
    name: str = "non_reasoning"
    enable_thinking: bool = False
    max_response_tokens: int = 1024
    max_prompt_tokens: int = 16384


@dataclass
class ProceduralConfig:
    """Offline environment generator knobs (DESIGN §1: the four complexity-scaling strategies)."""

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
    functional_generalization: float = 0.0
    parameter_expansion: float = 0.0
    parameter_type_generalization: float = 0.0
    # ... and how many distractor tools are added (a range).
    min_distractors: int = 0
    max_distractors: int = 0


@dataclass
class FilesConfig:
    train: Optional[str] = None
    test: Optional[str] = None


@dataclass
class EnvsConfig:
    name: str = "procedural"  # procedural | ftrl_files | llm
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    # Optional caps applied after loading (useful for quick runs on big sets).
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    llm: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    name: str = "solve_f1"
    compat: str = "ftrl"  # ftrl: reproduce the reference exactly | fixed: strip thoughts, unique ids
    tool_timeout_s: float = 10.0


@dataclass
class CollectConfig:
    max_turns: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 32  # conversations generated together
    max_envs: Optional[int] = None  # cap on environments per round (null: all train envs)


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
    prompts_per_step: int = 512
    n: int = 16
    temperature: float = 0.7
    top_p: float = 1.0
    mini_batch_prompts: int = 32
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation)
    ppo_epochs: int = 1
    lr: float = 1e-6
    lr_scheduler: str = "constant"  # constant | cosine | linear
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "seq-mean-token-mean"
    use_kl_loss: bool = True
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    entropy_coeff: float = 0.001
    max_steps_per_round: Optional[int] = None
    save_every_steps: int = 10  # trainer state (weights, optimizer, RNG) for resume after a kill
    gradient_checkpointing: bool = False


@dataclass
class WarmupConfig:
    """Supervised warm start on gold trajectories (runs when model.warm_start is true)."""

    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    num_trajectories: Optional[int] = None  # null: every train environment


@dataclass
class FreezeConfig:
    name: str = "none"
    # Which parameters the selection covers: layer range ("0:0.5" fractions of depth, "0-13"
    # indices, null = all layers) x module kinds; plus an optional regex on parameter names.
    layers: Optional[str] = None
    modules: list[str] = field(default_factory=list)
    regex: Optional[str] = None
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
    layers: Optional[str] = None


@dataclass
class BackendConfig:
    name: str = "native"  # native | verl
    verl: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResourcesConfig:
    name: str = "cpu"
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = None  # torch intra-op threads on CPU (null: torch default)
    n_gpus_per_node: int = 0
    nnodes: int = 1
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.7
    sandbox_workers: int = 2


@dataclass
class EvalConfig:
    name: str = "own_test"
    benchmarks: list[str] = field(default_factory=lambda: ["ftrl_test"])
    max_turns: int = 20
    temperature: float = 0.0
    batch_size: int = 32
    max_samples: Optional[int] = None
    checkpoints: str = "all"  # all: base, warmup and every round | last: only the final policy
    data_dir: Optional[str] = None  # benchmark data (tau-bench, RoTBench); env FTRL_DATA_DIR


@dataclass
class WandbConfig:
    project: str = "ftrl"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    name: str = "console"  # console | wandb
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class AnalysisConfig:
    """Compare two HF checkpoints directly (``stages=[analyze]``); null: the run's own checkpoints."""

    base: Optional[str] = None
    target: Optional[str] = None


@dataclass
class RunConfig:
    name: str = "default"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    run_dir: str = "outputs/default/base"
    dry_run: bool = False
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

    # ------------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        from ftrl.registry import BENCHMARKS, ENV_SOURCES, PARSERS, REWARDS

        for index, stage in enumerate(self.stages):
            _check_choice(f"stages[{index}]", stage, STAGES)
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages: listed twice in {self.stages}")
        order = [s for s in STAGES if s in self.stages]
        if order != list(self.stages):
            raise ConfigError(f"stages: must follow the pipeline order {list(STAGES)}, got {self.stages}")

        _check_choice("model.engine", self.model.engine, ("hf", "vllm", "openai"))
        PARSERS.check(self.model.parser, "model.parser")
        _check_choice("model.dtype", self.model.dtype, ("float32", "bfloat16", "float16", "auto"))
        if self.model.name == "tiny" and self.model.path is None:
            tiny = self.model.tiny
            if tiny.hidden_size % tiny.num_attention_heads:
                raise ConfigError("model.tiny.hidden_size must be divisible by model.tiny.num_attention_heads")
            if tiny.num_attention_heads % tiny.num_key_value_heads:
                raise ConfigError("model.tiny.num_attention_heads must be divisible by num_key_value_heads")
        elif self.model.path is None and self.model.engine != "openai":
            raise ConfigError(f"model.path: required for model.name='{self.model.name}' (a local path or hub id)")
        if self.mode.enable_thinking and not self.model.supports_thinking:
            raise ConfigError(f"mode.enable_thinking=true but model '{self.model.name}' has supports_thinking=false")
        _check_positive("mode.max_response_tokens", self.mode.max_response_tokens)

        ENV_SOURCES.check(self.envs.name, "envs.name")
        if self.envs.name == "ftrl_files" and not (self.envs.files.train or self.envs.files.test):
            raise ConfigError("envs.files.train / envs.files.test: envs=ftrl_files needs at least one path")
        proc = self.envs.procedural
        for key in ("functional_generalization", "parameter_expansion", "parameter_type_generalization"):
            value = getattr(proc, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"envs.procedural.{key}: must be a probability in [0, 1], got {value}")
        if proc.min_distractors > proc.max_distractors:
            raise ConfigError("envs.procedural.min_distractors must be <= envs.procedural.max_distractors")

        REWARDS.check(self.reward.name, "reward.name")
        _check_choice("reward.compat", self.reward.compat, ("ftrl", "fixed"))
        _check_positive("reward.tool_timeout_s", self.reward.tool_timeout_s)
        _check_positive("collect.max_turns", self.collect.max_turns)
        _check_positive("eval.max_turns", self.eval.max_turns)

        _check_choice("algorithm.name", self.algorithm.name, ("grpo", "reinforce_pp", "ppo"))
        _check_choice("algorithm.adv_estimator", self.algorithm.adv_estimator,
                      ("grpo", "reinforce_plus_plus", "gae"))
        if self.algorithm.adv_estimator == "gae" and not self.algorithm.use_critic:
            raise ConfigError("algorithm.use_critic: adv_estimator=gae (PPO) needs a critic; set use_critic=true")
        _check_choice("train.name", self.train.name, ("tiny", "reference"))
        _check_choice("train.lr_scheduler", self.train.lr_scheduler, ("constant", "cosine", "linear"))
        _check_choice("train.loss_agg_mode", self.train.loss_agg_mode,
                      ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
        _check_choice("train.kl_loss_type", self.train.kl_loss_type,
                      ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"))
        _check_positive("train.rounds", self.train.rounds)
        _check_positive("train.n", self.train.n)
        if self.algorithm.adv_estimator == "grpo" and self.train.n < 2:
            raise ConfigError("train.n: GRPO needs at least 2 samples per prompt for a group baseline")
        if self.train.name == "tiny" and self.model.name != "tiny":
            log.warning("train=tiny (CPU demo hyper-parameters) with model=%s; real models want "
                        "train=reference or a +experiment= file", self.model.name)

        _check_choice("freeze.action", self.freeze.action, ("train", "freeze"))
        _check_choice("peft.name", self.peft.name, ("none", "lora"))
        _check_choice("backend.name", self.backend.name, ("native", "verl"))
        _check_choice("resources.device", self.resources.device, ("auto", "cpu", "cuda"))
        _check_positive("resources.sandbox_workers", self.resources.sandbox_workers)
        for index, name in enumerate(self.eval.benchmarks):
            BENCHMARKS.check(name, f"eval.benchmarks[{index}]")
        _check_choice("eval.checkpoints", self.eval.checkpoints, ("all", "last"))
        _check_choice("logger.name", self.logger.name, ("console", "wandb"))
        _check_choice("logger.wandb.mode", self.logger.wandb.mode, ("offline", "online", "disabled"))
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def max_new_tokens(self) -> int:
        """Response budget per turn: the mode's length, capped by the model's own cap if set."""
        if self.model.max_new_tokens is None:
            return self.mode.max_response_tokens
        return min(self.mode.max_response_tokens, self.model.max_new_tokens)


def load_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Validate a composed config against the schema and return the typed, checked RunConfig."""
    schema = OmegaConf.structured(RunConfig)
    try:
        user = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        user = OmegaConf.masked_copy(user, [k for k in user.keys() if k != "hydra"]) if "hydra" in user else user
        merged = OmegaConf.merge(schema, user)
        run_config: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{key + ': ' if key else ''}{error.msg if hasattr(error, 'msg') else error}") from None
    return run_config.validate()


def to_container(run_config: RunConfig) -> dict[str, Any]:
    """Plain-dict form for manifests, hashes and W&B."""
    return OmegaConf.to_container(OmegaConf.structured(run_config), resolve=True)  # type: ignore[return-value]
