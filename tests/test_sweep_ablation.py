"""The sweep comparison of an ablation, pinned on fixture jobs: arms x metrics with seeds and spread, trainable
parameters per freeze policy, where the weight change sits, one heat-map figure; and the ablation experiments.

Job directories are built by hand (``.hydra/config.yaml``, ``overrides.yaml``, ``summary.json`` and small
safetensors checkpoints); nothing trains or evaluates.

    OMP_NUM_THREADS=1 python -m pytest tests/test_sweep_ablation.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ftrl.analysis.sweep_report import SweepReport, sweep_comparison, write_sweep_comparison
from ftrl.config import load_run_config

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
POLICIES = {name: OmegaConf.to_container(OmegaConf.load(CONF / "freeze" / f"{name}.yaml"))
            for name in ("none", "lower_mlp_only", "mlp_only")}


def shapes(hidden: int = 4, inter: int = 8, vocab: int = 16) -> dict[str, tuple[int, ...]]:
    """4 layers, tied embeddings: 676 parameters; the MLP of one layer is 96, the lower half's 192."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(4):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (2, hidden),
                    p + "self_attn.v_proj.weight": (2, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                    p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                    p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                    p + "post_attention_layernorm.weight": (hidden,)})
    return out


def checkpoint(directory: Path, changed: set[str] | None) -> None:
    """Ones everywhere; ``changed`` tensors (None: all) at 2, so each moved element adds 1 to the squared change."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    save_file({n: torch.full(s, 2.0 if changed is None or n in changed else 1.0) for n, s in shapes().items()},
              str(directory / "model.safetensors"))


def make_job(sweep: Path, policy: str, seed: int, f1: tuple[float, float] | None) -> Path:
    """A finished job (F1 at warmup and round 2) or, with ``f1=None``, one that never finished."""
    job = sweep / f"freeze={policy},seed={seed}"
    (job / ".hydra").mkdir(parents=True)
    config = {"name": "tiny_freeze_ablation", "seed": seed, "freeze": POLICIES[policy], "peft": {"name": "none"},
              "model": {"name": "tiny", "path": None}, "eval": {"benchmarks": ["ftrl_test"]}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"freeze={policy}", f"seed={seed}"]))
    if f1 is None:
        return job
    start, last = f1
    evals = {"base": {"ftrl_test/solve_f1": 0.0, "ftrl_test/solve_p": 1.0},
             "warmup": {"ftrl_test/solve_f1": start, "ftrl_test/solve_p": 0.5},
             "round2": {"ftrl_test/solve_f1": last, "ftrl_test/solve_p": 0.5}}
    (job / "summary.json").write_text(json.dumps({"evals": [{"checkpoint": c, "metrics": m} for c, m in evals.items()]}))
    lower_mlp = {n for n in shapes() if n.startswith(("model.layers.0.mlp", "model.layers.1.mlp"))}
    checkpoint(job / "warmup" / "checkpoint", changed=set())
    checkpoint(job / "rounds" / "r1" / "checkpoint", changed=set())
    checkpoint(job / "rounds" / "r2" / "checkpoint", changed=None if policy == "none" else lower_mlp)
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / "tiny_freeze_ablation"
    for policy, seed, f1 in (("none", 0, (0.30, 0.40)), ("none", 1, (0.40, 0.52)), ("lower_mlp_only", 0, (0.30, 0.35)),
                             ("lower_mlp_only", 1, (0.40, 0.43)), ("mlp_only", 0, None)):
        make_job(sweep, policy, seed, f1)
    return sweep


ARM_HEADER = ["freeze", "seeds", "trainable params", "trainable %", "Solve-P start", "Solve-P last", "Solve-P gain",
              "Solve-F1 start", "Solve-F1 last", "Solve-F1 gain", "Δ² L0-2 MLP %", "Δ² lower-half MLP %"]
ARM_BODY = [
    ["lower_mlp_only", "0,1", "192 ± 0", "28.40 ± 0.00", "50.00 ± 0.00", "50.00 ± 0.00", "0.00 ± 0.00",
     "35.00 ± 7.07", "39.00 ± 5.66", "4.00 ± 1.41", "100.00 ± 0.00", "100.00 ± 0.00"],
    ["mlp_only", "0", "—", "—", "—", "—", "—", "—", "—", "—", "—", "—"],
    ["none", "0,1", "676 ± 0", "100.00 ± 0.00", "50.00 ± 0.00", "50.00 ± 0.00", "0.00 ± 0.00", "35.00 ± 7.07",
     "46.00 ± 8.49", "11.00 ± 1.41", "42.60 ± 0.00", "28.40 ± 0.00"],
]


def test_the_comparison_of_fixture_jobs_is_pinned(sweep: Path) -> None:
    comparison = sweep_comparison(sweep)
    assert comparison.keys == ["freeze"]
    # F1 gains: none 0.10, 0.12 (mean 11.00, sd 1.41); lower_mlp_only 0.05, 0.03 (4.00, 1.41). Trainable: 676
    # in all, the lower-half MLP 2 x 96 = 192. Weight change: every element of every tensor moved by 1 under
    # none (L0-2 MLP: 288 / 676 = 42.60%, L0-1: 28.40%), only the lower-half MLP under lower_mlp_only.
    assert comparison.arm_rows() == (ARM_HEADER, ARM_BODY)
    header, body = comparison.job_rows()
    assert header[:4] == ["job", "freeze", "seed", "checkpoint"]
    assert [row[:4] for row in body] == [["freeze=lower_mlp_only,seed=0", "lower_mlp_only", "0", "round2"],
                                         ["freeze=lower_mlp_only,seed=1", "lower_mlp_only", "1", "round2"],
                                         ["freeze=mlp_only,seed=0", "mlp_only", "0", "unfinished"],
                                         ["freeze=none,seed=0", "none", "0", "round2"],
                                         ["freeze=none,seed=1", "none", "1", "round2"]]
    assert body[0][4:10] == ["192", "28.40", "50.00", "50.00", "0.00", "30.00"]


def test_write_and_the_callback_print_where_the_comparison_is(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    out = capsys.readouterr().out
    assert f"sweep table: {sweep / 'sweep_table.md'}" in out
    assert f"sweep comparison: {sweep / 'comparison' / 'comparison.md'}" in out
    text = (sweep / "comparison" / "comparison.md").read_text()
    assert "| none | 0,1 | 676 ± 0 | 100.00 ± 0.00 |" in text and "![heat-maps](heatmaps.png)" in text
    assert "- freeze=mlp_only,seed=0: no checkpoint to count parameters in" in text
    assert (sweep / "comparison" / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (sweep / "comparison" / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("freeze,seeds,trainable_params:mean,trainable_params:std,trainable_params:n,")
    assert rows[3].startswith("none,0 1,676,0,2,1,0,2,")
    assert len(list((sweep / "comparison" / "cells").glob("*.json"))) == 4  # cached per finished job
    assert write_sweep_comparison(sweep) == sweep / "comparison" / "comparison.md"  # rebuilt from the cache
    rebuilt = subprocess.run([sys.executable, "-m", "ftrl.report", "sweep", str(sweep)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=False)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"sweep comparison: {sweep / 'comparison' / 'comparison.md'}" in rebuilt.stdout
    assert "11.00 ± 1.41" in rebuilt.stdout


# ------------------------------------------------------------------------------ the experiments
def _compose(overrides: list[str]) -> object:
    import ftrl.run  # noqa: F401  (registers the ftrl_dirname resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["run_dir=/tmp/ftrl-test-run", *overrides],
                       return_hydra_config=True)


@pytest.mark.parametrize("experiment,rewards", [
    ("reward_ablation", "solve_precision,solve_rate,solve_pr,solve_f1"),
    ("tiny_reward_ablation", "solve_precision,solve_rate,solve_pr,solve_f1")])
def test_reward_ablations_sweep_the_papers_four_rewards(experiment: str, rewards: str) -> None:
    cfg = _compose([f"+experiment={experiment}"])
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == {"reward": rewards}
    job = load_run_config(_compose([f"+experiment={experiment}", "reward=solve_pr"]))
    assert job.reward.name == "solve_pr" and job.name == experiment
    if experiment == "reward_ablation":
        assert (job.model.name, job.algorithm.name, job.backend.name) == ("qwen25_7b", "grpo", "verl")
    else:
        assert job.model.name == "tiny" and job.resources.num_threads == 1


def test_freeze_ablations_offer_the_papers_selection_and_the_lower_half() -> None:
    paper = load_run_config(_compose(["+experiment=freeze_ablation", "freeze=paper_lower_mlp_only"]))
    assert (paper.freeze.layers, list(paper.freeze.modules), paper.freeze.action) == ("0:3", ["mlp"], "train")
    half = load_run_config(_compose(["+experiment=freeze_ablation", "freeze=lower_mlp_only"]))
    assert (half.freeze.layers, list(half.freeze.modules)) == ("0:0.5", ["mlp"])
    for name in ("freeze_ablation", "tiny_freeze_ablation"):
        swept = _compose([f"+experiment={name}"]).hydra.sweeper.params.freeze.split(",")
        assert {"none", "paper_lower_mlp_only", "lower_mlp_only"} <= set(swept), name
    text = (CONF / "freeze" / "lower_mlp_only.yaml").read_text()
    assert "our extension" in text and "layers 0-2" in text
