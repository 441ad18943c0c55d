"""PNG figures of the analysis: the layer x module change heat-map and the training reward curve.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``, so
importing this module changes no global backend and works on machines without a display.

    python -m ftrl.analysis.param_delta BASE_DIR TARGET_DIR --out /tmp/delta   # writes the heat-map
    python -c "from ftrl.analysis.plots import plot_reward_curve; \
plot_reward_curve([{'step': s, 'reward/score': s / 10} for s in range(10)], '/tmp/reward.png')"
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ftrl.artifacts import atomic_path

# The heat-map's columns: these kinds always, in this order; any other kind found is appended.
HEATMAP_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                    "down_proj", "norm")
# Cells outside the decoder layers, drawn in a side panel on the same colour scale, in this order.
OUTSIDE_LABELS: dict[str | None, str] = {"embed": "embed", "norm": "final norm", "lm_head": "lm_head", None: "other"}
# Cell values are written into the cells up to this grid size.
ANNOTATE_MAX_LAYERS = 16
# Reward parts drawn in the lower panel, in this order first (others follow alphabetically).
REWARD_PART_ORDER: tuple[str, ...] = ("reward/solved", "reward/malformed", "reward/empty")
REWARD_KEY = "reward/score"
REWARD_STD_KEY = "reward/score_std"
# Legend labels of the reward parts (history keys without "reward/"); others show their key.
REWARD_PART_LABELS: dict[str, str] = {
    "solved": "sub-answers solved per turn",
    "calls": "tool calls per turn",
    "malformed": "turns with malformed calls (fraction)",
    "empty": "empty turns (fraction)",
    "answer": "turns stating the answer (fraction)",
    "zero_variance_groups": "groups with equal rewards (fraction)",
}


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_delta_heatmap(aggregated: Mapping[tuple[int | None, str | None], float], path: str | os.PathLike,
                       title: str = "relative parameter change", note: str | None = None) -> Path:
    """Write :func:`delta_heatmap_figure` as a PNG; returns the path."""
    return _save(delta_heatmap_figure(aggregated, title, note), path)


def delta_heatmap_figure(aggregated: Mapping[tuple[int | None, str | None], float],
                         title: str = "relative parameter change", note: str | None = None) -> Figure:
    """Heat-map of relative change: layer 0 at the bottom, module kinds q, k, v, o, gate, up, down, norm.

    ``aggregated`` maps ``(layer, module)`` to a relative change (``DeltaAggregate.rel_changes()``).
    Cells without a layer (embeddings, final norm, lm_head) are drawn in a side panel on the same
    colour scale, so a moved embedding or LM head shows next to the layers. Missing cells are blank,
    infinite ones are blank and labelled ``inf``. ``note`` (e.g. the share of the squared change
    outside the layers) is written under the title.
    """
    layer_cells, outside = _split_heatmap_cells(aggregated)
    if not layer_cells:
        raise ValueError(f"no per-layer cell to draw; the cells are {sorted(map(str, aggregated))}")
    modules, grid = _heatmap_grid(layer_cells)
    num_layers = grid.shape[0]
    side = np.array([[value] for _, value in outside]) if outside else np.zeros((0, 1))
    finite = np.ma.masked_invalid(grid)
    everything = np.ma.masked_invalid(np.concatenate([grid.ravel(), side.ravel()]))
    vmin, vmax = (float(everything.min()), float(everything.max())) if everything.count() else (0.0, 1.0)

    figure = Figure(figsize=(1.6 + 0.75 * (len(modules) + (4.0 if outside else 0)), 1.8 + 0.32 * num_layers))
    axes, side_axes, color_axes = _heatmap_axes(figure, len(modules), bool(outside))
    image = axes.imshow(finite, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                        vmin=vmin, vmax=vmax)
    axes.set_xticks(range(len(modules)), [m.removesuffix("_proj") for m in modules], rotation=45)
    tick_step = max(1, num_layers // 24)
    axes.set_yticks(range(0, num_layers, tick_step))
    axes.set_xlabel("module")
    axes.set_ylabel("layer")
    axes.set_title(title if note is None else f"{title}\n{note}", fontsize=9, loc="left")
    midpoint = (vmin + vmax) / 2
    if num_layers <= ANNOTATE_MAX_LAYERS:
        for layer in range(num_layers):
            for column in range(len(modules)):
                if not math.isnan(grid[layer, column]):
                    _annotate_cell(axes, column, layer, grid[layer, column], midpoint)
    if side_axes is not None:
        _draw_outside_panel(side_axes, side, outside, vmin, vmax)
    if color_axes is not None:
        figure.colorbar(image, cax=color_axes, label="||W1 - W0||_F / ||W0||_F")
    else:
        figure.colorbar(image, ax=axes, label="||W1 - W0||_F / ||W0||_F")
    return figure


def _split_heatmap_cells(aggregated: Mapping[tuple[int | None, str | None], float],
                         ) -> tuple[dict[tuple[int, str], float], list[tuple[str | None, float]]]:
    """Per-layer cells keyed ``(layer, module)`` and the cells outside the layers, in side-panel order."""
    layer_cells = {(layer, module or "other"): value for (layer, module), value in aggregated.items()
                   if layer is not None}
    outside = sorted(((module, value) for (layer, module), value in aggregated.items() if layer is None),
                     key=lambda item: list(OUTSIDE_LABELS).index(item[0]) if item[0] in OUTSIDE_LABELS
                     else len(OUTSIDE_LABELS))
    return layer_cells, outside


def _heatmap_grid(layer_cells: Mapping[tuple[int, str], float]) -> tuple[list[str], np.ndarray]:
    """The module columns (the usual ones, then any others) and the layer x module grid, NaN where missing."""
    extra = sorted({module for _, module in layer_cells if module not in HEATMAP_MODULES})
    modules = list(HEATMAP_MODULES) + extra
    num_layers = 1 + max(layer for layer, _ in layer_cells)
    grid = np.full((num_layers, len(modules)), np.nan)
    for (layer, module), value in layer_cells.items():
        grid[layer, modules.index(module)] = value
    return modules, grid


def _heatmap_axes(figure: Figure, num_modules: int, with_side: bool) -> tuple[Any, Any, Any]:
    """Main axes, side-panel axes and colour-bar axes (the last two None without a side panel)."""
    if not with_side:
        return figure.add_subplot(), None, None
    # main | side panel | room for the side panel's labels | colour bar
    grid_spec = figure.add_gridspec(1, 4, width_ratios=[num_modules, 1.0, 1.3, 0.3], wspace=0.15)
    axes, side_axes = figure.add_subplot(grid_spec[0, 0]), figure.add_subplot(grid_spec[0, 1])
    return axes, side_axes, figure.add_subplot(grid_spec[0, 3])


def _annotate_cell(target: Any, column: int, row: int, value: float, midpoint: float) -> None:
    """Write a cell's value (``inf`` for infinite) in a colour readable on the viridis scale."""
    color = "black" if math.isinf(value) or value > midpoint else "white"
    target.text(column, row, "inf" if math.isinf(value) else f"{value:.2g}", ha="center", va="center",
                fontsize=7, color=color)


def _draw_outside_panel(side_axes: Any, side: np.ndarray, outside: Sequence[tuple[str | None, float]],
                        vmin: float, vmax: float) -> None:
    """Draw the cells outside the layers (embeddings, final norm, lm_head) on the main colour scale."""
    side_axes.imshow(np.ma.masked_invalid(side), origin="lower", aspect="auto", cmap="viridis",
                     interpolation="nearest", vmin=vmin, vmax=vmax)
    side_axes.set_xticks([])
    side_axes.set_yticks(range(len(outside)), [OUTSIDE_LABELS.get(module, str(module)) for module, _ in outside])
    side_axes.yaxis.tick_right()
    side_axes.set_xlabel("outside\nthe layers")
    midpoint = (vmin + vmax) / 2
    for row, (_, value) in enumerate(outside):
        if not math.isnan(value):
            _annotate_cell(side_axes, 0, row, value, midpoint)


def _steps(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    for key in ("step", "global_step"):
        if all(key in row for row in rows):
            return [float(row[key]) for row in rows]
    return [float(index) for index in range(len(rows))]


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    values = [row.get(key) for row in rows]
    return np.array([np.nan if value is None else float(value) for value in values])


def _part_rank(key: str) -> tuple[int, str]:
    if key in REWARD_PART_ORDER:
        return REWARD_PART_ORDER.index(key), ""
    return len(REWARD_PART_ORDER), key


def plot_reward_curve(history_rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                      title: str = "training reward", reward_name: str | None = None) -> Path:
    """Write :func:`reward_curve_figure` as a PNG; returns the path."""
    return _save(reward_curve_figure(history_rows, title, reward_name), path)


def reward_curve_figure(history_rows: Sequence[Mapping[str, Any]], title: str = "training reward",
                        reward_name: str | None = None) -> Figure:
    """Reward mean (``reward/score``) with a +-std band (``reward/score_std``) against the step.

    The step is ``step`` (else ``global_step``, else the row position), ticked at integers. Rows
    without ``reward/score`` are skipped. Other ``reward/*`` keys (``reward/solved``,
    ``reward/malformed``, ``reward/empty``...; not ``*_std``) go in a second panel, labelled in words
    (:data:`REWARD_PART_LABELS`). When rows carry ``round``, dashed lines mark where a round starts.
    ``reward_name`` (the reward variant, e.g. ``solve_f1``) goes into the title.
    """
    if reward_name:
        title = f"{title} (reward: {reward_name})"
    rows = [row for row in history_rows if row.get(REWARD_KEY) is not None]
    if not rows:
        keys = sorted({key for row in history_rows for key in row})
        raise ValueError(f"no history row has '{REWARD_KEY}'; keys seen: {keys}")
    steps = np.array(_steps(rows))
    mean = _series(rows, REWARD_KEY)
    part_keys = sorted({key for row in rows for key in row
                        if key.startswith("reward/") and key not in (REWARD_KEY, REWARD_STD_KEY)
                        and not key.endswith("_std")}, key=_part_rank)

    figure = Figure(figsize=(7.0, 6.0 if part_keys else 3.8))
    if part_keys:
        panels = [figure.add_subplot(2, 1, 1), figure.add_subplot(2, 1, 2)]
    else:
        panels = [figure.add_subplot()]
    reward_axes = panels[0]
    reward_axes.plot(steps, mean, marker="o", markersize=3, label="sampled reward (mean per step)")
    if any(REWARD_STD_KEY in row for row in rows):
        std = _series(rows, REWARD_STD_KEY)
        reward_axes.fill_between(steps, mean - std, mean + std, alpha=0.25, label="+-1 std across samples")
    reward_axes.set_ylabel("reward per sampled turn")
    reward_axes.set_title(title)
    if part_keys:
        for key in part_keys:
            name = key.removeprefix("reward/")
            panels[1].plot(steps, _series(rows, key), marker=".", label=REWARD_PART_LABELS.get(name, name))
        panels[1].set_ylabel("per sampled turn")
    panels[-1].set_xlabel("training step (all rounds)")
    for axes in panels:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))

    if all("round" in row for row in rows):
        first_boundary = True
        for index in range(1, len(rows)):
            if rows[index]["round"] != rows[index - 1]["round"]:
                boundary = (steps[index - 1] + steps[index]) / 2
                for axes in panels:
                    axes.axvline(boundary, color="gray", linestyle="--", linewidth=1,
                                 label="round boundary" if first_boundary and axes is reward_axes else None)
                first_boundary = False
                reward_axes.annotate(f"round {rows[index]['round']}", (boundary, 1.0),
                                     xycoords=("data", "axes fraction"), xytext=(3, -12),
                                     textcoords="offset points", fontsize=8, color="gray")
    reward_axes.legend(loc="best", fontsize=8)
    if part_keys:
        panels[1].legend(loc="best", fontsize=8)
    return figure
