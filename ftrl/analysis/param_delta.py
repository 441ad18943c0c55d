"""Which parameters moved: per-tensor relative change between two HF safetensors checkpoints.

The paper's analysis finds that tool-use RL changes the lower-layer MLP weights most. This module
measures that for any pair of checkpoints (base -> RL, warm start -> round k, ...):

* :class:`CheckpointReader` / :func:`iter_checkpoint_tensors` read ``model.safetensors`` or the
  shards named by ``model.safetensors.index.json`` lazily with ``safetensors.safe_open``; a tensor is
  read only when asked for, and :func:`compare_checkpoints` reads it in row blocks of
  ``chunk_elements`` values, so two 8B models are compared in a few hundred MB of memory.
* :func:`param_delta` gives one :class:`DeltaRow` per tensor present in both checkpoints:
  ``rel_change = ||W1 - W0||_F / ||W0||_F``, accumulated in float64 (bf16/fp16/fp32 inputs alike).
* :func:`aggregate` groups rows by (layer, module kind) and rolls them up per module kind and per
  layer; a group's change is ``sqrt(sum ||dW||^2) / sqrt(sum ||W0||^2)`` (exact, not a mean of ratios).
* :func:`summarize` states where the squared change concentrates (MLP / attention / other, lower /
  upper half of the layers, top cells); :func:`analyze_checkpoints` writes ``param_delta.csv``,
  ``param_delta_heatmap.png``, ``summary.txt`` and ``summary.json``; :func:`analyze_run` is the
  pipeline's ``analyze`` stage.

    python -m ftrl.analysis.param_delta BASE_DIR TARGET_DIR --out /tmp/delta
    python -m ftrl.run stages=[analyze] analysis.base=<path> analysis.target=<path>
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from ftrl.artifacts import (  # the file names are re-exported: tests and callers import them from here
    HEATMAP_PNG,
    PARAM_DELTA_CSV,
    SUMMARY_JSON,
    SUMMARY_TXT,
    atomic_write,
    write_json,
)
from ftrl.params import ATTN_KINDS, MLP_KINDS, MODULE_KINDS, classify_parameter

if TYPE_CHECKING:
    from ftrl.run_state import RunContext

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CSV_COLUMNS: tuple[str, ...] = ("name", "layer", "module", "numel", "rel_change")

# Values per row block (32 MB in float64): a comparison holds about four such blocks at a time.
DEFAULT_CHUNK_ELEMENTS = 1 << 22
TOP_CELLS = 5

CellKey = tuple[int | None, str | None]


class CheckpointError(ValueError):
    """A checkpoint path is unreadable, or two checkpoints cannot be compared."""


# ------------------------------------------------------------------------------ checkpoint reading
def natural_key(name: str) -> list[Any]:
    """Sort key that compares digit runs as numbers: ``layers.2`` sorts before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A local checkpoint path; a hub id (``Qwen/Qwen3-8B``) is looked up in the local HF cache only."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True,
                                          allow_patterns=["*.safetensors", "*.json"]))
        except Exception as error:  # noqa: BLE001 - any cache miss means "not available offline"
            raise CheckpointError(f"checkpoint '{text}' is not a local path and not in the local Hugging "
                                  f"Face cache ({type(error).__name__}); download it or pass a directory") \
                from None
    raise CheckpointError(f"checkpoint path '{text}' does not exist")


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name of the checkpoint at ``path`` to the safetensors file that holds it."""
    if path.is_file() and path.name.endswith(".index.json"):
        return _files_from_index(path)
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise CheckpointError(f"{path} is neither a .safetensors file, an index .json nor a directory")
        return _files_from_single(path)
    if (path / INDEX_FILE).is_file():
        return _files_from_index(path / INDEX_FILE)
    if (path / SINGLE_FILE).is_file():
        return _files_from_single(path / SINGLE_FILE)
    present = sorted(p.name for p in path.glob("*.safetensors"))
    if len(present) == 1:
        return _files_from_single(path / present[0])
    raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE} "
                          f"(safetensors files present: {present or 'none'})")


def _files_from_single(file: Path) -> dict[str, Path]:
    with safe_open(str(file), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), file)


def _files_from_index(index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path} is not a safetensors index with a 'weight_map' ({error})") \
            from None
    files = {name: index_path.parent / shard for name, shard in weight_map.items()}
    missing = sorted({str(file.name) for file in files.values() if not file.is_file()})
    if missing:
        raise CheckpointError(f"{index_path} names shard(s) {missing} that are not in {index_path.parent}")
    return files


class CheckpointReader:
    """Lazy, read-only access to the tensors of one checkpoint.

    ``path``: a checkpoint directory (``model.safetensors``, or shards + ``model.safetensors.index.json``),
    a single ``.safetensors`` file, an index file, or a hub id already in the local HF cache. Only the
    headers are read up front. Each read maps the file, copies the requested tensor or row block out
    and unmaps it again, so the mapped pages of a 16 GB checkpoint never pile up in this process's
    resident memory (safetensors' mapping otherwise keeps every page it touched until it is closed).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_checkpoint(path)
        self._files = _tensor_files(self.path)

    def names(self) -> list[str]:
        """Tensor names, in natural order (numbers inside names compared as numbers)."""
        return sorted(self._files, key=natural_key)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    @contextlib.contextmanager
    def _open(self, name: str) -> Iterator[Any]:
        if name not in self._files:
            raise KeyError(f"tensor '{name}' is not in checkpoint {self.path}")
        with safe_open(str(self._files[name]), framework="pt") as handle:
            yield handle

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, opening each file once."""
        shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self._files.values())):
            with safe_open(str(file), framework="pt") as handle:
                names = handle.keys()  # safe_open has keys() but is not iterable
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in names
                               if self._files.get(name) == file})
        return shapes

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype."""
        with self._open(name) as handle:
            return handle.get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension; only those bytes are read from disk."""
        with self._open(name) as handle:
            return handle.get_slice(name)[start:stop]


def iter_checkpoint_tensors(path: str | os.PathLike) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Yield ``(name, load)`` per tensor in natural name order; ``load()`` reads that tensor only.

    Only the headers are read up front; nothing stays mapped between loads.
    """
    reader = CheckpointReader(path)
    for name in reader.names():
        yield name, functools.partial(reader.read, name)


# ------------------------------------------------------------------------------ per-tensor change
def relative_change(delta_sq: float, base_sq: float) -> float:
    """``sqrt(delta_sq) / sqrt(base_sq)``; a zero base gives ``inf`` if anything changed, else 0.0."""
    if base_sq > 0.0:
        return math.sqrt(delta_sq) / math.sqrt(base_sq)
    return math.inf if delta_sq > 0.0 else 0.0


@dataclass(frozen=True)
class DeltaRow:
    """One tensor's change. ``delta_sq``/``base_sq`` are ``||W1-W0||_F^2``/``||W0||_F^2`` (float64)."""

    name: str
    layer: int | None
    module: str | None
    numel: int
    rel_change: float
    delta_sq: float = 0.0
    base_sq: float = 0.0


@dataclass
class DeltaReport:
    """Rows for the tensors both checkpoints hold, and the names only one of them holds."""

    rows: list[DeltaRow]
    only_in_base: list[str] = field(default_factory=list)
    only_in_target: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        notes = [f"only in base (not compared): {name}" for name in self.only_in_base]
        return notes + [f"only in target (not compared): {name}" for name in self.only_in_target]


def _squared_norms(base: CheckpointReader, target: CheckpointReader, name: str, shape: tuple[int, ...],
                   chunk_elements: int) -> tuple[float, float]:
    """``(||W1-W0||^2, ||W0||^2)`` in float64, reading row blocks of about ``chunk_elements`` values."""
    if len(shape) == 0:
        blocks: Iterable[tuple[torch.Tensor, torch.Tensor]] = [(base.read(name), target.read(name))]
    else:
        row_numel = math.prod(shape[1:])
        rows_per_block = max(1, chunk_elements // max(1, row_numel))
        blocks = ((base.read_rows(name, start, start + rows_per_block),
                   target.read_rows(name, start, start + rows_per_block))
                  for start in range(0, shape[0], rows_per_block))
    delta_sq = base_sq = 0.0
    for block0, block1 in blocks:
        w0 = block0.to(torch.float64).reshape(-1)
        w1 = block1.to(torch.float64).reshape(-1)
        base_sq += float(torch.dot(w0, w0))
        w1.sub_(w0)
        delta_sq += float(torch.dot(w1, w1))
    return delta_sq, base_sq


def compare_checkpoints(base_path: str | os.PathLike, target_path: str | os.PathLike,
                        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> DeltaReport:
    """Per-tensor relative change from ``base_path`` to ``target_path`` (see :func:`param_delta`).

    Every shared tensor's shape is checked before any data is read, so a mismatch fails at once.
    """
    base, target = CheckpointReader(base_path), CheckpointReader(target_path)
    base_names = base.names()
    shared = [name for name in base_names if name in target]
    report = DeltaReport(rows=[], only_in_base=[n for n in base_names if n not in target],
                         only_in_target=[n for n in target.names() if n not in base])
    shapes, target_shapes = base.shapes(), target.shapes()
    for name in shared:
        if shapes[name] != target_shapes[name]:
            raise CheckpointError(f"tensor '{name}' has shape {list(shapes[name])} in {base.path} but "
                                  f"{list(target_shapes[name])} in {target.path}")
    log.info("param delta: %d shared tensors (%d only in base, %d only in target): %s -> %s", len(shared),
             len(report.only_in_base), len(report.only_in_target), base.path, target.path)
    for name in shared:
        delta_sq, base_sq = _squared_norms(base, target, name, shapes[name], chunk_elements)
        layer, module = classify_parameter(name)
        report.rows.append(DeltaRow(name=name, layer=layer, module=module, numel=math.prod(shapes[name]),
                                    rel_change=relative_change(delta_sq, base_sq), delta_sq=delta_sq,
                                    base_sq=base_sq))
    for note in report.warnings():
        log.warning("param delta: %s", note)
    return report


def param_delta(base_path: str | os.PathLike, target_path: str | os.PathLike,
                chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list[DeltaRow]:
    """One row per tensor present in both checkpoints, in natural name order.

    ``rel_change = ||W1 - W0||_F / ||W0||_F`` accumulated in float64 over row blocks (peak memory is a
    block, not a tensor). A tensor whose base is all zeros gets ``inf`` if it changed, else 0.0.
    Tensors held by only one checkpoint (a tied ``lm_head`` saved on one side) are skipped with a
    logged warning; :func:`compare_checkpoints` returns their names. Differing shapes raise
    :class:`CheckpointError` naming the tensor and both shapes.
    """
    return compare_checkpoints(base_path, target_path, chunk_elements).rows


def _format_float(value: float) -> str:
    return f"{value:.6g}"


def write_param_delta_csv(rows: Sequence[DeltaRow], path: str | os.PathLike) -> Path:
    """Write ``name,layer,module,numel,rel_change`` in row order, atomically.

    ``layer``/``module`` are empty when the classifier gives none; ``rel_change`` has 6 significant
    digits (``inf`` for a changed all-zero tensor). The squared norms stay in ``summary.json``'s totals.
    """
    path = Path(path)
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([row.name, "" if row.layer is None else row.layer, row.module or "", row.numel,
                             _format_float(row.rel_change)])
    return path


# ------------------------------------------------------------------------------ aggregation
@dataclass(frozen=True)
class GroupChange:
    """Summed squared norms of a group of tensors; its relative change is exact for the group."""

    tensors: int = 0
    numel: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0

    @property
    def rel_change(self) -> float:
        return relative_change(self.delta_sq, self.base_sq)

    def __add__(self, other: GroupChange) -> GroupChange:
        return GroupChange(self.tensors + other.tensors, self.numel + other.numel,
                           self.delta_sq + other.delta_sq, self.base_sq + other.base_sq)

    @classmethod
    def of(cls, row: DeltaRow) -> GroupChange:
        return cls(1, row.numel, row.delta_sq, row.base_sq)


@dataclass(frozen=True)
class DeltaAggregate:
    """Changes per (layer, module) cell, per module kind, per layer (``None``: outside the layers)."""

    cells: dict[CellKey, GroupChange]
    by_module: dict[str | None, GroupChange]
    by_layer: dict[int | None, GroupChange]
    total: GroupChange

    def rel_changes(self) -> dict[CellKey, float]:
        """``{(layer, module): relative change}``: what the heat-map draws."""
        return {key: group.rel_change for key, group in self.cells.items()}


def _module_rank(module: str | None) -> tuple[int, str]:
    if module in MODULE_KINDS:
        return MODULE_KINDS.index(module), ""
    if module is None:
        return len(MODULE_KINDS) + 1, ""
    return len(MODULE_KINDS), module  # kinds the classifier may add later, between known ones and None


def cell_sort_key(key: CellKey) -> tuple[int, int, tuple[int, str]]:
    layer, module = key
    return (1, 0, _module_rank(module)) if layer is None else (0, layer, _module_rank(module))


def aggregate(rows: Iterable[DeltaRow]) -> DeltaAggregate:
    """Group rows by (layer, module kind); each group's change is ``sqrt(sum dW^2) / sqrt(sum W0^2)``."""
    cells: dict[CellKey, GroupChange] = {}
    for row in rows:
        key = (row.layer, row.module)
        cells[key] = cells.get(key, GroupChange()) + GroupChange.of(row)
    cells = dict(sorted(cells.items(), key=lambda item: cell_sort_key(item[0])))
    by_module: dict[str | None, GroupChange] = {}
    by_layer: dict[int | None, GroupChange] = {}
    total = GroupChange()
    for (layer, module), group in cells.items():
        by_module[module] = by_module.get(module, GroupChange()) + group
        by_layer[layer] = by_layer.get(layer, GroupChange()) + group
        total = total + group
    return DeltaAggregate(cells=cells, by_module=by_module, by_layer=by_layer, total=total)


# ------------------------------------------------------------------------------ summary
def module_group(module: str | None) -> str:
    """``mlp`` (gate/up/down), ``attention`` (q/k/v/o) or ``other`` (norms, embeddings, unknown)."""
    if module in MLP_KINDS:
        return "mlp"
    if module in ATTN_KINDS:
        return "attention"
    return "other"


def lower_half_layers(num_layers: int) -> int:
    """Layers ``0 .. n-1`` with ``n = ceil(num_layers / 2)`` form the lower half (a middle layer is lower)."""
    return (num_layers + 1) // 2


def cell_label(key: CellKey) -> str:
    layer, module = key
    if layer is None:
        return {"norm": "final norm", None: "other"}.get(module, module or "other")
    return f"L{layer} {module or 'other'}"


def summary_numbers(aggregated: DeltaAggregate, num_layers: int) -> dict[str, Any]:
    """The headline numbers :func:`summarize` states; shares are fractions of the total squared change."""
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    beyond = sorted(layer for layer in aggregated.by_layer if layer is not None and layer >= num_layers)
    if beyond:
        raise ValueError(f"num_layers={num_layers} but the checkpoint has layer(s) {beyond}")
    lower = lower_half_layers(num_layers)
    parts: dict[str, GroupChange] = {}
    for (layer, module), group in aggregated.cells.items():
        depth = "outside" if layer is None else ("lower" if layer < lower else "upper")
        for part in (module_group(module), depth, f"{depth}_{module_group(module)}"):
            parts[part] = parts.get(part, GroupChange()) + group
    total_sq = aggregated.total.delta_sq

    def share(part: str) -> float:
        return parts.get(part, GroupChange()).delta_sq / total_sq if total_sq > 0.0 else 0.0

    ranked = sorted(aggregated.cells.items(),
                    key=lambda item: (-_finite_or_max(item[1].rel_change), cell_sort_key(item[0])))
    top = [{"layer": layer, "module": module, "label": cell_label((layer, module)),
            "rel_change": group.rel_change} for (layer, module), group in ranked[:TOP_CELLS]]
    return {
        "tensors": aggregated.total.tensors,
        "numel": aggregated.total.numel,
        "num_layers": num_layers,
        "lower_half_layers": lower,
        "overall_rel_change": aggregated.total.rel_change,
        "share_mlp": share("mlp"),
        "share_attention": share("attention"),
        "share_other": share("other"),
        "share_lower_half": share("lower"),
        "share_upper_half": share("upper"),
        "share_outside_layers": share("outside"),
        "share_lower_half_mlp": share("lower_mlp"),
        "rel_change_mlp": parts.get("mlp", GroupChange()).rel_change,
        "rel_change_attention": parts.get("attention", GroupChange()).rel_change,
        "rel_change_lower_half_mlp": parts.get("lower_mlp", GroupChange()).rel_change,
        "rel_change_upper_half_mlp": parts.get("upper_mlp", GroupChange()).rel_change,
        "top_cells": top,
    }


def _finite_or_max(value: float) -> float:
    return sys.float_info.max if math.isinf(value) else (-1.0 if math.isnan(value) else value)


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


def _layer_span(start: int, stop: int) -> str:
    if stop <= start:
        return "none"
    return f"layer {start}" if stop - start == 1 else f"layers {start}-{stop - 1}"


def summarize(aggregated: DeltaAggregate, num_layers: int) -> str:
    """A few lines on where the change concentrates (fixed wording; numbers from :func:`summary_numbers`).

    Example::

        24 tensors compared (1,234 parameters); overall relative change 0.00123
        squared change by module group: MLP 62.1%, attention 30.2%, other 7.7%
        squared change by depth: lower half (layers 0-1) 90.0%, upper half (layers 2-3) 5.0%, outside ...
        lower-half MLP holds 46.0% of the squared change
        top cells: L1 down_proj 0.012, L0 up_proj 0.0113, ...
    """
    numbers = summary_numbers(aggregated, num_layers)
    lower = numbers["lower_half_layers"]
    lines = [(f"{numbers['tensors']} tensors compared ({numbers['numel']:,} parameters); "
              f"overall relative change {numbers['overall_rel_change']:.3g}")]
    if aggregated.total.delta_sq == 0.0:
        lines.append("no parameter changed: every compared tensor is identical")
        return "\n".join(lines)
    top_cells = ", ".join(f"{cell['label']} {cell['rel_change']:.3g}" for cell in numbers["top_cells"])
    pct = {key: _percent(value) for key, value in numbers.items() if key.startswith("share_")}
    lines += [
        (f"squared change by module group: MLP {pct['share_mlp']}, attention {pct['share_attention']}, "
         f"other {pct['share_other']}"),
        (f"squared change by depth: lower half ({_layer_span(0, lower)}) {pct['share_lower_half']}, "
         f"upper half ({_layer_span(lower, num_layers)}) {pct['share_upper_half']}, "
         f"outside layers {pct['share_outside_layers']}"),
        f"lower-half MLP holds {pct['share_lower_half_mlp']} of the squared change",
        f"top cells: {top_cells}",
    ]
    return "\n".join(lines)


def _outside_note(aggregated: DeltaAggregate, num_layers: int) -> str | None:
    """The heat-map's line on the cells outside the layers (its right panel): which, and their share."""
    outside = [module for layer, module in aggregated.cells if layer is None]
    if not outside:
        return None
    share = summary_numbers(aggregated, num_layers)["share_outside_layers"]
    note = (f"outside the layers ({', '.join(cell_label((None, m)) for m in outside)}; right panel): "
            f"{_percent(share)} of the squared change")
    if "embed" in outside and "lm_head" not in outside:
        note += "; no lm_head tensor (tied to the embedding)"
    return note


# ------------------------------------------------------------------------------ one comparison
def num_layers_of(checkpoint: str | os.PathLike) -> int | None:
    """``num_hidden_layers`` from the checkpoint's ``config.json`` (also under ``text_config``), if any."""
    path = resolve_checkpoint(checkpoint)
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    value = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    return int(value) if value is not None else None


def analyze_checkpoints(base_path: str | os.PathLike, target_path: str | os.PathLike,
                        out_dir: str | os.PathLike, label: str | None = None, num_layers: int | None = None,
                        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> dict[str, Any]:
    """Compare two checkpoints; write the CSV, heat-map, ``summary.txt`` and ``summary.json`` to ``out_dir``.

    ``num_layers`` defaults to the target's ``config.json`` (else the highest layer index + 1); it
    splits the layers into the lower and upper halves of the summary. Returns the headline numbers.
    """
    from ftrl.analysis.plots import plot_delta_heatmap

    out_dir = Path(out_dir)
    label = label or f"{Path(str(base_path)).name} -> {Path(str(target_path)).name}"
    report = compare_checkpoints(base_path, target_path, chunk_elements)
    if not report.rows:
        raise CheckpointError(f"{base_path} and {target_path} share no tensor names; nothing to compare")
    aggregated = aggregate(report.rows)
    if num_layers is None:
        num_layers = num_layers_of(target_path)
    if num_layers is None:
        num_layers = 1 + max((layer for layer in aggregated.by_layer if layer is not None), default=0)

    write_param_delta_csv(report.rows, out_dir / PARAM_DELTA_CSV)
    plot_delta_heatmap(aggregated.rel_changes(), out_dir / HEATMAP_PNG,
                       title=f"relative change ||dW|| / ||W||: {label}", note=_outside_note(aggregated, num_layers))
    text = "\n".join([f"param delta: {label}", summarize(aggregated, num_layers), *report.warnings()]) + "\n"
    (out_dir / SUMMARY_TXT).write_text(text, encoding="utf-8")
    numbers = {"label": label, "base": str(base_path), "target": str(target_path),
               **summary_numbers(aggregated, num_layers),
               "only_in_base": report.only_in_base, "only_in_target": report.only_in_target}
    write_json(out_dir / SUMMARY_JSON, numbers)
    log.info("param delta %s:\n%s", label, text.rstrip())
    return numbers


# ------------------------------------------------------------------------------ pipeline stage
def _analysis_paths(cfg: Any) -> tuple[str | None, str | None]:
    section = getattr(cfg, "analysis", None)
    if isinstance(section, Mapping):
        return section.get("base"), section.get("target")
    return getattr(section, "base", None), getattr(section, "target", None)


def analyze_run(ctx: RunContext) -> dict[str, Any]:
    """The ``analyze`` stage: parameter change from the RL start to each round's checkpoint.

    With ``analysis.base`` and ``analysis.target`` set, exactly those two checkpoints are compared into
    ``analysis/``. Otherwise the RL start is the warm-start checkpoint if there is one, else the base:
    ``analysis/`` holds start -> last round, ``analysis/<start>_to_round<k>/`` each round, and
    ``analysis/base_to_round<k>/`` the whole change when a warm start exists. A run with a warm start
    but no round compares base -> warmup. (The training stage draws the reward curve,
    ``train_reward_curve.png``.)
    """
    out_dir = ctx.run_dir.analysis_dir
    base, target = _analysis_paths(ctx.cfg)
    if base or target:
        if not (base and target):
            raise CheckpointError(f"analysis.base={base!r} analysis.target={target!r}: set both paths to "
                                  "compare two checkpoints, or neither to analyse this run's checkpoints")
        numbers = analyze_checkpoints(base, target, out_dir, label=f"{base} -> {target}")
        return _headline("analysis", numbers)

    checkpoints = dict(ctx.checkpoints())
    if len(checkpoints) < 2:
        found = ", ".join(f"{name} ({path})" for name, path in checkpoints.items()) or "none"
        raise CheckpointError(f"analyze needs at least two checkpoints of this run; found: {found}. Run the "
                              "train stage first, or set analysis.base and analysis.target")
    names = list(checkpoints)
    rounds = [name for name in names if name.startswith("round")]
    start = "warmup" if "warmup" in checkpoints else "base"
    pairs = [(start, name) for name in rounds] or [("base", names[-1])]
    if start == "warmup" and rounds:
        pairs.append(("base", rounds[-1]))

    results: dict[str, dict[str, Any]] = {}
    for first, second in pairs:
        results[f"{first}_to_{second}"] = analyze_checkpoints(checkpoints[first], checkpoints[second],
                                                              ctx.run_dir.analysis_comparison_dir(first, second),
                                                              label=f"{first} -> {second}")
    main_first, main_second = (start, rounds[-1]) if rounds else ("base", names[-1])
    main_pair = f"{main_first}_to_{main_second}"
    main_dir = ctx.run_dir.analysis_comparison_dir(main_first, main_second)
    for file_name in (PARAM_DELTA_CSV, HEATMAP_PNG, SUMMARY_TXT, SUMMARY_JSON):
        # The headline comparison is also at the top of analysis/, where the report looks first.
        (out_dir / file_name).write_bytes((main_dir / file_name).read_bytes())

    summary = _headline(main_pair, results[main_pair])
    summary["comparisons"] = sorted(results)
    return summary


def _headline(comparison: str, numbers: Mapping[str, Any]) -> dict[str, Any]:
    top = numbers["top_cells"][0] if numbers["top_cells"] else None
    return {"comparison": comparison, "overall_rel_change": numbers["overall_rel_change"],
            "share_mlp": round(numbers["share_mlp"], 4),
            "share_attention": round(numbers["share_attention"], 4),
            "share_lower_half_mlp": round(numbers["share_lower_half_mlp"], 4),
            "top_cell": f"{top['label']} {top['rel_change']:.3g}" if top else None}


# ------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Relative parameter change between two HF safetensors checkpoints.")
    parser.add_argument("base", help="base checkpoint: directory, .safetensors file or cached hub id")
    parser.add_argument("target", help="changed checkpoint (same layout)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--label", default=None, help="title of the heat-map and summary")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="decoder layers of the model (default: from config.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        analyze_checkpoints(args.base, args.target, args.out, label=args.label, num_layers=args.num_layers)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((args.out / SUMMARY_TXT).read_text(encoding="utf-8"), end="")
    print(f"wrote {args.out / PARAM_DELTA_CSV}, {args.out / HEATMAP_PNG}, {args.out / SUMMARY_JSON}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
