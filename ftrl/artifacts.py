"""The run directory: every file name a stage reads or writes, and the run manifest.

One module owns the layout so stages exchange files, never in-memory state, and any stage can be
re-run alone on an existing run directory::

    <run_dir>/
      manifest.json                 versions, git sha, config hash, env-set hash
      config.yaml                   the resolved RunConfig
      stages/<stage>.json           completion markers (a stage with a marker is skipped)
      envs/train.jsonl test.jsonl   environments (reference records) + envs/manifest.json
      model/base/                   the tiny model built for this run (config, weights, tokenizer)
      warmup/checkpoint/            supervised warm start (tiny models)
      rounds/r{k}/snapshots.jsonl   collected snapshots (+ .parquet) for round k
      rounds/r{k}/checkpoint/       HF safetensors checkpoint after round k
      rounds/r{k}/train/            history.jsonl, trainer state for resume, reward curve
      eval/<checkpoint>/<bench>.jsonl + metrics.json;  eval/metrics.json (all checkpoints)
      analysis/                     param_delta.csv, heat-map, summary
      summary.json                  {"evals": [{"checkpoint", "metrics"}...]}

    python -c "from ftrl.artifacts import RunDir; print(RunDir('outputs/x').snapshots(1))"
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_of_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names: Iterable[str] = ("torch", "transformers", "verl", "hydra-core", "peft",
                                            "vllm", "wandb")) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory. Checkpoint names: base, warmup, round1, round2, ..."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # --- run-level files
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def stage_marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    # --- environments
    @property
    def envs_dir(self) -> Path:
        return self.root / "envs"

    def envs(self, split: str) -> Path:
        return self.envs_dir / f"{split}.jsonl"

    @property
    def envs_manifest(self) -> Path:
        return self.envs_dir / "manifest.json"

    # --- models and checkpoints
    @property
    def base_model(self) -> Path:
        return self.root / "model" / "base"

    @property
    def warmup_dir(self) -> Path:
        return self.root / "warmup"

    def round_dir(self, k: int) -> Path:
        return self.root / "rounds" / f"r{k}"

    def snapshots(self, k: int) -> Path:
        return self.round_dir(k) / "snapshots.jsonl"

    def snapshots_parquet(self, k: int) -> Path:
        return self.round_dir(k) / "snapshots.parquet"

    def train_dir(self, k: int) -> Path:
        return self.round_dir(k) / "train"

    def checkpoint_dir(self, name: str) -> Path:
        """Where checkpoint ``name`` (warmup, round1, ...) is or will be written."""
        if name == "warmup":
            return self.warmup_dir / "checkpoint"
        if name.startswith("round"):
            return self.round_dir(int(name[len("round"):])) / "checkpoint"
        raise ValueError(f"no checkpoint directory for '{name}'")

    # --- evaluation and analysis
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_records(self, checkpoint: str, benchmark: str) -> Path:
        return self.eval_dir / checkpoint / f"{benchmark}.jsonl"

    def eval_metrics(self, checkpoint: str) -> Path:
        return self.eval_dir / checkpoint / "metrics.json"

    @property
    def eval_summary(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    # --- stage markers
    def is_done(self, stage: str) -> bool:
        return self.stage_marker(stage).exists()

    def mark_done(self, stage: str, **info: Any) -> None:
        write_json(self.stage_marker(stage), {"stage": stage, "finished_at": time.time(), **info})

    def clear_marker(self, stage: str) -> None:
        self.stage_marker(stage).unlink(missing_ok=True)


def write_manifest(run_dir: RunDir, config: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    """Create or update the run manifest; refuse to reuse a directory made by a different config."""
    config_hash = hashlib.sha256(json.dumps(_identity(config), sort_keys=True).encode()).hexdigest()[:16]
    manifest: dict[str, Any] = {}
    if run_dir.manifest.exists():
        manifest = read_json(run_dir.manifest)
        previous = manifest.get("config_hash")
        if previous and previous != config_hash:
            changed = _diff(manifest.get("identity", {}), _identity(config))
            raise RunDirConflict(
                f"{run_dir.root} holds a run with a different configuration (changed: {', '.join(changed)}). "
                "Re-run with the original settings to resume, or choose another directory with "
                "name=<new name> or hydra.run.dir=<path>."
            )
    manifest.update({
        "config_hash": config_hash,
        "identity": _identity(config),
        "versions": package_versions(),
        "git_sha": git_sha(),
        "argv": sys.argv,
        "updated_at": time.time(),
    })
    manifest.setdefault("created_at", time.time())
    if extra:
        manifest.update(extra)
    write_json(run_dir.manifest, manifest)
    return manifest


class RunDirConflict(RuntimeError):
    """The run directory was created by a different configuration."""


# Keys that may change between a run and its resumption without changing what it computes.
_VOLATILE_KEYS = {"stages", "dry_run", "run_dir", "logger", "resources", "eval"}


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _VOLATILE_KEYS}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changed: list[str] = []
        for key in sorted(set(old) | set(new)):
            changed += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return changed
    return [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"] if old != new else []
