"""The verl backend up to the GPU: overrides against verl's own config, dataset rows, reward, agent
loop, freeze hook, checkpoint merge and the dry-run command (verl's trainer itself needs GPUs).

    OMP_NUM_THREADS=1 python -m pytest tests/test_verl_backend.py -q
    FTRL_UPDATE_GOLDEN=1 python -m pytest tests/test_verl_backend.py -q -k golden   # rewrite the golden list
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ftrl.artifacts import RunDir
from ftrl.config import ConfigError, ProceduralConfig, RunConfig, TinyModelConfig, load_run_config
from ftrl.envs.procedural import build_procedural_envs
from ftrl.llm.chat_template import render_chat
from ftrl.llm.tiny import build_tiny_model, build_tokenizer, corpus_from_records
from ftrl.registry import ADV_ESTIMATORS, ALGORITHMS
from ftrl.reward import score_response
from ftrl.train import verl_backend as vb
from ftrl.types import as_json_obj

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "verl_overrides_qwen3_8b_grpo.txt"
# A node of 8 GPUs with tensor parallel 2 (spelled out so the tests do not depend on profile files).
GPUS = ["resources.device=cuda", "resources.n_gpus_per_node=8", "resources.tensor_parallel_size=2",
        "resources.gpu_memory_utilization=0.6"]


# ------------------------------------------------------------------------------------ helpers
def compose_run(overrides: list[str]) -> RunConfig:
    """Our config (``conf/``) composed and validated."""
    import ftrl.run  # noqa: F401  (registers the ftrl_dirname resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw = compose(config_name="config", overrides=["run_dir=/runs/test", *overrides])
    return load_run_config(raw)


def apply_overrides(base: Any, overrides: list[str]) -> Any:
    """verl's composed defaults with ``overrides`` applied by Hydra's own override logic.

    ``compose_verl_config`` re-runs the whole composition (~1 s); this applies the same overrides
    to one composed copy (~0.1 s). ``test_fast_path_equals_full_composition`` shows both agree.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config = copy.deepcopy(base)
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(list(overrides)), config)
    return config


def tool_call_text(calls: list[dict]) -> str:
    """Qwen/Hermes tool-call blocks, as a model writes them."""
    return "\n".join(f'<tool_call>\n{json.dumps({"name": c["name"], "arguments": c["arguments"]})}\n</tool_call>'
                     for c in calls)


class GoldEngine:
    """Plays each environment's gold calls turn by turn, then states the answer (a perfect policy)."""

    def __init__(self, envs: list[dict]) -> None:
        self.by_question = {env["messages"][0]["content"]: env for env in envs}

    def generate(self, requests: list[Any], params: Any) -> list[list[Any]]:
        from ftrl.llm.engines.base import Generation

        outputs = []
        for request in requests:
            env = self.by_question[request.messages[0]["content"]]
            turn = sum(1 for m in request.messages if m["role"] == "assistant")
            gold = json.loads(env["gold_calls"])
            text = tool_call_text(gold[turn]) if turn < len(gold) else f"The answer is {env['answer']}."
            outputs.append([Generation(text=text, prompt_token_ids=[], token_ids=[], finish_reason="stop")])
        return outputs


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def verl_base() -> Any:
    """verl's ppo_trainer config with no override, composed once for the module."""
    return vb.compose_verl_config([])


@pytest.fixture(scope="module")
def envs() -> list[dict]:
    return build_procedural_envs(ProceduralConfig(num_train=8, num_test=0), seed=0)["train"]


@pytest.fixture(scope="module")
def tokenizer(envs: list[dict]) -> Any:
    return build_tokenizer(corpus_from_records(envs), vocab_size=1024)


@pytest.fixture(scope="module")
def model_dir(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local HF model directory: verl's validate_config reads the critic's model config (PPO)."""
    path = tmp_path_factory.mktemp("tiny_model")
    _tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def snapshots(envs: list[dict], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Real snapshot records: the collection stage run with a scripted perfect policy."""
    from ftrl.collect import collect_snapshots, executor_from_config, parser_from_config
    from ftrl.envs.io import read_records
    from ftrl.llm.engines.base import SamplingParams

    run_config = RunConfig()
    path = tmp_path_factory.mktemp("collect") / "snapshots.jsonl"
    collect_snapshots(GoldEngine(envs), envs, path, params=SamplingParams(), max_turns=20,
                      parser=parser_from_config(run_config), execute=executor_from_config(run_config), batch_size=8,
                      desc="gold")
    return read_records(path)


@pytest.fixture(scope="module")
def tiny_run(envs: list[dict], snapshots: list[dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run directory with environments, the tiny base model and round 1's snapshots."""
    from ftrl.envs.io import write_jsonl
    from ftrl.llm.tiny import ensure_base_model
    from ftrl.run_state import RunContext

    root = tmp_path_factory.mktemp("run")
    overrides = ["backend=verl", "+debug=smoke", "model.warm_start=false", "resources.n_gpus_per_node=1",
                 f"run_dir={root}"]
    run_config = compose_run(overrides)
    ctx = RunContext(cfg=run_config, run_dir=RunDir(root))
    write_jsonl(ctx.run_dir.envs("train"), envs)
    ensure_base_model(ctx)
    write_jsonl(ctx.run_dir.snapshots(1), snapshots)
    return {"ctx": ctx, "overrides": overrides, "root": root}


@pytest.fixture(scope="module")
def dataset(snapshots: list[dict], tokenizer: Any, verl_base: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """The snapshots written by our writer and loaded back by verl's RLHFDataset (+ the verl config)."""
    import datasets
    from verl.utils.dataset.rl_dataset import RLHFDataset

    folder = tmp_path_factory.mktemp("verl_data")
    rows, dropped = vb.build_verl_rows(snapshots, tokenizer, 16384, enable_thinking=False)
    assert dropped == 0
    path = vb.write_verl_parquet(folder / "train.parquet", rows)
    run_config = compose_run(["backend=verl", *GPUS])
    config = apply_overrides(verl_base, vb.verl_overrides(run_config, "/runs/test", 1, policy="/models/tiny"))
    with pytest.MonkeyPatch.context() as patch:  # keep the Arrow cache in the tmp dir
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(folder / "hf_cache"))
        yield RLHFDataset(data_files=[str(path)], tokenizer=tokenizer, config=config.data), config


# ------------------------------------------------------------------------------------ overrides
def test_reference_overrides_carry_the_paper_hyper_parameters(verl_base: Any) -> None:
    for mode, response in (("non_reasoning", 1024), ("reasoning", 8192)):
        run_config = compose_run(["model=qwen3_8b", "train=reference", "backend=verl", f"mode={mode}", *GPUS])
        config = apply_overrides(verl_base, vb.verl_overrides(run_config, "/runs/x", 1))
        actor = config.actor_rollout_ref.actor
        assert actor.optim.lr == 1e-6 and actor.optim.lr_scheduler_type == "constant"
        assert config.data.train_batch_size == 512
        assert config.actor_rollout_ref.rollout.n == 16
        assert actor.ppo_mini_batch_size == 32 and actor.ppo_epochs == 1
        assert actor.use_kl_loss is True and actor.kl_loss_coef == 0.001 and actor.kl_loss_type == "low_var_kl"
        assert config.algorithm.use_kl_in_reward is False
        assert actor.entropy_coeff == 0.001
        assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.2, 3.0)
        assert actor.loss_agg_mode == "seq-mean-token-mean"
        assert config.actor_rollout_ref.rollout.temperature == 0.7
        assert config.data.max_prompt_length == 16384
        assert config.data.max_response_length == response
        assert config.actor_rollout_ref.rollout.response_length == response  # verl's interpolation
        assert config.data.apply_chat_template_kwargs.enable_thinking is (mode == "reasoning")
        assert actor.ppo_max_token_len_per_gpu == 16384 + response  # one longest sequence per micro-batch
        assert config.actor_rollout_ref.model.path == "Qwen/Qwen3-8B"
        assert (config.trainer.n_gpus_per_node, config.actor_rollout_ref.rollout.tensor_model_parallel_size) == (8, 2)
        assert config.trainer.total_epochs == 1 and config.trainer.total_training_steps is None
        vb.validate_verl_config(config)


PAPER_SETTINGS = [(model, mode, algorithm) for model in ("qwen3_8b", "qwen25_7b")
                  for mode in ("non_reasoning", "reasoning") for algorithm in ("grpo", "reinforce_pp", "ppo")
                  if not (model == "qwen25_7b" and mode == "reasoning")]


@pytest.mark.parametrize("model,mode,algorithm", PAPER_SETTINGS)
def test_paper_settings_pass_verls_validate_config(verl_base: Any, model_dir: str, model: str, mode: str,
                                                   algorithm: str) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    run_config = compose_run([f"model={model}", f"mode={mode}", f"algorithm={algorithm}", "train=reference",
                              "backend=verl", *GPUS])
    # Round 2 starts from round 1's merged checkpoint; 5000 snapshots make 9 full batches of 512.
    overrides = vb.verl_overrides(run_config, "/runs/x", 2, num_prompts=5000)
    assert "actor_rollout_ref.model.path=/runs/x/rounds/r1/checkpoint" in overrides
    # verl reads the critic's model config while validating, so point the policy at a real directory.
    config = apply_overrides(verl_base, vb.verl_overrides(run_config, "/runs/x", 2, num_prompts=5000,
                                                          policy=model_dir))
    vb.validate_verl_config(config)
    assert config.algorithm.adv_estimator == {"grpo": "grpo", "reinforce_pp": "reinforce_plus_plus",
                                              "ppo": "gae"}[algorithm]
    assert need_critic(config) is (algorithm == "ppo") and need_reference_policy(config) is True
    if algorithm == "ppo":
        assert config.critic.model.path == model_dir and config.critic.optim.lr == 1e-5
        assert config.critic.cliprange_value == 0.5
        assert config.critic.ppo_epochs == 1 and config.trainer.critic_warmup == 0
    assert config.trainer.total_training_steps == 9


def test_reasoning_mode_is_refused_for_a_model_without_thinking() -> None:
    with pytest.raises(ConfigError, match="supports_thinking=false"):
        compose_run(["model=qwen25_7b", "mode=reasoning", "backend=verl", *GPUS])


def _verl_experiments() -> list[tuple[str, RunConfig]]:
    """Every conf/experiment file whose composed config selects backend=verl.

    Sweeps are not expanded: they vary freeze policies (test_freeze_policy_goes_through_the_worker_hook
    covers each) and algorithms (test_paper_settings_pass_verls_validate_config covers each).
    """
    experiments = []
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        run_config = compose_run([f"+experiment={path.stem}"])
        if run_config.backend.name == "verl":
            experiments.append((path.stem, run_config))
    return experiments


def test_every_verl_experiment_composes_against_verl_and_validates(verl_base: Any, model_dir: str) -> None:
    experiments = _verl_experiments()
    for experiment, run_config in experiments:
        config = apply_overrides(verl_base, vb.verl_overrides(run_config, f"/runs/{experiment}", 1, policy=model_dir))
        try:
            vb.validate_verl_config(config)
        except Exception as error:  # name the experiment that fails
            raise AssertionError(f"+experiment={experiment}: verl rejects the config: {error}") from error
        assert config.algorithm.adv_estimator == ALGORITHMS.get(run_config.algorithm.name).adv_estimator, experiment
        assert config.data.train_batch_size == run_config.train.prompts_per_step, experiment
        assert config.trainer.n_gpus_per_node == run_config.resources.n_gpus_per_node >= 1, experiment
    names = [name for name, _ in experiments]
    assert "qwen8b_grpo" in names, f"conf/experiment/qwen8b_grpo.yaml must select backend=verl; verl ones: {names}"


def test_golden_override_list_qwen3_8b_grpo() -> None:
    run_config = compose_run(["model=qwen3_8b", "train=reference", "backend=verl", "name=qwen3_8b_grpo", *GPUS])
    overrides = vb.verl_overrides(run_config, "/runs/qwen3_8b_grpo", 1)
    text = "\n".join(overrides) + "\n"
    if os.environ.get("FTRL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8"), "override list changed; FTRL_UPDATE_GOLDEN=1 rewrites it"


def test_verl_logs_to_file_and_our_tracker_owns_wandb(verl_base: Any) -> None:
    run_config = compose_run(["model=qwen3_8b", "backend=verl", "logger=wandb", "logger.wandb.group=ablation",
                              "name=q8", *GPUS])
    config = apply_overrides(verl_base, vb.verl_overrides(run_config, "/runs/w", 3))
    # one W&B run per job: verl writes its metrics file, the job's tracker replays it after the round
    assert list(config.trainer.logger) == ["console", "file"]
    assert (config.trainer.project_name, config.trainer.experiment_name) == ("ftrl", "q8-r3")
    env_vars = config.ray_kwargs.ray_init.runtime_env.env_vars  # verl's tracker runs in a Ray actor
    assert "WANDB_MODE" not in env_vars
    assert env_vars.VERL_FILE_LOGGER_PATH == "/runs/w/rounds/r3/train/verl_metrics.jsonl"


def test_fast_path_equals_full_composition(verl_base: Any, model_dir: str) -> None:
    run_config = compose_run(["model=qwen3_8b", "train=reference", "backend=verl", "algorithm=ppo",
                              "freeze=lower_mlp_only", *GPUS])
    overrides = vb.verl_overrides(run_config, "/runs/a=b,c", 1, num_prompts=2048, policy=model_dir)
    full = vb.check_verl_overrides(overrides)  # compose + validate_config, as main_ppo does
    fast = apply_overrides(verl_base, overrides)
    assert OmegaConf.to_container(full) == OmegaConf.to_container(fast)
    assert full.trainer.default_local_dir == "/runs/a=b,c/rounds/r1/train/verl_checkpoints"


def test_composing_verl_inside_our_hydra_app_restores_it() -> None:
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ours = GlobalHydra.instance().hydra
        config = vb.compose_verl_config(["actor_rollout_ref.rollout.name=vllm"])
        assert GlobalHydra.instance().hydra is ours
        assert compose(config_name="config").backend.name == "native"  # our search path still works
    assert config.actor_rollout_ref.rollout.name == "vllm"


ALGORITHM_OPTIONS = sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml"))


@pytest.mark.parametrize("estimator_override", [None, *ADV_ESTIMATORS.names()])
@pytest.mark.parametrize("algorithm", ALGORITHM_OPTIONS)
def test_both_backends_train_with_the_same_estimator(algorithm: str, estimator_override: str | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """verl's algorithm.adv_estimator and the native trainer's estimator agree for every option and override."""
    from ftrl.train.algorithms import compute_advantages

    overrides = [f"algorithm={algorithm}"]
    if estimator_override is not None:
        overrides.append(f"algorithm.adv_estimator={estimator_override}")
        if estimator_override == "gae":
            overrides.append("algorithm.use_critic=true")
    run_config = compose_run(overrides)
    if estimator_override is None:  # conf/algorithm/<name>.yaml agrees with the registry
        spec = ALGORITHMS.get(algorithm)
        assert (run_config.algorithm.adv_estimator, run_config.algorithm.use_critic) == (
            spec.adv_estimator, spec.use_critic)
    verl_side = [item.split("=", 1)[1] for item in vb.verl_overrides(run_config, "/runs/x", 1, policy="/m")
                 if item.startswith("algorithm.adv_estimator=")]
    called: list[str] = []
    for name in ADV_ESTIMATORS.names():
        monkeypatch.setitem(ADV_ESTIMATORS._entries, name,
                            lambda *args, name=name, **kwargs: called.append(name) or (None, None))
    compute_advantages(run_config.algorithm, torch.zeros(2, 3), torch.ones(2, 3), np.array([0, 0]))
    assert verl_side == called == [estimator_override or ALGORITHMS.get(algorithm).adv_estimator]


FREEZE_POLICIES = sorted(p.stem for p in (CONF / "freeze").glob("*.yaml") if p.stem != "none")


@pytest.mark.parametrize("policy", FREEZE_POLICIES)
def test_freeze_policy_goes_through_the_worker_hook(verl_base: Any, policy: str) -> None:
    run_config = compose_run(["model=qwen3_8b", "train=reference", "backend=verl", f"freeze={policy}", *GPUS])
    config = apply_overrides(verl_base, vb.verl_overrides(run_config, "/runs/f", 1))
    vb.validate_verl_config(config)
    assert config.actor_rollout_ref.model.external_lib == "ftrl.train.verl_worker"
    # Freeze runs train with FSDP2 (per-tensor sharding; FSDP1 kept gradient buffers for frozen tensors).
    assert config.actor_rollout_ref.actor.strategy == "fsdp2"
    env_vars = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env_vars[vb.FREEZE_FILE_ENV] == "/runs/f/rounds/r1/train/freeze_policy.json"


def test_no_freeze_policy_leaves_verl_untouched() -> None:
    overrides = vb.verl_overrides(compose_run(["model=qwen3_8b", "backend=verl", *GPUS]), "/runs/f", 1)
    assert not any("external_lib" in item or vb.FREEZE_FILE_ENV in item or "use_orig_params" in item
                   for item in overrides)


def test_lora_and_raw_overrides_reach_verl(verl_base: Any) -> None:
    run_config = compose_run(["model=qwen3_8b", "backend=verl", "peft=lora", "peft.r=8", *GPUS,
                              "backend.verl.overrides=['actor_rollout_ref.rollout.enforce_eager=true']"])
    # (validate_config would ask vLLM for its largest LoRA rank, which needs vllm installed.)
    config = apply_overrides(verl_base, vb.verl_overrides(run_config, "/runs/l", 1))
    assert config.actor_rollout_ref.model.lora_rank == 8 and config.actor_rollout_ref.model.lora_alpha == 32
    assert list(config.actor_rollout_ref.model.target_modules) == list(run_config.peft.target_modules)
    assert config.actor_rollout_ref.rollout.enforce_eager is True


@pytest.mark.parametrize("overrides,message", [
    (["train.lr_scheduler=linear"], "train.lr_scheduler"),
    (["peft=lora", "freeze=mlp_only"], "freeze=mlp_only with peft=lora"),
    (["peft=lora", "peft.layers='0:0.5'"], "peft.layers"),
    (["backend.verl.ppo_max_token_len_per_gpu=1000"], "cannot hold one sequence of"),
    (["backend.verl.strategy=megatron"], "backend.verl.strategy"),
    (["resources.tensor_parallel_size=3"], "does not divide the 8 GPUs"),
    (["backend.verl.overrides=[no_equals_sign]"], "backend.verl.overrides[0]"),
])
def test_backend_verl_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compose_run(["model=qwen3_8b", "backend=verl", *GPUS, *overrides])


@pytest.mark.parametrize("value", ["/runs/a=b,c/x", "it's", "${oc.env:HOME}", "with space", "true", "1", "-3",
                                   "C:\\dir\\", "a\\'b", "\\${x}", "[x]", "Qwen/Qwen3-8B",
                                   "pkg://ftrl.train.verl_reward", ""])
def test_hydra_values_parse_back_to_the_same_string(value: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"key={vb.hydra_value(value)}")
    config = OmegaConf.create({"key": override.value()})
    assert config.key == value


# ------------------------------------------------------------------------------------ dataset rows
def test_snapshot_rows_load_through_rlhf_dataset_and_render_like_native(dataset: Any, snapshots: list[dict],
                                                                       tokenizer: Any) -> None:
    rlhf, _ = dataset
    assert len(rlhf) == len(snapshots) and len(snapshots) > len({s["messages"][0]["content"] for s in snapshots})
    multi_turn = 0
    for index, record in enumerate(snapshots):
        item = rlhf[index]
        messages = vb.messages_from_row(item["raw_prompt"])
        tools = vb.tools_from_row(item["extra_info"])
        ours = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=False,
                                             tokenize=False)
        native = render_chat(as_json_obj(record["messages"]), as_json_obj(record["tools"]),
                             add_generation_prompt=True, enable_thinking=False)
        assert ours == native, f"snapshot {index} renders differently"
        multi_turn += any(m["role"] == "tool" for m in messages)
        assert item["agent_name"] == vb.AGENT_NAME and item["data_source"] == record["data_source"]
        assert item["reward_model"]["ground_truth"] == record["answer"]
        extra = item["extra_info"]
        assert json.loads(extra["codes"]) == as_json_obj(record["codes"])
        assert json.loads(extra["unsolved_set"]) == as_json_obj(record["unsolved_set"])
        assert extra["solve_rate"] == pytest.approx(record["solve_rate"]) and extra["index"] == index
    assert multi_turn >= 8  # histories with tool calls and tool results, not only first turns


def test_overlong_snapshots_are_dropped_with_the_rows_tools(snapshots: list[dict], tokenizer: Any) -> None:
    lengths = [len(tokenizer(vb.render_prompt(tokenizer, as_json_obj(s["messages"]), as_json_obj(s["tools"]), False),
                             add_special_tokens=False)["input_ids"]) for s in snapshots]
    limit = sorted(lengths)[len(lengths) // 2]
    rows, dropped = vb.build_verl_rows(snapshots, tokenizer, limit, enable_thinking=False, batch_size=5)
    assert dropped == sum(length > limit for length in lengths) > 0
    assert len(rows) == sum(length <= limit for length in lengths)
    assert [row["extra_info"]["index"] for row in rows] == list(range(len(rows)))


def test_messages_from_row_undoes_parquet_padding() -> None:
    raw = np.array([{"role": "user", "content": "hi", "tool_calls": None, "tool_call_id": None},
                    {"role": "assistant", "content": None, "tool_call_id": None,
                     "tool_calls": np.array([{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{\"x\": 1}"}}], dtype=object)}],
                   dtype=object)
    assert vb.messages_from_row(raw) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
    ]


# ------------------------------------------------------------------------------------ reward
def _responses(record: dict, envs: list[dict]) -> dict[str, str]:
    """Hand-written turns for one snapshot: correct and wrong calls, malformed, answer, empty.

    Snapshots hold only the reference fields; the correct first turn comes from the environment's gold
    trajectory, for the environment's own first snapshot (nothing called yet).
    """
    env = next(e for e in envs if e["messages"][0]["content"] == record["messages"][0]["content"])
    gold = json.loads(env["gold_calls"]) if len(record["messages"]) == 1 else None
    answer = record["answer"]
    responses = {"malformed": '<tool_call>\n{"name": "broken", "arguments": \n</tool_call>',
                 "answer": f"The answer is {answer}.", "empty": "",
                 # verl's own decode drops special tokens: only the text we pass keeps this unanswered.
                 "special_token_inside_answer": f"The answer is {answer[:1]}<|im_start|>{answer[1:]}"}
    calls = [{"name": name, "arguments": {"id": "Z0"}} for name in json.loads(record["unsolved_set"])]
    responses["wrong_calls"] = tool_call_text(calls)
    if gold is not None:
        responses["correct_calls"] = tool_call_text(gold[0])
    return responses


def test_registered_reward_scores_real_rows_like_the_native_reward(dataset: Any, snapshots: list[dict],
                                                                   tokenizer: Any, envs: list[dict]) -> None:
    from tensordict import TensorDict
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    rlhf, config = dataset
    compute_score = get_custom_reward_fn(config)  # how verl loads reward.custom_reward_function
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")

    async def verl_score(item: dict, text: str) -> float:
        manager = NaiveRewardManager(config=config, tokenizer=tokenizer, compute_score=compute_score)
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn]
        prompt = [1, 2, 3]
        ids = torch.tensor([prompt + response])
        batch = TensorDict({"prompts": torch.tensor([prompt]), "responses": torch.tensor([response]),
                            "attention_mask": torch.ones_like(ids), "input_ids": ids}, batch_size=1)
        decoded = tokenizer.decode(response, skip_special_tokens=False)  # what our agent loop passes
        fields = {"data_source": item["data_source"], "reward_model": item["reward_model"],
                  "extra_info": dict(item["extra_info"]), "tool_extra_fields": {vb.RESPONSE_TEXT_KEY: decoded}}
        data = DataProto(batch=batch, non_tensor_batch={k: np.array([v], dtype=object) for k, v in fields.items()})
        return (await manager.run_single(data))["reward_score"]

    scored: dict[str, list[tuple[float, float]]] = {}
    for index, record in enumerate(snapshots):
        for case, text in _responses(record, envs).items():
            native = score_response(text + "<|im_end|>", record).score
            through_verl = asyncio.run(verl_score(rlhf[index], text))
            assert through_verl == native, (index, case, text)
            scored.setdefault(case, []).append((through_verl, record["solve_rate"]))
    # The reference table, on fresh environments (solve_rate 0): a correct first turn of a
    # single-hop task scores 2q/(p+1) = 1; wrong calls 0; malformed -0.3; empty -0.5; the answer 1/(1+t).
    first_single = next(i for i, s in enumerate(snapshots) if s["data_source"] == "Single-Hop" and s["solve_rate"] == 0)
    expected = {"correct_calls": 1.0, "wrong_calls": 0.0, "malformed": -0.3, "empty": -0.5, "answer": 0.5,
                "special_token_inside_answer": 0.0}
    for case, value in expected.items():
        text = _responses(snapshots[first_single], envs)[case]
        assert asyncio.run(verl_score(rlhf[first_single], text)) == value, case
    assert {value for value, _ in scored["malformed"]} == {-0.3}


def test_compute_score_contract_without_the_agent_loop_text(snapshots: list[dict], dataset: Any,
                                                            envs: list[dict]) -> None:
    from ftrl.train.verl_reward import compute_score

    rlhf, _ = dataset
    record, item = snapshots[0], rlhf[0]
    text = _responses(record, envs)["special_token_inside_answer"]
    # Without our agent loop's text, verl's skip_special_tokens decode is all there is to score.
    plain = compute_score(item["data_source"], text.replace("<|im_start|>", ""), item["reward_model"]["ground_truth"],
                          item["extra_info"])
    assert plain["score"] == score_response(text.replace("<|im_start|>", ""), record).score > 0
    assert set(plain) == {"score", "tool_calls", "solved", "malformed", "empty", "answered"}
    with pytest.raises(KeyError, match="verl extra_info lacks"):
        compute_score("Single-Hop", "x", "y", {"answer": "y"})


# ------------------------------------------------------------------------------------ agent loop
class StubServer:
    """Stands in for verl's LLM server client: fixed response tokens, records each request."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.requests: list[dict] = []

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict, **kwargs: Any) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        self.requests.append({"prompt_ids": list(prompt_ids), "sampling_params": dict(sampling_params)})
        return TokenOutput(token_ids=self.token_ids, log_probs=[-0.5 - i for i in range(len(self.token_ids))])


def _as_agent_loop_kwargs(rlhf: Any, index: int) -> dict[str, Any]:
    """One dataset row as verl's V1 rollout hands it to an agent loop (dataloader batch -> TensorDict ->
    per-sample fields, as ``AgentLoopWorkerTQ.generate_sequences`` unpacks them)."""
    from tensordict.tensorclass import NonTensorStack
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.rl_dataset import collate_fn

    batch = collate_fn([rlhf[index], rlhf[0]])
    batch["uid"] = np.array(["u0", "u1"], dtype=object)
    fields = {}
    for key, value in tu.get_tensordict(batch).items():
        if isinstance(value, torch.Tensor):
            fields[key] = value[0]
        elif isinstance(value, NonTensorStack):
            fields[key] = value[0].data
        else:
            fields[key] = value.data
    return fields


def test_agent_loop_renders_row_tools_and_generates_one_turn(dataset: Any, snapshots: list[dict], tokenizer: Any,
                                                            tmp_path: Path) -> None:
    import hydra
    from verl.experimental.agent_loop.agent_loop import (
        AgentLoopOutput,
        DictConfigWrap,
        ToolListWrap,
        _agent_loop_registry,
    )

    from ftrl.train.verl_agent_loop import FTRLStepAgentLoop

    rlhf, config = dataset
    index = max(range(len(snapshots)), key=lambda i: len(as_json_obj(snapshots[i]["messages"])))
    record = snapshots[index]
    response_length = config.actor_rollout_ref.rollout.response_length
    reply = tokenizer(tool_call_text([{"name": "get_x", "arguments": {"id": "P1"}}]) + "<|im_end|>",
                      add_special_tokens=False)["input_ids"]
    server = StubServer(reply * (response_length // len(reply) + 2))  # longer than the budget

    agent_file = tmp_path / "agent_loop.yaml"
    agent_file.write_text(vb.agent_loop_yaml(), encoding="utf-8")
    for entry in OmegaConf.load(agent_file):  # what AgentLoopWorker does with agent_loop_config_path
        _agent_loop_registry[entry.name] = entry

    fields = _as_agent_loop_kwargs(rlhf, index)
    agent_name = fields.pop("agent_name")

    async def run() -> AgentLoopOutput:
        loop = hydra.utils.instantiate(config=_agent_loop_registry[agent_name],
                                       trainer_config=DictConfigWrap(config=config), server_manager=server,
                                       tokenizer=tokenizer, processor=None, hf_model_type="qwen3",
                                       dataset_cls=type(rlhf), data_config=DictConfigWrap(config.data),
                                       tools=ToolListWrap([]))
        assert isinstance(loop, FTRLStepAgentLoop)
        return await loop.run({"temperature": 0.7, "top_p": 1.0}, session_id=0, global_steps=1, **fields)

    output = asyncio.run(run())
    native_text = render_chat(as_json_obj(record["messages"]), as_json_obj(record["tools"]), add_generation_prompt=True,
                              enable_thinking=False)
    assert "<tools>" in native_text and "<tool_response>" in native_text
    assert output.prompt_ids == tokenizer(native_text, add_special_tokens=False)["input_ids"]
    assert server.requests[0]["prompt_ids"] == output.prompt_ids
    assert server.requests[0]["sampling_params"] == {"temperature": 0.7, "top_p": 1.0, "max_tokens": response_length}
    assert output.response_ids == server.token_ids[:response_length] and len(output.response_ids) == response_length
    assert output.response_mask == [1] * response_length
    assert output.response_logprobs == [-0.5 - i for i in range(response_length)]
    assert output.num_turns == 2
    assert output.extra_fields[vb.RESPONSE_TEXT_KEY] == tokenizer.decode(output.response_ids, skip_special_tokens=False)
    tensors = output.as_dict()  # verl's own conversion to its batch fields
    assert tensors["prompts"].tolist() == output.prompt_ids and tensors["response_mask"].sum() == response_length


# ------------------------------------------------------------------------------------ freeze hook
def _tiny_model(tokenizer: Any) -> Any:
    shape = TinyModelConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=64, vocab_size=1024)
    return build_tiny_model(shape, tokenizer, seed=0)


def _engine(forward_only: bool = False, model_type: str = "language_model", strategy: str = "fsdp",
            use_orig_params: bool = True) -> SimpleNamespace:
    """The attributes of verl's FSDPEngine the hook reads."""
    return SimpleNamespace(engine_config=SimpleNamespace(forward_only=forward_only, strategy=strategy,
                                                         use_orig_params=use_orig_params),
                           model_config=SimpleNamespace(model_type=model_type), _is_lora=False, rank=0)


def test_freeze_hook_matches_the_native_policy(tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import asdict

    from ftrl.config import FreezeConfig
    from ftrl.train.freeze import apply_freeze_policy
    from ftrl.train.verl_worker import REPORT_NAME, wrap_build_module

    policy = FreezeConfig(name="lower_mlp_only", layers="0:0.5", modules=["mlp"], action="train")
    policy_file = tmp_path / "freeze_policy.json"
    policy_file.write_text(json.dumps(asdict(policy)), encoding="utf-8")
    native = _tiny_model(tokenizer)
    native_report = apply_freeze_policy(native, policy)
    build = wrap_build_module(lambda engine: _tiny_model(tokenizer))  # stands in for verl's model build

    monkeypatch.delenv(vb.FREEZE_FILE_ENV, raising=False)
    assert all(p.requires_grad for p in build(_engine()).parameters())  # no policy in the environment
    monkeypatch.setenv(vb.FREEZE_FILE_ENV, str(policy_file))
    module = build(_engine())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in native.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.{k}_proj.weight" for i in (0, 1) for k in ("gate", "up", "down")}
    report = json.loads((tmp_path / REPORT_NAME).read_text(encoding="utf-8"))
    assert report["trainable_params"] == native_report.trainable_params == 6 * 32 * 64
    assert report["policy"] == "lower_mlp_only" and report["layers"] == [0, 1]
    for engine in (_engine(forward_only=True), _engine(model_type="value_model")):  # reference, critic
        assert all(p.requires_grad for p in build(engine).parameters())
    with pytest.raises(ConfigError, match="use_orig_params=true"):
        build(_engine(use_orig_params=False))
    assert not all(p.requires_grad for p in build(_engine(strategy="fsdp2", use_orig_params=False)).parameters())


def test_freeze_hook_installs_where_verl_builds_the_model() -> None:
    import inspect

    from verl.utils.import_utils import import_external_libs
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine, FSDPEngineWithLMHead

    from ftrl.train import verl_worker

    import_external_libs("ftrl.train.verl_worker")  # what HFModelConfig does with model.external_lib
    assert getattr(FSDPEngine._build_module, "_ftrl_freeze_hook", False)
    assert FSDPEngineWithLMHead._build_module is FSDPEngine._build_module
    assert verl_worker.install() is False  # once per process
    # The fact the hook rests on (verl 0.9.1): the HF model is built, then wrapped by FSDP.
    source = inspect.getsource(FSDPEngine._build_model_optimizer)
    assert 0 <= source.index("self._build_module()") < source.index("self._build_fsdp_module(")


# ------------------------------------------------------------------------------------ round on disk
def _fake_verl_checkpoint(base_dir: Path, actor_dir: Path) -> dict[str, torch.Tensor]:
    """An FSDP actor checkpoint as verl saves it on one GPU, weights moved away from the base model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for index, parameter in enumerate(model.parameters()):
            parameter.add_(0.01 * (index + 1))
    state = model.state_dict()
    (actor_dir / "huggingface").mkdir(parents=True)
    torch.save(state, actor_dir / "model_world_size_1_rank_0.pt")
    (actor_dir / "fsdp_config.json").write_text(json.dumps({"world_size": 1}), encoding="utf-8")
    for name in os.listdir(base_dir):
        if name.endswith(".json"):
            (actor_dir / "huggingface" / name).write_bytes((base_dir / name).read_bytes())
    return {name: tensor.clone() for name, tensor in state.items()}


@pytest.fixture(scope="module")
def finished_round(tiny_run: dict) -> dict:
    """Round 1 as verl leaves it after its last step: a checkpoint of step 2 and the metrics file."""
    ctx = tiny_run["ctx"]
    files = vb.VerlRoundFiles.of(ctx.run_dir, 1)
    weights = _fake_verl_checkpoint(ctx.run_dir.base_model, files.checkpoints / "global_step_2" / "actor")
    (files.checkpoints / "latest_checkpointed_iteration.txt").write_text("2", encoding="utf-8")
    metrics = [{"step": step, "data": {"critic/score/mean": 0.25 * step, "actor/kl_loss": 0.01, "note": "x"}}
               for step in (1, 2)]
    files.metrics.write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
    return {**tiny_run, "weights": weights, "files": files}


def test_prepare_round_writes_the_job(tiny_run: dict, snapshots: list[dict]) -> None:
    import pyarrow.parquet as pq

    plan = vb.prepare_round(tiny_run["ctx"], 1)
    files: vb.VerlRoundFiles = plan["files"]
    assert plan["steps"] == 2 and plan["dropped"] == 0  # +debug=smoke caps rounds at 2 steps
    assert pq.read_metadata(files.data).num_rows == plan["snapshots"] == len(snapshots)
    assert files.agent_loops.read_text(encoding="utf-8") == vb.agent_loop_yaml()
    script = files.command_script.read_text(encoding="utf-8")
    assert script.startswith("#!/usr/bin/env bash") and os.access(files.command_script, os.X_OK)
    assert f"export PYTHONPATH={ROOT}" in script and "verl.trainer.main_ppo" in script
    assert "trainer.total_training_steps=2" in script and "data.train_batch_size=4" in script
    assert plan["command"][-1] == f"hydra.run.dir={files.hydra_dir}"
    assert not files.freeze_policy.exists()


def test_train_round_resumes_from_the_last_checkpoint_and_merges_it(finished_round: dict,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    ctx, files = finished_round["ctx"], finished_round["files"]
    launched = []
    real_run = vb._run_logged

    def spy(command: list[str], log_path: Path, env: dict, what: str) -> None:
        launched.append(what)
        assert "verl.trainer.main_ppo" not in command, "a finished round must not train again"
        real_run(command, log_path, env, what)

    monkeypatch.setattr(vb, "_run_logged", spy)
    info = vb.train_round(ctx, 1)
    assert launched == ["verl.model_merger"]
    checkpoint = ctx.run_dir.checkpoint_dir("round1")
    assert info["steps"] == 2 and info["checkpoint"] == str(checkpoint)
    assert (info["reward_first"], info["reward_last"]) == (0.25, 0.5)
    merged = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    for name, tensor in finished_round["weights"].items():  # verl's merger writes bfloat16
        assert torch.equal(merged[name], tensor.bfloat16().float()), name
    assert (checkpoint / "tokenizer.json").is_file() and not list(checkpoint.parent.glob(".checkpoint.*.tmp"))  # no staging left
    history = [json.loads(line) for line in files.history.read_text(encoding="utf-8").splitlines()]
    assert [(row["step"], row["reward/score"], row["global_step"]) for row in history] == [(1, 0.25, 1), (2, 0.5, 2)]
    assert "note" not in history[0]
    assert ctx.policy_for_round(2) == checkpoint  # the next round collects with the merged model


def test_train_round_refuses_a_freeze_the_actor_never_applied(finished_round: dict) -> None:
    from ftrl.run_state import RunContext

    run_config = compose_run([*finished_round["overrides"], "freeze=mlp_only"])
    ctx = RunContext(cfg=run_config, run_dir=RunDir(finished_round["root"]))
    files = finished_round["files"]
    files.freeze_report.unlink(missing_ok=True)
    with pytest.raises(RuntimeError, match="never reported applying the policy"):
        vb.train_round(ctx, 1)
    assert json.loads(files.freeze_policy.read_text(encoding="utf-8"))["name"] == "mlp_only"
    assert "actor.strategy=fsdp2" in files.command_script.read_text(encoding="utf-8")


def test_train_round_needs_gpus(tiny_run: dict) -> None:
    from ftrl.run_state import RunContext

    run_config = compose_run([*tiny_run["overrides"], "resources.n_gpus_per_node=0"])
    with pytest.raises(RuntimeError, match="backend=verl needs GPUs"):
        vb.train_round(RunContext(cfg=run_config, run_dir=RunDir(tiny_run["root"])), 1)


def test_dry_run_prints_the_plan_and_the_verl_command(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ftrl.run", "model=qwen3_8b", "train=reference", "backend=verl", "dry_run=true",
               f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[todo] train_r1: round 1: RL update" in out and "verl command (round 1):" in out
    for line in ("-m", "verl.trainer.main_ppo", "actor_rollout_ref.model.path=Qwen/Qwen3-8B",
                 "actor_rollout_ref.actor.optim.lr=1e-06", "data.train_batch_size=512",
                 "actor_rollout_ref.rollout.n=16", "algorithm.adv_estimator=grpo",
                 "+data.apply_chat_template_kwargs.enable_thinking=false"):
        assert f"    {line}" in out, line
    assert not (tmp_path / "run" / "rounds").exists()  # a dry run writes no round files
