"""Turn raw model text into an assistant message with OpenAI-style tool calls.

Two formats are understood: Qwen/Hermes (``<tool_call>{"name": .., "arguments": ..}</tool_call>``)
and Llama 3.1 (``<|python_tag|>{"name": .., "parameters": ..}``). Both return the message shape of
the FTRL reference::

    {"role": "assistant", "content": str, "tool_calls": [ToolCall, ...] | None}

where a tool call is ``{"id": "call_...", "type": "function", "function": {"name": ..,
"arguments": json.dumps(args, ensure_ascii=False)}}``.

``compat="ftrl"`` reproduces the reference parser, quirks included (calls written inside
``<think>`` are parsed; ids come from a timestamp hash and can collide). ``compat="fixed"`` strips
thoughts before parsing, gives every call a unique id, tolerates whitespace and junk around the
JSON of each call (the JSON itself must still be valid) and reports the thoughts separately under
``reasoning_content``.

    python -c "from ftrl.llm.parsers import parse_qwen; \\
        print(parse_qwen('<tool_call>{\\"name\\": \\"f\\", \\"arguments\\": {}}</tool_call>'))"
    python -m pytest tests/test_parsers.py -q
"""

from __future__ import annotations

import ast
import datetime
import functools
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from hashlib import sha256
from typing import Any

from ftrl.errors import unknown_choice_message
from ftrl.registry import PARSERS
from ftrl.types import Message, ToolCall, make_tool_call

COMPAT_MODES: tuple[str, ...] = ("ftrl", "fixed")

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_MARK = "<tool_parsed_response>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
PYTHON_TAG = "<|python_tag|>"

# The reference removes the opening tag with ``str.lstrip(tag)``, which strips any leading run of
# the tag's *characters*, not the tag itself. Keeping the same character set under compat=ftrl
# reproduces it exactly, e.g. ``<tool_call><tool_call>{..}`` still parses there.
_QWEN_OPEN_CHARS = TOOL_CALL_OPEN
_LLAMA_TAG_CHARS = PYTHON_TAG

# Markers whose presence in a turn without any parsed call means the model tried and failed to
# call a tool (the reward's -0.3 row; the collector uses the same test).
TOOL_MARKUP: tuple[str, ...] = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_MARK)


def check_compat(compat: str) -> None:
    """Raise ``ValueError`` naming the valid modes if ``compat`` is not one of them."""
    if compat not in COMPAT_MODES:
        raise ValueError(unknown_choice_message("compat mode", compat, list(COMPAT_MODES)))


def has_tool_markup(text: str | None) -> bool:
    """True if ``text`` still holds ``<tool_call>``, ``</tool_call>`` or ``<tool_parsed_response>``."""
    return bool(text) and any(marker in text for marker in TOOL_MARKUP)


def split_thinking(text: str) -> tuple[str | None, str]:
    """Separate thoughts from the visible text: ``(thinking, rest)``.

    Handles ``<think>..</think>`` blocks anywhere, a leading ``..</think>`` without an opening tag
    (Qwen3 output when the chat template already opened the block) and an unterminated
    ``<think>`` (the rest of the text is thought). ``thinking`` is None when no think tag occurs;
    several blocks are joined by a blank line. Both parts are stripped.
    """
    first_open = text.find(THINK_OPEN)
    first_close = text.find(THINK_CLOSE)
    if first_open == -1 and first_close == -1:
        return None, text.strip()

    thoughts: list[str] = []
    visible: list[str] = []
    position = 0
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        thoughts.append(text[:first_close])
        position = first_close + len(THINK_CLOSE)
    while True:
        start = text.find(THINK_OPEN, position)
        if start == -1:
            visible.append(text[position:])
            break
        visible.append(text[position:start])
        end = text.find(THINK_CLOSE, start + len(THINK_OPEN))
        if end == -1:
            thoughts.append(text[start + len(THINK_OPEN) :])
            break
        thoughts.append(text[start + len(THINK_OPEN) : end])
        position = end + len(THINK_CLOSE)
    thinking = "\n\n".join(part.strip() for part in thoughts if part.strip())
    return thinking, "".join(visible).strip()


def _timestamp_call_id() -> str:
    # Reference ids: hash of the wall clock. Two calls parsed within one clock tick share an id.
    return "call_" + sha256(str(datetime.datetime.now()).encode()).hexdigest()


def _unique_call_id() -> str:
    return "call_" + uuid.uuid4().hex


def _tool_call(name: Any, arguments: Any, call_id: str) -> ToolCall:
    # Always encoded here: a decoded value that is itself a string stays a JSON string literal.
    return make_tool_call(name, json.dumps(arguments, ensure_ascii=False), call_id)


def _message(content: str, tool_calls: list[ToolCall] | None, thinking: str | None = None) -> Message:
    message: Message = {"role": "assistant", "content": content, "tool_calls": tool_calls or None}
    if thinking is not None:
        message["reasoning_content"] = thinking
    return message


# --------------------------------------------------------------------------- Qwen / Hermes


def _qwen_call_ftrl(body: str) -> ToolCall | None:
    """One call as the reference accepts it: any truthy name; dict arguments or a JSON string."""
    try:
        payload = json.loads(body)
        if not isinstance(payload, dict) or not payload.get("name"):
            return None
        arguments = payload["arguments"]
        if type(arguments) is not dict:
            # The reference decodes a non-dict once more and keeps whatever comes out (a JSON
            # string of a list or number is accepted; the tool then fails when it runs).
            if not isinstance(arguments, str):
                return None
            arguments = json.loads(arguments)
        return _tool_call(payload["name"], arguments, _timestamp_call_id())
    except (KeyError, ValueError, TypeError, RecursionError):
        return None


def _parse_qwen_ftrl(text: str, one_tool_only: bool) -> Message:
    start = text.find(TOOL_CALL_OPEN)
    if start == -1:
        return _message(text.strip(), None)
    parts = text[start:].split(TOOL_CALL_CLOSE)
    if one_tool_only:
        parts = parts[:1]
    calls = []
    for part in parts:
        part = part.strip()
        # A part that does not open with the tag (text between or after calls) is ignored.
        if not part.startswith(TOOL_CALL_OPEN):
            continue
        call = _qwen_call_ftrl(part.lstrip(_QWEN_OPEN_CHARS).strip())
        if call is not None:
            calls.append(call)
    if not calls:
        return _message(text.strip(), None)
    return _message(text[:start].strip(), calls)


def _decode_json_prefix(body: str) -> Any:
    """Strict JSON value at the start of ``body`` (after whitespace); trailing junk is ignored."""
    body = body.strip()
    value, _ = json.JSONDecoder().raw_decode(body)
    return value


def _qwen_call_fixed(body: str) -> ToolCall | None:
    """A call needs a non-empty string name and dict arguments (or a JSON string of a dict)."""
    try:
        payload = _decode_json_prefix(body)
        if not isinstance(payload, dict):
            return None
        name, arguments = payload.get("name"), payload.get("arguments")
        if not isinstance(name, str) or not name.strip():
            return None
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        if not isinstance(arguments, dict):
            return None
        return _tool_call(name.strip(), arguments, _unique_call_id())
    except (ValueError, TypeError, RecursionError):
        return None


def _qwen_blocks(text: str) -> list[str]:
    """Bodies of ``<tool_call>`` blocks; a block without its closing tag ends at the next opening."""
    bodies = []
    position = text.find(TOOL_CALL_OPEN)
    while position != -1:
        body_start = position + len(TOOL_CALL_OPEN)
        close = text.find(TOOL_CALL_CLOSE, body_start)
        next_open = text.find(TOOL_CALL_OPEN, body_start)
        if close != -1 and (next_open == -1 or close < next_open):
            bodies.append(text[body_start:close])
        else:
            bodies.append(text[body_start:] if next_open == -1 else text[body_start:next_open])
        position = next_open
    return bodies


def _parse_qwen_fixed(text: str, one_tool_only: bool) -> Message:
    thinking, visible = split_thinking(text)
    start = visible.find(TOOL_CALL_OPEN)
    if start == -1:
        return _message(visible, None, thinking)
    calls = []
    for body in _qwen_blocks(visible):
        call = _qwen_call_fixed(body)
        if call is not None:
            calls.append(call)
            if one_tool_only:
                break
    if not calls:
        return _message(visible, None, thinking)
    return _message(visible[:start].strip(), calls, thinking)


def parse_qwen(text: str, compat: str = "ftrl", one_tool_only: bool = False) -> Message:
    """Parse Qwen/Hermes ``<tool_call>`` output into an assistant message.

    ``compat="ftrl"``: the first ``<tool_call>`` anywhere (inside thoughts too) starts the calls;
    ``content`` is the text before it; parts that fail to parse are skipped silently; if none
    parses, ``content`` is the whole text and ``tool_calls`` None. ``one_tool_only`` looks at the
    first part only. ``compat="fixed"``: thoughts are removed first (and returned as
    ``reasoning_content``), ids are unique, and ``one_tool_only`` keeps the first call that parses.
    """
    check_compat(compat)
    if compat == "ftrl":
        return _parse_qwen_ftrl(text, one_tool_only)
    return _parse_qwen_fixed(text, one_tool_only)


def format_qwen_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """Qwen/Hermes text of ``tool_calls``, the inverse of :func:`parse_qwen`.

    Identical to what ``ftrl/assets/chat_template.jinja`` renders for an assistant turn's calls:
    ``<tool_call>\\n{"name": .., "arguments": ..}\\n</tool_call>`` per call, one newline between
    blocks. A call is the reference shape ``{"function": {"name", "arguments"}}`` or a bare
    ``{"name", "arguments"}``; arguments given as a string are written verbatim, None as ``{}``,
    anything else JSON-encoded with non-ASCII kept (the template's ``tojson``).
    """
    blocks = []
    for call in tool_calls:
        function = call.get("function", call)
        arguments = function.get("arguments")
        if arguments is None:
            encoded = "{}"
        elif isinstance(arguments, str):
            encoded = arguments
        else:
            encoded = json.dumps(arguments, ensure_ascii=False)
        name = json.dumps(function.get("name"), ensure_ascii=False)
        blocks.append(f'{TOOL_CALL_OPEN}\n{{"name": {name}, "arguments": {encoded}}}\n{TOOL_CALL_CLOSE}')
    return "\n".join(blocks)


# --------------------------------------------------------------------------- Llama 3.1


def _balanced_prefix(text: str) -> str:
    """``text`` cut where its first JSON-like value closes, or completed if it never does.

    Tracks strings and brackets; an unterminated string is closed and open brackets are closed in
    reverse order, so a response cut off by the token limit still decodes.
    """
    closers = {"{": "}", "[": "]"}
    stack: list[str] = []
    in_string = escaped = False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in closers:
            stack.append(closers[char])
        elif char in "}]" and stack:
            stack.pop()
            if not stack:
                return text[: index + 1]
    completion = ('"' if in_string else "") + "".join(reversed(stack))
    return text + completion


def _drop_trailing_commas(text: str) -> str:
    """Remove commas directly before a closing bracket, outside strings."""
    out: list[str] = []
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "}]":
            while out and out[-1].isspace():
                out.pop()
            if out and out[-1] == ",":
                out.pop()
        out.append(char)
    return "".join(out)


def tolerant_json_loads(text: str) -> Any:
    """Decode the first JSON object or array in ``text``, repairing common LLM damage.

    Tries strict JSON, then a truncation/trailing-comma repair, then a Python literal (single
    quotes, True/None). Returns None when nothing decodes. This stands in for the reference's
    ``json_repair`` (not a dependency here); it covers truncated, comma-damaged and Python-style
    objects but not every repair that package makes.
    """
    starts = [index for index in (text.find("{"), text.find("[")) if index != -1]
    if not starts:
        return None
    text = text[min(starts) :]
    try:
        return json.JSONDecoder().raw_decode(text)[0]
    except (ValueError, RecursionError):
        pass
    candidate = _balanced_prefix(text)
    for attempt in (candidate, _drop_trailing_commas(candidate)):
        try:
            return json.loads(attempt)
        except (ValueError, RecursionError):
            continue
    try:
        return ast.literal_eval(candidate)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _llama_call(payload: Any, call_id: str, strict: bool) -> ToolCall | None:
    if not isinstance(payload, dict):
        return None
    if strict:
        name = payload.get("name")
        arguments = payload.get("parameters", payload.get("arguments"))
        if isinstance(arguments, str):
            arguments = tolerant_json_loads(arguments)
        if not isinstance(name, str) or not name.strip() or not isinstance(arguments, dict):
            return None
        return _tool_call(name.strip(), arguments, call_id)
    # Reference: "parameters" and "name" must exist; a non-dict "parameters" is repaired-decoded
    # and kept whatever it becomes; the name is not checked further.
    if "parameters" not in payload or "name" not in payload:
        return None
    arguments = payload["parameters"]
    if type(arguments) is not dict:
        if not isinstance(arguments, str):
            return None
        arguments = tolerant_json_loads(arguments)
    try:
        return _tool_call(payload["name"], arguments, call_id)
    except (TypeError, ValueError, RecursionError):
        return None


def _parse_llama31_ftrl(text: str) -> Message:
    start = text.find(PYTHON_TAG)
    if start == -1:
        # The tag is a special token that decoding may have dropped: try the whole text as a call.
        payload_text, content = text.strip(), ""
    else:
        payload_text = text[start:].lstrip(_LLAMA_TAG_CHARS).strip()
        content = text[:start].strip()
    payload = tolerant_json_loads(payload_text.split(PYTHON_TAG)[0])
    if isinstance(payload, list):
        # The reference indexes [0] here and would crash on an empty list; that is no call.
        payload = payload[0] if payload else None
    call = _llama_call(payload, _timestamp_call_id(), strict=False) if payload else None
    if call is None:
        return _message(text.strip(), None)
    return _message(content, [call])


def _parse_llama31_fixed(text: str) -> Message:
    thinking, visible = split_thinking(text)
    start = visible.find(PYTHON_TAG)
    if start == -1:
        # Without the tag, only a response that *is* a JSON call counts (not JSON quoted in prose).
        segments, content = ([visible] if visible[:1] in ("{", "[") else []), ""
    else:
        segments, content = visible[start:].split(PYTHON_TAG)[1:], visible[:start].strip()
    calls = []
    for segment in segments:
        payload = tolerant_json_loads(segment)
        for item in payload if isinstance(payload, list) else [payload]:
            call = _llama_call(item, _unique_call_id(), strict=True)
            if call is not None:
                calls.append(call)
    if not calls:
        return _message(visible, None, thinking)
    return _message(content, calls, thinking)


def parse_llama31(text: str, compat: str = "ftrl") -> Message:
    """Parse Llama 3.1 ``<|python_tag|>{"name": .., "parameters": {..}}`` output.

    ``compat="ftrl"``: as the reference, at most the first call is read (from the tag, or from the
    whole text when the tag is absent) and its JSON is repaired leniently. When a call parses
    without a tag, ``content`` is ``""`` (the reference leaves it None). ``compat="fixed"``:
    thoughts removed, every tagged segment read (a segment may hold a list of calls), names must be
    non-empty strings and parameters dicts, ids unique.
    """
    check_compat(compat)
    try:
        if compat == "ftrl":
            return _parse_llama31_ftrl(text)
        return _parse_llama31_fixed(text)
    except (ValueError, TypeError, RecursionError, MemoryError):
        # The repair path is heuristic; a text it cannot handle is plain content, never an error.
        return _message(text.strip(), None)


def get_parser(family: str, compat: str = "ftrl") -> Callable[[str], Message]:
    """The registered parser for ``family`` ("qwen", "llama31") with ``compat`` bound."""
    check_compat(compat)
    return functools.partial(PARSERS.get(family), compat=compat)
