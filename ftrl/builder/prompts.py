"""Prompt templates of the builder stages: packaged files, user overrides, hashes for the manifest.

One template per stage (``prompts/<stage>.txt``: seed, decompose, document, integrate, scale, deploy,
plus ``repair`` for malformed replies). A template is the user message sent for one item; it uses
``$name`` placeholders (``string.Template``, so JSON braces need no escaping). Overrides come from
``envs.llm.prompts_dir`` (a directory holding any of the files) and ``envs.llm.prompts.<stage>`` (a
file path), the latter winning. Each template's SHA-256 goes into the set's manifest, and since the
rendered text is part of every request's cache key, editing a prompt re-runs exactly the stages that
use it.

    python -c "from ftrl.builder.prompts import load_prompts; print(load_prompts().hashes())"
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
STAGES: tuple[str, ...] = ("seed", "decompose", "document", "integrate", "scale", "deploy", "repair")
# Placeholders each template may use (an override that uses another one fails at load time).
VARIABLES: dict[str, tuple[str, ...]] = {
    "seed": ("topic", "count", "scenarios"),
    "decompose": ("question", "hints", "grounding"),
    "document": ("question", "sub_questions", "count"),
    "integrate": ("question", "tools", "calls"),
    "scale": ("question", "tools", "calls", "strategies", "num_distractors"),
    "deploy": ("tools", "cases", "distractors", "answers"),
    "repair": ("errors",),
}
SYSTEM_PROMPT = (
    "You build executable tool-use environments for training language models. "
    "Follow the instructions exactly and answer with one JSON object."
)


@dataclass(frozen=True)
class Prompt:
    stage: str
    text: str
    source: str  # the file it came from

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, **values: Any) -> str:
        try:
            return string.Template(self.text).substitute({key: str(value) for key, value in values.items()})
        except KeyError as error:
            raise ValueError(
                f"prompt '{self.stage}' ({self.source}) uses ${error.args[0]}, which this stage "
                f"does not provide; valid placeholders: {['$' + v for v in VARIABLES[self.stage]]}"
            ) from None
        except ValueError as error:
            raise ValueError(
                f"prompt '{self.stage}' ({self.source}): {error} (write a literal $ as $$)"
            ) from None


class PromptSet:
    """The templates in use, by stage."""

    def __init__(self, prompts: Mapping[str, Prompt]) -> None:
        self.prompts = dict(prompts)

    def __getitem__(self, stage: str) -> Prompt:
        return self.prompts[stage]

    def hashes(self) -> dict[str, str]:
        return {stage: prompt.sha256 for stage, prompt in self.prompts.items()}


def _check_placeholders(prompt: Prompt) -> None:
    allowed = set(VARIABLES[prompt.stage])
    used = set()
    for match in string.Template.pattern.finditer(prompt.text):
        name = match.group("named") or match.group("braced")
        if name:
            used.add(name)
    unknown = sorted(used - allowed)
    if unknown:
        raise ValueError(
            f"prompt '{prompt.stage}' ({prompt.source}) uses {['$' + u for u in unknown]}; valid "
            f"placeholders: {['$' + v for v in VARIABLES[prompt.stage]]}"
        )


def load_prompts(prompts_dir: str | None = None, overrides: Mapping[str, str] | None = None) -> PromptSet:
    """Packaged templates, replaced by files in ``prompts_dir`` and by per-stage ``overrides`` paths."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(STAGES))
    if unknown:
        raise ValueError(f"envs.llm.prompts: unknown stage(s) {unknown}; valid: {list(STAGES)}")
    directory = Path(prompts_dir).expanduser() if prompts_dir else None
    if directory is not None and not directory.is_dir():
        raise FileNotFoundError(f"envs.llm.prompts_dir: no such directory '{directory}'")
    prompts = {}
    for stage in STAGES:
        path = PROMPT_DIR / f"{stage}.txt"
        if directory is not None and (directory / f"{stage}.txt").is_file():
            path = directory / f"{stage}.txt"
        if stage in overrides:
            path = Path(overrides[stage]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"envs.llm.prompts.{stage}: no such file '{path}'")
        prompt = Prompt(stage, path.read_text(encoding="utf-8"), str(path))
        _check_placeholders(prompt)
        prompts[stage] = prompt
    return PromptSet(prompts)
