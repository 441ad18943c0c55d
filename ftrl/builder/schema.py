"""Validation of the builder LLM's structured outputs: a small JSON-Schema checker and domain checks.

``validate(value, schema)`` supports the JSON-Schema subset the stage schemas use (``type`` incl.
lists of types, ``properties``, ``required``, ``additionalProperties``, ``items``, ``enum``,
``minItems``/``maxItems``, ``minLength``, ``minProperties``) and returns error strings with a path
(``$.sub_questions[1].answer: expected string, got null``) that are sent back to the LLM in a repair
request. ``check_tool_schema`` checks an OpenAI function schema so that the tool can be rendered by
chat templates and called as ``name(**arguments)``; ``check_arguments`` checks a call against it;
``parse_llm_json`` reads a reply that may be fenced, chatty or slightly broken JSON.

    python -c "from ftrl.builder.schema import validate; print(validate({}, {'required': ['b']}))"
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Mapping
from typing import Any

from ftrl.llm.parsers import tolerant_json_loads
from ftrl.types import SCENARIOS

JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def matches_type(value: Any, type_spec: str | list[str]) -> bool:
    """True if ``value`` is of the JSON type(s) ``type_spec`` (booleans are not integers)."""
    names = [type_spec] if isinstance(type_spec, str) else list(type_spec)
    for name in names:
        if name not in JSON_TYPES:
            continue
        if name in ("integer", "number") and isinstance(value, bool):
            continue
        if name == "integer" and isinstance(value, float) and value.is_integer():
            return True
        if isinstance(value, JSON_TYPES[name]):
            return True
    return False


def validate(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Errors of ``value`` against ``schema`` (empty list: valid)."""
    errors: list[str] = []
    if "type" in schema and not matches_type(value, schema["type"]):
        expected = schema["type"] if isinstance(schema["type"], str) else " or ".join(schema["type"])
        return [
            (f"{path}: expected {expected}, "
            f"got {_type_name(value)}")
        ]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str) and len(value.strip()) < schema.get("minLength", 0):
        errors.append(f"{path}: must be a non-empty string")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: needs at least {schema['minItems']} item(s), got {len(value)}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: at most {schema['maxItems']} item(s) allowed, got {len(value)}")
        if "items" in schema:
            for index, item in enumerate(value):
                errors.extend(validate(item, schema["items"], f"{path}[{index}]"))
    if isinstance(value, dict):
        if len(value) < schema.get("minProperties", 0):
            errors.append(f"{path}: needs at least {schema['minProperties']} key(s)")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing required key '{key}'")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors.extend(validate(item, properties[key], f"{path}.{key}"))
            elif extra is False:
                errors.append(f"{path}: unexpected key '{key}' (allowed: {sorted(properties)})")
            elif isinstance(extra, Mapping):
                errors.extend(validate(item, extra, f"{path}.{key}"))
    return errors


# ----------------------------------------------------------------------------- parsing replies
def _strip_fences(text: str) -> str:
    fenced = re.search(r"```(?:json|JSON)?\s*\n(.*?)```", text, re.DOTALL)
    return fenced.group(1) if fenced else text


def parse_llm_json(text: str) -> tuple[Any, bool, str | None]:
    """``(value, repaired_locally, error)``: strict JSON first, then fence/prose stripping and repair."""
    stripped = text.strip()
    try:
        return json.loads(stripped), False, None
    except (ValueError, RecursionError):
        pass
    inner = _strip_fences(stripped).strip()
    try:
        return json.loads(inner), True, None
    except (ValueError, RecursionError):
        pass
    value = tolerant_json_loads(inner)
    if value is None:
        preview = stripped[:120].replace("\n", " ")
        return (
            None,
            False,
            f"the reply is not JSON (it starts with {preview!r}); reply with one JSON object only",
        )
    return value, True, None


# ----------------------------------------------------------------------------- tools and calls
def check_tool_schema(tool: Any, where: str = "tool") -> list[str]:
    """Errors of an OpenAI function schema ``{"type": "function", "function": {name, description, ...}}``."""
    if (
        not isinstance(tool, dict)
        or tool.get("type") != "function"
        or not isinstance(tool.get("function"), dict)
    ):
        return [
            f"{where}: must be {{'type': 'function', 'function': {{'name', 'description', 'parameters'}}}}"
        ]
    function = tool["function"]
    name = function.get("name")
    errors = []
    if not isinstance(name, str) or not _NAME.match(name) or keyword.iskeyword(name):
        errors.append(f"{where}: name {name!r} must be a Python identifier (letters, digits, _; at most 64)")
        name = "?"
    where = f"{where} '{name}'"
    if not isinstance(function.get("description"), str) or not function["description"].strip():
        errors.append(f"{where}: needs a non-empty description")
    parameters = function.get("parameters")
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        return errors + [f"{where}: parameters must be a JSON schema with type 'object'"]
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict):
        return errors + [f"{where}: parameters.properties must be an object"]
    for param, spec in properties.items():
        if not isinstance(param, str) or not _NAME.match(param) or keyword.iskeyword(param):
            errors.append(f"{where}: parameter name {param!r} must be a Python identifier")
        if not isinstance(spec, dict):
            errors.append(f"{where}: parameter '{param}' must be a JSON schema object")
            continue
        declared = spec.get("type")
        names = [declared] if isinstance(declared, str) else declared
        if not isinstance(names, list) or not names or any(t not in JSON_TYPES for t in names):
            errors.append(
                f"{where}: parameter '{param}' has type {declared!r}; valid: {sorted(JSON_TYPES)} "
                "or a list of them"
            )
    required = parameters.get("required", [])
    if not isinstance(required, list) or any(r not in properties for r in required):
        errors.append(
            f"{where}: parameters.required {required!r} must list declared properties ({sorted(properties)})"
        )
    return errors


def check_arguments(tool: Mapping[str, Any], arguments: Any, where: str = "call") -> list[str]:
    """Errors of ``arguments`` against the tool's parameter schema (required, known, typed)."""
    name = tool["function"]["name"]
    if not isinstance(arguments, dict):
        return [f"{where} of '{name}': arguments must be an object, got {_type_name(arguments)}"]
    parameters = tool["function"].get("parameters") or {}
    properties = parameters.get("properties", {})
    errors = []
    for key in parameters.get("required", []):
        if key not in arguments:
            errors.append(f"{where} of '{name}': missing required argument '{key}'")
    for key, value in arguments.items():
        if key not in properties:
            errors.append(f"{where} of '{name}': unknown argument '{key}' (parameters: {sorted(properties)})")
        elif "type" in properties[key] and not matches_type(value, properties[key]["type"]):
            errors.append(
                f"{where} of '{name}': argument '{key}'={value!r} is not of type {properties[key]['type']}"
            )
        elif "enum" in properties[key] and value not in properties[key]["enum"]:
            errors.append(
                f"{where} of '{name}': argument '{key}'={value!r} is not one of {properties[key]['enum']}"
            )
    return errors


def classify_structure(depends_on: Mapping[str, list[str]]) -> str:
    """The scenario type a dependency graph describes (sub-question id -> ids it depends on)."""
    ids = list(depends_on)
    parent = {node: node for node in ids}

    def find(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    has_edges = False
    for node, deps in depends_on.items():
        for dep in deps:
            has_edges = True
            parent[find(node)] = find(dep)
    components = len({find(node) for node in ids})
    if len(ids) == 1:
        return "Single-Hop"
    if not has_edges:
        return "Parallel Single-Hop"
    return "Multi-Hop" if components == 1 else "Parallel Multi-Hop"


# ----------------------------------------------------------------------------- stage schemas
_STRING = {"type": "string", "minLength": 1}
_ARGS = {"type": "object"}
_TOOL = {"type": "object", "required": ["type", "function"]}

SEED_SCHEMA = {
    "type": "object",
    "required": ["questions"],
    "properties": {
        "questions": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "required": ["question"], "properties": {"question": _STRING}},
        }
    },
}

DECOMPOSE_SCHEMA = {
    "type": "object",
    "required": ["scenario", "sub_questions", "final_answer"],
    "properties": {
        "scenario": {"type": "string", "enum": list(SCENARIOS)},
        "sub_questions": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "question", "answer", "depends_on"],
                "properties": {
                    "id": _STRING,
                    "question": _STRING,
                    "answer": {"type": ["string", "number"]},
                    "depends_on": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "final_answer": {"type": ["string", "number"]},
    },
}

DOCUMENT_SCHEMA = {
    "type": "object",
    "required": ["tools"],
    "properties": {
        "tools": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["sub_question_id", "tool", "arguments"],
                "properties": {"sub_question_id": _STRING, "tool": _TOOL, "arguments": _ARGS},
            },
        }
    },
}

_CALLS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["sub_question_id", "name", "arguments"],
        "properties": {"sub_question_id": _STRING, "name": _STRING, "arguments": _ARGS},
    },
}

INTEGRATE_SCHEMA = {
    "type": "object",
    "required": ["tools", "calls"],
    "properties": {
        "tools": {"type": "array", "minItems": 1, "items": _TOOL},
        "calls": _CALLS,
        "merged_from": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
    },
}

SCALE_SCHEMA = {
    "type": "object",
    "required": ["tools", "calls", "distractors"],
    "properties": {
        "tools": {"type": "array", "minItems": 1, "items": _TOOL},
        "calls": _CALLS,
        "distractors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["tool", "example_arguments"],
                "properties": {"tool": _TOOL, "example_arguments": _ARGS},
            },
        },
        # Gold values in an alternative parameter type the builder cannot derive itself (optional).
        "alternatives": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["sub_question_id", "parameter", "value"],
                "properties": {"sub_question_id": _STRING, "parameter": _STRING},
            },
        },
    },
}

DEPLOY_SCHEMA = {
    "type": "object",
    "required": ["codes"],
    "properties": {"codes": {"type": "object", "minProperties": 1, "additionalProperties": _STRING}},
}
