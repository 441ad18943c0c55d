"""Token batches for policy-gradient updates: left-padded prompts + right-padded responses.

The layout is verl's: ``input_ids = [prompt (left-padded) | response (right-padded)]``, a
``response_mask`` over the response part (every generated token including the end-of-turn token),
and per-token log-probabilities of the response under a model, computed in micro-batches
(:func:`batch_logprobs`: padding-free, each distinct prompt once, where the model allows).

    python -m pytest tests/test_algorithms.py -q
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor       # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor    # (B, P + R)
    response_mask: torch.Tensor   # (B, R) float
    prompt_length: int            # P

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]

    def select(self, rows: torch.Tensor | Sequence[int]) -> TokenBatch:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return TokenBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                          self.response_mask[rows], self.prompt_length)

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                          self.response_mask.to(device), self.prompt_length)


def make_token_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Pack (prompt ids, response ids) pairs; empty responses get an all-zero response mask."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for r in responses))
    batch = len(prompts)
    input_ids = torch.full((batch, prompt_len + response_len), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, prompt_len + response_len), dtype=torch.long)
    response_mask = torch.zeros((batch, response_len), dtype=torch.float32)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, prompt_len - len(prompt):prompt_len] = torch.tensor(list(prompt), dtype=torch.long)
        attention[row, prompt_len - len(prompt):prompt_len] = 1
        if response:
            input_ids[row, prompt_len:prompt_len + len(response)] = torch.tensor(list(response), dtype=torch.long)
            attention[row, prompt_len:prompt_len + len(response)] = 1
            response_mask[row, :len(response)] = 1.0
    position_ids = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    return TokenBatch(input_ids, attention, position_ids, response_mask, prompt_len)


def micro_batches(size: int, micro_batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, size, micro_batch_size):
        yield torch.arange(start, min(start + micro_batch_size, size))


def trim(batch: TokenBatch) -> TokenBatch:
    """Drop columns that are padding in every row (a micro-batch's own prompt/response extent)."""
    keep_prompt = batch.attention_mask[:, :batch.prompt_length].any(dim=0)
    first = int(keep_prompt.nonzero()[0]) if keep_prompt.any() else batch.prompt_length
    response_len = int(batch.response_mask.sum(dim=-1).max().item()) if batch.size else 0
    response_len = max(response_len, 1)
    end = batch.prompt_length + response_len
    return TokenBatch(batch.input_ids[:, first:end], batch.attention_mask[:, first:end],
                      batch.position_ids[:, first:end], batch.response_mask[:, :response_len],
                      batch.prompt_length - first)


def response_logprobs(model: torch.nn.Module, batch: TokenBatch, with_entropy: bool = False,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability (and entropy) of each response token under ``model``: (B, R) each.

    The batch is trimmed to its own extent first, so the outputs cover ``trim(batch)``'s response
    length; callers pad back with :func:`pad_to`.
    """
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    trimmed = trim(batch)
    response_len = trimmed.response_mask.shape[1]
    # Only the positions that predict response tokens need logits: the last response_len + 1
    # positions, of which all but the final one are used; the prompt's logits are never computed.
    output = model(input_ids=trimmed.input_ids, attention_mask=trimmed.attention_mask,
                   position_ids=trimmed.position_ids, use_cache=False, logits_to_keep=response_len + 1)
    prompt_len = trimmed.prompt_length
    logits = output.logits[:, :response_len].float()
    log_probs = logprobs_from_logits(logits, trimmed.input_ids[:, prompt_len: prompt_len + response_len])
    entropy = entropy_from_logits(logits) if with_entropy else None
    return log_probs, entropy


def batch_logprobs(model: torch.nn.Module, batch: TokenBatch, with_entropy: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`response_logprobs`, padding-free where the model allows (``ftrl.llm.engines.packed``).

    Rows with the same prompt (the n samples of a GRPO group) run that prompt once and attend to its
    keys and values; no padding goes through the model. Same outputs (up to float rounding) and the
    same shapes as :func:`response_logprobs`, which models the packed path does not cover still use.
    """
    from ftrl.llm.engines.packed import continuation_logprobs, unsupported_reason

    if unsupported_reason(model, training=model.training) is not None:
        return response_logprobs(model, batch, with_entropy=with_entropy)
    prompts, responses, group = grouped_rows(batch)
    return continuation_logprobs(model, prompts, responses, group, with_entropy=with_entropy)


def grouped_rows(batch: TokenBatch) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """The distinct prompts, each row's response ids and the index of its prompt (padding removed)."""
    prompts, responses = split_rows(batch)
    distinct: dict[tuple[int, ...], int] = {}
    group = [distinct.setdefault(tuple(prompt), len(distinct)) for prompt in prompts]
    return [list(prompt) for prompt in distinct], responses, group


def split_rows(batch: TokenBatch) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's prompt ids and response ids, padding removed."""
    ids = batch.input_ids.cpu()
    prompt_mask = batch.attention_mask[:, :batch.prompt_length].cpu().bool()
    response_lengths = batch.response_mask.cpu().sum(dim=-1).long().tolist()
    prompts = [row[mask].tolist() for row, mask in zip(ids[:, :batch.prompt_length], prompt_mask)]
    responses = [row[:length].tolist() for row, length in zip(ids[:, batch.prompt_length:], response_lengths)]
    return prompts, responses


def value_predictions(critic: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Critic value of each response position (the state before the token), (B, R_trimmed).

    Padding-free where the critic allows (``ftrl.llm.engines.packed.continuation_values``: the n
    samples of a group share their prompt's pass), as :func:`batch_logprobs`; otherwise one padded forward.
    """
    from ftrl.llm.engines.packed import continuation_values, unsupported_reason

    if unsupported_reason(critic, training=critic.training) is None:
        return continuation_values(critic, *grouped_rows(batch))
    trimmed = trim(batch)
    output = critic(input_ids=trimmed.input_ids, attention_mask=trimmed.attention_mask,
                    position_ids=trimmed.position_ids, use_cache=False)
    values = output.logits.squeeze(-1).float()
    prompt_len = trimmed.prompt_length
    response_len = trimmed.response_mask.shape[1]
    return values[:, prompt_len - 1: prompt_len - 1 + response_len]


def pad_to(values: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad (B, r) with zeros to (B, length)."""
    if values.shape[1] == length:
        return values
    return torch.nn.functional.pad(values, (0, length - values.shape[1]))
