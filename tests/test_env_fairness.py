"""Distractors give nothing away: position-only and name-style-only policies score at chance.

Over 400 environments of the default procedural config (every environment has 1-2 distractors), a
policy scores 1 when the tool it calls answers a sub-question (is in ``unsolved_set``) and 0 when it
is a distractor. Chance is a uniformly random pick of one of the environment's tools: per
environment p_i = answering / tools, averaged over the set (0.59 here: 3.8 tools, 1.4 of them
distractors, on average). A policy that uses only where a tool is listed, or only how its name and
parameters look, must stay within 4 standard errors of that chance level; the standard error comes
from the data, sqrt(sum p_i (1 - p_i)) / N (0.023 for these N = 400, so the margin is 0.094; 0.13
on the 200 held-out environments of the style learner). The same checks on the old layout
(distractors listed last; distractor getters beside info tools) fail, which shows they can.

    python -m pytest tests/test_env_fairness.py -q
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence

import pytest

from ftrl.config import ProceduralConfig
from ftrl.envs.procedural import generate_envs

# An environment as the policies see it: its tools in listed order, each (schema, answers?).
Env = list[tuple[dict, bool]]


@pytest.fixture(scope="module")
def envs() -> list[Env]:
    records = generate_envs(ProceduralConfig(num_train=400, num_test=0), seed=11).records["train"]
    out = []
    for record in records:
        answering = set(json.loads(record["unsolved_set"]))
        out.append([(t["function"], t["function"]["name"] in answering) for t in json.loads(record["tools"])])
    return out


def chance_and_margin(envs: Sequence[Env]) -> tuple[float, float]:
    """Mean chance level, and 4 standard errors of a policy's mean score around it."""
    p = [sum(answers for _, answers in env) / len(env) for env in envs]
    return sum(p) / len(p), 4 * math.sqrt(sum(q * (1 - q) for q in p)) / len(p)


def position_score(envs: Sequence[Env], k: int) -> float:
    """Always call the tool at position k (counted from the end when negative; clipped to the list)."""
    return sum(env[max(-len(env), min(k, len(env) - 1))][1] for env in envs) / len(envs)


def style(tool: dict) -> tuple:
    """What a tool looks like without reading what it is about: name pattern and parameter shape.

    The name with its entity and field words abstracted, the parameters after the id, whether the id
    takes several types, the required parameters after the id. (Whether the id is a number or a
    code belongs to the entity, i.e. to what the tool is about, not to its style.)
    """
    properties = tool["parameters"]["properties"]
    first = next(iter(properties.values()))
    pattern = "get_<entity>_info" if re.fullmatch(r"get_[a-z]+_info", tool["name"]) else "get_<entity>_<field>"
    return (pattern, tuple(list(properties)[1:]), isinstance(first["type"], list),
            tuple(tool["parameters"]["required"][1:]))


def learn_style_ranking(train: Sequence[Env]) -> list[tuple]:
    """A style-only learner: styles ordered by how often a tool of that style answered in ``train``."""
    seen: dict[tuple, list[int]] = {}
    for env in train:
        for tool, answers in env:
            seen.setdefault(style(tool), []).append(answers)
    return sorted(seen, key=lambda s: (-sum(seen[s]) / len(seen[s]), str(s)))


def style_score(envs: Sequence[Env], ranking: Sequence[tuple]) -> float:
    """Expected score of: call a uniformly random tool of the best-ranked style the environment offers."""
    total = 0.0
    for env in envs:
        styles = {style(tool) for tool, _ in env}
        wanted = next((s for s in ranking if s in styles), None)
        matching = [answers for tool, answers in env if style(tool) == wanted] or [answers for _, answers in env]
        total += sum(matching) / len(matching)
    return total / len(envs)


def test_the_set_has_distractors_to_find(envs: list[Env]) -> None:
    chance, margin = chance_and_margin(envs)
    assert all(1 <= sum(not answers for _, answers in env) <= 2 for env in envs)
    assert 0.5 < chance < 0.7 and margin < 0.12, (chance, margin)


@pytest.mark.parametrize("k", [0, 1, 2, -1, -2])
def test_a_position_only_policy_scores_at_chance(envs: list[Env], k: int) -> None:
    chance, margin = chance_and_margin(envs)
    score = position_score(envs, k)
    assert abs(score - chance) <= margin, f"position {k}: score {score:.3f}, chance {chance:.3f} +- {margin:.3f}"


def test_a_name_style_only_policy_scores_at_chance(envs: list[Env]) -> None:
    train, held_out = envs[:200], envs[200:]
    ranking = learn_style_ranking(train)
    chance, margin = chance_and_margin(held_out)
    score = style_score(held_out, ranking)
    assert abs(score - chance) <= margin, f"styles {ranking[:2]}: score {score:.3f}, chance {chance:.3f} +- {margin:.3f}"
    # Stronger: within every environment all tools look alike, so no style-only rule can do better.
    assert all(len({style(tool) for tool, _ in env}) == 1 for env in envs)


def _relabelled(envs: Sequence[Env], change: Callable[[Env], Env]) -> list[Env]:
    return [change(list(env)) for env in envs]


def test_the_checks_catch_the_old_layout(envs: list[Env]) -> None:
    chance, margin = chance_and_margin(envs)
    # Distractors listed after the answering tools: position 0 always answers.
    last = _relabelled(envs, lambda env: sorted(env, key=lambda item: not item[1]))
    assert position_score(last, 0) > chance + margin
    # Getter-style distractors beside info tools: the info pattern gives the answering tools away.
    def getters(env: Env) -> Env:
        return [(tool if answers or not tool["name"].endswith("_info")
                 else {**tool, "name": tool["name"].replace("_info", "_fee")}, answers) for tool, answers in env]
    old = _relabelled(envs, getters)
    general = [env for env in old if any(tool["name"].endswith("_info") for tool, _ in env)]
    chance_general, margin_general = chance_and_margin(general)
    assert style_score(general, learn_style_ranking(general)) > chance_general + margin_general
