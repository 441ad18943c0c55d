"""The Hydra callback that makes a sweep report itself (registered in conf/config.yaml, hydra.callbacks).

At the end of a multirun (``python -m ftrl.run -m ...``) the sweep's jobs are gathered into one table,
one row per job with the swept keys as columns (ftrl.analysis.tables.sweep_table), written to
``<sweep dir>/sweep_table.md`` and ``.csv``, and the path is printed. ``python -m ftrl.report sweep
<sweep dir>`` rebuilds it. A failure here is logged and never fails the sweep, whose jobs are done.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ftrl.analysis.tables import write_sweep_table

        sweep_dir = config.hydra.sweep.dir
        try:
            path = write_sweep_table(sweep_dir)
        # the jobs are done: a table that cannot be made (unreadable job files) must not fail the sweep
        except (OSError, ValueError, KeyError, TypeError, IndexError, yaml.YAMLError) as error:
            log.warning("sweep table for %s not written: %s (rebuild: python -m ftrl.report sweep %s)",
                        sweep_dir, error, sweep_dir)
            return
        print(f"sweep table: {path}  (rebuild: python -m ftrl.report sweep {sweep_dir})", flush=True)
