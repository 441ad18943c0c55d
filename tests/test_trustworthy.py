"""Runs that cannot show wrong numbers without a word: changed inputs and eval settings, refused runs,
preflight of what a run needs, and one-line errors that name the key and the fix (issue 15).

    python -m pytest tests/test_trustworthy.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from ftrl.artifacts import RunDir, RunDirConflict
from ftrl.config import RunConfig, load_run_config
from ftrl.envs.io import read_records, write_jsonl
from ftrl.envs.procedural import build_procedural_envs
from ftrl.errors import ConfigError, MissingInputError
from ftrl.inputs import file_fingerprint, input_fingerprints, preflight
from ftrl.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["+debug=smoke", "model.tiny.copy_pretrain_steps=0", "envs.procedural.num_train=8",
         "envs.procedural.num_test=8", "eval.max_turns=2"]


def _config(run_dir: Path, *overrides: str) -> RunConfig:
    import ftrl.run  # noqa: F401  (registers the ftrl_dirname resolver)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return load_run_config(compose(config_name="config", overrides=[f"run_dir={run_dir}", *overrides]))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftrl.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


# ------------------------------------------------------------------------------------ 1. stale inputs
@pytest.fixture
def env_files(tmp_path: Path) -> dict[str, Path]:
    envs = build_procedural_envs(_config(tmp_path / "unused", *SMALL).envs.procedural, seed=0)
    return {split: write_jsonl(tmp_path / f"{split}.jsonl", envs[split]) for split in ("train", "test")}


def test_an_input_file_changed_in_place_is_refused_by_name(tmp_path: Path, env_files: dict[str, Path]) -> None:
    overrides = [*SMALL, "envs=ftrl_files", f"envs.files.train={env_files['train']}",
                 f"envs.files.test={env_files['test']}", "stages=[build_envs]"]
    run_dir = tmp_path / "run"
    run_pipeline(_config(run_dir, *overrides))
    recorded = json.loads(RunDir(run_dir).manifest.read_text())["inputs"]
    assert set(recorded) == {"envs.files.train", "envs.files.test"}
    run_pipeline(_config(run_dir, *overrides))  # unchanged inputs: the run resumes
    records = read_records(env_files["train"])
    write_jsonl(env_files["train"], records[:-1])  # "fixing" the file in place
    with pytest.raises(RunDirConflict, match=r"input\(s\) changed .*envs\.files\.train .*sha256 \w{12} -> \w{12}"):
        run_pipeline(_config(run_dir, *overrides))
    assert len(read_records(RunDir(run_dir).envs("train"))) == len(records)  # the run's copy is untouched


def test_large_files_are_fingerprinted_by_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ftrl.inputs

    monkeypatch.setattr(ftrl.inputs, "FULL_HASH_LIMIT", 1 << 16)
    weights = tmp_path / "model.safetensors"
    data = bytearray(8) + b"{}" + bytes(range(256)) * 4096  # 1 MiB after an (empty) header
    data[:8] = (2).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    before = file_fingerprint(weights)
    data[-10] ^= 1  # the last block is always sampled
    weights.write_bytes(bytes(data))
    assert before.startswith("sampled:") and file_fingerprint(weights) != before


def test_a_local_model_directory_is_an_input(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    (model / "README.md").write_text("not part of the fingerprint")
    cfg = _config(tmp_path / "run", "model=qwen3_8b", f"model.path={model}")
    first = input_fingerprints(cfg)["model.path"]["sha256"]
    (model / "README.md").write_text("edited")
    assert input_fingerprints(cfg)["model.path"]["sha256"] == first
    (model / "model.safetensors").write_bytes(b"\1" * 16)
    assert input_fingerprints(cfg)["model.path"]["sha256"] != first


# ------------------------------------------------------------------------------------ 2. stale evaluation
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    run_pipeline(_config(run_dir, *SMALL, "stages=[build_envs,eval]"))
    return run_dir


def _eval_state(run_dir: Path) -> tuple[int, dict, list[str]]:
    rd = RunDir(run_dir)
    summary = json.loads(rd.summary.read_text())
    archived = sorted(p.name.split("-")[0] for p in (rd.eval_dir / "archive").glob("*")) if (
        rd.eval_dir / "archive").exists() else []
    return len(read_records(rd.eval_records("base", "ftrl_test"))), summary["eval_settings"], archived


def test_changed_eval_settings_evaluate_again_and_keep_the_old_results(evaluated: Path) -> None:
    samples, settings, archived = _eval_state(evaluated)
    assert (samples, settings["max_samples"], archived) == (8, 12, [])
    run_pipeline(_config(evaluated, *SMALL, "stages=[build_envs,eval]", "eval.max_samples=3"))
    samples, settings, archived = _eval_state(evaluated)
    assert (samples, settings["max_samples"], archived) == (3, 3, ["base"])
    assert json.loads(RunDir(evaluated).eval_settings("base").read_text())["max_samples"] == 3

    summary = run_pipeline(_config(evaluated, *SMALL, "stages=[eval]", "eval.max_samples=3"))  # same settings
    assert _eval_state(evaluated)[2] == ["base"] and summary["evals"][0]["checkpoint"] == "base"

    run_pipeline(_config(evaluated, *SMALL, "stages=[eval]", "eval.max_samples=3", "rerun=[eval]"))
    assert _eval_state(evaluated)[0] == 3 and _eval_state(evaluated)[2] == ["base", "base"]


def test_rerun_takes_only_stages_nothing_else_builds_on(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rerun\[0\]: 'train' cannot be re-run in place"):
        _config(tmp_path, "rerun=[train]")
    assert _config(tmp_path, "rerun=[eval,analyze]").rerun == ["eval", "analyze"]


# ------------------------------------------------------------------------------------ 3. refused runs
def test_a_refused_invocation_leaves_the_recorded_config_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _cli(*SMALL, "stages=[build_envs]", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    recorded = RunDir(run_dir).recorded_config.read_text()
    assert yaml.safe_load(recorded)["train"]["lr"] == 2e-4
    assert yaml.safe_load(RunDir(run_dir).recorded_overrides.read_text())[-1] == "stages=[build_envs]"
    refused = _cli(*SMALL, "stages=[build_envs]", "train.lr=0.5", f"hydra.run.dir={run_dir}")
    assert refused.returncode == 2
    output = refused.stdout + refused.stderr
    assert "train.lr: 0.0002 -> 0.5" in output and "Traceback" not in output
    assert RunDir(run_dir).recorded_config.read_text() == recorded


# ------------------------------------------------------------------------------------ 8. preflight
def test_preflight_names_every_missing_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = _config(tmp_path / "run", "envs=ftrl_files", f"envs.files.train={tmp_path}/nope.jsonl",
                  "model=qwen3_8b", f"model.path={tmp_path}/no-model")
    problems = preflight(cfg)
    assert [p.split(":")[0] for p in problems] == ["envs.files.train", "model.path"]
    assert preflight(cfg, done_steps={"build_envs"}) == [problems[1]]  # envs already built: not needed
    api = _config(tmp_path / "api", "model=api", "stages=[eval]")
    assert preflight(api) == [("model.api.api_key_env: the environment variable OPENAI_API_KEY is not set "
                              "(export OPENAI_API_KEY=...; or set model.api.api_key_env='' for an endpoint "
                              "without a key)")]
    stored = _config(tmp_path / "set", "envs=set", "+envs.mix={mine: 1.0}", f"envs.sets_dir={tmp_path}/sets")
    assert preflight(stored) == [(f"envs.mix.mine: no stored env set 'mine' in {tmp_path}/sets "
                                 "(python -m ftrl.envs.sets list)")]
    qa = _config(tmp_path / "qa", "envs=llm", "envs.llm.api.api_key_env=''", "envs.llm.seed_source.kind=datasets",
                 f"envs.llm.seed_source.path={tmp_path}/qa.parquet")
    assert [p.split(":")[0] for p in preflight(qa)] == ["envs.llm.seed_source.path"]
    with pytest.raises(MissingInputError, match="nothing was run"):
        run_pipeline(cfg)


def test_dry_run_lists_inputs_and_fails_on_a_missing_one(tmp_path: Path) -> None:
    out = _cli("dry_run=true", "envs=ftrl_files", f"envs.files.train={tmp_path}/nope.jsonl",
               f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    assert f"[missing] envs.files.train: {tmp_path}/nope.jsonl (read by build_envs)" in out.stdout
    ok = _cli("dry_run=true", "model=qwen3_8b", f"hydra.run.dir={tmp_path}/run2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "[hub] model.path: Qwen/Qwen3-8B (read by collect)" in ok.stdout


# ------------------------------------------------------------------------------------ 9. messages
def test_an_unknown_key_lists_the_sections_keys_and_a_close_match() -> None:
    for key in ("train.lrr=3", "+train.lrr=3"):
        out = _cli(key, "dry_run=true")
        assert out.returncode == 2
        message = out.stdout + out.stderr
        assert "train.lrr: unknown key; valid keys of train: [" in message and "did you mean 'lr'?" in message
        assert "Traceback" not in message and "+train.lrr" not in message.replace(key, "")


def test_cfg_job_validates_values() -> None:
    out = _cli("--cfg", "job", "train.lr=abc")
    assert out.returncode == 2
    assert "train.lr: Value 'abc' of type 'str' could not be converted to Float" in out.stdout + out.stderr


def test_report_on_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "ftrl.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == (f"ftrl.report: {tmp_path} is not a run directory; give a directory that "
                                  "`python -m ftrl.run` wrote, e.g. outputs/default/base")
