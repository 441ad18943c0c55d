#!/usr/bin/env python3
"""Upload offline W&B runs: find ``wandb/offline-run-*`` folders under outputs/ and ``wandb sync`` them.

Runs log offline by default (``logger=wandb``, ``logger.wandb.mode=offline``), which suits compute
nodes without internet. From a machine that has it (and ``WANDB_API_KEY`` or ``wandb login``):

    python launchers/wandb_sync.py --dry-run                 # list what would be uploaded
    python launchers/wandb_sync.py                           # upload every run not yet synced
    python launchers/wandb_sync.py --root outputs/multirun/freeze_ablation --entity my-team

A run counts as synced once ``wandb sync`` has left its ``*.wandb.synced`` marker in the run folder;
``--include-synced`` uploads those again. Runs are passed to one ``wandb sync`` call per batch of
``--batch`` folders. Exit status: ``wandb sync``'s (0 when there is nothing to do).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def find_offline_runs(root: Path, include_synced: bool = False) -> list[Path]:
    """Offline run folders under ``root`` (sorted), skipping synced ones unless asked."""
    runs = sorted(path for path in root.rglob("offline-run-*")
                  if path.is_dir() and path.parent.name == "wandb")
    if include_synced:
        return runs
    return [run for run in runs if not any(run.glob("*.wandb.synced"))]


def sync_command(runs: Sequence[Path], wandb_bin: str = "wandb", project: str | None = None,
                 entity: str | None = None) -> list[str]:
    command = [wandb_bin, "sync"]
    if project:
        command += ["--project", project]
    if entity:
        command += ["--entity", entity]
    return command + [str(run) for run in runs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("outputs"), help="where to look (default: outputs)")
    parser.add_argument("--project", default=None,
                        help="upload into this W&B project (default: the run's own)")
    parser.add_argument("--entity", default=None, help="W&B entity (team or user)")
    parser.add_argument("--include-synced", action="store_true", help="upload runs already synced, too")
    parser.add_argument("--batch", type=int, default=50, help="run folders per `wandb sync` call")
    parser.add_argument("--wandb-bin", default="wandb", help="the wandb executable")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs and the command, upload nothing")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"[wandb_sync] --root {args.root} is not a directory", file=sys.stderr)
        return 2
    if args.batch < 1:
        print(f"[wandb_sync] --batch must be >= 1, got {args.batch}", file=sys.stderr)
        return 2

    runs = find_offline_runs(args.root, include_synced=args.include_synced)
    print(f"[wandb_sync] {len(runs)} offline run(s) to sync under {args.root}")
    status = 0
    for start in range(0, len(runs), args.batch):
        command = sync_command(runs[start:start + args.batch], args.wandb_bin, args.project, args.entity)
        if args.dry_run:
            print(shlex.join(command))
            continue
        result = subprocess.run(command, check=False)
        status = status or result.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
