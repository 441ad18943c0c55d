"""Reference-faithful sampling (issue 13): top_k, repetition_penalty and ``inherit`` in every engine.

The settings that reach HF ``generate`` (its GenerationConfig) and ``vllm.SamplingParams`` (the
keyword arguments) are asserted, for a model whose generation config says what Qwen2.5's says
(top_k 20, top_p 0.8, repetition_penalty 1.05). Also: the config keys reach SamplingParams, the
OpenAI request body, and the tiny default keeps its on-policy sampling.

    OMP_NUM_THREADS=1 python -m pytest tests/test_sampling_fidelity.py -q
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ftrl.config import RunConfig, TinyModelConfig
from ftrl.llm.engines.base import ChatRequest, SamplingParams, effective_warpers, read_generation_defaults
from ftrl.llm.engines.hf import HFEngine
from ftrl.llm.engines.openai import openai_sampling_extra
from ftrl.llm.engines.vllm import TOP_K_DISABLED, VLLMEngine, sampling_kwargs
from ftrl.llm.tiny import build_tiny_model, build_tokenizer, builtin_corpus

torch.set_num_threads(1)
QWEN25 = {"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05, "temperature": 0.7, "do_sample": True}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(builtin_corpus(), vocab_size=600)


@pytest.fixture(scope="module")
def model_dir(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=64, vocab_size=1024)
    model = build_tiny_model(shape, tokenizer, seed=0)
    for key, value in QWEN25.items():
        setattr(model.generation_config, key, value)
    path = tmp_path_factory.mktemp("qwen25_like")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _hf_generation_config(model_dir: Path, params: SamplingParams) -> Any:
    """The GenerationConfig HFEngine hands to ``model.generate`` for ``params``."""
    engine = HFEngine.from_pretrained(str(model_dir), device="cpu", batch_size=4)
    seen: list[Any] = []
    real_generate = engine.model.generate

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs["generation_config"])
        return real_generate(**kwargs)

    engine.model.generate = spy  # type: ignore[method-assign]
    engine.generate([ChatRequest([{"role": "user", "content": "Oslo?"}])], params)
    engine.close()
    assert engine.model is None
    return seen[0]


def test_generation_defaults_are_read_from_the_model_directory(model_dir: Path, tmp_path: Path) -> None:
    assert read_generation_defaults(model_dir) == {"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
    assert read_generation_defaults(tmp_path) == {}
    assert read_generation_defaults("Qwen/Qwen3-8B") == {}  # a hub id: nothing local to read


def test_warpers_are_off_unless_asked_or_inherited() -> None:
    defaults = {"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
    assert effective_warpers(SamplingParams(), defaults) == {"top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    assert effective_warpers(SamplingParams(inherit=True), defaults) == defaults
    assert effective_warpers(SamplingParams(top_k=5, repetition_penalty=1.1), defaults) == {
        "top_k": 5, "top_p": 1.0, "repetition_penalty": 1.1}
    # Greedy (the reference's evaluation) keeps only the repetition penalty.
    assert effective_warpers(SamplingParams(temperature=0.0, inherit=True), defaults) == {
        "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.05}
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1).validate()
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0).validate()


def test_hf_generate_gets_the_inherited_warpers(model_dir: Path) -> None:
    config = _hf_generation_config(model_dir, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0,
                                                             inherit=True))
    assert (config.do_sample, config.temperature) == (True, 1.0)
    assert (config.top_k, config.top_p, config.repetition_penalty) == (20, 0.8, 1.05)


def test_hf_generate_default_stays_on_policy(model_dir: Path) -> None:
    config = _hf_generation_config(model_dir, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    assert (config.do_sample, config.top_k, config.top_p, config.repetition_penalty) == (True, 0, 1.0, 1.0)


def test_hf_greedy_eval_applies_the_models_repetition_penalty(model_dir: Path) -> None:
    config = _hf_generation_config(model_dir, SamplingParams(temperature=0.0, max_new_tokens=4, inherit=True))
    assert config.do_sample is False and config.repetition_penalty == 1.05


def test_vllm_sampling_params_get_the_inherited_warpers(model_dir: Path, tokenizer: Any) -> None:
    defaults = read_generation_defaults(model_dir)
    inherited = sampling_kwargs(SamplingParams(temperature=1.0, inherit=True), [1], 0, defaults)
    assert (inherited["top_k"], inherited["top_p"], inherited["repetition_penalty"]) == (20, 0.8, 1.05)
    explicit = sampling_kwargs(SamplingParams(temperature=1.0, top_k=7, repetition_penalty=1.2), [1], 0, defaults)
    assert (explicit["top_k"], explicit["top_p"], explicit["repetition_penalty"]) == (7, 1.0, 1.2)
    off = sampling_kwargs(SamplingParams(temperature=1.0), [1], 0, defaults)
    assert (off["top_k"], off["top_p"], off["repetition_penalty"]) == (TOP_K_DISABLED, 1.0, 1.0)
    greedy = sampling_kwargs(SamplingParams(temperature=0.0, inherit=True), [1], None, defaults)
    assert (greedy["temperature"], greedy["top_k"], greedy["repetition_penalty"]) == (0.0, TOP_K_DISABLED, 1.05)

    # Through the engine: the kwargs vllm.SamplingParams is built with.
    recorded: list[dict] = []

    class LLM:
        def generate(self, prompts: list, sampling_params: list, use_tqdm: bool = False) -> list:
            recorded.extend(sampling_params)
            from types import SimpleNamespace
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5], finish_reason="length",
                                                             stop_reason=None)]) for _ in prompts]

    engine = VLLMEngine(LLM(), tokenizer, sampling_params_cls=lambda **kw: kw, generation_defaults=defaults)
    engine.generate([ChatRequest([{"role": "user", "content": "Oslo?"}])], SamplingParams(inherit=True))
    assert (recorded[0]["top_k"], recorded[0]["top_p"], recorded[0]["repetition_penalty"]) == (20, 0.8, 1.05)


def test_openai_request_carries_what_the_api_supports() -> None:
    assert openai_sampling_extra(SamplingParams()) == {}
    assert openai_sampling_extra(SamplingParams(top_k=20, repetition_penalty=1.05)) == {
        "top_k": 20, "repetition_penalty": 1.05}
    # inherit: leave top_p/top_k/penalty to the server (vLLM applies the model's generation config).
    assert openai_sampling_extra(SamplingParams(inherit=True)) == {"top_p": None}
    assert openai_sampling_extra(SamplingParams(temperature=0.0, repetition_penalty=1.05)) == {
        "repetition_penalty": 1.05}


def test_default_run_keeps_its_sampling_and_paper_runs_inherit() -> None:
    from hydra import compose, initialize_config_dir

    import ftrl.run  # noqa: F401  (registers the ftrl_dirname resolver)
    from ftrl.config import load_run_config

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        paper = load_run_config(compose(config_name="config",
                                        overrides=["run_dir=/runs/test", "+experiment=qwen25_7b_grpo"]))
    default = RunConfig()
    assert (default.collect.top_k, default.collect.repetition_penalty, default.collect.inherit) == (0, 1.0, False)
    assert (default.eval.repetition_penalty, default.eval.inherit) == (1.0, False)
    assert paper.collect.inherit and paper.eval.inherit


def test_stages_pass_the_settings_to_the_engine() -> None:
    """collect builds its SamplingParams from collect.*; every eval module from eval.*."""
    root = Path(__file__).resolve().parent.parent
    stages = (root / "ftrl" / "stages.py").read_text(encoding="utf-8")
    assert "inherit=cfg.collect.inherit" in stages and "top_k=cfg.collect.top_k" in stages
    for name in ("own_test", "general", "taubench", "bfcl", "toolhop", "rotbench"):
        text = (root / "ftrl" / "eval" / f"{name}.py").read_text(encoding="utf-8")
        assert "repetition_penalty=cfg.eval.repetition_penalty, inherit=cfg.eval.inherit" in text, name


def test_context_limit_ends_the_episode_not_the_stage(tmp_path: Path) -> None:
    """An engine turn that reports finish_reason="context" ends that episode (recorded); the others go on."""
    import json as _json

    from ftrl.collect import collect_snapshots
    from ftrl.config import ProceduralConfig
    from ftrl.envs.executor import StatefulExecutor
    from ftrl.envs.procedural import build_procedural_envs
    from ftrl.eval.own_test import evaluate_own_test
    from ftrl.llm.engines.base import ChatEngine, Generation
    from ftrl.llm.parsers import get_parser
    from ftrl.train.warmup import format_tool_calls

    records = build_procedural_envs(ProceduralConfig(num_train=4, num_test=0), seed=5)["train"]
    limited = records[0]["messages"][0]["content"]

    class Engine(ChatEngine):
        def render(self, request: ChatRequest) -> str:
            return request.messages[0]["content"]

        def generate(self, requests: Any, params: Any) -> list:
            out = []
            for request in requests:
                turns = sum(1 for m in request.messages if m["role"] == "assistant")
                if request.messages[0]["content"] == limited and turns == 1:
                    out.append([Generation("", [1, 2], [], "context")])  # the second turn no longer fits
                    continue
                record = next(r for r in records if r["messages"][0]["content"] == request.messages[0]["content"])
                gold = _json.loads(record["gold_calls"])
                out.append([Generation(format_tool_calls(gold[turns]) if turns < len(gold) else "done", [], [],
                                       "stop")])
            return out

    parse, execute = get_parser("qwen", "ftrl"), StatefulExecutor(timeout=10.0)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    stats = collect_snapshots(Engine(), records, tmp_path / "snapshots.jsonl", params=params, max_turns=20,
                              parser=parse, execute=execute, batch_size=4)
    assert stats["episodes_run"] == 4 and stats["episodes_context_limited"] == 1
    evaluate_own_test(Engine(), records, tmp_path / "eval.jsonl", params=params, max_turns=20, parser=parse,
                      execute=execute, batch_size=4)
    rows = [_json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    ended = {row["messages"][0]["content"]: row.get("ended_by") for row in rows if "messages" in row}
    assert ended[limited] == "context" and sum(value == "context" for value in ended.values()) == 1
