"""Environment sources by name (``envs.name``): each turns the run config into train/test records.

The ``llm`` source lives with the builder (``ftrl.builder.env_source``): it drives LLM engines, a layer above ``envs``.

    python -m ftrl.run stages=[build_envs] envs=procedural
"""

from __future__ import annotations

from typing import Any

from ftrl.config import RunConfig

Records = dict[str, list[dict[str, Any]]]


def procedural(cfg: RunConfig) -> Records:
    """Generated environments; their build report (per-strategy scaling counts, gate rejections by
    reason, in words and with examples) becomes ``source_manifest.build`` of ``envs/manifest.json``."""
    import logging

    from ftrl.envs.procedural import generate_envs
    from ftrl.envs.sets import EnvRecords

    build = generate_envs(cfg.envs.procedural, seed=cfg.seed)
    logging.getLogger(__name__).info(build.report.summary())
    return EnvRecords(build.records, {"source": "procedural", "build": build.report.manifest()})


def ftrl_files(cfg: RunConfig) -> Records:
    """Reference files, loaded unvalidated: ``build_envs``'s gate checks (and drops or refuses) each record.

    The result carries ``locations`` (each record's ``file:line``) for the gate's report.
    """
    from ftrl.envs.io import load_ftrl_files
    from ftrl.envs.sets import EnvRecords

    locations: dict[str, list[str]] = {}
    records = EnvRecords(load_ftrl_files(cfg.envs.files, validate=False, locations=locations))
    records.locations = locations  # type: ignore[attr-defined]
    return records


def env_set(cfg: RunConfig) -> Records:
    """Stored env sets mixed by weight (``envs.mix``)."""
    from ftrl.envs.sets import mix_sets

    return mix_sets(dict(cfg.envs.mix), cfg.envs.sets_dir, seed=cfg.envs.mix_seed)


def taubench(cfg: RunConfig) -> Records:
    """tau-bench tasks as stateful environments (data from envs.taubench.data_dir or FTRL_DATA_DIR)."""
    import dataclasses
    import logging

    from ftrl.envs.sets import EnvRecords
    from ftrl.envs.taubench import build_taubench_envs

    tau = cfg.envs.taubench
    if tau.data_dir is None and cfg.eval.data_dir is not None:
        tau = dataclasses.replace(tau, data_dir=cfg.eval.data_dir)
    records, report = build_taubench_envs(tau, timeout=cfg.reward.tool_timeout_s)
    logging.getLogger(__name__).info(report.summary())
    return EnvRecords(records, {"source": "taubench", "domains": list(tau.domains), "import": vars(report)})
