"""Where benchmark data lives: ``eval.data_dir`` (or ``FTRL_DATA_DIR``) holds one folder per benchmark.

The layout: ``toolhop/``, ``tau-bench/``, ``rotbench/``, ``general/`` (BFCL's data ships inside the
``bfcl-eval`` package). A missing folder or file is a :class:`MissingInputError` naming the benchmark,
the path and the config key to set; nothing is read from anywhere else.

    python -c "from ftrl.eval.data import benchmark_dir; print(benchmark_dir(None, 'rotbench', 'rotbench'))"
"""

from __future__ import annotations

import os
from pathlib import Path

from ftrl.errors import MissingInputError

DATA_DIR_ENV = "FTRL_DATA_DIR"


def data_root(data_dir: str | None, benchmark: str) -> Path:
    """``eval.data_dir``, else ``$FTRL_DATA_DIR``; an error naming both when neither is set."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise MissingInputError(f"{benchmark}: no benchmark data directory; set eval.data_dir=<dir> (or the "
                                f"{DATA_DIR_ENV} environment variable) to a folder holding toolhop/, tau-bench/, "
                                "rotbench/, general/")
    return Path(chosen).expanduser()


def benchmark_dir(data_dir: str | None, benchmark: str, folder: str) -> Path:
    """``<data root>/<folder>``, which must exist."""
    root = data_root(data_dir, benchmark)
    path = root / folder
    if not path.is_dir():
        key = "eval.data_dir" if data_dir else DATA_DIR_ENV
        raise MissingInputError(f"{benchmark}: no folder '{path}' (from {key}={root}); put the benchmark's data "
                                f"there or point {key} at the folder that holds {folder}/")
    return path


def benchmark_file(path: str | os.PathLike, benchmark: str, key: str) -> Path:
    """A data file named by config key ``key``, which must exist."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise MissingInputError(f"{benchmark}: no such file '{resolved}' ({key})")
    return resolved
