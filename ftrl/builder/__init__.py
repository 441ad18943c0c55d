"""LLM environment builder (``envs=llm``): the paper's five stages, quality gates, versioned env sets.

A seed task (a question from ``envs.llm.seed_file``, a QA row with its gold answer from
``envs.llm.seed_source``, or one the LLM writes for a topic in ``envs.llm.topics``; ``seeds``) goes
through

1. scenario decomposition (``stages.decompose``): scenario type, sub-questions with sub-answers and
   their dependencies, final answer (a gold answer, verbatim);
2. document generation (``stages.document``): exactly one OpenAI function schema per sub-question;
3. function integration (``stages.integrate``): overlapping tools merged, n -> m <= n, with the map
   from each sub-question to the tool and call that answers it and ``merged_from``;
4. complexity scaling (``stages.scale``): functional generalisation, parameter expansion,
   parameter-type generalisation and distractor tools, each a knob with a strength (on by default,
   each drawn strategy checked and turned into gate probes by ``scaling``);
5. localized deployment (``stages.deploy``): Python source per tool;

then the quality gates (``gate``) before it is kept. Each stage has a prompt template in
``prompts/`` (overridable from config), its replies are validated against a schema and repaired a
bounded number of times (``llm.StructuredLLM``), and every failure is reported with its reason.
The result is a content-hashed environment set with a manifest and a build report
(``ftrl.envs.sets``); every request is cached, so a re-run costs no LLM call.

    python -m ftrl.builder seed_file=questions.jsonl model=gpt-4o-mini
    python -m ftrl.run stages=[build_envs] envs=llm envs.llm.seed_file=questions.jsonl
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftrl.builder.builder import BuildReport, BuildResult, build_env_set

if TYPE_CHECKING:
    from ftrl.config import RunConfig

__all__ = ["BuildReport", "BuildResult", "build_env_set", "env_source"]


def env_source(cfg: RunConfig) -> dict[str, list[dict[str, Any]]]:
    """``envs=llm``: build (or replay from the cache) an env set; stored under ``envs.sets_dir`` too."""
    return build_env_set(cfg.envs.llm, sets_dir=cfg.envs.sets_dir).as_env_records()
