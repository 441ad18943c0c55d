"""Metric tracking: console always, Weights & Biases when ``logger=wandb`` (offline by default).

One W&B run per Hydra job, multirun jobs included (each job opens its run and finishes it, also on
errors, before the next job starts):

* **group** = ``logger.wandb.group`` (the experiment's ``name`` by default), so every job of a sweep
  and every stage-set run on the same experiment land side by side;
* **job type** = the stages the job runs: ``pipeline`` for all of them, else the stage names joined
  by ``+`` (``eval``, ``collect+train``);
* **tags** = the chosen option of each config group (``algorithm:grpo``, ``freeze:mlp_only`` ...)
  plus ``logger.wandb.tags``;
* **id** = a hash of the run directory and the job type: re-running the same command resumes the
  same W&B run, while ``stages=[eval]`` on a finished run directory gets its own run in the group.

Offline runs are written to ``<run_dir>/wandb/offline-run-*``; ``python launchers/wandb_sync.py``
uploads them later. Tests never reach W&B: the default logger is ``console``, and
``WANDB_MODE=disabled`` (or ``logger.wandb.mode=disabled``) turns W&B off whatever the logger.

Metric names are shared by both backends, so runs of the native and the verl backend plot on the
same panels (verl's own names are translated by :func:`verl_metrics_to_ftrl`):

=============================  ==============================================================
``trainer/global_step``        training step across rounds (the x-axis to pick in W&B)
``reward/score``               mean per-turn reward of the step's sampled turns
``reward/{calls,solved,...}``  reward parts (native backend; verl logs the score only)
``actor/pg_loss``              policy-gradient loss; also ``actor/kl_loss``, ``actor/entropy``,
                               ``actor/grad_norm``, ``actor/lr``, ``actor/pg_clipfrac``,
                               ``actor/ppo_kl``
``critic/vf_loss``             value loss (PPO); also ``critic/vf_clipfrac``,
                               ``critic/values_mean``, ``critic/grad_norm``
``response/length_mean``       response tokens per sample; ``response/length_max``,
                               ``response/truncated`` (fraction that hit the length limit)
``perf/step_s``                seconds per training step; ``perf/tokens_per_s`` (all devices),
                               ``perf/gen_s`` (rollout seconds)
``collect/<stat>``             one point per collection round
``warmup/loss``                supervised warm start (tiny models)
``eval/<checkpoint>/<metric>`` e.g. ``eval/round3/ftrl_test/solve_f1``; the run summary holds it for
                               every evaluated checkpoint, and ``<metric>`` for the last one
                               (:func:`eval_summary`): the keys of ``summary.json`` and of
                               ``python -m ftrl.report table2`` (which shows them x100)
``verl/<name>``                verl-only diagnostics, under their verl names
=============================  ==============================================================

    python -m ftrl.run logger=wandb +debug=smoke          # offline run under the run directory
    python launchers/wandb_sync.py --dry-run              # list offline runs not yet synced
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from typing_extensions import Self

from ftrl.config import STAGES, RunConfig, to_container

log = logging.getLogger(__name__)

MAX_TAG_LENGTH = 64  # W&B rejects longer tags

# verl metric name -> ftrl metric name, for quantities both backends measure.
VERL_METRIC_NAMES: dict[str, str] = {
    "critic/score/mean": "reward/score",
    "response_length/mean": "response/length_mean",
    "response_length/max": "response/length_max",
    "response_length/clip_ratio": "response/truncated",
    "actor/pg_loss": "actor/pg_loss",
    "actor/kl_loss": "actor/kl_loss",
    "actor/entropy": "actor/entropy",
    "actor/grad_norm": "actor/grad_norm",
    "actor/lr": "actor/lr",
    "actor/pg_clipfrac": "actor/pg_clipfrac",
    "actor/ppo_kl": "actor/ppo_kl",
    "critic/vf_loss": "critic/vf_loss",
    "critic/vf_clipfrac": "critic/vf_clipfrac",
    "critic/values/mean": "critic/values_mean",
    "critic/grad_norm": "critic/grad_norm",
    "perf/time_per_step": "perf/step_s",
    "timing_s/gen": "perf/gen_s",
}


def config_tags(cfg: RunConfig) -> list[str]:
    """The chosen option of each config group, as W&B tags (``algorithm:grpo`` ...)."""
    return [
        f"model:{cfg.model.name}", f"mode:{cfg.mode.name}", f"algorithm:{cfg.algorithm.name}",
        f"reward:{cfg.reward.name}", f"freeze:{cfg.freeze.name}", f"envs:{cfg.envs.name}",
        f"backend:{cfg.backend.name}", f"peft:{cfg.peft.name}", f"train:{cfg.train.name}",
        f"resources:{cfg.resources.name}",
    ]


def job_type_for(stages: Sequence[str]) -> str:
    """``pipeline`` when a job runs every stage, else its stages joined by ``+``."""
    if list(stages) == list(STAGES):
        return "pipeline"
    return "+".join(stages) or "none"


def run_id_for(run_dir: str, job_type: str) -> str:
    """Same run directory and job type -> same W&B id, so a resumed job continues its W&B run."""
    return hashlib.sha1(f"{os.path.abspath(run_dir)}|{job_type}".encode()).hexdigest()[:16]


def run_name_for(cfg: RunConfig, job_type: str) -> str:
    """The run directory's leaf (a multirun job's overrides, e.g. ``freeze=mlp_only``), else the name."""
    leaf = os.path.basename(os.path.normpath(cfg.run_dir))
    name = leaf if leaf and leaf != "base" else cfg.name
    return name if job_type == "pipeline" else f"{name} [{job_type}]"


def wandb_enabled(cfg: RunConfig) -> bool:
    """W&B is on for ``logger=wandb`` unless its mode or ``WANDB_MODE`` says ``disabled``."""
    return (cfg.logger.name == "wandb" and cfg.logger.wandb.mode != "disabled"
            and os.environ.get("WANDB_MODE", "").lower() != "disabled")


def verl_metrics_to_ftrl(metrics: Mapping[str, Any]) -> dict[str, float]:
    """verl's per-step metrics under ftrl's names; the rest kept as ``verl/<name>``.

    ``perf/tokens_per_s`` (all devices, as the native backend reports it) is derived from verl's
    ``perf/total_num_tokens`` and ``perf/time_per_step``; non-numeric values are dropped.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[VERL_METRIC_NAMES.get(key, f"verl/{key}")] = float(value)
    tokens, seconds = metrics.get("perf/total_num_tokens"), metrics.get("perf/time_per_step")
    if isinstance(tokens, (int, float)) and isinstance(seconds, (int, float)) and seconds > 0:
        out["perf/tokens_per_s"] = float(tokens) / float(seconds)
    return out


def read_verl_metrics_file(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(step, metrics)`` per line of verl's ``file`` logger (``VERL_FILE_LOGGER_PATH``) JSONL."""
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield int(row["step"]), dict(row["data"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{line_no}: not a verl file-logger row ({error})") from None


class Tracker:
    """Fan-out of metric logging for one job. ``step`` is the global training step across rounds.

    Use as a context manager (or call :meth:`finish`) so the W&B run is finished with the job's
    exit code even when the job fails.
    """

    def __init__(self, cfg: RunConfig, job_type: str | None = None) -> None:
        self.cfg = cfg
        self.job_type = job_type or job_type_for(cfg.stages)
        self._wandb_run: Any = None
        self.logged = 0  # log calls of this job; 0 after a run whose steps were all done already
        if not wandb_enabled(cfg):
            return
        import wandb

        settings = cfg.logger.wandb
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        tags = [tag[:MAX_TAG_LENGTH] for tag in config_tags(cfg) + list(settings.tags)]
        self._wandb_run = wandb.init(
            project=settings.project, entity=settings.entity, group=settings.group or cfg.name,
            job_type=self.job_type, name=run_name_for(cfg, self.job_type), tags=tags,
            config=to_container(cfg), mode=settings.mode, dir=cfg.run_dir, resume="allow",
            id=run_id_for(cfg.run_dir, self.job_type),
        )
        log.info("wandb: mode=%s project=%s group=%s job_type=%s run=%s dir=%s", settings.mode,
                 settings.project, settings.group or cfg.name, self.job_type, self._wandb_run.id,
                 self._wandb_run.dir)

    @property
    def wandb_run(self) -> Any:
        """The live ``wandb`` run, or None when W&B is off or the run is finished."""
        return self._wandb_run

    @property
    def active(self) -> bool:
        return self._wandb_run is not None

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.logged += 1
        if self._wandb_run is not None:
            # W&B's own step must only grow; stages log at different paces, so the training step
            # travels as a metric (the x-axis to choose in the dashboard) instead.
            payload = dict(metrics)
            if step is not None:
                payload["trainer/global_step"] = step
            self._wandb_run.log(payload)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update(dict(metrics))

    def finish(self, exit_code: int = 0) -> None:
        """Finish the W&B run (idempotent); a non-zero exit code marks it failed."""
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            run.finish(exit_code=exit_code)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.finish(0 if exc_type is None else 1)


def eval_summary(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A W&B run summary for ``{checkpoint: metrics}`` (in checkpoint order): ``eval/<checkpoint>/<key>``
    for each, plus the last checkpoint's metrics under their own keys, as in ``summary.json``."""
    out: dict[str, Any] = {f"eval/{name}/{key}": value for name, metrics in evals.items() for key, value in metrics.items()}
    if evals:
        out.update(list(evals.values())[-1])
    return out


def replay_recorded_metrics(tracker: Tracker, run_dir: Path | str) -> int:
    """Send a finished run's recorded metrics to ``tracker``'s W&B run; returns the rows sent.

    For ``logger=wandb`` added to a run whose steps were all done already: without this the new W&B
    run would be empty. Sends the warm start's and every round's per-step history (``history.jsonl``,
    with ``trainer/global_step``) and each checkpoint's eval metrics, and records in the manifest that
    this W&B run holds them, so a later invocation does not send them twice.
    """
    from ftrl.artifacts import RunDir, read_json, write_json

    rd = RunDir(run_dir)
    run_id = tracker.wandb_run.id if tracker.wandb_run is not None else None
    manifest = read_json(rd.manifest) if rd.manifest.exists() else {}
    if run_id is None or run_id in manifest.get("wandb_replayed", []):
        return 0
    sent = 0
    histories = [rd.warmup_history] + [rd.train_history(k) for k in range(1, 1000) if rd.train_history(k).exists()]
    for path in histories:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                step = row.get("global_step", row.get("step"))
                tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                            step=step if isinstance(step, int) else None)
                sent += 1
    evals = read_json(rd.eval_summary) if rd.eval_summary.exists() else {}
    for name, metrics in evals.items():
        tracker.log({f"eval/{name}/{k}": v for k, v in metrics.items()})
        sent += 1
    if evals:
        tracker.summary(eval_summary(evals))
    manifest.setdefault("wandb_replayed", []).append(run_id)
    write_json(rd.manifest, manifest)
    return sent
