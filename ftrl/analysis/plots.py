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


CRITIC_KEYS: tuple[tuple[str, str], ...] = (("critic/explained_var", "critic explained variance"),
                                             ("critic/vf_loss", "critic value loss"))


def reward_curve_figure(history_rows: Sequence[Mapping[str, Any]], title: str = "training reward",
                        reward_name: str | None = None) -> Figure:
    """Reward mean (``reward/score``) with a +-std band (``reward/score_std``) against the step.

    The step is ``step`` (else ``global_step``, else the row position), ticked at integers. Rows
    without ``reward/score`` are skipped. Other ``reward/*`` keys (``reward/solved``,
    ``reward/malformed``, ``reward/empty``...; not ``*_std``) go in a second panel, labelled in words
    (:data:`REWARD_PART_LABELS`). Runs with a critic (PPO) get a last panel with the critic's
    explained variance and value loss per step (:data:`CRITIC_KEYS`), so a critic that explains
    nothing is seen next to the reward it fails to predict. When rows carry ``round``, dashed lines
    mark where a round starts. ``reward_name`` (the reward variant, e.g. ``solve_f1``) goes into the title.
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
    with_critic = any(key in row for row in rows for key, _ in CRITIC_KEYS)

    num_panels = 1 + bool(part_keys) + with_critic
    figure = Figure(figsize=(7.0, 3.8 + 2.2 * (num_panels - 1)))
    panels = [figure.add_subplot(num_panels, 1, index + 1) for index in range(num_panels)]
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
    if with_critic:
        _draw_critic_panel(panels[-1], steps, rows)
    panels[-1].set_xlabel("training step (all rounds)")
    for axes in panels:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    _draw_round_boundaries(panels, steps, rows)
    for axes in panels:
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize=8)
    return figure


def _draw_critic_panel(axes: Any, steps: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> None:
    """Explained variance and value loss of the critic per step; 0 marks a critic no better than a constant."""
    for key, label in CRITIC_KEYS:
        if any(key in row for row in rows):
            axes.plot(steps, _series(rows, key), marker=".", label=label)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_ylabel("critic")


def _draw_round_boundaries(panels: Sequence[Any], steps: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> None:
    """Dashed lines where a new round starts (rows carry ``round``), labelled on the first panel."""
    if not all("round" in row for row in rows):
        return
    first_boundary = True
    for index in range(1, len(rows)):
        if rows[index]["round"] != rows[index - 1]["round"]:
            boundary = (steps[index - 1] + steps[index]) / 2
            for axes in panels:
                axes.axvline(boundary, color="gray", linestyle="--", linewidth=1,
                             label="round boundary" if first_boundary and axes is panels[0] else None)
            first_boundary = False
            panels[0].annotate(f"round {rows[index]['round']}", (boundary, 1.0),
                               xycoords=("data", "axes fraction"), xytext=(3, -12),
                               textcoords="offset points", fontsize=8, color="gray")


# ------------------------------------------------------------------------------ interventions and sweeps
def plot_layer_scan(points: Sequence[tuple[int, str, float | None, float]], path: str | os.PathLike, *,
                    metric: str, base: float | None, trained: float | None,
                    title: str = "per-layer transplant scan") -> Path:
    """Write :func:`layer_scan_figure` as a PNG; returns the path."""
    return _save(layer_scan_figure(points, metric=metric, base=base, trained=trained, title=title), path)


def layer_scan_figure(points: Sequence[tuple[int, str, float | None, float]], *, metric: str,
                      base: float | None, trained: float | None, title: str = "per-layer transplant scan") -> Figure:
    """The scan over layers: ``points`` are ``(layer, module kind, metric value, share of the squared change)``.

    Top: the metric (x100) of B with layer i's kind taken from T, one line per kind, between B's and T's
    scores (dashed); its right axis reads the same heights as gain kept, (value - B) / (T - B), when T and
    B differ. Bottom: the share of the squared B->T weight change each transplant moved, so the causal
    measure (top) can be read against the weight-change measure (bottom).
    """
    if not points:
        raise ValueError("no scan point to draw")
    kinds = list(dict.fromkeys(kind for _, kind, _, _ in points))
    layers = sorted({layer for layer, _, _, _ in points})
    figure = Figure(figsize=(max(6.0, 0.35 * len(layers) + 3.0), 6.4))
    top, bottom = figure.add_subplot(2, 1, 1), figure.add_subplot(2, 1, 2)
    width = 0.8 / len(kinds)
    for number, kind in enumerate(kinds):
        series = sorted((layer, value, share) for layer, k, value, share in points if k == kind)
        xs = [layer for layer, _, _ in series]
        top.plot(xs, [np.nan if v is None else 100 * v for _, v, _ in series], marker="o", label=f"transplant {kind}")
        bottom.bar([x + (number - (len(kinds) - 1) / 2) * width for x in xs], [100 * s for _, _, s in series],
                   width=width, label=kind)
    for value, label, style in ((base, "B (base)", ":"), (trained, "T (trained)", "--")):
        if value is not None:
            top.axhline(100 * value, color="gray", linestyle=style, linewidth=1, label=f"{label} {100 * value:.1f}")
    if base is not None and trained is not None and abs(trained - base) > 1e-12:
        gain_axis = top.twinx()
        low, high = top.get_ylim()
        gain_axis.set_ylim((low / 100 - base) / (trained - base), (high / 100 - base) / (trained - base))
        gain_axis.set_ylabel("gain kept")
    top.set_ylabel(f"{metric} x100")
    top.set_title(title, fontsize=9, loc="left")
    top.legend(loc="best", fontsize=7)
    bottom.set_ylabel("% of squared change moved")
    bottom.set_xlabel("layer")
    bottom.legend(loc="best", fontsize=7)
    for axes in (top, bottom):
        axes.set_xticks(layers if len(layers) <= 40 else layers[::max(1, len(layers) // 20)])
    return figure


def plot_heatmap_panels(panels: Sequence[tuple[str, Mapping[tuple[int | None, str | None], float]]],
                        path: str | os.PathLike, title: str = "relative change per job") -> Path:
    """Write :func:`heatmap_panels_figure` as a PNG; returns the path."""
    return _save(heatmap_panels_figure(panels, title), path)


def heatmap_panels_figure(panels: Sequence[tuple[str, Mapping[tuple[int | None, str | None], float]]],
                          title: str = "relative change per job", columns: int = 4) -> Figure:
    """Several layer x module heat-maps side by side on ONE colour scale (the largest finite cell of all).

    Each panel is ``(title, cells)`` with ``cells`` as for :func:`delta_heatmap_figure`; cells outside
    the layers (embeddings, final norm, lm_head) are the panel's right-most columns, after a gap.
    """
    if not panels:
        raise ValueError("no heat-map panel to draw")
    grids = [_panel_grid(cells) for _, cells in panels]
    finite = [value for _, _, grid in grids for value in grid.ravel() if np.isfinite(value)]
    vmax = max(finite) if finite and max(finite) > 0 else 1.0
    rows = math.ceil(len(panels) / columns)
    cols = min(columns, len(panels))
    depth = max(grid.shape[0] for _, _, grid in grids)
    figure = Figure(figsize=(0.5 + 3.4 * cols, 1.3 + (0.9 + 0.22 * depth) * rows))
    image = None
    for number, ((panel_title, _), (labels, num_layers, grid)) in enumerate(zip(panels, grids)):
        axes = figure.add_subplot(rows, cols, number + 1)
        image = axes.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis",
                            interpolation="nearest", vmin=0.0, vmax=vmax)
        axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        axes.set_yticks(range(grid.shape[0]), [str(i) for i in range(num_layers)] + ["out"] * (grid.shape[0] - num_layers),
                        fontsize=6)
        axes.set_title(panel_title, fontsize=8)
    figure.suptitle(f"{title} (one colour scale: 0 to {vmax:.3g}; frozen parameters are 0)", fontsize=10)
    figure.colorbar(image, ax=figure.axes, label="||W1 - W0||_F / ||W0||_F", shrink=0.8)
    return figure


def _panel_grid(cells: Mapping[tuple[int | None, str | None], float]) -> tuple[list[str], int, np.ndarray]:
    """Column labels, the number of layer rows, and the grid: layers x module kinds, then one row of the
    cells outside the layers (each in its own column after the kinds) when there are any."""
    layer_cells, outside = _split_heatmap_cells(cells)
    modules, grid = _heatmap_grid(layer_cells) if layer_cells else (list(HEATMAP_MODULES), np.full((0, 8), np.nan))
    labels = [m.removesuffix("_proj") for m in modules]
    num_layers = grid.shape[0]
    if outside:
        extra = np.full((num_layers + 1, len(modules) + len(outside)), np.nan)
        extra[:num_layers, :len(modules)] = grid
        for index, (_, value) in enumerate(outside):
            extra[num_layers, len(modules) + index] = value
        labels += [OUTSIDE_LABELS.get(module, str(module)) for module, _ in outside]
        grid = extra
    return labels, num_layers, grid
