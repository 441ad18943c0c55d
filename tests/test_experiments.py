"""Paper experiments, ablation sweeps, hardware profiles, the SLURM launcher and the sweep helper.

Every ``conf/experiment`` file composes and validates; the twelve Table 2 models carry the
reference hyper-parameters of docs/reference.md §6; the ablations are multirun experiments whose sweeps list
existing options; the SLURM launcher config turns into a real submitit sbatch script; the sweep
helper launches from a clean worktree of a tmp git repository.

    OMP_NUM_THREADS=1 python -m pytest tests/test_experiments.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ftrl.config import RunConfig, load_run_config, to_container

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "launchers"))
import sweep

# name -> (model, enable_thinking, algorithm, verl adv_estimator, response tokens)
TABLE2: dict[str, tuple[str, bool, str, str, int]] = {}
for _model in ("qwen25_7b", "qwen25_14b", "qwen3_8b", "qwen3_14b"):
    for _thinking in ((False, True) if _model.startswith("qwen3") else (False,)):
        for _algorithm, _estimator in (("grpo", "grpo"), ("reinforce_pp", "reinforce_plus_plus")):
            _name = f"{_model}_{'reasoning_' if _thinking else ''}{_algorithm}"
            TABLE2[_name] = (_model, _thinking, _algorithm, _estimator, 8192 if _thinking else 1024)
ALL_EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEPS = {
    "freeze_ablation": ("freeze", ["none", "paper_lower_mlp_only", "freeze_paper_lower_mlp", "lower_mlp_only",
                                   "upper_mlp_only", "freeze_lower_mlp", "mlp_only", "attn_only"]),
    "algorithm_ablation": ("algorithm", ["grpo", "reinforce_pp", "ppo"]),
    "tiny_freeze_ablation": ("freeze", ["none", "paper_lower_mlp_only", "lower_mlp_only", "upper_mlp_only"]),
    "reward_ablation": ("reward", ["solve_precision", "solve_rate", "solve_pr", "solve_f1"]),
    "tiny_reward_ablation": ("reward", ["solve_precision", "solve_rate", "solve_pr", "solve_f1"]),
    "tiny_algorithm_ablation": ("algorithm", ["grpo", "reinforce_pp", "ppo"]),
}


def _compose(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    import ftrl.run  # noqa: F401  (registers the ftrl_dirname resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["run_dir=/tmp/ftrl-test-run", *overrides],
                       return_hydra_config=hydra_config)


def _experiment(name: str, *overrides: str) -> RunConfig:
    return load_run_config(_compose([f"+experiment={name}", *overrides]))


def _run_cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftrl.run", *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=120, env=env)


# ------------------------------------------------------------------------------------ experiments
def test_the_experiment_files_are_table2_the_alias_and_the_sweeps() -> None:
    # (tests/test_config.py composes every experiment file; here each kind's values are checked.)
    # eval_<model>: Table 2's eval-only rows (checked against experiments/paper/table2.csv in tests/test_report.py)
    assert {e for e in ALL_EXPERIMENTS if not e.startswith("eval_")} == set(TABLE2) | {"qwen8b_grpo"} | set(SWEEPS)
    assert len(TABLE2) == 12


@pytest.mark.parametrize("experiment", sorted(TABLE2))
def test_table2_experiment_has_the_reference_recipe(experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTRL_DATA_DIR", "/datasets")
    model, thinking, algorithm, estimator, response_tokens = TABLE2[experiment]
    cfg = _experiment(experiment)
    assert cfg.name == experiment
    assert cfg.model.name == model and cfg.model.engine == "vllm" and cfg.model.dtype == "bfloat16"
    assert cfg.mode.enable_thinking is thinking and cfg.mode.max_response_tokens == response_tokens
    assert cfg.mode.max_prompt_tokens == 16384
    assert (cfg.algorithm.name, cfg.algorithm.adv_estimator) == (algorithm, estimator)
    assert not cfg.algorithm.use_critic
    train = cfg.train
    assert (train.name, train.rounds, train.epochs_per_round) == ("reference", 3, 1)
    assert (train.lr, train.lr_scheduler, train.prompts_per_step, train.n, train.mini_batch_prompts) == (
        1e-6, "constant", 512, 16, 32)
    assert (train.use_kl_loss, train.kl_loss_coef, train.kl_loss_type, train.entropy_coeff) == (
        True, 0.001, "low_var_kl", 0.001)
    clip = (train.clip_ratio_low, train.clip_ratio_high, train.clip_ratio_c)
    assert train.temperature == 0.7 and clip == (0.2, 0.2, 3.0)
    assert train.loss_agg_mode == "seq-mean-token-mean" and train.ppo_epochs == 1
    assert (cfg.collect.temperature, cfg.collect.max_turns) == (1.0, 20)
    assert cfg.backend.name == "verl"
    assert (cfg.resources.name, cfg.resources.n_gpus_per_node, cfg.resources.nnodes) == ("8x80gb", 8, 1)
    assert cfg.envs.name == "ftrl_files"
    assert cfg.envs.files.train == "/datasets/ftrl/train.jsonl"
    assert cfg.envs.files.test == "/datasets/ftrl/test.jsonl"
    assert (cfg.logger.name, cfg.logger.wandb.mode) == ("wandb", "offline")
    assert cfg.logger.wandb.group == experiment


def test_data_paths_default_to_data_dir_without_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTRL_DATA_DIR", raising=False)
    assert _experiment("qwen3_8b_grpo").envs.files.train == "data/ftrl/train.jsonl"


def test_qwen8b_grpo_is_qwen3_8b_grpo_under_its_own_name() -> None:
    alias, original = to_container(_experiment("qwen8b_grpo")), to_container(_experiment("qwen3_8b_grpo"))
    assert (alias.pop("name"), original.pop("name")) == ("qwen8b_grpo", "qwen3_8b_grpo")
    assert alias["logger"]["wandb"].pop("group") == "qwen8b_grpo"
    original["logger"]["wandb"].pop("group")
    assert alias == original


def test_model_path_and_resources_stay_overridable() -> None:
    cfg = _experiment("qwen3_14b_reasoning_grpo", "model.path=/models/Qwen3-14B", "resources=multinode",
                      "resources.nnodes=4")
    assert cfg.model.path == "/models/Qwen3-14B" and cfg.mode.max_response_tokens == 8192
    assert (cfg.resources.name, cfg.resources.nnodes, cfg.resources.n_gpus_per_node) == ("multinode", 4, 8)


def test_train_algorithm_files_name_an_existing_pair_and_hold_train_keys() -> None:
    from ftrl.config import TrainConfig
    from ftrl.registry import ALGORITHMS

    pairs = {f"{train.stem}_{algorithm}" for train in (CONF / "train").glob("*.yaml") for algorithm in ALGORITHMS.names()}
    files = sorted((CONF / "train_algorithm").glob("*.yaml"))
    assert files, "conf/train_algorithm holds the per-(train, algorithm) settings"
    train_keys = set(TrainConfig.__dataclass_fields__)
    for path in files:
        # a misspelt file name would never be picked up by `train_algorithm@train: ${train}_${algorithm}`
        assert path.stem in pairs, f"{path.name}: not <train option>_<algorithm option>"
        body = OmegaConf.load(path)
        assert set(body) <= train_keys, f"{path.name}: {set(body) - train_keys} are not train.* keys"


def test_reinforce_pp_and_ppo_at_the_tiny_scale_take_their_pair_settings_and_overrides_still_win() -> None:
    base = load_run_config(_compose([])).train
    reinforce = load_run_config(_compose(["algorithm=reinforce_pp"])).train
    assert base.loss_agg_mode == "seq-mean-token-mean"
    assert reinforce.loss_agg_mode == "token-mean"
    # only the pair file's keys differ
    assert {k: v for k, v in asdict(reinforce).items() if asdict(base)[k] != v} == {"loss_agg_mode": "token-mean"}
    ppo = load_run_config(_compose(["algorithm=ppo"])).train
    assert {k: v for k, v in asdict(ppo).items() if asdict(base)[k] != v} == {"loss_agg_mode": "token-mean"}
    overridden = load_run_config(_compose(["algorithm=reinforce_pp", "train.loss_agg_mode=seq-mean-token-sum"]))
    assert overridden.train.loss_agg_mode == "seq-mean-token-sum"
    # the paper's recipe has no pair file: Table 2's Reinforce++ rows keep seq-mean-token-mean
    assert load_run_config(_compose(["algorithm=reinforce_pp", "train=reference"])).train.loss_agg_mode == \
        "seq-mean-token-mean"
    assert _experiment("qwen3_8b_reinforce_pp").train.loss_agg_mode == "seq-mean-token-mean"
    assert load_run_config(_compose(["algorithm=ppo", "train=reference"])).train.loss_agg_mode == "seq-mean-token-mean"


@pytest.mark.parametrize("profile,gpus,nodes,tp", [
    ("1x24gb", 1, 1, 1), ("1x80gb", 1, 1, 1), ("8x80gb", 8, 1, 2), ("multinode", 8, 2, 2)])
def test_hardware_profiles(profile: str, gpus: int, nodes: int, tp: int) -> None:
    resources = load_run_config(_compose([f"resources={profile}"])).resources
    shape = (resources.n_gpus_per_node, resources.nnodes, resources.tensor_parallel_size)
    assert resources.device == "cuda" and shape == (gpus, nodes, tp)
    assert 0.0 < resources.gpu_memory_utilization < 1.0 and resources.sandbox_workers >= 8
    assert gpus % tp == 0


@pytest.mark.parametrize("experiment", sorted(SWEEPS))
def test_ablation_experiments_sweep_existing_options(experiment: str) -> None:
    group, options = SWEEPS[experiment]
    cfg = _compose([f"+experiment={experiment}"], hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params == {group: ",".join(options)}
    assert all((CONF / group / f"{option}.yaml").is_file() for option in options)
    # A job of the sweep: the experiment plus one swept option is a valid run named after the sweep.
    job = load_run_config(_compose([f"+experiment={experiment}", f"{group}={options[-1]}"]))
    assert getattr(job, group).name == options[-1] and job.name == experiment


def test_paper_ablations_keep_the_table2_recipe() -> None:
    cfg = _experiment("freeze_ablation", "freeze=lower_mlp_only")
    assert (cfg.model.name, cfg.algorithm.name, cfg.train.name, cfg.backend.name) == (
        "qwen3_8b", "grpo", "reference", "verl")
    assert (cfg.freeze.name, cfg.freeze.layers, cfg.freeze.action) == ("lower_mlp_only", "0:0.5", "train")


def test_tiny_sweep_runs_one_job_per_option_on_cpu(tmp_path: Path) -> None:
    out = _run_cli("-m", "+experiment=tiny_freeze_ablation", "dry_run=true", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["freeze=lower_mlp_only", "freeze=none", "freeze=paper_lower_mlp_only", "freeze=upper_mlp_only"]
    for job in jobs:
        identity = json.loads((tmp_path / job / "manifest.json").read_text())["identity"]
        policy = job.split("=")[1]
        assert (identity["name"], identity["freeze"]["name"]) == ("tiny_freeze_ablation", policy)
        assert identity["model"]["tiny"]["hidden_size"] == 64  # the +debug=smoke sizes ...
        assert identity["model"]["tiny"]["num_hidden_layers"] == 4  # ... with 4 layers (layers 0-2 < all)
        assert f"run_dir: {tmp_path / job}" in out.stdout
    assert out.stdout.count("[todo] train_r2") == 4  # +debug=smoke: two rounds per job


# ------------------------------------------------------------------------------------ CLI and launchers
def test_cli_composes_the_design_card_experiment_and_the_slurm_launcher() -> None:
    job = _run_cli("+experiment=qwen8b_grpo", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    assert "name: qwen8b_grpo" in job.stdout and "name: qwen3_8b" in job.stdout
    hydra = _run_cli("+experiment=qwen8b_grpo", "hydra/launcher=slurm", "--cfg", "hydra")
    assert hydra.returncode == 0, hydra.stderr
    assert "hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in hydra.stdout
    assert "srun_args:" in hydra.stdout and "ftrl_ray_start" in hydra.stdout
    local = _run_cli("hydra/launcher=local", "--cfg", "hydra")
    assert local.returncode == 0, local.stderr
    assert "hydra._internal.core_plugins.basic_launcher.BasicLauncher" in local.stdout


def _sbatch_text(overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sbatch script submitit would submit for this config (a stub srun satisfies its check)."""
    import submitit
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import open_dict

    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose(["hydra/launcher=slurm", *overrides], hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = "/repo"
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
    HydraConfig.instance().set_config(cfg)
    launcher = instantiate(cfg.hydra.launcher)
    # The plugin's own renaming (BaseSubmititLauncher.launch): non-base keys get the "slurm_" prefix.
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    params: dict[str, Any] = {key if key in base_keys else f"slurm_{key}": value
                              for key, value in launcher.params.items()
                              if key not in ("submitit_folder", "max_num_timeout")}
    executor = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="slurm",
                                     slurm_max_num_timeout=launcher.params["max_num_timeout"])
    executor.update_parameters(**params)
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")


def test_slurm_launcher_allocates_all_nodes_and_runs_one_driver(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTRL_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("FTRL_SLURM_TIME_MIN", "600")
    text = _sbatch_text(["+experiment=qwen8b_grpo", "resources=multinode", "resources.nnodes=4"], tmp_path,
                        monkeypatch)
    lines = text.splitlines()
    for flag in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=32", "--mem=256GB",
                 "--partition=gpu", "--time=600", "--job-name=qwen8b_grpo"):
        assert f"#SBATCH {flag}" in lines, flag
    assert not any(line.startswith("#SBATCH --account") for line in lines)  # unset env -> no flag
    # the project folder, not the submitter's cwd (resolved by ${ftrl_root:} before HydraConfig exists)
    setup, srun = lines.index(f"source {ROOT}/launchers/ray_cluster.sh"), next(
        i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines[setup + 1] == "ftrl_ray_start || exit 1" and setup < srun
    assert "--nodes=1 --ntasks=1 --overlap python -u -m submitit.core._submit" in lines[srun]
    assert lines[-1] == "ftrl_ray_stop"


# ------------------------------------------------------------------------------------ sweep helper
FAKE_RUN = '''import json, os, sys
with open(os.environ["SWEEP_TEST_OUT"], "w") as handle:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "module": __file__}, handle)
'''


@pytest.fixture()
def git_repo(tmp_path: Path) -> Path:
    """A tiny repository whose ``ftrl.run`` records how it was launched."""
    repo = tmp_path / "repo"
    (repo / "ftrl").mkdir(parents=True)
    (repo / "ftrl" / "__init__.py").write_text("")
    (repo / "ftrl" / "run.py").write_text(FAKE_RUN)
    (repo / ".gitignore").write_text("outputs/\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", "-C", str(repo), *command], check=True, env=env, capture_output=True)
    return repo


def test_sweep_helper_refuses_a_dirty_tree(git_repo: Path, capsys: pytest.CaptureFixture) -> None:
    (git_repo / "ftrl" / "run.py").write_text(FAKE_RUN + "# edited\n")
    (git_repo / "new_experiment.yaml").write_text("name: x\n")
    status = sweep.main(["--repo", str(git_repo), "+experiment=tiny_freeze_ablation"])
    assert status == 2
    message = capsys.readouterr().err
    assert "\n   M ftrl/run.py\n" in message and "?? new_experiment.yaml" in message and "--force" in message
    assert not (git_repo / "outputs" / "worktrees").exists()


def test_sweep_helper_runs_from_a_worktree_of_head(git_repo: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "launched.json"
    monkeypatch.setenv("SWEEP_TEST_OUT", str(record))
    sha = sweep.git(git_repo, "rev-parse", "HEAD")
    assert sweep.main(["--repo", str(git_repo), "+experiment=tiny_freeze_ablation", "seed=1"]) == 0
    worktree = git_repo / "outputs" / "worktrees" / sha
    launched = json.loads(record.read_text())
    assert Path(launched["cwd"]) == worktree and Path(launched["module"]) == worktree / "ftrl" / "run.py"
    assert launched["argv"] == ["-m", "+experiment=tiny_freeze_ablation", "seed=1",
                                f"hydra.sweep.dir='{git_repo}/outputs/multirun/${{name}}'"]
    assert sweep.git(worktree, "rev-parse", "HEAD") == sha
    launches = (git_repo / "outputs" / "worktrees" / "launches.jsonl").read_text().splitlines()
    log_entry = json.loads(launches[-1])
    assert (log_entry["sha"], log_entry["ref"], log_entry["forced_dirty"]) == (sha, "HEAD", [])
    # The worktree lives under ignored outputs/: the checkout stays clean and a second launch reuses it.
    assert sweep.uncommitted_changes(git_repo) == []
    assert sweep.main(["--repo", str(git_repo), "hydra.sweep.dir=/elsewhere"]) == 0
    assert json.loads(record.read_text())["argv"] == ["-m", "hydra.sweep.dir=/elsewhere"]


def test_sweep_helper_force_and_commit_and_dry_run(git_repo: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("SWEEP_TEST_OUT", str(tmp_path / "launched.json"))
    sha = sweep.git(git_repo, "rev-parse", "HEAD")
    (git_repo / "scratch.txt").write_text("not committed")
    assert sweep.main(["--repo", str(git_repo), "--dry-run"]) == 2
    assert sweep.main(["--repo", str(git_repo), "--commit", "HEAD", "--dry-run"]) == 0
    assert f"outputs/worktrees/{sha}" in capsys.readouterr().out
    assert not (git_repo / "outputs").exists()
    assert sweep.main(["--repo", str(git_repo), "--force"]) == 0
    assert "NOT part of this sweep" in capsys.readouterr().err
    entry = json.loads((git_repo / "outputs" / "worktrees" / "launches.jsonl").read_text().splitlines()[-1])
    assert entry["forced_dirty"] == ["?? scratch.txt"]
    assert not (git_repo / "outputs" / "worktrees" / sha / "scratch.txt").exists()
    assert sweep.main(["--repo", str(git_repo), "--commit", "no-such-ref"]) == 2


def test_the_run_says_when_a_pair_file_sets_train_keys(caplog: pytest.LogCaptureFixture) -> None:
    from ftrl.run import _log_train_algorithm_pair

    with caplog.at_level("INFO", logger="ftrl.run"):
        _log_train_algorithm_pair("tiny_reinforce_pp", _compose(["algorithm=reinforce_pp"]))
        _log_train_algorithm_pair("tiny_reinforce_pp",
                                  _compose(["algorithm=reinforce_pp", "train.loss_agg_mode=seq-mean-token-sum"]))
        _log_train_algorithm_pair("tiny_grpo", _compose([]))  # no such file: nothing to say
    assert [r.getMessage() for r in caplog.records] == [
        "conf/train_algorithm/tiny_reinforce_pp.yaml sets train.loss_agg_mode=token-mean",
        "conf/train_algorithm/tiny_reinforce_pp.yaml sets train.loss_agg_mode=token-mean (overridden: seq-mean-token-sum)"]
