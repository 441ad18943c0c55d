"""Complexity scaling (stage 4) checked per environment: did each drawn strategy happen, and how to call it.

The scale stage asks the LLM to apply the strategies drawn for a task; this module judges its answer
against the tools before scaling and derives the *probes*, calls the gate makes after deployment so
that every scaled feature is exercised with the gold values (``ftrl.builder.gate``):

==============================  ===================================================  ==========================
strategy                        applied when                                         probes (from a gold call)
==============================  ===================================================  ==========================
functional_generalization       a tool got a new selector parameter with an          every other enum value:
                                ``enum`` of >= 2 values, and its gold call passes    must work (another fact)
                                one of them
parameter_expansion             a tool got a new optional parameter, with a          the call plus the default:
                                ``default`` (or ``enum``/``examples``) to call it    must return the sub-answer
parameter_type_generalization   a parameter accepts several types (``["string",     the gold value as each type
                                "integer"]``, one value or an array with             the gold call does not use
                                ``items``); every type gets called                   (array form ``[v]``): must
                                                                                     return the sub-answer
distractors                     exactly the drawn number of distractor tools         their example calls (gate)
==============================  ===================================================  ==========================

A gold value the builder cannot convert to a declared type itself (``"Paris"`` as an integer) comes
from the reply's ``alternatives`` (``{"sub_question_id", "parameter", "value"}``). Errors are kept per
strategy, so a task whose reply never applies a drawn strategy fails with ``scaling_not_applied``
naming it, and the build report counts per strategy how often it was drawn, applied and rejected.

    python -m pytest tests/test_env_builder.py -q -k scaling
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ftrl.builder.records import GoldCall, Probe, tool_name
from ftrl.builder.schema import matches_type

STRATEGIES: tuple[str, ...] = (
    "functional_generalization",
    "parameter_expansion",
    "parameter_type_generalization",
    "distractors",
)
SCALING_NOT_APPLIED = "scaling_not_applied"
# Prompt text per strategy (str.format with n = the number of distractors: literal braces doubled).
STRATEGY_TEXT = {
    "functional_generalization": (
        "Functional generalisation: make at least one tool more general by giving it a NEW selector "
        "parameter with an \"enum\" of at least two facts it knows, e.g. get_city_population(city) becomes "
        "get_city_info(city, field) with field in [\"population\", \"area\", \"mayor\"]. The call passes the "
        "value that returns the sub-answer; every other enum value must work too (it returns that fact)."
    ),
    "parameter_expansion": (
        "Parameter expansion: add parameters to the tools, at least one NEW OPTIONAL one (not in "
        "\"required\") with a \"default\" in its schema (e.g. an output format or a detail level, as an enum); "
        "the tool must accept it and still return the same answer for the default. Required ones may be "
        "added too; the calls pass every required parameter."
    ),
    "parameter_type_generalization": (
        "Parameter-type generalisation: let at least one parameter that a call passes accept several types, "
        "e.g. \"type\": [\"string\", \"integer\"], or one value or an array of values "
        "(\"type\": [\"string\", \"array\"], \"items\": {{\"type\": \"string\"}}). Every type must work with the "
        "gold value: the builder calls \"5\" as 5 and \"Paris\" as [\"Paris\"] itself; where the gold value "
        "cannot be converted (a name as an integer id), list it in \"alternatives\"."
    ),
    "distractors": (
        "Distractor tools: add {n} tool(s) from the same domain that answer none of the sub-questions."
    ),
}


def parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    props = tool["function"].get("parameters", {}).get("properties", {})
    return props if isinstance(props, dict) else {}


def declared_types(spec: Any) -> list[str]:
    """The non-null JSON types a parameter schema declares (``"type"`` a string or a list)."""
    declared = spec.get("type") if isinstance(spec, dict) else None
    names = [declared] if isinstance(declared, str) else list(declared or [])
    return [name for name in names if name != "null"]


def convert(value: Any, to_type: str, spec: Mapping[str, Any]) -> Any:
    """``value`` as ``to_type`` when the builder can say what that means, else ``None``."""
    text = value if isinstance(value, str) else None
    if to_type == "array":
        items = spec.get("items") if isinstance(spec.get("items"), dict) else {}
        return [value] if "type" not in items or matches_type(value, items["type"]) else None
    if to_type == "string" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if to_type == "integer" and text is not None and re.fullmatch(r"-?\d+", text.strip()):
        return int(text)
    if to_type == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if to_type == "number" and text is not None and re.fullmatch(r"-?\d+(\.\d+)?", text.strip()):
        return float(text) if "." in text else int(text)
    if to_type == "boolean" and text is not None and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    return None


def _call_value(spec: Mapping[str, Any]) -> tuple[bool, Any]:
    """A value to call an optional parameter with: its default, else its first enum value or example."""
    if "default" in spec:
        return True, spec["default"]
    for key in ("enum", "examples"):
        if isinstance(spec.get(key), list) and spec[key]:
            return True, spec[key][0]
    return False, None


@dataclass
class ScaleCheck:
    """One stage-4 answer judged against the tools before scaling: errors per strategy, and the probes."""

    strategies: Sequence[str]
    before_tools: list[dict[str, Any]]
    before_calls: list[GoldCall]
    tools: list[dict[str, Any]]
    calls: list[dict[str, Any]]  # {"sub_question_id", "name", "arguments"}, already checked against tools
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, list[str]] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    features: dict[str, str] = field(default_factory=dict)  # "tool.parameter" -> strategy

    def run(self) -> ScaleCheck:
        self.by_name = {tool_name(tool): tool for tool in self.tools}
        self._origin_parameters()
        checks = {
            "functional_generalization": self._functional,
            "parameter_expansion": self._expansion,
            "parameter_type_generalization": self._types,
        }
        for strategy in self.strategies:
            if strategy in checks:
                errors = checks[strategy]()
                if errors:
                    self.errors[strategy] = errors
        return self

    def _origin_parameters(self) -> None:
        """Each new tool's parameters before scaling (the tools whose sub-questions it now answers)."""
        before = {tool_name(tool): tool for tool in self.before_tools}
        old_tool = {call.sub_question_id: call.name for call in self.before_calls}
        self.origin: dict[str, set[str]] = {}
        for call in self.calls:
            old = before.get(old_tool.get(str(call["sub_question_id"]), ""))
            self.origin.setdefault(call["name"], set()).update(parameters(old) if old else {})

    def _new(self, name: str) -> dict[str, Any]:
        return {p: spec for p, spec in parameters(self.by_name[name]).items() if p not in self.origin.get(name, set())}

    def _probe(self, strategy: str, feature: str, call: Mapping[str, Any], param: str, value: Any,
               expect_answer: bool = True) -> None:
        arguments = {**copy.deepcopy(call["arguments"]), param: value}
        probe = Probe(strategy, feature, param, str(call["sub_question_id"]), call["name"], arguments, expect_answer)
        key = (probe.name, json.dumps(arguments, sort_keys=True))
        if all((p.name, json.dumps(p.arguments, sort_keys=True)) != key for p in self.probes):
            self.probes.append(probe)

    def _functional(self) -> list[str]:
        found = False
        for call in self.calls:
            for param, spec in self._new(call["name"]).items():
                enum = spec.get("enum") if isinstance(spec, dict) else None
                if not isinstance(enum, list) or len(set(map(repr, enum))) < 2 or call["arguments"].get(
                        param, object()) not in enum:
                    continue
                found = True
                self.features[f"{call['name']}.{param}"] = "functional_generalization"
                for value in enum:
                    if value != call["arguments"][param]:
                        feature = f"selector {param}={value!r} of '{call['name']}'"
                        self._probe("functional_generalization", feature, call, param, value, expect_answer=False)
        if found:
            return []
        return [("functional generalisation was drawn but no tool got a new selector parameter: give a tool a new "
                "parameter with an \"enum\" of at least two facts it knows and pass, in its call, the value that "
                "returns the sub-answer")]

    def _expansion(self) -> list[str]:
        errors: list[str] = []
        optional = 0
        for name in dict.fromkeys(call["name"] for call in self.calls):
            required = set(self.by_name[name]["function"].get("parameters", {}).get("required", []))
            for param, spec in self._new(name).items():
                if param in required:
                    continue
                optional += 1
                self.features[f"{name}.{param}"] = "parameter_expansion"
                has_value, value = _call_value(spec)
                if not has_value or ("type" in spec and not matches_type(value, spec["type"])):
                    errors.append(f"new optional parameter '{param}' of '{name}' needs a \"default\" of its type "
                                  "(or an \"enum\"/\"examples\"), so that it can be called")
                    continue
                for call in self.calls:
                    if call["name"] == name and param not in call["arguments"]:
                        self._probe("parameter_expansion", f"optional parameter '{param}' of '{name}'", call,
                                    param, value)
        if not optional:
            errors.insert(0, "parameter expansion was drawn but no tool got a new optional parameter (one not in "
                             "\"required\", with a \"default\")")
        return errors

    def _alternative(self, call: Mapping[str, Any], param: str, to_type: str) -> Any:
        """The reply's gold value for ``param`` of ``call`` as ``to_type`` (``alternatives``), else ``None``."""
        for entry in self.alternatives:
            if (str(entry.get("sub_question_id")) == str(call["sub_question_id"]) and entry.get("parameter") == param
                    and matches_type(entry.get("value"), to_type)):
                return entry["value"]
        return None

    def _types(self) -> list[str]:
        errors: list[str] = []
        multi = 0
        for name, tool in self.by_name.items():
            calls = [call for call in self.calls if call["name"] == name]
            for param, spec in parameters(tool).items():
                types = declared_types(spec)
                if len(types) < 2 or not calls:
                    continue
                multi += 1
                self.features[f"{name}.{param}"] = "parameter_type_generalization"
                if "array" in types and not isinstance(spec.get("items"), dict):
                    errors.append(f"parameter '{param}' of '{name}' accepts an array but declares no \"items\" "
                                  "(OpenAI tool schemas need it)")
                errors.extend(self._exercise(name, param, spec, types, calls))
        if not multi:
            errors.insert(0, "parameter-type generalisation was drawn but no parameter of a called tool accepts "
                             "several types (e.g. \"type\": [\"string\", \"integer\"])")
        return errors

    def _exercise(self, name: str, param: str, spec: dict[str, Any], types: list[str],
                  calls: list[dict[str, Any]]) -> list[str]:
        """Probe every type of ``param`` a gold call does not pass, with each gold value; errors for types
        no gold value can be given in (converted by the builder, or from the reply's ``alternatives``)."""
        errors = []
        passing = [call for call in calls if param in call["arguments"]]
        for to_type in types:
            if any(matches_type(call["arguments"][param], to_type) for call in passing):
                continue  # the gold call itself uses this type
            feature = f"array form of '{param}' of '{name}'" if to_type == "array" else (
                f"type {to_type} of '{param}' of '{name}'")
            made = 0
            for call in calls:
                value = convert(call["arguments"][param], to_type, spec) if param in call["arguments"] else None
                if value is None:
                    value = self._alternative(call, param, to_type)
                if value is not None:
                    self._probe("parameter_type_generalization", feature, call, param, value)
                    made += 1
            if not made:
                errors.append(f"parameter '{param}' of '{name}' accepts {types} but no call passes it as {to_type}: "
                              f"add {{\"sub_question_id\", \"parameter\": \"{param}\", \"value\"}} to "
                              f"\"alternatives\" with the gold value as {to_type}")
        return errors
