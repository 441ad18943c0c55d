#!/usr/bin/env python3
"""Launch a Hydra multirun from a clean git worktree, so the sweep's code cannot change under it.

A sweep on SLURM runs for days while you keep editing the checkout; jobs that start late would
otherwise import whatever the working tree holds at that moment. This helper:

1. refuses to start when the checkout has uncommitted changes (tracked or untracked; ``--force``
   launches the last commit anyway and says what is left out), unless ``--commit`` names a commit;
2. creates (or reuses) a detached ``git worktree`` of that commit under
   ``outputs/worktrees/<sha>`` (git-ignored, like all of ``outputs/``);
3. runs ``python -m ftrl.run -m <overrides>`` from that worktree with ``PYTHONPATH`` pointing at it,
   writing the sweep into the checkout's own ``outputs/multirun/<name>`` (unless the overrides set
   ``hydra.sweep.dir``); each job's ``manifest.json`` records the worktree's sha;
4. appends the launch (sha, ref, command, time) to ``outputs/worktrees/launches.jsonl``.

    python launchers/sweep.py -- +experiment=freeze_ablation hydra/launcher=slurm
    python launchers/sweep.py --commit v0.1.0 -- +experiment=tiny_freeze_ablation
    python launchers/sweep.py --dry-run -- +experiment=algorithm_ablation

Remove old worktrees with ``git worktree remove outputs/worktrees/<sha>`` (or ``git worktree prune``
after deleting the folder). Exit status: the sweep's, or 2 for a refused launch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

WORKTREES = Path("outputs") / "worktrees"


class SweepError(RuntimeError):
    """The launch was refused; the message says why and what to do."""


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SweepError(f"git {' '.join(args)} failed in {repo}: {result.stderr.strip()}")
    return result.stdout.rstrip()  # keep leading blanks: porcelain status columns start with one


def repo_root(start: Path) -> Path:
    return Path(git(start, "rev-parse", "--show-toplevel"))


def uncommitted_changes(repo: Path) -> list[str]:
    """``git status --porcelain`` lines of the checkout, ignoring this helper's own worktrees."""
    status = git(repo, "status", "--porcelain", "--", ".", f":(exclude){WORKTREES.as_posix()}")
    return [line for line in status.splitlines() if line.strip()]


def resolve_commit(repo: Path, ref: str) -> str:
    return git(repo, "rev-parse", "--verify", f"{ref}^{{commit}}")


def ensure_worktree(repo: Path, sha: str) -> Path:
    """A clean, detached worktree of ``sha`` under ``outputs/worktrees/<sha>`` (created once)."""
    path = repo / WORKTREES / sha
    if path.exists():
        head = git(path, "rev-parse", "HEAD")
        if head != sha:
            raise SweepError(f"{path} is checked out at {head}, not {sha}; remove it with "
                             f"`git worktree remove --force {path}` and launch again")
        dirty = git(path, "status", "--porcelain")
        if dirty:
            raise SweepError(f"worktree {path} has local changes ({dirty.splitlines()[0]} ...); a sweep "
                             f"worktree must stay pristine: `git worktree remove --force {path}`")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    git(repo, "worktree", "add", "--detach", str(path), sha)
    return path


def sweep_command(python: str, overrides: Sequence[str], repo: Path) -> list[str]:
    """``python -m ftrl.run -m ...``; the sweep directory defaults to the checkout's outputs/."""
    command = [python, "-m", "ftrl.run", "-m", *overrides]
    if not any(item.lstrip("+").startswith("hydra.sweep.dir=") for item in overrides):
        # Quoted so a checkout path with spaces stays one value; Hydra still resolves ${name} inside.
        command.append(f"hydra.sweep.dir='{repo / 'outputs' / 'multirun'}/${{name}}'")
    return command


def record_launch(repo: Path, entry: dict) -> Path:
    log_path = repo / WORKTREES / "launches.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    return log_path


def launch(repo: Path, overrides: Sequence[str], commit: str | None = None, force: bool = False,
           dry_run: bool = False, python: str = sys.executable) -> int:
    """Create the worktree and run the sweep from it; returns the sweep's exit status."""
    repo = repo_root(repo)
    forced_dirty: list[str] = []
    if commit is None:
        changes = uncommitted_changes(repo)
        if changes and not force:
            listed = "\n  ".join(changes[:10]) + ("\n  ..." if len(changes) > 10 else "")
            raise SweepError(f"{repo} has uncommitted changes, which a worktree of HEAD would not "
                             f"contain:\n  {listed}\ncommit them (or stash them), name a commit with "
                             "--commit, or pass --force to sweep HEAD without them")
        forced_dirty = changes
    sha = resolve_commit(repo, commit or "HEAD")
    command = sweep_command(python, overrides, repo)
    if forced_dirty:
        print(f"[sweep] --force: {len(forced_dirty)} uncommitted change(s) are NOT part of this sweep",
              file=sys.stderr)
    if dry_run:
        print(f"[sweep] would create {repo / WORKTREES / sha} and run there:\n  {shlex.join(command)}")
        return 0
    worktree = ensure_worktree(repo, sha)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(worktree), *filter(None, [env.get("PYTHONPATH")])])
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sha": sha, "ref": commit or "HEAD",
             "forced_dirty": forced_dirty, "worktree": str(worktree), "command": command}
    record_launch(repo, entry)
    print(f"[sweep] {sha[:12]} from {worktree}:\n  {shlex.join(command)}", file=sys.stderr)
    return subprocess.run(command, cwd=worktree, env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Everything after -- is passed to `python -m ftrl.run -m`.")
    parser.add_argument("--commit", default=None,
                        help="commit/tag/branch to sweep (default: HEAD, which needs a clean tree)")
    parser.add_argument("--force", action="store_true", help="sweep HEAD even with uncommitted changes")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the checkout (default: the cwd)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs ftrl (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the worktree and command, run nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the sweep")
    args = parser.parse_args(argv)
    try:
        return launch(args.repo, args.overrides, commit=args.commit, force=args.force, dry_run=args.dry_run,
                      python=args.python)
    except SweepError as error:
        print(f"[sweep] refused: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
