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

from ftrl.artifacts import atomic_path

# The heat-map's columns: these kinds always, in this order; any other kind found is appended.
HEATMAP_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                    "down_proj", "norm")
# Cell values are written into the cells up to this grid size.
ANNOTATE_MAX_LAYERS = 16
# Reward parts drawn in the lower panel, in this order first (others follow alphabetically).
REWARD_PART_ORDER: tuple[str, ...] = ("reward/solved", "reward/malformed", "reward/empty")
REWARD_KEY = "reward/score"
REWARD_STD_KEY = "reward/score_std"


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_delta_heatmap(aggregated: Mapping[tuple[int | None, str | None], float], path: str | os.PathLike,
                       title: str = "relative parameter change") -> Path:
    """Heat-map of relative change: layer 0 at the bottom, module kinds q, k, v, o, gate, up, down, norm.

    ``aggregated`` maps ``(layer, module)`` to a relative change (``DeltaAggregate.rel_changes()``);
    cells without a layer (embeddings, final norm, lm_head) are not drawn. Missing cells are blank,
    infinite ones are blank and labelled ``inf``. Returns the PNG path.
    """
    layer_cells = {(layer, module or "other"): value for (layer, module), value in aggregated.items()
                   if layer is not None}
    if not layer_cells:
        raise ValueError(f"no per-layer cell to draw; the cells are {sorted(map(str, aggregated))}")
    extra = sorted({module for _, module in layer_cells if module not in HEATMAP_MODULES})
    modules = list(HEATMAP_MODULES) + extra
    num_layers = 1 + max(layer for layer, _ in layer_cells)
    grid = np.full((num_layers, len(modules)), np.nan)
    for (layer, module), value in layer_cells.items():
        grid[layer, modules.index(module)] = value
    finite = np.ma.masked_invalid(grid)

    figure = Figure(figsize=(1.0 + 0.75 * len(modules), 1.5 + 0.32 * num_layers))
    axes = figure.add_subplot()
    image = axes.imshow(finite, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(modules)), [m.removesuffix("_proj") for m in modules], rotation=45)
    tick_step = max(1, num_layers // 24)
    axes.set_yticks(range(0, num_layers, tick_step))
    axes.set_xlabel("module")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="||W1 - W0||_F / ||W0||_F")
    if num_layers <= ANNOTATE_MAX_LAYERS:
        midpoint = (float(finite.min()) + float(finite.max())) / 2 if finite.count() else 0.0
        for layer in range(num_layers):
            for column in range(len(modules)):
                value = grid[layer, column]
                if math.isnan(value):
                    continue
                color = "black" if math.isinf(value) or value > midpoint else "white"
                axes.text(column, layer, "inf" if math.isinf(value) else f"{value:.2g}", ha="center",
                          va="center", fontsize=7, color=color)
    return _save(figure, path)


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
                      title: str = "training reward") -> Path:
    """Reward mean (``reward/score``) with a +-std band (``reward/score_std``) against the step.

    The step is ``step`` (else ``global_step``, else the row position). Rows without ``reward/score``
    are skipped. Other ``reward/*`` keys (``reward/solved``, ``reward/malformed``, ``reward/empty``...;
    not ``*_std``) go in a second panel. When rows carry ``round``, dashed lines mark where a round
    starts. Returns the PNG path.
    """
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
    reward_axes.plot(steps, mean, marker="o", markersize=3, label="reward mean")
    if any(REWARD_STD_KEY in row for row in rows):
        std = _series(rows, REWARD_STD_KEY)
        reward_axes.fill_between(steps, mean - std, mean + std, alpha=0.25, label="+- std")
    reward_axes.set_ylabel("reward")
    reward_axes.set_title(title)
    reward_axes.legend(loc="best", fontsize=8)
    if part_keys:
        for key in part_keys:
            panels[1].plot(steps, _series(rows, key), marker=".", label=key.removeprefix("reward/"))
        panels[1].set_ylabel("fraction / part")
        panels[1].legend(loc="best", fontsize=8)
    panels[-1].set_xlabel("step")

    if all("round" in row for row in rows):
        for index in range(1, len(rows)):
            if rows[index]["round"] != rows[index - 1]["round"]:
                boundary = (steps[index - 1] + steps[index]) / 2
                for axes in panels:
                    axes.axvline(boundary, color="gray", linestyle="--", linewidth=1)
                reward_axes.annotate(f"round {rows[index]['round']}", (boundary, 1.0),
                                     xycoords=("data", "axes fraction"), xytext=(3, -12),
                                     textcoords="offset points", fontsize=8, color="gray")
    return _save(figure, path)
