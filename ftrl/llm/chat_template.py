"""The Qwen-style chat template of the offline tiny models, and a renderer that needs no tokenizer.

The template text lives in ``ftrl/assets/chat_template.jinja`` and follows the public Qwen3 / Hermes
conventions, so the reward parser and the tool-call format are the ones real Qwen models use:

* every turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``;
* a ``tools`` list goes into the system turn (after the system text, if any) as a ``# Tools``
  section with one JSON schema per line inside ``<tools></tools>`` and the instruction to answer with
  ``<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>``;
* assistant ``tool_calls`` (the FTRL reference shape ``{"id", "type", "function": {"name",
  "arguments"}}`` or a bare ``{"name", "arguments"}``) render as ``<tool_call>`` blocks, one per
  call; arguments given as a JSON string are emitted verbatim, a dict is JSON-dumped;
* consecutive ``tool`` messages share one ``user`` turn, each inside
  ``<tool_response>\\n...\\n</tool_response>``;
* ``add_generation_prompt`` opens ``<|im_start|>assistant\\n``; ``enable_thinking=False`` adds the
  empty ``<think>\\n\\n</think>\\n\\n`` Qwen3 uses to switch thinking off, ``True`` (or leaving it
  unset, as in Qwen3) leaves the model free to open ``<think>`` itself.

Thoughts in earlier assistant turns (``reasoning_content`` or an inline ``<think>...</think>``
prefix) are **stripped by default**: the history shows only each turn's visible text and its tool
calls, whichever position the turn has. This keeps a snapshot's prompt independent of how much the
policy happened to think in earlier turns, and it is what a non-thinking turn produces anyway.
``keep_thoughts=True`` renders them back as ``<think>\\n{thought}\\n</think>\\n\\n`` before the text.
An unclosed ``<think>`` (a truncated turn) is left as written. ``content=None`` renders as empty.

    python -c "from ftrl.llm.chat_template import render_chat as r; \
print(r([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True))"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

TEMPLATE_RESOURCE = "chat_template.jinja"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
# Tags the model writes and the reward parser reads: single tokens that decoding keeps.
TOOL_TAGS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<tools>",
    "</tools>",
)
THINKING_OFF_PREFIX = "<think>\n\n</think>\n\n"


@lru_cache(maxsize=1)
def chat_template() -> str:
    """The Jinja source of the template (attached to tokenizers as ``tokenizer.chat_template``)."""
    return (resources.files("ftrl") / "assets" / TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    keep_thoughts: bool = False,
    template: str | None = None,
) -> str:
    """Render a conversation exactly as ``tokenizer.apply_chat_template(..., tokenize=False)`` does.

    It goes through transformers' own Jinja environment (same filters and whitespace rules), so it
    can build text before any tokenizer exists (e.g. the tokenizer's training corpus).
    ``enable_thinking=None`` leaves the variable undefined, the template's thinking-on default.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    options: dict[str, Any] = {"keep_thoughts": keep_thoughts}
    if enable_thinking is not None:
        options["enable_thinking"] = enable_thinking
    rendered, _ = render_jinja_template(
        conversations=[[dict(message) for message in messages]],
        tools=[dict(tool) for tool in tools] if tools else None,
        chat_template=template or chat_template(),
        add_generation_prompt=add_generation_prompt,
        **options,
    )
    return rendered[0]
