"""verl agent loop for step-level FTRL: render a snapshot with its own tools, generate ONE next turn.

verl 0.9 rolls out only through async servers driven by agent loops, and the loop is where a
prompt is tokenized. Each dataset row (``ftrl.train.verl_backend`` schema) names this loop in
``agent_name`` ("ftrl_step"); verl finds the class through the file given to
``actor_rollout_ref.rollout.agent.agent_loop_config_path``. For every row and sample it:

1. rebuilds the snapshot's messages from the Parquet row (``messages_from_row``) and its tool
   schemas from ``extra_info.tools`` (``tools_from_row``);
2. renders them through the model's chat template with those tools and the run's
   ``enable_thinking`` (``data.apply_chat_template_kwargs``), via verl's Continuous Token builder;
3. asks the rollout server for one completion of at most ``response_length`` tokens;
4. returns verl's ``AgentLoopOutput``: the prompt ids, the response ids (every response token is
   the model's, mask 1), their log-probs, and the response decoded *with* special tokens under
   ``extra_info["ftrl_response_text"]`` for the reward (the native trainer scores that text).

Why per-row tools rendered by the template, not a pre-rendered tool system prompt: the prompt
then is token for token what the native backend and the collection engine see
(``tokenizer.apply_chat_template(messages, tools=...)``) for any model family; where a template
puts the tool section (system turn, first user turn, its own wording) stays the template's
business; and the Parquet keeps the reference fields, so one file serves every model. The price is
that verl's own prompt-length filter cannot see per-row tools, so ``verl_backend.build_verl_rows``
filters with the same rendering before writing the file.

    python -m pytest tests/test_verl_backend.py -q -k agent_loop
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.utils.profiler import simple_timer

from ftrl.train.verl_backend import AGENT_NAME, RESPONSE_TEXT_KEY, messages_from_row, tools_from_row

log = logging.getLogger(__name__)


@register(AGENT_NAME)
class FTRLStepAgentLoop(AgentLoopBase):
    """One assistant turn for one snapshot, with the snapshot's own tools in the prompt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.response_length = int(self.rollout_config.response_length)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        if "raw_prompt" not in kwargs:
            raise KeyError(f"agent loop '{AGENT_NAME}' needs the raw_prompt field that verl's RLHFDataset adds; "
                           f"got fields {sorted(kwargs)}")
        messages = messages_from_row(kwargs["raw_prompt"])
        tools = tools_from_row(kwargs.get("extra_info"))
        prompt_ids = await self.ct_build_initial_tokens(messages, tools=tools)

        params = dict(sampling_params)
        params.setdefault("max_tokens", self.response_length)
        metrics: dict[str, Any] = {}
        with simple_timer("generate_sequences", metrics):
            output = await self.server_manager.generate(request_id=uuid4().hex, prompt_ids=prompt_ids,
                                                        sampling_params=params)
        response_ids = list(output.token_ids)[: self.response_length]
        logprobs = list(output.log_probs)[: len(response_ids)] if output.log_probs else None
        if not response_ids:
            # An aborted or empty generation: verl's postprocessing indexes the last response token, so
            # return one end-of-turn token (masked out of the loss) and score the empty text.
            log.warning("agent loop '%s': empty generation (stop reason %r); padded with eos, masked", AGENT_NAME,
                        getattr(output, "stop_reason", None))
            eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.pad_token_id
            return AgentLoopOutput(
                prompt_ids=list(prompt_ids), response_ids=[int(eos)], response_mask=[0],
                response_logprobs=[0.0] if output.log_probs is not None else None, num_turns=2,
                metrics={**metrics, "num_preempted": -1},
                extra_fields={**(output.extra_fields or {}), RESPONSE_TEXT_KEY: "", "turn_scores": [],
                              "tool_rewards": []},
            )
        metrics["num_preempted"] = output.num_preempted if output.num_preempted is not None else -1
        text = self.tokenizer.decode(response_ids, skip_special_tokens=False)
        return AgentLoopOutput(
            prompt_ids=list(prompt_ids),
            response_ids=response_ids,
            response_mask=[1] * len(response_ids),
            response_logprobs=logprobs,
            num_turns=2,
            metrics=metrics,
            # turn_scores/tool_rewards keep the schema of verl's own loops, which downstream code reads.
            extra_fields={**output.extra_fields, RESPONSE_TEXT_KEY: text, "turn_scores": [], "tool_rewards": []},
        )
