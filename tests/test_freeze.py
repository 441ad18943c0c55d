"""Freeze policies and LoRA composition on a tiny in-process Qwen3: exact selections, real AdamW steps.

Every option in conf/freeze/ is applied to a 4-layer model, its trainable tensor names are checked
against an explicit list, and three AdamW steps (weight decay > 0, optimizer over *all* parameters)
must leave each frozen tensor bit-identical while every trainable one moves.

    OMP_NUM_THREADS=1 python -m pytest tests/test_freeze.py -q
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ftrl.config import FreezeConfig, PeftConfig
from ftrl.errors import ConfigError
from ftrl.params import classify_parameter, format_layers, parse_layer_range
from ftrl.train.freeze import (
    FreezeReport,
    FrozenParametersChangedError,
    apply_freeze_policy,
    apply_lora,
    assert_frozen_unchanged,
    lora_target_modules,
    merge_lora_for_save,
    select_parameters,
    snapshot_frozen,
)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
FREEZE_DIR = ROOT / "conf" / "freeze"
PEFT_DIR = ROOT / "conf" / "peft"
VOCAB = 64
NUM_LAYERS = 4

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NORMS = ("self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm")
ALL_LAYERS = range(NUM_LAYERS)


def layer_names(layers: range | list[int], leaves: tuple[str, ...], prefix: str = "") -> set[str]:
    return {f"{prefix}model.layers.{i}.{leaf}.weight" for i in layers for leaf in leaves}


ALL_NAMES = ({"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
             | layer_names(ALL_LAYERS, ATTN + MLP + LAYER_NORMS))
# Per option file: the exact trainable tensors on the 4-layer model, and their parameter count.
# Per layer: attention 16384+8192+8192+16384, MLP 3x2048, norms 2x128+2x32; plus embed, norm, head.
EXPECTED_TRAINABLE: dict[str, tuple[set[str], int]] = {
    "none": (ALL_NAMES, 226_592),
    "mlp_only": (layer_names(ALL_LAYERS, MLP), 24_576),
    "lower_mlp_only": (layer_names([0, 1], MLP), 12_288),
    "upper_mlp_only": (layer_names([2, 3], MLP), 12_288),
    "attn_only": (layer_names(ALL_LAYERS, ATTN), 196_608),
    "freeze_lower_mlp": (ALL_NAMES - layer_names([0, 1], MLP), 214_304),
    "paper_lower_mlp_only": (layer_names([0, 1, 2], MLP), 18_432),
    "freeze_paper_lower_mlp": (ALL_NAMES - layer_names([0, 1, 2], MLP), 208_160),
}
FREEZE_OPTIONS = sorted(path.stem for path in FREEZE_DIR.glob("*.yaml"))


def tiny_model(tied: bool = False, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return Qwen3ForCausalLM(config).eval()


def load_freeze(option: str) -> FreezeConfig:
    option_file = OmegaConf.load(FREEZE_DIR / f"{option}.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(FreezeConfig), option_file)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def load_peft(option: str, **overrides: object) -> PeftConfig:
    merged = OmegaConf.merge(OmegaConf.structured(PeftConfig), OmegaConf.load(PEFT_DIR / f"{option}.yaml"),
                             overrides)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def random_tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def train_steps(model: torch.nn.Module, steps: int = 3) -> list[float]:
    """AdamW over every parameter (frozen ones included, as a careless trainer would) on an LM loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(steps):
        tokens = random_tokens(seed=step)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


# ------------------------------------------------------------------------------- naming
@pytest.mark.parametrize("name,expected", [
    ("model.layers.3.mlp.gate_proj.weight", (3, "gate_proj")),
    ("model.layers.5.mlp.up_proj.weight", (5, "up_proj")),
    ("model.layers.5.mlp.down_proj.weight", (5, "down_proj")),
    ("model.layers.5.self_attn.o_proj.weight", (5, "o_proj")),
    ("model.layers.27.self_attn.k_proj.bias", (27, "k_proj")),  # Qwen2 has q/k/v biases
    ("model.layers.27.self_attn.v_proj.bias", (27, "v_proj")),
    ("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight", (3, "q_proj")),
    ("base_model.model.model.layers.12.mlp.down_proj.base_layer.weight", (12, "down_proj")),
    ("base_model.model.lm_head.modules_to_save.default.weight", (None, "lm_head")),
    ("model.language_model.layers.2.mlp.gate_proj.weight", (2, "gate_proj")),
    ("model.embed_tokens.weight", (None, "embed")),
    ("model.norm.weight", (None, "norm")),
    ("lm_head.weight", (None, "lm_head")),
    ("model.layers.0.input_layernorm.weight", (0, "norm")),
    ("model.layers.0.post_attention_layernorm.weight", (0, "norm")),
    ("model.layers.0.self_attn.q_norm.weight", (0, "norm")),
    ("model.layers.0.self_attn.k_norm.weight", (0, "norm")),
    ("v_head.summary.weight", (None, None)),
    ("score.weight", (None, None)),
    ("transformer.h.0.attn.c_attn.weight", (None, None)),  # GPT-2 naming is not recognised
])
def test_classify_parameter(name: str, expected: tuple[int | None, str | None]) -> None:
    assert classify_parameter(name) == expected


def test_every_tiny_model_parameter_is_classified() -> None:
    kinds = {name: classify_parameter(name) for name, _ in tiny_model().named_parameters()}
    assert all(kind is not None for _, kind in kinds.values())
    assert sorted({layer for layer, _ in kinds.values() if layer is not None}) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------- layer ranges
@pytest.mark.parametrize("spec,num_layers,expected", [
    (None, 4, None),
    ("0:0.5", 4, {0, 1}),
    ("0.5:1.0", 4, {2, 3}),
    ("0:1.0", 4, {0, 1, 2, 3}),
    (":0.25", 4, {0}),
    ("0:0.5", 5, {0, 1, 2}),  # 0 <= i < 2.5
    ("0.5:1.0", 5, {3, 4}),  # 2.5 <= i < 5
    ("0.3:0.6", 10, {3, 4, 5}),  # exact decimal arithmetic: 0.3 * 10 == 3
    ("0:0.5", 28, set(range(14))),
    ("0:2", 4, {0, 1}),
    ("1:", 4, {1, 2, 3}),
    ("0:1", 4, {0}),  # ints are indices, not fractions
    ("0-13", 28, set(range(14))),
    ("1-1", 4, {1}),
    ("0,2,3", 4, {0, 2, 3}),
    ("0-1, 3", 4, {0, 1, 3}),
    ("2", 4, {2}),
    (3, 4, {3}),
])
def test_parse_layer_range(spec: str | int | None, num_layers: int, expected: set[int] | None) -> None:
    assert parse_layer_range(spec, num_layers) == expected


@pytest.mark.parametrize("spec,message", [
    ("0:5", "must satisfy 0 <= lo < hi <= 4"),
    ("2:1", "must satisfy 0 <= lo < hi <= 4"),
    ("0-4", "layer 4 in '0-4' is out of range; the model has 4 layers (indices 0-3)"),
    ("5", "layer 5 in '5' is out of range; the model has 4 layers"),
    ("-1", "layer -1 in '-1' is out of range"),
    ("3-1", "runs backwards"),
    ("0:1.5", "must satisfy 0 <= lo < hi <= 1"),
    ("0.5:0.5", "must satisfy 0 <= lo < hi <= 1"),
    ("0.1:0.2", "selects no layer; the model has 4 layers"),  # 0.4 <= i < 0.8
    ("a:b", "cannot read 'a'"),
    ("1:2:3", "more than one ':'"),
    ("", "empty layer range"),
    ("lower", "cannot read 'lower'"),
])
def test_parse_layer_range_errors_name_the_key(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_layer_range(spec, 4, key="peft.layers")
    assert str(error.value).startswith("peft.layers: ")
    assert message in str(error.value)


def test_format_layers() -> None:
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_layers([3]) == "3"
    assert format_layers(None) == "all"


# ------------------------------------------------------------------------------- every option file
def test_every_freeze_option_has_an_expectation() -> None:
    assert FREEZE_OPTIONS == sorted(EXPECTED_TRAINABLE)


@pytest.mark.parametrize("option", FREEZE_OPTIONS)
def test_freeze_option_trains_exactly_its_tensors(option: str) -> None:
    model = tiny_model()
    assert {name for name, _ in model.named_parameters()} == ALL_NAMES
    expected_names, expected_params = EXPECTED_TRAINABLE[option]

    report = apply_freeze_policy(model, load_freeze(option))

    assert trainable_names(model) == expected_names
    assert (report.policy, report.trainable_params, report.total_params) == (option, expected_params, 226_592)
    assert (report.trainable_tensors, report.total_tensors, report.num_layers) == (len(expected_names), 47, 4)

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    snapshot = snapshot_frozen(model)
    assert set(snapshot) == ALL_NAMES - expected_names
    losses = train_steps(model)
    assert all(torch.isfinite(torch.tensor(losses)))

    after = dict(model.named_parameters())
    frozen_moved = [name for name in ALL_NAMES - expected_names if not torch.equal(after[name], before[name])]
    trainable_still = [name for name in expected_names if torch.equal(after[name], before[name])]
    assert frozen_moved == []
    assert trainable_still == []  # every trainable tensor moved (weight decay alone moves it)
    assert_frozen_unchanged(model, snapshot)


def test_report_describe_lines() -> None:
    lower = apply_freeze_policy(tiny_model(), load_freeze("lower_mlp_only"))
    assert lower.describe() == ("freeze: policy=lower_mlp_only trainable=12.3K/226.6K (5.4%) tensors=6/47 "
                                "layers=0-1 modules=gate_proj,up_proj,down_proj")
    assert lower.layers == (0, 1) and lower.modules == ("gate_proj", "up_proj", "down_proj")
    assert lower.as_dict()["trainable_fraction"] == pytest.approx(12_288 / 226_592)
    frozen = apply_freeze_policy(tiny_model(), load_freeze("freeze_lower_mlp"))
    assert frozen.describe() == ("freeze: policy=freeze_lower_mlp trainable=214.3K/226.6K (94.6%) "
                                 "tensors=41/47 layers=0-1 modules=gate_proj,up_proj,down_proj action=freeze")
    everything = apply_freeze_policy(tiny_model(), load_freeze("none"))
    assert everything.describe() == ("freeze: policy=none trainable=226.6K/226.6K (100.0%) tensors=47/47 "
                                     "layers=all modules=all")
    # The scale of the 1.25M tiny demo model (docs/reference.md §9) prints in millions.
    demo = FreezeReport(policy="lower_mlp_only", action="train", trainable_params=393_216,
                        total_params=1_250_000, trainable_tensors=6, total_tensors=46, num_layers=4,
                        layers=(0, 1), modules=("gate_proj", "up_proj", "down_proj"))
    assert demo.describe().startswith("freeze: policy=lower_mlp_only trainable=0.39M/1.25M (31.5%) ")


# ------------------------------------------------------------------------------- selection rules
def test_select_parameters_returns_model_order_and_none_selects_nothing() -> None:
    model = tiny_model()
    assert select_parameters(model, load_freeze("lower_mlp_only")) == [
        f"model.layers.{i}.{leaf}.weight" for i in (0, 1) for leaf in MLP]
    # action=freeze selects the same tensors; it only flips which side trains.
    assert select_parameters(model, load_freeze("freeze_lower_mlp")) == select_parameters(
        model, load_freeze("lower_mlp_only"))
    assert select_parameters(model, load_freeze("none")) == []


def test_regex_alone_selects_by_name_and_combines_with_layers() -> None:
    model = tiny_model()
    norms = select_parameters(model, FreezeConfig(name="norms", regex=r"norm"))
    assert set(norms) == layer_names(ALL_LAYERS, LAYER_NORMS) | {"model.norm.weight"}
    assert len(norms) == 17
    last_q = select_parameters(model, FreezeConfig(name="last_q", layers="3", regex=r"q_proj"))
    assert last_q == ["model.layers.3.self_attn.q_proj.weight"]


def test_layer_range_never_selects_tensors_outside_layers() -> None:
    model = tiny_model()
    selected = select_parameters(model, FreezeConfig(name="upper", layers="0.5:1.0"))
    assert set(selected) == layer_names([2, 3], ATTN + MLP + LAYER_NORMS)
    without_layers = select_parameters(model, FreezeConfig(name="head", modules=["lm_head", "embed"]))
    assert without_layers == ["model.embed_tokens.weight", "lm_head.weight"]


def test_policy_matching_nothing_raises_with_policy_and_names() -> None:
    with pytest.raises(ConfigError) as error:
        apply_freeze_policy(tiny_model(), FreezeConfig(name="ghost", regex=r"does_not_exist"))
    message = str(error.value)
    assert "freeze policy 'ghost'" in message and "selects no parameter" in message
    assert "model.embed_tokens.weight" in message and "model.layers.0.self_attn.q_proj.weight" in message
    # With a layer range set, the head outside the layers can never be selected.
    with pytest.raises(ConfigError, match="freeze policy 'head_low' .* selects no parameter"):
        apply_freeze_policy(tiny_model(), FreezeConfig(name="head_low", layers="0:2", modules=["lm_head"]))


def test_unknown_module_kind_names_the_key_and_valid_kinds() -> None:
    with pytest.raises(ConfigError) as error:
        apply_freeze_policy(tiny_model(), FreezeConfig(name="typo", modules=["mlpp"]))
    message = str(error.value)
    assert message.startswith("freeze.modules: unknown module kind 'mlpp'")
    assert "'gate_proj'" in message and "'attn'" in message and "did you mean 'mlp'?" in message


@pytest.mark.parametrize("cfg,message", [
    (FreezeConfig(name="lower", layers="0-9", modules=["mlp"]),
     "freeze.layers: layer 4 in '0-9' is out of range"),
    (FreezeConfig(name="bad", modules=["mlp"], action="thaw"), "freeze.action: unknown value 'thaw'"),
    (FreezeConfig(name="none", modules=["mlp"]), "freeze.name='none' trains every parameter"),
    (FreezeConfig(name="empty"), "sets none of freeze.layers, freeze.modules, freeze.regex"),
    (FreezeConfig(name="bad_regex", regex="("), "freeze.regex: invalid regular expression"),
    (FreezeConfig(name="all_frozen", regex=".", action="freeze"), "leaves nothing trainable"),
])
def test_invalid_policies_raise(cfg: FreezeConfig, message: str) -> None:
    model = tiny_model()
    with pytest.raises(ConfigError) as error:
        apply_freeze_policy(model, cfg)
    assert message in str(error.value)
    assert trainable_names(model) == ALL_NAMES  # a rejected policy changes nothing


# ------------------------------------------------------------------------------- tied embeddings
def test_tied_embeddings_share_one_flag_and_warn_on_half_selection(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with caplog.at_level(logging.WARNING, logger="ftrl.train.freeze"):
        report = apply_freeze_policy(model, FreezeConfig(name="head_only", modules=["lm_head"]))
    assert "selects lm_head.weight but not model.embed_tokens.weight" in caplog.text
    # The shared tensor counts once and trains as a whole (head and input embedding).
    assert (report.trainable_params, report.trainable_tensors, report.total_tensors) == (2_048, 1, 46)
    assert report.total_params == 226_592 - 2_048
    assert trainable_names(model) == {"model.embed_tokens.weight"}
    assert model.lm_head.weight.requires_grad

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftrl.train.freeze"):
        apply_freeze_policy(model, FreezeConfig(name="freeze_embed", modules=["embed"], action="freeze"))
    assert "selects model.embed_tokens.weight but not lm_head.weight" in caplog.text
    assert not model.lm_head.weight.requires_grad and len(trainable_names(model)) == 45

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftrl.train.freeze"):
        report = apply_freeze_policy(model, load_freeze("lower_mlp_only"))
    assert caplog.text == ""  # both names unselected: consistent, no warning
    assert (report.trainable_tensors, report.total_tensors) == (6, 46)


# ------------------------------------------------------------------------------- frozen checks
def test_freezing_drops_stale_gradients() -> None:
    model = tiny_model()
    tokens = random_tokens()
    model(input_ids=tokens, labels=tokens).loss.backward()
    apply_freeze_policy(model, load_freeze("mlp_only"))
    with_grad = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert with_grad == layer_names(ALL_LAYERS, MLP)


def test_assert_frozen_unchanged_names_the_changed_tensor() -> None:
    model = tiny_model()
    apply_freeze_policy(model, load_freeze("mlp_only"))
    snapshot = snapshot_frozen(model)
    assert len(snapshot) == 47 - 12
    assert_frozen_unchanged(model, snapshot)
    with torch.no_grad():
        model.model.layers[2].self_attn.k_proj.weight[0, 0] += 1e-6
    with pytest.raises(FrozenParametersChangedError) as error:
        assert_frozen_unchanged(model, snapshot)
    assert str(error.value) == "1 frozen tensor(s) changed: ['model.layers.2.self_attn.k_proj.weight']"


# ------------------------------------------------------------------------------- LoRA
LOWER_MLP_ADAPTERS = {f"base_model.model.model.layers.{i}.mlp.{kind}.lora_{ab}.default.weight"
                      for i in (0, 1) for kind in ("gate_proj", "up_proj", "down_proj") for ab in "AB"}


def test_lora_on_lower_mlp_only_trains_adapters_and_merges(tmp_path: Path) -> None:
    reference = tiny_model()  # same seed: the base model before any adapter
    model = tiny_model()
    peft_model, report = apply_lora(model, load_peft("lora"), load_freeze("lower_mlp_only"))

    lora_names = {name for name, _ in peft_model.named_parameters() if ".lora_" in name}
    assert lora_names == LOWER_MLP_ADAPTERS
    assert trainable_names(peft_model) == LOWER_MLP_ADAPTERS
    # r=16 on 64x32 / 32x64 projections: 16*(64+32) = 1536 adapter parameters per module.
    assert (report.trainable_params, report.total_params) == (6 * 1_536, 226_592 + 6 * 1_536)
    assert (report.trainable_tensors, report.total_tensors, report.adapted_modules) == (12, 59, 6)
    assert report.describe() == ("freeze: policy=lower_mlp_only+lora trainable=9.2K/235.8K (3.9%) "
                                 "tensors=12/59 layers=0-1 modules=gate_proj,up_proj,down_proj "
                                 "lora_modules=6")

    base_snapshot = snapshot_frozen(peft_model)
    assert len(base_snapshot) == 47
    lora_before = {name: parameter.detach().clone() for name, parameter in peft_model.named_parameters()
                   if name in lora_names}
    train_steps(peft_model)
    assert_frozen_unchanged(peft_model, base_snapshot)
    lora_after = dict(peft_model.named_parameters())
    assert all(not torch.equal(lora_after[name], before) for name, before in lora_before.items())

    tokens = random_tokens(seed=7)
    with torch.no_grad():
        peft_logits = peft_model(input_ids=tokens).logits
        base_logits = reference(input_ids=tokens).logits
    assert (peft_logits - base_logits).abs().max().item() > 1e-3  # the adapters changed the function

    merged = merge_lora_for_save(peft_model)
    assert type(merged) is Qwen3ForCausalLM
    assert {name for name, _ in merged.named_parameters()} == ALL_NAMES
    # The merge ran on a copy: the training model still carries its adapters.
    assert any(".lora_" in name for name, _ in peft_model.named_parameters())
    merged.save_pretrained(tmp_path / "merged")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert (set(info["missing_keys"]), set(info["unexpected_keys"])) == (set(), set())
    with torch.no_grad():
        loaded_logits = loaded.eval()(input_ids=tokens).logits
    assert torch.allclose(loaded_logits, peft_logits, atol=1e-5, rtol=0)


def test_lora_targets_follow_freeze_action_and_peft_layers() -> None:
    model = tiny_model()
    # freeze=freeze_lower_mlp trains attention everywhere and the upper MLPs: adapters go there only.
    targets = lora_target_modules(model, load_peft("lora"), load_freeze("freeze_lower_mlp"))
    expected = ({f"model.layers.{i}.{leaf}" for i in ALL_LAYERS for leaf in ATTN}
                | {f"model.layers.{i}.{leaf}" for i in (2, 3) for leaf in MLP})
    assert set(targets) == expected and len(targets) == 22
    # Without a policy, peft.layers and peft.target_modules decide alone.
    targets = lora_target_modules(model, load_peft("lora", layers="2-3", target_modules=["q_proj"]),
                                  load_freeze("none"))
    assert targets == ["model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    # Both restrictions intersect: the lower-half policy and peft.layers="1:" leave layer 1 only.
    targets = lora_target_modules(model, load_peft("lora", layers="1:"), load_freeze("lower_mlp_only"))
    assert targets == [f"model.layers.1.{leaf}" for leaf in MLP]


@pytest.mark.parametrize("peft_overrides,freeze_option,message", [
    ({"target_modules": ["gate_proj"]}, "attn_only", "peft: no projection qualifies for LoRA"),
    ({"target_modules": ["norm"]}, "none", "peft.target_modules: unknown module kind 'norm'"),
    ({"layers": "0-7"}, "none", "peft.layers: layer 4 in '0-7' is out of range"),
    ({"r": 0}, "none", "peft.r: must be > 0"),
    ({"name": "none"}, "none", "peft.name: apply_lora needs 'lora'"),
])
def test_lora_errors_name_the_key(peft_overrides: dict, freeze_option: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        apply_lora(tiny_model(), load_peft("lora", **peft_overrides), load_freeze(freeze_option))
    assert message in str(error.value)


def test_merge_lora_for_save_passes_plain_models_through() -> None:
    model = tiny_model()
    assert merge_lora_for_save(model) is model
    with pytest.raises(TypeError, match="expected a PeftModel or PreTrainedModel"):
        merge_lora_for_save(torch.nn.Linear(2, 2))
