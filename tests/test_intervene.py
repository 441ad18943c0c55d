"""Interventions: revert / transplant built on disk byte for byte, selections as the freeze policies make them,
streaming with bounded memory on sharded checkpoints, and the ``intervene`` stage's table with a known answer.

Checkpoints are hand-made safetensors files (Qwen3 tensor names, tied embeddings) in tmp dirs; the stage
test evaluates each model with a stand-in benchmark whose score is the mean weight, so B (zeros) scores 0,
T (ones) scores 1 and every intervention's gain kept is exactly the share of parameters it takes from T.

    OMP_NUM_THREADS=1 python -m pytest tests/test_intervene.py -q
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ftrl.analysis.intervene.build import build_intervention, read_layout
from ftrl.analysis.intervene.selection import select_names, trainable_parameters
from ftrl.analysis.intervene.stage import CSV_NAME, PLOT_NAME, gain_kept, run_interventions
from ftrl.artifacts import RunDir
from ftrl.config import ConfigError, FreezeConfig, RunConfig, parse_intervention, parse_selector
from ftrl.report import interventions_table
from ftrl.run_state import RunContext

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
FREEZE_DIR = ROOT / "conf" / "freeze"
NUM_LAYERS = 4
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def shapes(hidden: int = 4, inter: int = 8, vocab: int = 16, kv: int = 2) -> dict[str, tuple[int, ...]]:
    """A 4-layer Qwen3-named model with tied embeddings (no lm_head tensor): 676 parameters at the defaults."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                    p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                    p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                    p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                    p + "post_attention_layernorm.weight": (hidden,)})
    out["model.norm.weight"] = (hidden,)
    return out


def random_pair(seed: int = 0, **sizes: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """B random, T = B + noise; one norm in bfloat16 (its bytes are copied as they are)."""
    gen = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=gen) for name, shape in shapes(**sizes).items()}
    target = {name: value + 0.01 * torch.randn(value.shape, generator=gen) for name, value in base.items()}
    for tensors in (base, target):
        tensors["model.layers.3.input_layernorm.weight"] = tensors["model.layers.3.input_layernorm.weight"].bfloat16()
    return base, target


def save(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"num_hidden_layers": NUM_LAYERS, "tie_word_embeddings": True,
                                                       "saved_from": directory.name}))
    (directory / "tokenizer.json").write_text("{}")
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names[index::shards]}, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names[index::shards]})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def raw_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor's stored dtype, shape and exact bytes."""
    layout = read_layout(path)
    out = {}
    for name, entry in layout.tensors.items():
        with open(entry.file, "rb") as handle:
            handle.seek(entry.start)
            out[name] = (entry.dtype, entry.shape, handle.read(entry.stop - entry.start))
    return out


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base, target = random_pair()
    return save(tmp_path / "B", base), save(tmp_path / "T", target, shards=3)


# ------------------------------------------------------------------------------ bit for bit
def test_revert_of_everything_is_b_bit_for_bit(pair: tuple[Path, Path], tmp_path: Path) -> None:
    b, t = pair
    report = build_intervention(b, t, "revert", "all", tmp_path / "out")
    assert (report.tensors_changed, report.params_changed, report.total_params) == (38, 676, 676)
    assert raw_tensors(tmp_path / "out") == raw_tensors(b)
    # the host is T: its shards, index and side files, with B's bytes in them
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in t.iterdir())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["saved_from"] == "T"
    loaded = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        loaded.update(load_file(str(shard)))
    assert all(torch.equal(loaded[name], value) for name, value in load_file(str(b / "model.safetensors")).items())


def test_transplant_of_everything_is_t_bit_for_bit(pair: tuple[Path, Path], tmp_path: Path) -> None:
    b, t = pair
    build_intervention(b, t, "transplant", "all", tmp_path / "out")
    assert raw_tensors(tmp_path / "out") == raw_tensors(t)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("selector,expected", [
    ("lower_mlp_only", {f"model.layers.{i}.mlp.{k}.weight" for i in (0, 1) for k in MLP}),
    ("paper_lower_mlp_only", {f"model.layers.{i}.mlp.{k}.weight" for i in (0, 1, 2) for k in MLP}),
    ("layers=1 modules=[attn]", {f"model.layers.1.self_attn.{k}.weight" for k in ATTN}),
    ("modules=[norm] regex=input", {f"model.layers.{i}.input_layernorm.weight" for i in range(NUM_LAYERS)}),
    ("layers=2:4 modules=[embed,down_proj]", {"model.layers.2.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"}),
    ("modules=[lm_head]", {"model.embed_tokens.weight"}),  # tied: the one stored tensor is the head too
])
def test_revert_and_transplant_partition_the_delta_exactly(pair: tuple[Path, Path], tmp_path: Path, selector: str,
                                                           expected: set[str]) -> None:
    b, t = pair
    reverted = build_intervention(b, t, "revert", selector, tmp_path / "revert")
    transplanted = build_intervention(b, t, "transplant", selector, tmp_path / "transplant")
    assert set(reverted.changed) == set(transplanted.changed) == expected
    raw_b, raw_t = raw_tensors(b), raw_tensors(t)
    raw_r, raw_x = raw_tensors(tmp_path / "revert"), raw_tensors(tmp_path / "transplant")
    for name in raw_b:  # each tensor comes whole from one side: the selection from the donor, the rest from the host
        assert raw_x[name] == (raw_t[name] if name in expected else raw_b[name])
        assert raw_r[name] == (raw_b[name] if name in expected else raw_t[name])
    tensors = {key: {} for key in "BTRX"}
    for key, path in (("B", b / "model.safetensors"), ("R", tmp_path / "revert"), ("X", tmp_path / "transplant")):
        for file in ([path] if path.is_file() else sorted(path.glob("*.safetensors"))):
            tensors[key].update(load_file(str(file)))
    for shard in sorted(t.glob("*.safetensors")):
        tensors["T"].update(load_file(str(shard)))
    for name in tensors["B"]:
        big = {key: tensors[key][name].double() for key in "BTRX"}
        assert torch.equal(big["R"] + big["X"] - big["B"], big["T"])  # revert(S) + transplant(S) - B == T
        assert torch.equal((big["R"] - big["B"]) + (big["X"] - big["B"]), big["T"] - big["B"])


def test_a_dtype_difference_is_converted_into_the_hosts_dtype(tmp_path: Path) -> None:
    base, target = random_pair()
    base["model.norm.weight"] = base["model.norm.weight"].bfloat16()
    b, t = save(tmp_path / "B", base), save(tmp_path / "T", target)
    build_intervention(b, t, "transplant", "modules=[norm] regex=^model\\.norm", tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(out["model.norm.weight"], target["model.norm.weight"].bfloat16())


# ------------------------------------------------------------------------------ streaming
def _peak_bytes_of_a_build(tmp_path: Path, inter: int) -> tuple[int, int, Path, Path]:
    base, target = random_pair(hidden=128, inter=inter, vocab=256, kv=64)
    b = save(tmp_path / f"B{inter}", base, shards=3)
    t = save(tmp_path / f"T{inter}", target, shards=3)
    tracemalloc.start()
    try:
        report = build_intervention(b, t, "transplant", "layers=0 modules=[mlp]", tmp_path / f"out{inter}",
                                    chunk_bytes=16 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.params_changed == 3 * 128 * inter
    return peak, max(v.numel() * v.element_size() for v in base.values()), b, t


def test_an_intervention_on_a_sharded_checkpoint_streams_in_bounded_memory(tmp_path: Path) -> None:
    """Python memory allocated while building one intervened model from two 3-shard checkpoints (tracemalloc):
    4.1 MB models (largest tensor 256 KiB) and 13.5 MB models (largest 1 MiB) both peak under 96 KiB, the
    larger no more than 8 KiB above the smaller: every byte goes through one 16 KiB buffer, so memory is the
    headers plus the buffer, whatever the size of a tensor or a model."""
    small, small_largest, _, _ = _peak_bytes_of_a_build(tmp_path, 512)
    large, large_largest, b, t = _peak_bytes_of_a_build(tmp_path, 2048)
    assert (small_largest, large_largest) == (256 * 1024, 1024 * 1024)
    assert sum(f.stat().st_size for f in b.glob("*.safetensors")) > 13_000_000
    assert small < 96 * 1024 and large < 96 * 1024 < large_largest // 10, (small, large)
    assert large - small < 8 * 1024, (small, large)
    assert json.loads((tmp_path / "out2048" / "model.safetensors.index.json").read_text()) == \
        json.loads((b / "model.safetensors.index.json").read_text())
    raw_b, raw_t, raw_x = raw_tensors(b), raw_tensors(t), raw_tensors(tmp_path / "out2048")
    assert all(raw_x[n] == (raw_t[n] if n.startswith("model.layers.0.mlp.") else raw_b[n]) for n in raw_b)


# ------------------------------------------------------------------------------ the grammar
def test_selections_are_the_freeze_policies_selections_on_a_live_model() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ftrl.train.freeze import apply_freeze_policy, select_parameters

    for tied in (True, False):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
        stored = {name: p.numel() for name, p in model.named_parameters()}  # tied: lm_head is not a stored tensor
        for option in sorted(p.stem for p in FREEZE_DIR.glob("*.yaml") if p.stem != "none"):
            policy = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FreezeConfig),
                                                         OmegaConf.load(FREEZE_DIR / f"{option}.yaml")))
            assert set(select_names(parse_selector(option), list(stored), 4)) == set(select_parameters(model, policy))
            freeze = OmegaConf.to_container(OmegaConf.load(FREEZE_DIR / f"{option}.yaml"))
            report = apply_freeze_policy(model, policy)
            assert trainable_parameters(freeze, stored, 4) == (report.trainable_params, report.total_params), option


def test_selector_errors_name_the_key() -> None:
    assert parse_intervention("transplant:layers=0:3 modules=[mlp]", "k")[1].layers == "0:3"
    for text, message in (("swap:all", "k: unknown value 'swap'"), ("revert:lower_mlp", "did you mean 'lower_mlp_only'"),
                          ("revert:none", "trains everything"), ("revert:layers=3:1", "0 <= lo < hi <= depth"),
                          ("revert:modules=[mpl]", "did you mean 'mlp'"), ("revert:layer=1", "unknown part")):
        with pytest.raises(ConfigError, match=message):
            parse_intervention(text, "k")
    with pytest.raises(ConfigError, match=r"revert:x: layer range '0:3' .* the model has 2 layers"):
        select_names(parse_selector("paper_lower_mlp_only"), list(shapes()), 2, "revert:x")


# ------------------------------------------------------------------------------ the stage
class MeanWeight:
    """Stand-in benchmark: ftrl_test/solve_f1 = the mean of all weights of the model (B: 0, T: 1)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, run_dir: RunDir, name: str, policy: Path) -> dict[str, float]:
        self.calls.append(name)
        assert (run_dir.eval_dir / name / "intervention.json").is_file()  # the record comes first
        tensors = load_file(str(Path(policy) / "model.safetensors"))
        total = sum(float(t.double().sum()) for t in tensors.values())
        return {"ftrl_test/solve_f1": total / sum(t.numel() for t in tensors.values()), "ftrl_test/n": 3.0}


def stage_run(tmp_path: Path, **intervene: object) -> RunContext:
    names = shapes()
    save(tmp_path / "run" / "warmup" / "checkpoint", {n: torch.zeros(s) for n, s in names.items()})
    save(tmp_path / "run" / "rounds" / "r1" / "checkpoint", {n: torch.ones(s) for n, s in names.items()})
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), {
        "run_dir": str(tmp_path / "run"), "stages": ["intervene"], "intervene": intervene}))
    return RunContext(cfg=cfg.validate(), run_dir=RunDir(tmp_path / "run"))


EXPECTED_CSV = """\
intervention,kind,selector,layers,modules,tensors_changed,params_changed,params_share,delta_share,status,\
ftrl_test/solve_f1,gain_kept:ftrl_test/solve_f1
B (warmup),base,,,,0,0,0.000000,0.000000,ok (intervene/eval/B-warmup),0,0.0000
T (round1),trained,all,all,all,38,676,1.000000,1.000000,ok (intervene/eval/T-round1),1,1.0000
revert:paper_lower_mlp_only,revert,paper_lower_mlp_only,0-2,"gate_proj,up_proj,down_proj",9,288,0.426036,0.426036,ok,\
0.573964,0.5740
transplant:paper_lower_mlp_only,transplant,paper_lower_mlp_only,0-2,"gate_proj,up_proj,down_proj",9,288,0.426036,\
0.426036,ok,0.426036,0.4260
revert:lower_mlp_only,revert,lower_mlp_only,0-1,"gate_proj,up_proj,down_proj",6,192,0.284024,0.284024,ok,0.715976,0.7160
transplant:lower_mlp_only,transplant,lower_mlp_only,0-1,"gate_proj,up_proj,down_proj",6,192,0.284024,0.284024,ok,\
0.284024,0.2840
transplant:mlp_only,transplant,mlp_only,all,"gate_proj,up_proj,down_proj",12,384,0.568047,0.568047,ok,0.568047,0.5680
transplant:attn_only,transplant,attn_only,all,"q_proj,k_proj,v_proj,o_proj",16,192,0.284024,0.284024,ok,0.284024,0.2840
transplant:layers=0 modules=[mlp],transplant,layers=0 modules=[mlp],0,"gate_proj,up_proj,down_proj",3,96,0.142012,\
0.142012,ok,0.142012,0.1420
transplant:layers=0 modules=[attn],transplant,layers=0 modules=[attn],0,"q_proj,k_proj,v_proj,o_proj",4,48,0.071006,\
0.071006,ok,0.0710059,0.0710
"""


def test_the_stage_writes_the_table_with_gain_kept_and_resumes(tmp_path: Path) -> None:
    ctx = stage_run(tmp_path, scan_layers="0")
    evaluate, released = MeanWeight(), []
    settings = {"benchmarks": ["ftrl_test"]}
    info = run_interventions(ctx, evaluate, lambda: released.append(1), settings)
    out = tmp_path / "run" / "intervene"
    # 676 parameters: layers 0-1 MLP 2 x 96 = 192 (28.4%), layers 0-2 288 (42.6%); B = 0, T = 1, so a
    # transplant keeps exactly its share of T's parameters as gain and a revert the rest.
    assert (out / CSV_NAME).read_text() == EXPECTED_CSV
    assert info == {"base": "warmup", "target": "round1", "metric": "ftrl_test/solve_f1", "interventions": 8,
                    "skipped": 0, "csv": str(out / CSV_NAME)}
    assert (out / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(evaluate.calls) == 10 and len(released) >= 8
    assert not (out / "models").exists()  # intervene.keep=false: every built model is gone
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    line = next(x for x in summary["interventions"] if x["intervention"] == "transplant:lower_mlp_only")
    assert line["gain_kept"] == pytest.approx(192 / 676, abs=1e-12) and line["value"] == pytest.approx(192 / 676)
    table = interventions_table(summary)
    assert "transplant:lower_mlp_only               28.4          28.4                28.4       0.28" in table
    assert "revert:lower_mlp_only                   28.4          28.4                71.6       0.72" in table
    # again: nothing evaluated; other eval settings: everything again; rerun=[intervene]: everything again
    run_interventions(ctx, evaluate, lambda: None, settings)
    assert len(evaluate.calls) == 10
    run_interventions(ctx, evaluate, lambda: None, {"benchmarks": ["ftrl_test"], "max_samples": 3})
    assert len(evaluate.calls) == 20
    ctx.cfg.rerun = ["intervene"]
    run_interventions(ctx, evaluate, lambda: None, {"benchmarks": ["ftrl_test"], "max_samples": 3})
    assert len(evaluate.calls) == 30


def test_the_stage_keeps_models_and_marks_what_does_not_fit(tmp_path: Path) -> None:
    ctx = stage_run(tmp_path, interventions=["revert:layers=0:6 modules=[mlp]", "transplant:all"], scan=[],
                    keep=True)
    info = run_interventions(ctx, MeanWeight(), lambda: None, {"benchmarks": ["ftrl_test"]})
    assert info["interventions"] == 2 and info["skipped"] == 1
    rows = (tmp_path / "run" / "intervene" / CSV_NAME).read_text().splitlines()
    assert "skipped: layers=0:6 modules=[mlp]: layer range '0:6' (half-open) must satisfy 0 <= lo < hi <= 4" in rows[3]
    assert rows[4].endswith(",ok,1,1.0000")
    kept = tmp_path / "run" / "intervene" / "models" / "transplant-all"
    assert raw_tensors(kept) == raw_tensors(tmp_path / "run" / "rounds" / "r1" / "checkpoint")
    assert not (tmp_path / "run" / "intervene" / PLOT_NAME).exists()  # no scan asked for


def test_gain_kept_is_undefined_where_training_changed_nothing() -> None:
    assert gain_kept(0.5, 0.4, 0.6) == pytest.approx(0.5)
    assert gain_kept(0.3, 0.4, 0.6) == pytest.approx(-0.5)
    assert gain_kept(0.4, 0.4, 0.4) is None and gain_kept(None, 0.4, 0.6) is None
