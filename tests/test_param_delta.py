"""Parameter-change analysis on hand-made checkpoints with known answers, and on tiny HF models.

    OMP_NUM_THREADS=1 python -m pytest tests/test_param_delta.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ftrl.analysis.param_delta import (
    HEATMAP_PNG,
    PARAM_DELTA_CSV,
    SUMMARY_JSON,
    SUMMARY_TXT,
    CheckpointError,
    aggregate,
    analyze_checkpoints,
    analyze_run,
    compare_checkpoints,
    iter_checkpoint_tensors,
    main,
    natural_key,
    param_delta,
    summarize,
    summary_numbers,
    write_param_delta_csv,
)
from ftrl.analysis.plots import plot_delta_heatmap, plot_reward_curve

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def base_tensors() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.full((3, 2), 2.0),
        "model.layers.0.mlp.up_proj.weight": torch.ones(2, 2),
        "model.layers.0.mlp.down_proj.weight": torch.full((2, 2), 3.0),
        "model.layers.1.self_attn.q_proj.weight": torch.full((2, 2), 2.0),
        "model.layers.1.mlp.up_proj.weight": torch.zeros(2, 2),
        "model.layers.10.input_layernorm.weight": torch.ones(4),
        "model.layers.10.post_attention_layernorm.weight": torch.ones(4),
        "model.unknown_scale": torch.tensor(5.0),
    }


def target_tensors() -> dict[str, torch.Tensor]:
    """Changes (||dW||^2, ||W0||^2): up0 (0.04, 4) down0 (16, 36) q1 (1, 16) norm10 (4, 4) scale (1, 25)."""
    tensors = {name: value.clone() for name, value in base_tensors().items()}
    tensors["model.layers.0.mlp.up_proj.weight"] += 0.1
    tensors["model.layers.0.mlp.down_proj.weight"][1, 0] += 4.0
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 1] += 1.0
    tensors["model.layers.10.input_layernorm.weight"][0] = 3.0
    tensors["model.unknown_scale"] = torch.tensor(6.0)
    tensors["lm_head.weight"] = torch.ones(3, 2)  # untied in the target only
    return tensors


def save_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def save_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, str(directory / shard))
        weight_map.update({name: shard for name in shard_names})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return (save_checkpoint(tmp_path / "base", base_tensors()),
            save_checkpoint(tmp_path / "target", target_tensors()))


EXPECTED_CSV = """name,layer,module,numel,rel_change
model.embed_tokens.weight,,embed,6,0
model.layers.0.mlp.down_proj.weight,0,down_proj,4,0.666667
model.layers.0.mlp.up_proj.weight,0,up_proj,4,0.1
model.layers.1.mlp.up_proj.weight,1,up_proj,4,0
model.layers.1.self_attn.q_proj.weight,1,q_proj,4,0.25
model.layers.10.input_layernorm.weight,10,norm,4,1
model.layers.10.post_attention_layernorm.weight,10,norm,4,0
model.unknown_scale,,,1,0.2
"""


def test_csv_lists_shared_tensors_in_natural_name_order(pair, tmp_path):
    # Rows follow the tensor names with digit runs compared as numbers (layers.1 < layers.10).
    base, target = pair
    report = compare_checkpoints(base, target)
    assert report.only_in_base == []
    assert report.only_in_target == ["lm_head.weight"]
    assert report.warnings() == ["only in target (not compared): lm_head.weight"]
    path = write_param_delta_csv(report.rows, tmp_path / "delta.csv")
    assert path.read_text() == EXPECTED_CSV
    rows = {row.name: row for row in report.rows}
    assert rows["model.layers.0.mlp.down_proj.weight"].rel_change == pytest.approx(4 / 6, abs=1e-12)
    assert rows["model.layers.0.mlp.down_proj.weight"].delta_sq == 16.0
    assert rows["model.layers.0.mlp.down_proj.weight"].base_sq == 36.0
    assert rows["model.layers.0.mlp.up_proj.weight"].rel_change == pytest.approx(0.1, rel=1e-6)
    assert rows["model.embed_tokens.weight"].rel_change == 0.0
    assert rows["model.layers.1.mlp.up_proj.weight"].rel_change == 0.0  # zero base, unchanged


def test_aggregate_is_the_group_frobenius_ratio_not_a_mean(pair):
    aggregated = aggregate(param_delta(*pair))
    cells = aggregated.rel_changes()
    assert list(cells) == [(0, "up_proj"), (0, "down_proj"), (1, "q_proj"), (1, "up_proj"), (10, "norm"),
                           (None, "embed"), (None, None)]
    assert cells[(10, "norm")] == pytest.approx(math.sqrt(4 / 8))  # two norms: (4 + 0) / (4 + 4)
    assert cells[(0, "down_proj")] == pytest.approx(4 / 6)
    assert aggregated.cells[(10, "norm")].tensors == 2
    assert aggregated.cells[(10, "norm")].numel == 8
    # up_proj over layers 0 and 1: sqrt(0.04 / (4 + 0)); layer 0: sqrt((0.04 + 16) / (4 + 36)).
    assert aggregated.by_module["up_proj"].rel_change == pytest.approx(0.1, rel=1e-6)
    assert aggregated.by_layer[0].rel_change == pytest.approx(math.sqrt(16.04 / 40), rel=1e-6)
    assert aggregated.by_layer[None].rel_change == pytest.approx(math.sqrt(1 / (24 + 25)))
    assert aggregated.total.delta_sq == pytest.approx(22.04, rel=1e-6)
    assert aggregated.total.base_sq == 113.0
    assert aggregated.total.tensors == 8


def test_summary_states_shares_and_top_cells(pair):
    aggregated = aggregate(param_delta(*pair))
    numbers = summary_numbers(aggregated, num_layers=12)
    assert numbers["lower_half_layers"] == 6
    assert numbers["share_mlp"] == pytest.approx(16.04 / 22.04, rel=1e-6)
    assert numbers["share_attention"] == pytest.approx(1 / 22.04, rel=1e-6)
    assert numbers["share_other"] == pytest.approx(5 / 22.04, rel=1e-6)
    assert numbers["share_lower_half"] == pytest.approx(17.04 / 22.04, rel=1e-6)
    assert numbers["share_upper_half"] == pytest.approx(4 / 22.04, rel=1e-6)
    assert numbers["share_outside_layers"] == pytest.approx(1 / 22.04, rel=1e-6)
    assert numbers["share_lower_half_mlp"] == pytest.approx(16.04 / 22.04, rel=1e-6)
    assert [cell["label"] for cell in numbers["top_cells"]] == [
        "L10 norm", "L0 down_proj", "L1 q_proj", "other", "L0 up_proj"]
    assert summarize(aggregated, num_layers=12) == (
        "8 tensors compared (31 parameters); overall relative change 0.442\n"
        "squared change by module group: MLP 72.8%, attention 4.5%, other 22.7%\n"
        "squared change by depth: lower half (layers 0-5) 77.3%, upper half (layers 6-11) 18.1%, "
        "outside layers 4.5%\n"
        "lower-half MLP holds 72.8% of the squared change\n"
        "top cells: L10 norm 0.707, L0 down_proj 0.667, L1 q_proj 0.25, other 0.2, L0 up_proj 0.1"
    )
    with pytest.raises(ValueError, match=r"num_layers=4 but the checkpoint has layer\(s\) \[10\]"):
        summarize(aggregated, num_layers=4)


def test_identical_checkpoints_summary(tmp_path):
    base = save_checkpoint(tmp_path / "a", base_tensors())
    aggregated = aggregate(param_delta(base, base))
    assert summarize(aggregated, num_layers=12).splitlines()[1] == (
        "no parameter changed: every compared tensor is identical")


def test_sharded_and_chunked_reads_give_the_same_numbers(pair, tmp_path):
    base, target = pair
    sharded = save_sharded(tmp_path / "target_sharded", target_tensors())
    assert len(list(sharded.glob("*.safetensors"))) == 2
    single = param_delta(base, target)
    assert param_delta(base, sharded) == single
    # One value per block: every row of every tensor is read separately.
    chunked = param_delta(base, sharded, chunk_elements=1)
    assert [r.name for r in chunked] == [r.name for r in single]
    for got, want in zip(chunked, single, strict=True):
        assert got.rel_change == pytest.approx(want.rel_change, abs=1e-15)
    # A single .safetensors file and an index file are accepted as paths too.
    assert param_delta(base / "model.safetensors", sharded / "model.safetensors.index.json") == single


def test_iter_checkpoint_tensors_streams_names_in_order(tmp_path):
    sharded = save_sharded(tmp_path / "ckpt", target_tensors())
    seen = {}
    for name, load in iter_checkpoint_tensors(sharded):
        seen[name] = load()
    assert list(seen) == sorted(target_tensors(), key=natural_key)
    assert list(seen)[-3:] == ["model.layers.10.input_layernorm.weight",
                               "model.layers.10.post_attention_layernorm.weight", "model.unknown_scale"]
    assert torch.equal(seen["model.layers.0.mlp.down_proj.weight"], torch.tensor([[3.0, 3.0], [7.0, 3.0]]))


def test_bf16_and_mixed_dtypes(tmp_path):
    name = "model.layers.0.mlp.gate_proj.weight"
    base = save_checkpoint(tmp_path / "a", {name: torch.ones(4, 3, dtype=torch.bfloat16)})
    target = save_checkpoint(tmp_path / "b", {name: torch.full((4, 3), 1.5, dtype=torch.bfloat16)})
    mixed = save_checkpoint(tmp_path / "c", {name: torch.full((4, 3), 0.75)})
    assert param_delta(base, target)[0].rel_change == 0.5
    assert param_delta(base, mixed, chunk_elements=3)[0].rel_change == 0.25


def test_zero_base_that_changes_is_infinite(tmp_path):
    base = save_checkpoint(tmp_path / "a", {"model.layers.0.self_attn.k_proj.weight": torch.zeros(2, 2)})
    target = save_checkpoint(tmp_path / "b", {"model.layers.0.self_attn.k_proj.weight": torch.eye(2)})
    rows = param_delta(base, target)
    assert rows[0].rel_change == math.inf
    assert write_param_delta_csv(rows, tmp_path / "d.csv").read_text().splitlines()[1] == (
        "model.layers.0.self_attn.k_proj.weight,0,k_proj,4,inf")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    base = save_checkpoint(tmp_path / "a", {"model.layers.3.mlp.up_proj.weight": torch.ones(2, 2)})
    target = save_checkpoint(tmp_path / "b", {"model.layers.3.mlp.up_proj.weight": torch.ones(2, 3)})
    with pytest.raises(CheckpointError, match=r"'model.layers.3.mlp.up_proj.weight' has shape \[2, 2\] in .* "
                                              r"but \[2, 3\] in "):
        param_delta(base, target)


def test_unreadable_checkpoints_explain_themselves(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        param_delta(empty, empty)
    sharded = save_sharded(tmp_path / "sharded", base_tensors())
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard\(s\) \['model-00002-of-00002.safetensors'\]"):
        param_delta(sharded, sharded)
    with pytest.raises(CheckpointError, match="does not exist"):
        param_delta(tmp_path / "nowhere", tmp_path / "nowhere")


def test_heatmap_and_reward_curve_are_png_files(pair, tmp_path):
    aggregated = aggregate(param_delta(*pair))
    heatmap = plot_delta_heatmap(aggregated.rel_changes(), tmp_path / "plots" / "heat.png", title="test")
    assert heatmap.read_bytes().startswith(PNG_MAGIC) and heatmap.stat().st_size > 5000
    rows = [{"step": step, "round": 1 + step // 4, "reward/score": 0.1 * step, "reward/score_std": 0.05,
             "reward/solved": 0.05 * step, "reward/malformed": 0.5 - 0.04 * step, "actor/kl": 0.0}
            for step in range(8)]
    curve = plot_reward_curve(rows, tmp_path / "plots" / "reward.png")
    assert curve.read_bytes().startswith(PNG_MAGIC) and curve.stat().st_size > 5000
    with pytest.raises(ValueError, match=r"no history row has 'reward/score'; keys seen: \['actor/kl'"):
        plot_reward_curve([{"step": 0, "actor/kl": 0.1}], tmp_path / "none.png")
    with pytest.raises(ValueError, match="no per-layer cell"):
        plot_delta_heatmap({(None, "embed"): 0.1}, tmp_path / "none.png")


def test_analyze_checkpoints_writes_outputs(pair, tmp_path):
    base, target = pair
    numbers = analyze_checkpoints(base, target, tmp_path / "out", label="base -> target", num_layers=12)
    assert (tmp_path / "out" / PARAM_DELTA_CSV).read_text() == EXPECTED_CSV
    assert (tmp_path / "out" / HEATMAP_PNG).read_bytes().startswith(PNG_MAGIC)
    summary = (tmp_path / "out" / SUMMARY_TXT).read_text().splitlines()
    assert summary[0] == "param delta: base -> target"
    assert summary[4] == "lower-half MLP holds 72.8% of the squared change"
    assert summary[-1] == "only in target (not compared): lm_head.weight"
    saved = json.loads((tmp_path / "out" / SUMMARY_JSON).read_text())
    assert saved["share_mlp"] == pytest.approx(16.04 / 22.04)
    assert numbers["only_in_target"] == ["lm_head.weight"]


# ------------------------------------------------------------------------------ pipeline stage
def stage_tensors(embed: float = 0.0, up: float = 0.0, q: float = 0.0) -> dict[str, torch.Tensor]:
    """Two layers; each argument adds to one entry (embed, q) or all four entries (up) of a 2x2 of ones."""
    embed_w, up_w, q_w = torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 2)
    embed_w[0, 0] += embed
    up_w += up
    q_w[1, 1] += q
    return {"model.embed_tokens.weight": embed_w, "model.layers.0.mlp.up_proj.weight": up_w,
            "model.layers.1.self_attn.q_proj.weight": q_w}


def make_context(tmp_path: Path, checkpoints: dict[str, dict[str, torch.Tensor]]):
    from ftrl.artifacts import RunDir
    from ftrl.config import RunConfig
    from ftrl.run_state import RunContext

    run_dir = RunDir(tmp_path / "run")
    locations = {"base": run_dir.base_model}
    for name, tensors in checkpoints.items():
        directory = locations.get(name) or run_dir.checkpoint_dir(name)
        save_checkpoint(directory, tensors, config={"num_hidden_layers": 2})
    return RunContext(cfg=RunConfig(run_dir=str(run_dir.root)), run_dir=run_dir)


def test_analyze_run_compares_rl_start_to_each_round(tmp_path):
    # warmup changes the embedding, round 1 the layer-0 MLP, round 2 the layer-1 attention
    # (each ||dW||^2 = 1); ||W_warmup||^2 = 7 + 4 + 4 = 15.
    ctx = make_context(tmp_path, {
        "base": stage_tensors(),
        "warmup": stage_tensors(embed=1.0),
        "round1": stage_tensors(embed=1.0, up=0.5),
        "round2": stage_tensors(embed=1.0, up=0.5, q=1.0),
    })
    for k, scores in ((1, [0.1, 0.2]), (2, [0.3, 0.5])):
        history = ctx.run_dir.train_dir(k) / "history.jsonl"
        history.parent.mkdir(parents=True)
        history.write_text("".join(json.dumps({"step": s, "reward/score": v, "reward/score_std": 0.1}) + "\n"
                                   for s, v in enumerate(scores)))
    result = analyze_run(ctx)
    assert result == {"comparison": "warmup_to_round2",
                      "overall_rel_change": pytest.approx(math.sqrt(2 / 15)), "share_mlp": 0.5,
                      "share_attention": 0.5, "share_lower_half_mlp": 0.5,
                      "top_cell": "L0 up_proj 0.5",
                      "comparisons": ["base_to_round2", "warmup_to_round1", "warmup_to_round2"]}
    analysis = ctx.run_dir.analysis_dir
    first = json.loads((analysis / "warmup_to_round1" / SUMMARY_JSON).read_text())
    assert first["share_lower_half_mlp"] == 1.0 and first["top_cells"][0]["label"] == "L0 up_proj"
    whole = json.loads((analysis / "base_to_round2" / SUMMARY_JSON).read_text())
    assert (whole["share_mlp"], whole["share_attention"], whole["share_other"]) == pytest.approx((1 / 3,) * 3)
    top_csv = (analysis / PARAM_DELTA_CSV).read_text()
    assert top_csv == (analysis / "warmup_to_round2" / PARAM_DELTA_CSV).read_text()
    assert top_csv.splitlines()[1:] == [
        "model.embed_tokens.weight,,embed,4,0", "model.layers.0.mlp.up_proj.weight,0,up_proj,4,0.5",
        "model.layers.1.self_attn.q_proj.weight,1,q_proj,4,0.5"]
    assert (analysis / HEATMAP_PNG).stat().st_size > 0


def test_analyze_run_with_explicit_paths_and_too_few_checkpoints(tmp_path):
    ctx = make_context(tmp_path, {"base": stage_tensors()})
    with pytest.raises(CheckpointError, match=r"two checkpoints of this run; found: base \(.*model/base\)"):
        analyze_run(ctx)
    other = save_checkpoint(tmp_path / "other", stage_tensors(up=1.0), config={"num_hidden_layers": 2})
    ctx.cfg.analysis.base = str(ctx.run_dir.base_model)
    ctx.cfg.analysis.target = str(other)
    result = analyze_run(ctx)
    assert result["comparison"] == "analysis"
    assert result["share_lower_half_mlp"] == 1.0
    assert result["overall_rel_change"] == pytest.approx(math.sqrt(4 / 12))
    summary = (ctx.run_dir.analysis_dir / SUMMARY_TXT).read_text()
    assert summary.startswith(f"param delta: {ctx.run_dir.base_model} -> {other}\n")
    ctx.cfg.analysis.target = None
    with pytest.raises(CheckpointError, match="set both paths"):
        analyze_run(ctx)


# ------------------------------------------------------------------------------ tiny HF models
def test_tiny_qwen3_with_only_layer0_mlp_perturbed(tmp_path, capsys):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        for projection in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            projection.weight.add_(0.01 * torch.randn_like(projection.weight))
    model.save_pretrained(tmp_path / "target", max_shard_size="20KB")
    assert (tmp_path / "target" / "model.safetensors.index.json").is_file()

    numbers = analyze_checkpoints(tmp_path / "base", tmp_path / "target", tmp_path / "out")
    assert numbers["num_layers"] == 4
    assert numbers["only_in_base"] == numbers["only_in_target"] == []
    assert numbers["top_cells"][0]["layer"] == 0
    assert numbers["top_cells"][0]["module"] in ("gate_proj", "up_proj", "down_proj")
    assert numbers["share_lower_half_mlp"] == pytest.approx(1.0)
    assert numbers["share_attention"] == 0.0
    summary = (tmp_path / "out" / SUMMARY_TXT).read_text()
    assert "lower-half MLP holds 100.0% of the squared change" in summary
    assert "top cells: L0 " in summary
    rows = (tmp_path / "out" / PARAM_DELTA_CSV).read_text().splitlines()
    changed = sorted(line.split(",")[0] for line in rows[1:] if line.split(",")[-1] != "0")
    assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                       "model.layers.0.mlp.up_proj.weight"]

    assert main([str(tmp_path / "base"), str(tmp_path / "target"), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "lower-half MLP holds 100.0% of the squared change" in printed
    assert (tmp_path / "cli" / HEATMAP_PNG).read_bytes().startswith(PNG_MAGIC)
