"""Config composition: every group option and every experiment composes and validates; errors name keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ftrl.config import STAGES, RunConfig, load_run_config, to_container
from ftrl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# train_algorithm is picked from the train and algorithm choices, not by hand (tests/test_experiments.py composes it).
GROUPS = sorted(p.name for p in CONF.iterdir()
                if p.is_dir() and p.name not in ("hydra", "experiment", "debug", "train_algorithm"))
# Options that need a user value to be valid, and the value the test supplies.
NEEDS = {("envs", "ftrl_files"): ["envs.files.train=/data/train.jsonl"]}


def _compose(overrides: list[str]) -> RunConfig:
    import ftrl.run  # noqa: F401  (registers the ftrl_dirname resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["run_dir=/tmp/ftrl-test-run", *overrides])
    return load_run_config(cfg)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group: str, option: str) -> None:
    run_config = _compose([f"{group}={option}", *NEEDS.get((group, option), [])])
    assert getattr(run_config, group).name == option


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    run_config = _compose([f"+experiment={experiment}"])
    assert run_config.name, experiment


def test_default_config_is_the_tiny_cpu_job() -> None:
    run_config = _compose([])
    assert run_config.model.name == "tiny" and run_config.model.path is None
    assert run_config.envs.name == "procedural"
    assert run_config.stages == list(STAGES)
    assert run_config.backend.name == "native"
    assert run_config.max_new_tokens == 96  # the tiny model caps the mode's 1024


def test_debug_smoke_shrinks_everything() -> None:
    run_config = _compose(["+debug=smoke"])
    assert run_config.envs.procedural.num_train < 100
    assert run_config.model.tiny.hidden_size == 64
    assert run_config.train.rounds == 2


def test_unknown_key_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.hiden_size"):
        load_run_config(OmegaConf.create({"model": {"hiden_size": 3}}))


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.rounds"):
        load_run_config(OmegaConf.create({"train": {"rounds": "three"}}))


def test_bad_choice_lists_valid_options_and_suggests() -> None:
    with pytest.raises(ConfigError) as error:
        load_run_config(OmegaConf.create({"reward": {"name": "solve_f2"}}))
    message = str(error.value)
    assert "reward.name" in message and "solve_precision" in message and "did you mean 'solve_f1'" in message


@pytest.mark.parametrize("overrides,fragment", [
    ({"stages": ["collect", "build_envs"]}, "pipeline order"),
    ({"stages": ["build_envs", "bogus"]}, "stages[1]"),
    ({"algorithm": {"adv_estimator": "gae", "use_critic": False}}, "algorithm.use_critic"),
    ({"mode": {"enable_thinking": True}, "model": {"name": "qwen25_7b", "path": "x", "supports_thinking": False}},
     "supports_thinking=false"),
    ({"envs": {"name": "ftrl_files"}}, "envs.files.train"),
    ({"model": {"name": "qwen3_8b", "path": None}}, "model.path"),
    ({"envs": {"procedural": {"parameter_expansion": 1.5}}}, "envs.procedural.parameter_expansion"),
    ({"train": {"n": 1}}, "train.n"),
    ({"eval": {"benchmarks": ["toolhopp"]}}, "eval.benchmarks[0]"),
])
def test_cross_field_rules(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as error:
        load_run_config(OmegaConf.create(overrides))
    assert fragment in str(error.value)


def test_cli_prints_composed_job_and_rejects_bad_values(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "ftrl.run", "--cfg", "job", "algorithm=ppo"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "adv_estimator: gae" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "ftrl.run", "reward.compat=strict", "stages=[build_envs]",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2
    assert "reward.compat" in bad.stdout + bad.stderr and "fixed" in bad.stdout + bad.stderr


def test_dry_run_names_run_dir_from_overrides(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "ftrl.run", "dry_run=true", "algorithm=ppo", "seed=3",
                          f"hydra.run.dir={tmp_path}/run"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert f"run_dir: {tmp_path}/run" in out.stdout
    assert "[todo] train_r3" in out.stdout


def test_dataclass_defaults_are_the_default_composition() -> None:
    """One set of defaults: RunConfig() is exactly what `python -m ftrl.run` composes with no overrides."""
    composed = to_container(_compose([]))
    coded = to_container(RunConfig())
    composed.pop("run_dir"), coded.pop("run_dir")
    assert composed == coded


@pytest.mark.parametrize("group", ["envs", "algorithm"])
def test_option_sections_match_the_schema_defaults(group: str) -> None:
    """Sections that only one option sets (envs.llm, envs.taubench, algorithm.critic) default to that option's values."""
    defaults = to_container(RunConfig())[group]
    for option in _options(group):
        section = to_container(_compose([f"{group}={option}", *NEEDS.get((group, option), [])]))[group]
        for key, value in section.items():
            if isinstance(value, dict) and key in (option, "critic"):
                assert value == defaults[key], f"{group}={option}: {group}.{key} differs from the dataclass defaults"


@pytest.mark.parametrize("overrides,fragment", [
    (["freeze=lower_mlp_only", "freeze.modules=[mpl]"], "freeze.modules: unknown module kind 'mpl'"),
    (["freeze=lower_mlp_only", "freeze.layers=9:2"], "freeze.layers"),
    (["freeze=lower_mlp_only", "freeze.layers=0:9"], "the model has 4 layers"),  # the tiny model's depth
    (["freeze.modules=[mlp]"], "freeze.name='none'"),
    (["freeze=lower_mlp_only", "freeze.regex='(unclosed'"], "freeze.regex"),
    (["peft=lora", "peft.target_modules=[q_prj]"], "peft.target_modules: unknown module kind 'q_prj'"),
    (["peft=lora", "peft.layers=abc"], "peft.layers"),
])
def test_selector_mistakes_fail_when_the_config_loads(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        _compose(overrides)
    assert fragment in str(error.value)


def test_layer_ranges_are_checked_against_a_local_models_depth(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}), encoding="utf-8")
    model = ["model=qwen3_8b", f"model.path={tmp_path}"]
    assert _compose([*model, "freeze=lower_mlp_only", "freeze.layers=0:2"]).known_num_layers() == 2
    with pytest.raises(ConfigError, match="the model has 2 layers"):
        _compose([*model, "freeze=lower_mlp_only", "freeze.layers=0:3"])


def test_dry_run_refuses_a_selector_typo(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "ftrl.run", "dry_run=true", "freeze=lower_mlp_only",
                          "freeze.modules=[mpl]", f"hydra.run.dir={tmp_path}/run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert "freeze.modules" in out.stdout + out.stderr and "did you mean 'mlp'" in out.stdout + out.stderr
