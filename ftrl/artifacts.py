"""The run directory: every file name a stage reads or writes, and the run manifest.

One module owns the layout so stages exchange files, never in-memory state, and any stage can be
re-run alone on an existing run directory::

    <run_dir>/
      manifest.json                 versions, git sha, config hash, env-set hash
      config.yaml                   the resolved RunConfig
      stages/<stage>.json           completion markers (a stage with a marker is skipped)
      envs/train.jsonl test.jsonl   environments (reference records) + envs/manifest.json
      model/base/                   the tiny model built for this run (config, weights, tokenizer)
      warmup/checkpoint/            supervised warm start (tiny models) + warmup/history.jsonl
      rounds/r{k}/snapshots.jsonl   collected snapshots (+ .parquet, + .progress.jsonl) for round k
      rounds/r{k}/checkpoint/       HF safetensors checkpoint after round k
      rounds/r{k}/train/            history.jsonl, trainer_state.pt (resume); verl_* files (verl backend)
      eval/<checkpoint>/<bench>.jsonl + metrics.json;  eval/metrics.json (all checkpoints)
      analysis/                     param_delta.csv, heat-map, summary.txt/.json (+ <a>_to_<b>/ each)
      train_reward_curve.png        reward over every finished round
      summary.json                  {"evals": [{"checkpoint", "metrics"}...]}

Files are written atomically (:func:`atomic_write`, :func:`atomic_path`, :func:`atomic_dir`): a
temporary sibling renamed into place, so a crash never leaves half a file or directory.

    python -c "from ftrl.artifacts import RunDir; print(RunDir('outputs/x').snapshots(1))"
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from ftrl.errors import FtrlError

# --- file names inside a run directory that RunDir's methods do not spell out alone
HISTORY_JSONL = "history.jsonl"                # per-step training metrics (warmup/, rounds/r{k}/train/)
TRAINER_STATE_PT = "trainer_state.pt"          # native trainer resume state (rounds/r{k}/train/)
REWARD_CURVE_PNG = "train_reward_curve.png"    # reward over every finished round (run root)
PROGRESS_SUFFIX = ".progress.jsonl"            # resumable-collection sidecar: snapshots.progress.jsonl
# One parameter-change comparison (analysis/ and analysis/<first>_to_<second>/; any --out directory).
PARAM_DELTA_CSV = "param_delta.csv"
HEATMAP_PNG = "param_delta_heatmap.png"
SUMMARY_TXT = "summary.txt"
SUMMARY_JSON = "summary.json"
# A verl round's files under rounds/r{k}/train/ (ftrl.train.verl_backend.VerlRoundFiles).
VERL_TRAIN_PARQUET = "verl_train.parquet"
VERL_AGENT_LOOP_YAML = "agent_loop.yaml"
FREEZE_POLICY_JSON = "freeze_policy.json"
FREEZE_REPORT_JSON = "freeze_report.json"      # written by the verl worker beside the policy file
VERL_CHECKPOINTS_DIR = "verl_checkpoints"
VERL_METRICS_JSONL = "verl_metrics.jsonl"
VERL_COMMAND_SH = "verl_command.sh"
VERL_LOG = "verl.log"
VERL_MERGE_LOG = "merge.log"
VERL_HYDRA_DIR = "verl_hydra"


# ------------------------------------------------------------------------------- atomic writes
def _temp_sibling(path: Path) -> Path:
    """A hidden name beside ``path``, unique per process and thread: ``.{name}.{pid}.{thread}.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally it is renamed onto ``path``.

    For writers that want a path, not a file object (``savefig``, ``pq.write_table``, ``torch.save``).
    The parent directory is created. On an exception the temporary file is removed and ``path`` is left
    as it was. The temporary name ends in ``.tmp``, so writers that infer a format from the suffix must
    be told the format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                 newline: str | None = None, fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; rename it onto ``path`` when the block ends.

    ``mode`` is ``"w"`` (text, ``encoding``/``newline`` as for :func:`open`) or ``"wb"``. With ``fsync``
    the data reaches the disk before the rename. Readers never see half a file; on an exception the
    old file (if any) is untouched and no temporary file is left.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    binary = mode == "wb"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if binary else encoding,
                                        newline=None if binary else newline) as handle:
        yield handle
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`); returns the path."""
    with atomic_write(path, "w", encoding=encoding, fsync=fsync) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`); returns the path."""
    with atomic_write(path, "wb", fsync=fsync) as handle:
        handle.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, if_exists: str = "replace") -> Iterator[Path]:
    """Yield an empty staging directory beside ``path``; rename it onto ``path`` when the block ends.

    A directory named ``path`` is therefore always complete. ``if_exists`` says what happens when
    ``path`` exists at the rename: ``"replace"`` removes it first; ``"keep"`` keeps it (e.g. another
    process stored the same content meanwhile) and discards the staged copy. On an exception, or when
    kept, the staging directory is removed.
    """
    if if_exists not in ("replace", "keep"):
        raise ValueError(f"atomic_dir: if_exists must be 'replace' or 'keep', not {if_exists!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_sibling(path)
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier, killed writer with this process id
    staging.mkdir()
    try:
        yield staging
        if if_exists == "replace" and path.exists():
            shutil.rmtree(path)
        try:
            os.replace(staging, path)
        except OSError:
            if if_exists != "keep" or not path.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
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
    def recorded_config(self) -> Path:
        """The validated config the run was created with (written once; a refused invocation never touches it)."""
        return self.root / ".hydra" / "config.yaml"

    @property
    def recorded_overrides(self) -> Path:
        """The command-line overrides of the invocation that created the run."""
        return self.root / ".hydra" / "overrides.yaml"

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

    @property
    def warmup_history(self) -> Path:
        return self.warmup_dir / HISTORY_JSONL

    def round_dir(self, k: int) -> Path:
        return self.root / "rounds" / f"r{k}"

    def snapshots(self, k: int) -> Path:
        return self.round_dir(k) / "snapshots.jsonl"

    def snapshots_parquet(self, k: int) -> Path:
        return self.round_dir(k) / "snapshots.parquet"

    def train_dir(self, k: int) -> Path:
        return self.round_dir(k) / "train"

    def train_history(self, k: int) -> Path:
        return self.train_dir(k) / HISTORY_JSONL

    def trainer_state(self, k: int) -> Path:
        return self.train_dir(k) / TRAINER_STATE_PT

    @property
    def reward_curve(self) -> Path:
        return self.root / REWARD_CURVE_PNG

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

    def eval_settings(self, checkpoint: str) -> Path:
        """The eval settings ``eval_metrics(checkpoint)`` was made with."""
        return self.eval_dir / checkpoint / "settings.json"

    def eval_archive(self, checkpoint: str) -> Path:
        """A fresh folder under ``eval/archive/`` for results made with earlier settings."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        candidate = self.eval_dir / "archive" / f"{checkpoint}-{stamp}"
        index = 1
        while candidate.exists():
            index += 1
            candidate = self.eval_dir / "archive" / f"{checkpoint}-{stamp}-{index}"
        return candidate

    @property
    def eval_summary(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def analysis_comparison_dir(self, first: str, second: str) -> Path:
        """``analysis/<first>_to_<second>/``: one comparison's CSV, heat-map and summaries."""
        return self.analysis_dir / f"{first}_to_{second}"

    # --- stage markers
    def is_done(self, stage: str) -> bool:
        return self.stage_marker(stage).exists()

    def mark_done(self, stage: str, **info: Any) -> None:
        write_json(self.stage_marker(stage), {"stage": stage, "finished_at": time.time(), **info})


def write_manifest(run_dir: RunDir, config: dict[str, Any], extra: dict[str, Any] | None = None,
                   inputs: dict[str, dict[str, Any]] | None = None) -> dict:
    """Create or update the run manifest; refuse to reuse a directory made by a different config, or
    whose external inputs (``inputs``: key -> {path, sha256}) changed since it recorded them."""
    config_hash = hashlib.sha256(json.dumps(_identity(config), sort_keys=True).encode()).hexdigest()[:16]
    manifest: dict[str, Any] = {}
    if run_dir.manifest.exists():
        manifest = read_json(run_dir.manifest)
        _check_inputs(run_dir, manifest.get("inputs") or {}, inputs or {})
        previous = manifest.get("config_hash")
        # Compare through today's identity rules, so a manifest written under older rules still matches.
        if previous and previous != config_hash and _identity(manifest.get("identity", {})) != _identity(config):
            changed = _diff(_identity(manifest.get("identity", {})), _identity(config))
            raise RunDirConflict(
                f"{run_dir.root} holds a run with a different configuration (changed: {', '.join(changed)}). "
                "Re-run with the original settings to resume, or choose another directory with "
                "name=<new name> or hydra.run.dir=<path>."
            )
    manifest.update({
        "config_hash": config_hash,
        "identity": _identity(config),
        "inputs": {**(manifest.get("inputs") or {}), **(inputs or {})},
        "versions": package_versions(),
        "git_sha": git_sha(),
        "argv": sys.argv,
        "updated_at": time.time(),
    })
    manifest.setdefault("created_at", time.time())
    if os.environ.get("SLURM_JOB_ID"):  # every SLURM job that worked on this run (a requeued one appears twice)
        job = {key: os.environ[name] for key, name in (("job_id", "SLURM_JOB_ID"),
                                                       ("array_job_id", "SLURM_ARRAY_JOB_ID"),
                                                       ("array_task_id", "SLURM_ARRAY_TASK_ID")) if name in os.environ}
        manifest.setdefault("slurm_jobs", []).append({**job, "started_at": time.time()})
    if extra:
        manifest.update(extra)
    write_json(run_dir.manifest, manifest)
    return manifest


class RunDirConflict(FtrlError, RuntimeError):
    """The run directory was created by a different configuration."""


def _check_inputs(run_dir: RunDir, recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse when an input the run recorded now has other contents (an input gone missing is not
    refused here: the preflight decides whether a pending stage still needs it)."""
    changed = [f"{key} ({now['path']}: sha256 {recorded[key].get('sha256', '?')[:12]} -> {now['sha256'][:12]})"
               for key, now in sorted(current.items())
               if key in recorded and recorded[key].get("sha256") != now.get("sha256")]
    if changed:
        raise RunDirConflict(
            f"{run_dir.root}: input(s) changed since this run recorded them: {', '.join(changed)}. The run "
            "keeps what it built from the old contents (envs/, checkpoints), so it is not continued. Start a "
            "new run for the new inputs (name=<new name> or hydra.run.dir=<path>), or restore the old files.")


# Keys that may change between a run and its resumption without changing what it computes.
_VOLATILE_KEYS = {"stages", "dry_run", "rerun", "run_dir", "logger", "resources", "eval", "intervene"}


# envs.name -> the one envs sub-section that source reads; the other sources' sections do not change a run.
_ENV_SOURCE_SECTIONS = {"procedural": "procedural", "ftrl_files": "files", "llm": "llm", "taubench": "taubench"}


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The keys that make a run what it is: volatile keys, unused environment sources and, without a
    critic (GRPO, Reinforce++), the critic's ``train.critic_*`` settings left out (a GRPO run made before
    a critic setting existed still resumes)."""
    identity = {k: v for k, v in config.items() if k not in _VOLATILE_KEYS}
    envs = identity.get("envs")
    if isinstance(envs, dict):
        active = _ENV_SOURCE_SECTIONS.get(envs.get("name"))
        identity["envs"] = {k: v for k, v in envs.items()
                            if k not in _ENV_SOURCE_SECTIONS.values() or k == active}
    algorithm, train = identity.get("algorithm"), identity.get("train")
    if isinstance(algorithm, dict) and isinstance(train, dict) and algorithm.get("use_critic") is False:
        identity["train"] = {k: v for k, v in train.items() if not k.startswith("critic_")}
    return identity


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changed: list[str] = []
        for key in sorted(set(old) | set(new)):
            changed += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return changed
    return [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"] if old != new else []
