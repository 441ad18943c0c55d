"""Offline environment builder: templated tool-use tasks in the FTRL reference format, no LLM.

Each environment is a small world of look-up tables (orders, products, users, warehouses,
suppliers, flights, cities) and a templated question whose sub-questions are answered by tool
calls. The four FTRL scenarios are built from *chains* of look-ups:

- Single-Hop: one chain of one call ("What is the price of product P73?");
- Parallel Single-Hop: 2..``max_parallel`` one-call chains answered in one turn (answer "a, b");
- Multi-Hop: one chain of 2..``max_hops`` calls where each output holds the next call's argument
  ("What is the city of the warehouse of product P73?"), the answer is the last sub-answer;
- Parallel Multi-Hop: two multi-hop chains run side by side (answer "a, b").

Every argument is a number or a short upper-case code that appears literally in the question or in
an earlier tool output, and every sub-answer is a short code or number, because a ~1M-parameter
model learns to copy ids but not to resolve entity names (docs/reference.md §9). The complexity-scaling knobs
of :class:`ftrl.config.ProceduralConfig` (on by default: ``ftrl.config.ScalingDefaults``) change the
tools, not the questions: functional generalisation (``get_order_info(order_id, field)`` instead of
``get_order_product(order_id)``), parameter expansion (a required ``fmt`` and an optional
``verbose``), parameter-type generalisation (ids as number or string, or a list of ids) and
distractor tools. Distractors are styled like the answering tools (getters of columns nobody asked
about beside getters, info tools of untouched entities beside info tools), and every environment
lists its tools in a seeded random order, so neither position nor naming style gives them away.

With ``id_pool_size`` set, every id, code and number comes from a fixed pool per kind shared by all
environments of a build (a small world vocabulary; each environment still wires the values into
fresh tables, so nothing can be answered from memory).

Before an environment is kept, :func:`scaling_problem` checks that every strategy drawn for it is
visible in its tools, and the shared build-time gate (:func:`ftrl.envs.gate.gate_candidates`) runs
it through the sandbox: gold calls deterministic and solving every sub-question under the reward's
rules, no sub-answer that matches by accident or leaks into another hop's output, one invalid call
per tool failing with an error that names the bad parameter or value, distractors answering
nothing, and case/space variants of string ids, every alternative id type, the array form, ``fmt``
and ``verbose`` working. :class:`BuildReport` counts the kept environments per strategy and the
rejections per reason (in words, with examples); ``envs=procedural`` puts it into
``envs/manifest.json`` (``source_manifest.build``). Each record carries one extra field,
``gold_calls``: the gold trajectory as a JSON list of turns, each a list of ``{"name", "arguments"}``
(used by the supervised warm start; never in reference exports, see ``ftrl.envs.sets export``).

    python -m ftrl.envs.procedural --num-train 20 --num-test 5 --out /tmp/envs   # + report.json
    python -m pytest tests/test_procedural.py -q
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftrl.config import ConfigError, ProceduralConfig
from ftrl.envs import gate as env_gate
from ftrl.envs import sandbox
from ftrl.errors import unknown_choice_message
from ftrl.types import SCENARIOS, SPLITS, TOOL_ERROR_PREFIX

log = logging.getLogger(__name__)

GATE_TIMEOUT_S = 10.0
DECOY_ROWS = (2, 3)  # look-up rows per table besides the ones the question needs (min, max)

# Scenario config keys (ProceduralConfig.scenario_weights: "single_hop", ..., "parallel_multi_hop")
# -> data_source names.
SCENARIO_KEYS: dict[str, str] = {name.lower().replace(" ", "_").replace("-", "_"): name for name in SCENARIOS}

# Gate rejection reasons (counted in BuildReport.rejected; REASONS says each in words). The sandbox
# checks are the shared build-time gate's (ftrl.envs.gate.gate_candidates), also used by ftrl.builder.
Candidate = env_gate.Candidate
GOLD_CALL_ERROR = env_gate.GOLD_CALL_ERROR
GOLD_UNSOLVED = env_gate.GOLD_UNSOLVED
TOOL_TIMEOUT = env_gate.TOOL_TIMEOUT
ANSWER_UNREACHABLE = env_gate.ANSWER_UNREACHABLE
NONDETERMINISTIC = env_gate.NONDETERMINISTIC
ACCIDENTAL_MATCH = env_gate.ACCIDENTAL_MATCH
HOP_LEAK = env_gate.HOP_LEAK
INVALID_CALL_ACCEPTED = env_gate.INVALID_CALL_ACCEPTED
INVALID_CALL_LEAKS = env_gate.INVALID_CALL_LEAKS
ERROR_UNINFORMATIVE = env_gate.ERROR_UNINFORMATIVE
DISTRACTOR_BROKEN = env_gate.DISTRACTOR_BROKEN
DISTRACTOR_ANSWERS = env_gate.DISTRACTOR_ANSWERS
VARIANT_FAILS = env_gate.VARIANT_FAILS
SCALED_FEATURE_FAILS = env_gate.SCALED_FEATURE_FAILS
SCALING_NOT_APPLIED = "scaling_not_applied"
DUPLICATE_QUESTION = "duplicate_question"
SHARES_TRAIN_IDS = "test_reuses_train_ids"
POOL_EXHAUSTED = "value_pool_exhausted"
REASONS: dict[str, str] = {
    **env_gate.REASONS,
    SCALING_NOT_APPLIED: "a complexity-scaling strategy drawn for the environment is missing from its tools",
    DUPLICATE_QUESTION: "the question was already generated",
    SHARES_TRAIN_IDS: "a test question asks what a train question asks",
    POOL_EXHAUSTED: "the value pool ran out of distinct values for the environment",
}
STRATEGIES: tuple[str, ...] = ("functional_generalization", "parameter_expansion", "parameter_type_generalization",
                               "distractors")
MAX_EXAMPLES = 3  # rejected candidates shown per reason in the build report


# ------------------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class Field:
    """One column of an entity table: ``key`` in outputs, ``noun`` in questions."""

    key: str
    noun: str
    ref: str | None = None   # entity whose id this column holds (a hop to the next table)
    kind: str | None = None  # value kind of a terminal column


@dataclass(frozen=True)
class Entity:
    name: str
    id_key: str
    id_kind: str
    id_doc: str  # how an id looks, for parameter descriptions
    fields: tuple[Field, ...]

    @property
    def plural(self) -> str:
        return self.name[:-1] + "ies" if self.name.endswith("y") else self.name + "s"

    @property
    def article(self) -> str:
        return "an" if self.name[0] in "aeiou" else "a"


ENTITIES: dict[str, Entity] = {
    entity.name: entity
    for entity in (
        Entity("order", "order_id", "order_id", "4-digit order id", (
            Field("product_id", "product", ref="product"),
            Field("customer_id", "customer", ref="user"),
            Field("total", "total", kind="number"),
        )),
        Entity("product", "product_id", "product_id", "product id, P and 2 digits", (
            Field("warehouse_id", "warehouse", ref="warehouse"),
            Field("supplier_id", "supplier", ref="supplier"),
            Field("price", "price", kind="number"),
        )),
        Entity("user", "user_id", "user_id", "user id, U and 3 digits", (
            Field("city_code", "city", ref="city"),
            Field("points", "points", kind="number"),
        )),
        Entity("warehouse", "warehouse_id", "warehouse_id", "warehouse id, W and 2 digits", (
            Field("city_code", "city", ref="city"),
            Field("capacity", "capacity", kind="number"),
        )),
        Entity("supplier", "supplier_id", "supplier_id", "supplier id, S and 2 digits", (
            Field("city_code", "city", ref="city"),
            Field("fee", "fee", kind="number"),
        )),
        Entity("flight", "flight_id", "flight_id", "flight id, F and 3 digits", (
            Field("origin", "origin", ref="city"),
            Field("destination", "destination", ref="city"),
            Field("gate", "gate", kind="gate"),
            Field("seats", "seats", kind="number"),
        )),
        Entity("city", "city_code", "city_code", "3-letter city code", (
            Field("region", "region", kind="region"),
            Field("timezone", "timezone", kind="timezone"),
        )),
    )
}

# Code prefixes of string ids; parameter-type generalisation accepts the bare number as well.
ID_PREFIXES: dict[str, str] = {"product_id": "P", "user_id": "U", "warehouse_id": "W", "supplier_id": "S",
                               "flight_id": "F"}
_CONSONANTS = "BCDFGHJKLMNPQRSTVWXZ"
_VALUE_DRAWS: dict[str, Callable[[random.Random], Any]] = {
    "order_id": lambda rng: rng.randint(1000, 9999),
    "product_id": lambda rng: f"P{rng.randint(10, 99)}",
    "user_id": lambda rng: f"U{rng.randint(100, 999)}",
    "warehouse_id": lambda rng: f"W{rng.randint(10, 99)}",
    "supplier_id": lambda rng: f"S{rng.randint(10, 99)}",
    "flight_id": lambda rng: f"F{rng.randint(100, 999)}",
    "city_code": lambda rng: "".join(rng.choice(_CONSONANTS) for _ in range(3)),
    "number": lambda rng: rng.randint(100, 999),
    "gate": lambda rng: f"G{rng.randint(10, 99)}",
    "region": lambda rng: f"R{rng.randint(10, 99)}",
    "timezone": lambda rng: f"UTC{rng.choice('+-')}{rng.randint(1, 9)}",
}

# Fixed words that tool outputs and error messages can contain. A drawn value that occurs inside
# them (a city code "STR" inside "must be a string") would let a failed call "verify" as a
# sub-answer, so such draws are redrawn.
_OUTPUT_WORDS = " ".join(
    [TOOL_ERROR_PREFIX, "unknown this tool knows such as must be an integer a string of digits or got list empty",
     "valid fields fmt json text verbose true false source table none bool int str dict float",
     "missing required positional argument arguments keyword unexpected takes were given object",
     "is not subscriptable callable has no attribute"]
    + [f"get_{e.name}_{f.noun} get_{e.name}_info {e.plural} {e.id_key} {f.key}"
       for e in ENTITIES.values() for f in e.fields]
).lower()


@functools.cache
def _chain_paths(length: int) -> tuple[tuple[tuple[str, Field], ...], ...]:
    """Every sequence of ``length`` look-ups where each non-final one returns the next one's id."""
    paths: list[tuple[tuple[str, Field], ...]] = []

    def extend(path: tuple[tuple[str, Field], ...]) -> None:
        if len(path) == length:
            paths.append(path)
            return
        last_field = path[-1][1]
        if last_field.ref is None:
            return
        for next_field in ENTITIES[last_field.ref].fields:
            extend(path + ((last_field.ref, next_field),))

    for entity in ENTITIES.values():
        for first in entity.fields:
            extend(((entity.name, first),))
    return tuple(paths)


MAX_CHAIN = max(n for n in range(1, 10) if _chain_paths(n))


NUMBER_POOL_FACTOR = 4


class PoolExhausted(RuntimeError):
    """An environment needs more distinct values of a kind than its pool (or the value space) holds."""


def _check_pool_size(size: int | None) -> int | None:
    if size is not None and size < 8:
        raise ConfigError(f"envs.procedural.id_pool_size: must be null or >= 8, got {size}")
    return size


def value_pools(size: int, seed: int) -> dict[str, list[Any]]:
    """A fixed set of at most ``size`` values per kind (numbers: 4x), shared by every environment of a build.

    With pools, train and test draw ids and answers from the same small world vocabulary (each
    environment still wires them into fresh tables), so a tokenizer fitted to the train split covers
    the test split's values too. No pooled value (lower-cased) occurs inside another one or inside
    the fixed output words, so each stays a clean unit of text.
    """
    rng = random.Random(f"value-pools-{seed}")
    pools: dict[str, list[Any]] = {}
    texts: list[str] = []
    for kind in sorted(_VALUE_DRAWS):
        # Every table row holds a number, so an environment needs several times more of them.
        wanted = size * NUMBER_POOL_FACTOR if kind == "number" else size
        values: list[Any] = []
        for _ in range(200 * wanted):
            if len(values) == wanted:
                break
            value = _VALUE_DRAWS[kind](rng)
            text = str(value).lower()
            if text in _OUTPUT_WORDS or any(text in seen or seen in text for seen in texts):
                continue
            texts.append(text)
            values.append(value)
        pools[kind] = values
    return pools


class _World:
    """One environment's tables: entity -> id -> row, with every drawn value distinct.

    Distinct means more than unequal: no value (lower-cased) occurs inside another, so a tool output
    verifies against a sub-answer only if it really holds that value.
    """

    def __init__(self, rng: random.Random, pools: Mapping[str, Sequence[Any]] | None = None) -> None:
        self.rng = rng
        self.pools = pools
        self.rows: dict[str, dict[Any, dict[str, Any]]] = {}
        self._texts: list[str] = []

    def draw(self, kind: str) -> Any:
        for _ in range(1000):
            value = self.rng.choice(self.pools[kind]) if self.pools else _VALUE_DRAWS[kind](self.rng)
            text = str(value).lower()
            if text in _OUTPUT_WORDS or any(text in seen or seen in text for seen in self._texts):
                continue
            self._texts.append(text)
            return value
        raise PoolExhausted(f"could not draw a distinct '{kind}' value in 1000 tries")

    def add_row(self, entity_name: str, row_id: Any = None) -> Any:
        entity = ENTITIES[entity_name]
        row_id = self.draw(entity.id_kind) if row_id is None else row_id
        row = {f.key: self.draw(ENTITIES[f.ref].id_kind if f.ref else f.kind) for f in entity.fields}
        self.rows.setdefault(entity_name, {})[row_id] = row
        return row_id


# ------------------------------------------------------------------------------------ tool specs
@dataclass(frozen=True)
class _Tool:
    name: str
    entity: str
    field_key: str | None  # the one column a single-purpose getter returns; None when general
    general: bool
    expanded: bool
    typed: bool  # parameter-type generalisation

    @property
    def spec(self) -> Entity:
        return ENTITIES[self.entity]


def _tool_for(entity: str, field_obj: Field, general: bool, expanded: bool, typed: bool) -> _Tool:
    if general:
        return _Tool(f"get_{entity}_info", entity, None, True, expanded, typed)
    return _Tool(f"get_{entity}_{field_obj.noun}", entity, field_obj.key, False, expanded, typed)


def _tool_schema(tool: _Tool) -> dict[str, Any]:
    entity = tool.spec
    if tool.typed:
        # Numbered ids also come as the bare number (P73 as 73) or, order ids, as a string of digits.
        numbered = entity.id_kind in ID_PREFIXES or entity.id_kind == "order_id"
        item_types: list[str] = ["integer", "string"] if numbered else ["string"]
        also = (" (a string of digits works too)" if entity.id_kind == "order_id"
                else " (the bare number works too)" if numbered else "")
        id_param = {"type": item_types + ["array"], "items": {"type": item_types if numbered else "string"},
                    "description": f"{entity.id_doc}{also}, or a list of them"}
    else:
        id_type = "integer" if entity.id_kind == "order_id" else "string"
        id_param = {"type": id_type, "description": entity.id_doc}
    properties: dict[str, Any] = {entity.id_key: id_param}
    required = [entity.id_key]
    if tool.general:
        description = f"Get one field of {entity.article} {entity.name}."
        properties["field"] = {"type": "string", "enum": [f.key for f in entity.fields],
                               "description": "field to return"}
        required.append("field")
    else:
        noun = next(f.noun for f in entity.fields if f.key == tool.field_key)
        description = f"Get the {noun} of {entity.article} {entity.name}."
    if tool.expanded:
        properties["fmt"] = {"type": "string", "enum": ["json", "text"], "description": "output format"}
        properties["verbose"] = {"type": "boolean", "description": "also return the data source"}
        required.append("fmt")
    return {"type": "function", "function": {
        "name": tool.name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def _key_check_lines(entity: Entity, typed: bool) -> list[str]:
    """Source lines (inside ``lookup(key)``) that validate and normalise an id argument."""
    name = entity.id_key
    if entity.id_kind == "order_id":
        if typed:
            return ["if isinstance(key, str) and key.strip().isdigit():",
                    "    key = int(key)",
                    "if isinstance(key, bool) or not isinstance(key, int):",
                    (f"    raise TypeError(f\"{name} must be a number or a string of digits, "
                     "got {type(key).__name__} {key!r}\")")]
        return ["if isinstance(key, bool) or not isinstance(key, int):",
                f"    raise TypeError(f\"{name} must be an integer, got {{type(key).__name__}} {{key!r}}\")"]
    if typed:
        lines = []
        if entity.id_kind in ID_PREFIXES:
            lines += ["if isinstance(key, int) and not isinstance(key, bool):",
                      f"    key = \"{ID_PREFIXES[entity.id_kind]}\" + str(key)"]
        kinds = "a string or a number" if entity.id_kind in ID_PREFIXES else "a string"
        return lines + ["if not isinstance(key, str):",
                        f"    raise TypeError(f\"{name} must be {kinds}, got {{type(key).__name__}} {{key!r}}\")",
                        "key = key.strip().upper()"]
    return ["if not isinstance(key, str):",
            f"    raise TypeError(f\"{name} must be a string, got {{type(key).__name__}} {{key!r}}\")",
            "key = key.strip().upper()"]


def _tool_source(tool: _Tool, table: dict[Any, Any]) -> str:
    """Python source of a self-contained tool: its own table literal, argument checks, the look-up."""
    entity = tool.spec
    id_key = entity.id_key
    params = [id_key] + (["field"] if tool.general else []) + (["fmt", "verbose=False"] if tool.expanded else [])
    description = _tool_schema(tool)["function"]["description"]
    lines = [f"def {tool.name}({', '.join(params)}):", f'    """{description}"""', f"    table = {table!r}"]
    if tool.general:
        lines += [f"    fields = {tuple(f.key for f in entity.fields)!r}",
                  "    if field not in fields:",
                  "        raise ValueError(f\"unknown field {field!r}; valid fields: {', '.join(fields)}\")"]
    if tool.expanded:
        lines += ["    if fmt not in ('json', 'text'):",
                  "        raise ValueError(f\"fmt must be 'json' or 'text', got {fmt!r}\")",
                  "    if not isinstance(verbose, bool):",
                  "        raise TypeError(f\"verbose must be true or false, got {verbose!r}\")"]
    lines += ["", "    def lookup(key):"]
    lines += ["        " + line for line in _key_check_lines(entity, tool.typed)]
    lines += ["        if key not in table:",
              (f"            raise ValueError(f\"unknown {id_key} {{key!r}}; this tool knows {entity.plural} "
               "such as {next(iter(table))!r}\")")]
    if tool.general:
        lines += [f"        result = {{{id_key!r}: key, field: table[key][field]}}"]
    else:
        lines += [f"        result = {{{id_key!r}: key, {tool.field_key!r}: table[key]}}"]
    if tool.expanded:
        lines += ["        if verbose:", f"            result['source'] = '{entity.name} table'"]
    lines += ["        return result", ""]
    if tool.typed:
        lines += [f"    if isinstance({id_key}, list):",
                  f"        if not {id_key}:",
                  f"            raise ValueError('{id_key} is an empty list')",
                  f"        results = [lookup(key) for key in {id_key}]",
                  "    else:",
                  f"        results = lookup({id_key})"]
    else:
        lines += [f"    results = lookup({id_key})"]
    if tool.expanded:
        lines += ["    if fmt == 'text':",
                  "        rows = results if isinstance(results, list) else [results]",
                  "        return '\\n'.join('; '.join(f'{k}: {v}' for k, v in row.items()) for row in rows)"]
    lines += ["    return results", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class Hop:
    """One gold look-up: ``tool(arg)`` answers ``answer`` (the ``field`` of ``entity`` row ``arg``)."""

    entity: str
    field: Field
    arg: Any
    answer: Any


@dataclass(frozen=True)
class _Settings:
    """ProceduralConfig, checked once (errors name the config key)."""

    weights: dict[str, float]
    max_hops: int
    max_parallel: int
    functional_generalization: float
    parameter_expansion: float
    parameter_type_generalization: float
    min_distractors: int
    max_distractors: int
    gate_timeout_s: float
    id_pool_size: int | None = None

    @classmethod
    def from_config(cls, cfg: ProceduralConfig) -> _Settings:
        key = "envs.procedural"
        weights: dict[str, float] = {}
        for name, weight in dict(cfg.scenario_weights).items():
            if name not in SCENARIO_KEYS:
                raise ConfigError(f"{key}.scenario_weights: "
                                  f"{unknown_choice_message('scenario', name, list(SCENARIO_KEYS))}")
            if weight is None or float(weight) < 0:
                raise ConfigError(f"{key}.scenario_weights.{name}: must be >= 0, got {weight!r}")
            weights[SCENARIO_KEYS[name]] = float(weight)
        if sum(weights.values()) <= 0:
            raise ConfigError(f"{key}.scenario_weights: at least one weight must be > 0, got {weights}")
        multi_hop = weights.get("Multi-Hop", 0) > 0 or weights.get("Parallel Multi-Hop", 0) > 0
        if multi_hop and not 2 <= cfg.max_hops <= MAX_CHAIN:
            raise ConfigError(f"{key}.max_hops: must be in [2, {MAX_CHAIN}] (the longest chain of look-ups, "
                              f"order -> product -> warehouse -> city -> region), got {cfg.max_hops}")
        if weights.get("Parallel Single-Hop", 0) > 0 and cfg.max_parallel < 2:
            raise ConfigError(f"{key}.max_parallel: must be >= 2 for Parallel Single-Hop, got {cfg.max_parallel}")
        for name in ("functional_generalization", "parameter_expansion", "parameter_type_generalization"):
            value = getattr(cfg, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}.{name}: must be a probability in [0, 1], got {value}")
        if not 0 <= cfg.min_distractors <= cfg.max_distractors:
            raise ConfigError(f"{key}.min_distractors/max_distractors: need 0 <= min <= max, got "
                              f"{cfg.min_distractors}, {cfg.max_distractors}")
        for name in ("num_train", "num_test"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(cfg, name)}")
        return cls(weights, cfg.max_hops, cfg.max_parallel, cfg.functional_generalization,
                   cfg.parameter_expansion, cfg.parameter_type_generalization, cfg.min_distractors,
                   cfg.max_distractors, float(getattr(cfg, "gate_timeout_s", GATE_TIMEOUT_S)),
                   _check_pool_size(getattr(cfg, "id_pool_size", None)))


_SINGULAR_TEMPLATES = ("What is {}?", "Find {}.", "Look up {}.")
_PLURAL_TEMPLATES = ("What are {}?", "Find {}.", "Look up {}.")


def _phrase(chain: Sequence[Hop]) -> str:
    """``the city of the warehouse of product P73`` for a chain rooted at product P73."""
    text = f"{chain[0].entity} {chain[0].arg}"
    for hop in chain:
        text = f"the {hop.field.noun} of {text}"
    return text


def _question(chains: Sequence[Sequence[Hop]], rng: random.Random) -> str:
    phrases = [_phrase(chain) for chain in chains]
    if len(phrases) == 1:
        return rng.choice(_SINGULAR_TEMPLATES).format(phrases[0])
    joined = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return rng.choice(_PLURAL_TEMPLATES).format(joined)


def _chain_lengths(scenario: str, settings: _Settings, rng: random.Random) -> list[int]:
    if scenario == "Single-Hop":
        return [1]
    if scenario == "Parallel Single-Hop":
        return [1] * rng.randint(2, settings.max_parallel)
    if scenario == "Multi-Hop":
        return [rng.randint(2, settings.max_hops)]
    return [rng.randint(2, settings.max_hops) for _ in range(2)]


def _call(tool: _Tool, arg: Any, field_key: str | None) -> dict[str, Any]:
    arguments: dict[str, Any] = {tool.spec.id_key: arg}
    if tool.general:
        arguments["field"] = field_key
    if tool.expanded:
        arguments["fmt"] = "json"
    return {"name": tool.name, "arguments": arguments}


def _build_chains(scenario: str, settings: _Settings, world: _World, rng: random.Random) -> list[list[Hop]]:
    """The scenario's look-up chains; each hop's answer is the id the next hop looks up."""
    chains: list[list[Hop]] = []
    for length in _chain_lengths(scenario, settings, rng):
        path = rng.choice(_chain_paths(length))
        row_id = world.add_row(path[0][0])
        chain = []
        for index, (entity, field_obj) in enumerate(path):
            answer = world.rows[entity][row_id][field_obj.key]
            chain.append(Hop(entity, field_obj, row_id, answer))
            if index + 1 < len(path):
                row_id = world.add_row(path[index + 1][0], row_id=answer)
        chains.append(chain)
    return chains


def _pick_distractors(chains: list[list[Hop]], needed: Mapping[str, _Tool], settings: _Settings,
                      rng: random.Random, general: bool, expanded: bool, typed: bool) -> tuple[list[_Tool], int]:
    """Distractors styled like the answering tools, and the size of the pool they were drawn from.

    With single-purpose getters (``get_<entity>_<field>``), getters of columns nobody asked about;
    with general tools (``get_<entity>_info``), the info tools of entities the task does not touch.
    Either way a distractor has the answering tools' name pattern and parameters, so only reading
    the question and the documents tells it apart.
    """
    asked = {(hop.entity, hop.field.key) for chain in chains for hop in chain}
    touched = {tool.entity for tool in needed.values()}
    pool = []
    for entity in ENTITIES.values():
        if general:
            if entity.name not in touched:
                pool.append(_tool_for(entity.name, entity.fields[0], True, expanded, typed))
            continue
        for field_obj in entity.fields:
            getter = _tool_for(entity.name, field_obj, False, expanded, typed)
            if (entity.name, field_obj.key) not in asked and getter.name not in needed:
                pool.append(getter)
    count = min(rng.randint(settings.min_distractors, settings.max_distractors), len(pool))
    return rng.sample(pool, count), len(pool)


def _invalid_calls(tools: Sequence[_Tool], world: _World) -> list[dict[str, Any]]:
    """One call per tool that must fail: unknown id, wrong type, missing id (or unknown field), in turn."""
    calls = []
    for index, tool in enumerate(tools):
        id_key = tool.spec.id_key
        known_id = next(iter(world.rows[tool.entity]))
        call = _call(tool, known_id, tool.spec.fields[0].key)
        mistakes = ("unknown_id", "wrong_type", "missing_argument") + (("unknown_field",) if tool.general else ())
        mistake = mistakes[index % len(mistakes)]
        if mistake == "unknown_id":
            call["arguments"][id_key] = world.draw(tool.spec.id_kind)
        elif mistake == "wrong_type":
            call["arguments"][id_key] = {"id": known_id}
        elif mistake == "missing_argument":
            del call["arguments"][id_key]
        else:
            call["arguments"]["field"] = "name"
        calls.append(call)
    return calls


def _distractor_calls(distractors: Sequence[_Tool], chains: list[list[Hop]], world: _World) -> list[dict[str, Any]]:
    """The calls a confused model would make: a distractor applied to the ids the task involves."""
    task_ids: dict[str, list[Any]] = {}
    for chain in chains:
        for hop in chain:
            task_ids.setdefault(hop.entity, []).append(hop.arg)
    calls = []
    for tool in distractors:
        for arg in task_ids.get(tool.entity, [next(iter(world.rows[tool.entity]))])[:2]:
            calls.append(_call(tool, arg, tool.spec.fields[0].key))
    return calls


def sample_candidate(scenario: str, cfg: ProceduralConfig | _Settings, rng: random.Random,
                     pools: Mapping[str, Sequence[Any]] | None = None) -> Candidate:
    """Draw one environment of ``scenario`` (a data_source name) with the knobs of ``cfg``.

    ``pools`` (from :func:`value_pools`) restricts every drawn value to a fixed set per kind. The
    tools are listed in a seeded random order: where a tool sits says nothing about whether it answers.
    """
    settings = cfg if isinstance(cfg, _Settings) else _Settings.from_config(cfg)
    if scenario not in SCENARIOS:
        raise ValueError(unknown_choice_message("scenario", scenario, list(SCENARIOS)))
    general = rng.random() < settings.functional_generalization
    expanded = rng.random() < settings.parameter_expansion
    typed = rng.random() < settings.parameter_type_generalization
    world = _World(rng, pools)
    chains = _build_chains(scenario, settings, world, rng)

    def tool_of(hop: Hop) -> _Tool:
        return _tool_for(hop.entity, hop.field, general, expanded, typed)

    needed: dict[str, _Tool] = {}  # in first-use order
    unsolved_set: dict[str, list[str]] = {}
    for chain in chains:
        for hop in chain:
            needed.setdefault(tool_of(hop).name, tool_of(hop))
            unsolved_set.setdefault(tool_of(hop).name, []).append(str(hop.answer))
    distractors, pool_size = _pick_distractors(chains, needed, settings, rng, general, expanded, typed)
    all_tools = list(needed.values()) + distractors
    rng.shuffle(all_tools)
    for entity_name in dict.fromkeys(tool.entity for tool in all_tools):
        for _ in range(rng.randint(*DECOY_ROWS)):
            world.add_row(entity_name)
    # Turn k holds hop k of every chain that is that long: parallel hops share a turn.
    gold_turns = [[_call(tool_of(chain[turn]), chain[turn].arg, chain[turn].field.key)
                   for chain in chains if len(chain) > turn]
                  for turn in range(max(len(chain) for chain in chains))]
    record = {
        "messages": [{"role": "user", "content": _question(chains, rng)}],
        "tools": json.dumps([_tool_schema(tool) for tool in all_tools], ensure_ascii=False),
        "codes": json.dumps(_codes(all_tools, world, rng), ensure_ascii=False),
        "unsolved_set": json.dumps(unsolved_set, ensure_ascii=False),
        "solve_rate": 0.0,
        "answer": ", ".join(str(chain[-1].answer) for chain in chains),
        "data_source": scenario,
        "split": "train",
        "gold_calls": json.dumps(gold_turns, ensure_ascii=False),
    }
    id_combination = tuple(sorted(f"{chain[0].arg}:{'/'.join(hop.field.key for hop in chain)}" for chain in chains))
    scaling = {"functional_generalization": general, "parameter_expansion": expanded,
               "parameter_type_generalization": typed, "distractors": len(distractors), "distractor_pool": pool_size}
    return Candidate(record, id_combination, _invalid_calls(all_tools, world),
                     _distractor_calls(distractors, chains, world), scaling)


def _codes(tools: Sequence[_Tool], world: _World, rng: random.Random) -> dict[str, str]:
    codes: dict[str, str] = {}
    for tool in tools:
        rows = world.rows[tool.entity]
        ids = list(rows)
        rng.shuffle(ids)  # the row a question needs sits anywhere in the table
        table = {row_id: (dict(rows[row_id]) if tool.general else rows[row_id][tool.field_key]) for row_id in ids}
        codes[tool.name] = _tool_source(tool, table)
    return codes


def scaling_problem(candidate: Candidate, min_distractors: int) -> str | None:
    """Whether the strategies drawn for ``candidate`` (its ``scaling``) are all visible in its tools.

    Functional generalisation: every tool is ``get_<entity>_info`` with a ``field`` enum (without it,
    none is); parameter expansion: every tool has a required ``fmt`` and an optional ``verbose``;
    parameter-type generalisation: every id parameter takes several types including an array with
    ``items``; distractors: as many as drawn, at least ``min_distractors`` unless the pool was
    smaller, with the answering tools' name pattern and parameters. ``None`` when all hold.
    """
    drawn = candidate.scaling
    tools = [tool["function"] for tool in json.loads(candidate.record["tools"])]
    answering = set(json.loads(candidate.record["unsolved_set"]))
    shapes = set()
    for tool in tools:
        properties, required = env_gate.tool_parameters(tool)
        id_spec = next(iter(properties.values()))
        seen = {"functional_generalization": tool["name"].endswith("_info") and "enum" in properties.get("field", {}),
                "parameter_expansion": "fmt" in required and "verbose" in properties and "verbose" not in required,
                "parameter_type_generalization": isinstance(id_spec.get("type"), list)
                and "array" in id_spec["type"] and "items" in id_spec}
        for strategy, present in seen.items():
            if present != bool(drawn[strategy]):
                return f"{tool['name']}: {strategy} {'drawn but missing' if drawn[strategy] else 'present but not drawn'}"
        shapes.add((tool["name"].endswith("_info"), tuple(list(properties)[1:]), tuple(required[1:])))
    distractors = [tool["name"] for tool in tools if tool["name"] not in answering]
    wanted = min(min_distractors, drawn["distractor_pool"])
    if len(distractors) != drawn["distractors"] or len(distractors) < wanted:
        return f"{len(distractors)} distractor tool(s) {distractors}, drawn {drawn['distractors']}, minimum {wanted}"
    if len(shapes) > 1:
        return f"the tools are not styled alike (name pattern, parameters): {sorted(shapes)}"
    return None


# ------------------------------------------------------------------------------------------ gate
def gate_details(candidates: Sequence[Candidate], timeout: float = GATE_TIMEOUT_S,
                 checks: Sequence[str] | None = None) -> list[env_gate.Rejection | None]:
    """Probe candidates in the sandbox with the shared build-time gate (:func:`ftrl.envs.gate.gate_candidates`).

    ``None`` for a good candidate, else the :class:`~ftrl.envs.gate.Rejection` (reason and evidence);
    ``checks``: the optional checks to make (``ftrl.envs.gate.PROBE_CHECKS``, default all).
    """
    return env_gate.gate_candidates(
        candidates, timeout, run=lambda jobs, limit: sandbox.get_sandbox().map_calls(jobs, limit), checks=checks)


def gate(candidates: Sequence[Candidate], timeout: float = GATE_TIMEOUT_S,
         checks: Sequence[str] | None = None) -> list[str | None]:
    """:func:`gate_details`, reason codes only: ``None`` for a good candidate, else why it was rejected."""
    return [None if r is None else r.reason for r in gate_details(candidates, timeout, checks)]


# ----------------------------------------------------------------------------------------- build
@dataclass
class BuildReport:
    """What the generator did: candidates drawn, kept per split and scenario, rejections by reason.

    ``scaling[split]`` counts the kept environments per complexity-scaling strategy (``distractors``:
    those with at least one distractor tool) and ``unscaled`` those with none of them; ``reasons``
    says each rejection reason in words and ``examples`` shows the first few rejected candidates.
    """

    seed: int
    candidates: int = 0
    kept: dict[str, dict[str, int]] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)  # {reason, question, detail}
    scaling: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    gate_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def manifest(self) -> dict[str, Any]:
        """For ``envs/manifest.json``: everything but the wall times, so the manifest stays reproducible."""
        data = self.as_dict()
        data.pop("seconds")
        data.pop("gate_seconds")
        return data

    def summary(self) -> str:
        kept = "; ".join(f"{split}: " + ", ".join(f"{s}={n}" for s, n in counts.items())
                         for split, counts in self.kept.items())
        rejected = ", ".join(f"{reason}={n}" for reason, n in sorted(self.rejected.items())) or "none"
        scaling = "; ".join(f"{split}: " + ", ".join(f"{s}={n}" for s, n in counts.items())
                            for split, counts in self.scaling.items())
        return (f"procedural envs (seed {self.seed}): {self.candidates} candidates in {self.seconds:.2f}s "
                f"(gate {self.gate_seconds:.2f}s); kept {kept}; scaling {scaling}; rejected {rejected}")

    def reject(self, reason: str, candidate: Candidate | None = None, detail: str = "") -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.reasons.setdefault(reason, REASONS.get(reason, reason))
        if candidate is not None and sum(e["reason"] == reason for e in self.examples) < MAX_EXAMPLES:
            self.examples.append({"reason": reason, "question": candidate.question, "detail": detail})

    def count_scaling(self, split: str, kept: Sequence[Candidate]) -> None:
        counts = dict.fromkeys((*STRATEGIES, "unscaled"), 0)
        for candidate in kept:
            applied = [s for s in STRATEGIES if candidate.scaling.get(s)]
            for strategy in applied:
                counts[strategy] += 1
            counts["unscaled"] += not applied
        self.scaling[split] = counts


@dataclass
class ProceduralBuild:
    records: dict[str, list[dict[str, Any]]]
    report: BuildReport


def _allocate(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``total`` over scenarios in proportion to their weights (largest remainders)."""
    weight_sum = sum(weights.values())
    shares = {s: total * weights.get(s, 0.0) / weight_sum for s in SCENARIOS}
    counts = {s: math.floor(share) for s, share in shares.items()}
    by_remainder = sorted(SCENARIOS, key=lambda s: (-(shares[s] - counts[s]), SCENARIOS.index(s)))
    for scenario in by_remainder[: total - sum(counts.values())]:
        counts[scenario] += 1
    return counts


@dataclass
class _Generator:
    """The state of one build: the seeded stream of candidates, what was seen, the report."""

    settings: _Settings
    rng: random.Random
    pools: dict[str, list[Any]] | None
    report: BuildReport
    seen_questions: set[str] = field(default_factory=set)
    train_ids: set[tuple[str, ...]] = field(default_factory=set)

    def draw(self, split: str, scenario: str, pending: set[str]) -> Candidate | None:
        """One candidate, or None when it is refused before the sandbox (duplicate, reused ids, ...)."""
        self.report.candidates += 1
        try:
            candidate = sample_candidate(scenario, self.settings, self.rng, self.pools)
        except PoolExhausted:
            self.report.reject(POOL_EXHAUSTED)
            return None
        problem = scaling_problem(candidate, self.settings.min_distractors)
        if candidate.question in self.seen_questions or candidate.question in pending:
            self.report.reject(DUPLICATE_QUESTION)
        elif split == "test" and candidate.id_combination in self.train_ids:
            self.report.reject(SHARES_TRAIN_IDS)
        elif problem is not None:
            self.report.reject(SCALING_NOT_APPLIED, candidate, problem)
        else:
            pending.add(candidate.question)
            return candidate
        return None

    def fill(self, split: str, scenario: str, need: int) -> list[Candidate]:
        """``need`` gated candidates of ``scenario``, drawn and gated in batches."""
        accepted: list[Candidate] = []
        drawn, budget = 0, 50 * need + 100
        while len(accepted) < need:
            missing = need - len(accepted)
            batch: list[Candidate] = []
            pending: set[str] = set()
            while len(batch) < missing + missing // 20 + 1:
                if drawn >= budget:
                    raise RuntimeError(f"procedural generator: only {len(accepted)} of {need} {split} "
                                       f"'{scenario}' environments after {drawn} candidates; "
                                       f"rejections {self.report.rejected}")
                drawn += 1
                candidate = self.draw(split, scenario, pending)
                if candidate is not None:
                    batch.append(candidate)
            gate_started = time.perf_counter()
            verdicts = gate_details(batch, self.settings.gate_timeout_s)
            self.report.gate_seconds += time.perf_counter() - gate_started
            for candidate, verdict in zip(batch, verdicts):
                if verdict is not None:
                    self.report.reject(verdict.reason, candidate, verdict.detail)
                elif len(accepted) < need:
                    accepted.append(candidate)
                    self.seen_questions.add(candidate.question)
        return accepted


def generate_envs(cfg: ProceduralConfig, seed: int) -> ProceduralBuild:
    """Build ``num_train`` + ``num_test`` gated environments; same cfg and seed give the same bytes."""
    settings = _Settings.from_config(cfg)
    started = time.perf_counter()
    pools = value_pools(settings.id_pool_size, seed) if settings.id_pool_size else None
    generator = _Generator(settings, random.Random(seed), pools, BuildReport(seed=seed))
    report = generator.report
    records: dict[str, list[dict[str, Any]]] = {}
    targets = {"train": cfg.num_train, "test": cfg.num_test}
    for split in SPLITS:
        kept: list[Candidate] = []
        report.kept[split] = {}
        for scenario, need in _allocate(targets[split], settings.weights).items():
            accepted = generator.fill(split, scenario, need)
            kept.extend(accepted)
            report.kept[split][scenario] = len(accepted)
        if split == "train":
            generator.train_ids = {candidate.id_combination for candidate in kept}
        report.count_scaling(split, kept)
        generator.rng.shuffle(kept)  # mix scenarios so any prefix of the file is a fair sample
        records[split] = [{**candidate.record, "split": split} for candidate in kept]
    report.rejected = dict(sorted(report.rejected.items()))
    report.reasons = dict(sorted(report.reasons.items()))
    report.seconds = time.perf_counter() - started
    return ProceduralBuild(records, report)


def build_procedural_envs(cfg: ProceduralConfig, seed: int) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "test": [...]}`` reference records (registry entry ``envs=procedural``)."""
    build = generate_envs(cfg, seed)
    log.info(build.report.summary())
    return build.records


# ------------------------------------------------------------------------------------------- CLI
def _decoded(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: json.loads(value) if key in ("tools", "codes", "unsolved_set", "gold_calls") else value
            for key, value in record.items()}


def main(argv: Sequence[str] | None = None) -> int:
    from ftrl.artifacts import write_json
    from ftrl.envs.io import write_jsonl

    defaults = ProceduralConfig()
    parser = argparse.ArgumentParser(prog="python -m ftrl.envs.procedural", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-test", type=int, default=defaults.num_test)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-hops", type=int, default=defaults.max_hops)
    parser.add_argument("--max-parallel", type=int, default=defaults.max_parallel)
    for knob in ("functional_generalization", "parameter_expansion", "parameter_type_generalization"):
        parser.add_argument(f"--{knob.replace('_', '-')}", type=float, default=getattr(defaults, knob),
                            help="probability per environment")
    parser.add_argument("--min-distractors", type=int, default=defaults.min_distractors)
    parser.add_argument("--max-distractors", type=int, default=defaults.max_distractors)
    args = parser.parse_args(argv)
    cfg = ProceduralConfig(
        num_train=args.num_train, num_test=args.num_test, max_hops=args.max_hops, max_parallel=args.max_parallel,
        functional_generalization=args.functional_generalization, parameter_expansion=args.parameter_expansion,
        parameter_type_generalization=args.parameter_type_generalization,
        min_distractors=args.min_distractors, max_distractors=args.max_distractors)
    try:
        build = generate_envs(cfg, args.seed)
    except ConfigError as error:
        parser.error(str(error))
    out = Path(args.out)
    for split, records in build.records.items():
        write_jsonl(out / f"{split}.jsonl", records)
        print(f"wrote {len(records)} {split} environments to {out / f'{split}.jsonl'}")
    write_json(out / "report.json", build.report.as_dict())
    print(build.report.summary())
    for reason, count in build.report.rejected.items():
        print(f"  rejected {count:4d} {reason}: {build.report.reasons[reason]}")
    for split, counts in build.report.kept.items():
        for scenario, count in counts.items():
            print(f"  {split:5s} {scenario:20s} {count}")
    example = next((r for split in SPLITS for r in build.records[split]), None)
    if example is not None:
        print("example environment:")
        print(json.dumps(_decoded(example), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
