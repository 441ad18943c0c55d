"""Padding-free forward passes over a Llama-family causal LM's own modules, with a key/value cache.

transformers' ``generate`` pads every batch to its longest prompt, re-reads the whole history at each
turn of an episode, concatenates the key/value cache at every decoding step and copies it again to
expand grouped-query heads; on a small model on CPU those copies, not the matrix products, take the
time. This module runs the same model (its embedding, norms, projections, MLPs, rotary embedding
and head are called as they are, so LoRA adapters and frozen parameters behave as in the HF
forward) with only the attention and the bookkeeping replaced:

* tokens are **packed**: no padding anywhere; attention runs per row (causal, over the row's own
  prefix), a decoding step as one batched product over the cache rows;
* keys and values live in preallocated per-batch buffers written in place (:class:`KVBatch`), and
  attention reads grouped heads without copying them (``enable_gqa``);
* :class:`PrefixCache` keeps the keys and values of recent sequences, so the next turn of an episode
  (or the n samples of one prompt) computes only the tokens it does not share with one of them;
* :func:`continuation_logprobs` scores continuations of shared prompts for training: each prompt
  runs once per group, its samples attend to its keys and values (gradients flow through both).

The results equal the HF forward's up to float rounding (the order of a few sums differs), which
``tests/test_packed.py`` checks, with greedy decoding token for token. Models it does not cover
(other architectures, sliding windows, dynamic RoPE, attention dropout, gradient checkpointing) are
named by :func:`unsupported_reason`; callers then use the HF path.

    python -m pytest tests/test_packed.py -q
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")
PREFIX_BLOCK = 16  # tokens per block of the prefix cache's hash chain


# ------------------------------------------------------------------------------------ the model
def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a peft wrapper (LoRA layers stay in place inside it)."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def unsupported_reason(model: torch.nn.Module, training: bool = False) -> str | None:
    """Why the packed path cannot run ``model`` exactly (None when it can)."""
    inner = _inner(model)
    config = getattr(inner, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        return f"model_type {kind!r} (packed path: {list(SUPPORTED_MODEL_TYPES)})"
    core = getattr(inner, "model", None)
    if not all(hasattr(core, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model lacks embed_tokens/layers/norm/rotary_emb"
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])):
        return "sliding-window layers"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in SUPPORTED_ROPE_TYPES:
        return f"rope_type {rope.get('rope_type')!r}"
    if training and getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    if training and getattr(inner, "is_gradient_checkpointing", False):
        return "gradient checkpointing"
    return None


class Core:
    """The modules of one Llama-family model the packed forward calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        inner = _inner(model)
        self.model = inner.model
        # A causal LM's head, or a token-classification model's (PPO's critic: dropout, then a scalar score).
        self.lm_head = getattr(inner, "lm_head", None)
        self.score = getattr(inner, "score", None)
        self.head_dropout = getattr(inner, "dropout", None)
        config = inner.config
        self.layers = list(self.model.layers[: config.num_hidden_layers])
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.vocab_size = config.vocab_size
        weight = self.model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of each packed position: (T, 1, head_dim) each, as the model's rotary module gives them."""
        cos, sin = self.model.rotary_emb(x, positions[None])
        return cos[0, :, None], sin[0, :, None]

    def qkv(self, attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            query_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (T, H, D), keys (T, KVH, D) and values (T, KVH, D) of packed hidden states.

        ``query_rows``: the queries of these tokens only (the other tokens' outputs are not needed).
        """
        rows = h.shape[0]
        k = attn.k_proj(h).view(rows, -1, self.head_dim)
        v = attn.v_proj(h).view(rows, -1, self.head_dim)
        if query_rows is not None:
            h, qcos, qsin = h[query_rows], cos[query_rows], sin[query_rows]
        else:
            qcos, qsin = cos, sin
        q = attn.q_proj(h).view(h.shape[0], -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q * qcos + _rotate_half(q) * qsin, k * cos + _rotate_half(k) * sin, v

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's outputs after the final norm: LM logits (T, vocab), or a critic's scores (T, labels)."""
        hidden = self.model.norm(hidden)
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        if self.head_dropout is not None:
            hidden = self.head_dropout(hidden)
        return self.score(hidden).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Packing:
    """Where each of T packed tokens sits: its row and its position in that row's sequence."""

    row: torch.Tensor       # (T,)
    position: torch.Tensor  # (T,)
    width: int              # the most new tokens of a row

    @classmethod
    def of(cls, counts: Sequence[int], starts: Sequence[int], device: torch.device) -> Packing:
        counts_t = torch.as_tensor(list(counts), dtype=torch.long)
        row = torch.repeat_interleave(torch.arange(len(counts_t)), counts_t)
        first = torch.cumsum(counts_t, 0) - counts_t
        position = torch.as_tensor(list(starts), dtype=torch.long)[row] + torch.arange(int(counts_t.sum())) - first[row]
        width = int(counts_t.max()) if len(counts_t) else 0
        return cls(row.to(device), position.to(device), width)


def _decode_mask(lengths: torch.Tensor, present: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (rows, 1, 1, span) of one decoding step: a row sees its first ``lengths`` keys.

    Rows without a new token (``present`` False) see key 0 only, so no softmax row is empty.
    """
    key = torch.arange(span, device=lengths.device)
    allowed = torch.where(present[:, None], key[None, :] < lengths[:, None], key[None, :] == 0)
    return torch.zeros(allowed.shape, dtype=dtype, device=lengths.device).masked_fill(~allowed, float("-inf"))[:, None,
                                                                                                               None]


def _attend_step(core: Core, q: torch.Tensor, pack: Packing, keys: torch.Tensor, values: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """One query per row (a decoding step) against the batch's keys/values (rows, KVH, span, D): (T, H * D).

    Grouped heads as a batched product (no copy of the keys per query head, no kernel setup).
    """
    rows = keys.shape[0]
    groups = core.heads // core.kv_heads
    query = q.new_zeros(rows, core.heads, core.head_dim).index_put((pack.row,), q)
    query = query.view(rows, core.kv_heads, groups, core.head_dim)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * core.scaling + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), values).view(rows, core.heads, core.head_dim)
    return out[pack.row].reshape(q.shape[0], -1)


def _attend_rows(core: Core, queries: Sequence[torch.Tensor],
                 rows_kv: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
    """Causal attention of each row's queries ``queries[r]`` (n, H, D) against its keys/values: (sum n, H * D).

    ``rows_kv[r]`` are row r's keys and values (KVH, S, D), whose last ``n`` positions are the row's
    queries (earlier ones: its cached or prompt prefix); None for a row without queries. One attention
    call per row, no padding; rows come from ``split`` (whose backward is one concatenation, where
    slicing a packed tensor per row would allocate a full-size gradient per row).
    """
    outputs = []
    for query, kv in zip(queries, rows_kv):
        count = query.shape[0]
        if count == 0 or kv is None:
            continue
        keys, values = kv
        prefix = keys.shape[1] - count
        mask = None
        if prefix:
            position = torch.arange(count, device=query.device)[:, None]
            mask = torch.arange(keys.shape[1], device=query.device)[None, :] <= prefix + position
        out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                             is_causal=not prefix, scale=core.scaling,
                                             enable_gqa=core.heads != core.kv_heads)
        outputs.append(out[0].transpose(0, 1).reshape(count, -1))
    return torch.cat(outputs)


def _bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each row's tokens in the packed order."""
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def _block(layer: torch.nn.Module, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Residual + attention output, then the MLP half of a decoder layer."""
    x = x + layer.self_attn.o_proj(attention)
    return x + layer.mlp(layer.post_attention_layernorm(x))


# ------------------------------------------------------------------------------------ inference
class KVBatch:
    """Keys and values of a batch of rows, (rows, KVH, capacity, D) per layer; row r holds lengths[r] tokens."""

    def __init__(self, core: Core, rows: int, capacity: int) -> None:
        shape = (rows, core.kv_heads, capacity, core.head_dim)
        self.k = [torch.zeros(shape, dtype=core.dtype, device=core.device) for _ in core.layers]
        self.v = [torch.zeros(shape, dtype=core.dtype, device=core.device) for _ in core.layers]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=core.device)

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (in that order; a row may repeat)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.lengths = self.lengths.index_select(0, rows)

    def load(self, row: int, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Put a cached prefix (per layer (KVH, >= length, D) keys and values) at the start of ``row``."""
        for index, (k, v) in enumerate(layers):
            self.k[index][row, :, :length] = k[:, :length]
            self.v[index][row, :, :length] = v[:, :length]
        self.lengths[row] = length

    def export(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[row, :, :length].clone(), v[row, :, :length].clone()) for k, v in zip(self.k, self.v)]


@torch.inference_mode()
def extend(core: Core, cache: KVBatch, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """Append ``tokens[r]`` (may be empty) to each row of ``cache``; the logits after each row's last one.

    Returns (rows, vocab) float logits (rows without new tokens: zeros).
    """
    counts = [len(t) for t in tokens]
    starts = cache.lengths
    pack = Packing.of(counts, starts.tolist(), core.device)
    ids = torch.tensor([token for row in tokens for token in row], dtype=torch.long, device=core.device)
    counts_t = torch.as_tensor(counts, dtype=torch.long, device=core.device)
    ends = starts + counts_t
    step = pack.width == 1  # a decoding step: one batched product over the cache rows
    mask = _decode_mask(ends, counts_t > 0, int(ends.max()), core.dtype) if step else None
    stops = ends.tolist()
    present = counts_t > 0
    last = (torch.cumsum(counts_t, 0) - 1)[present]
    x = core.model.embed_tokens(ids)
    cos, sin = core.rotary(x, pack.position)
    for index, layer in enumerate(core.layers):
        # The last layer runs only each row's last token past its keys/values: the others' outputs are unused.
        final = index == len(core.layers) - 1 and not step
        q, k, v = core.qkv(layer.self_attn, layer.input_layernorm(x), cos, sin, last if final else None)
        cache.k[index][pack.row, :, pack.position] = k
        cache.v[index][pack.row, :, pack.position] = v
        keys, values = cache.k[index], cache.v[index]
        if step:
            span = mask.shape[-1]
            attention = _attend_step(core, q, pack, keys[:, :, :span], values[:, :, :span], mask)
        else:
            rows_kv = [(keys[r, :, :stop], values[r, :, :stop]) if count else None
                       for r, (stop, count) in enumerate(zip(stops, counts))]
            attention = _attend_rows(core, q.split([min(c, 1) for c in counts] if final else counts), rows_kv)
        x = _block(layer, x[last] if final else x, attention)
    cache.lengths = ends
    logits = torch.zeros(cache.rows, core.vocab_size, dtype=torch.float32, device=core.device)
    logits[present] = core.logits(x if not step else x[last])
    return logits


class SharedKVBatch:
    """Rows that continue shared prefixes (the n samples of a prompt): each prefix's keys/values once.

    ``prefix`` holds one row per distinct prefix (its ``lengths`` are the prefix lengths), ``owner[r]``
    is row r's prefix, ``own`` holds each row's tokens after it. A decoding step reads each prefix
    once for all rows that share it (:func:`_attend_shared`) instead of once per row.
    """

    def __init__(self, core: Core, prefix: KVBatch, owner: torch.Tensor, capacity: int) -> None:
        self.prefix, self.owner = prefix, owner
        self.own = KVBatch(core, len(owner), capacity)
        self._slots()

    def _slots(self) -> None:
        """Each row's place among its prefix's rows (for the grouped product)."""
        taken: dict[int, int] = {}
        slots = []
        for owner in self.owner.tolist():
            slots.append(taken.get(owner, 0))
            taken[owner] = slots[-1] + 1
        self.slot = torch.as_tensor(slots, dtype=torch.long, device=self.owner.device)
        self.width = max(taken.values(), default=0)

    @property
    def rows(self) -> int:
        return self.own.rows

    @property
    def lengths(self) -> torch.Tensor:
        return self.prefix.lengths[self.owner] + self.own.lengths

    def select(self, rows: torch.Tensor) -> None:
        self.own.select(rows)
        self.owner = self.owner.index_select(0, rows)
        self._slots()

    def export(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        owner = int(self.owner[row])
        shared = int(self.prefix.lengths[owner])
        return [(torch.cat([pk[owner, :, :shared], ok[row, :, :length - shared]], dim=1),
                 torch.cat([pv[owner, :, :shared], ov[row, :, :length - shared]], dim=1))
                for pk, pv, ok, ov in zip(self.prefix.k, self.prefix.v, self.own.k, self.own.v)]


def _attend_shared(core: Core, q: torch.Tensor, rows: torch.Tensor, cache: SharedKVBatch, index: int,
                   masks: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One decoding step's attention over shared prefixes (read once per prefix) and each row's own tokens."""
    groups, dim = core.heads // core.kv_heads, core.head_dim
    total, prefixes = cache.rows, cache.prefix.rows
    query = q.new_zeros(total, core.kv_heads, groups, dim).index_put((rows,), q.view(-1, core.kv_heads, groups, dim))
    prefix_mask, own_mask = masks
    prefix_k = cache.prefix.k[index][:, :, :prefix_mask.shape[-1]]
    prefix_v = cache.prefix.v[index][:, :, :prefix_mask.shape[-1]]
    own_k = cache.own.k[index][:, :, :own_mask.shape[-1]]
    own_v = cache.own.v[index][:, :, :own_mask.shape[-1]]
    # Queries grouped by prefix: (prefixes, KVH, width * G, D) against each prefix's keys.
    grouped = query.new_zeros(prefixes, cache.width, core.kv_heads, groups, dim)
    grouped = grouped.index_put((cache.owner, cache.slot), query).permute(0, 2, 1, 3, 4)
    grouped = grouped.reshape(prefixes, core.kv_heads, cache.width * groups, dim)
    shared = torch.matmul(grouped, prefix_k.transpose(-1, -2)) * core.scaling + prefix_mask
    shared = shared.view(prefixes, core.kv_heads, cache.width, groups, -1).permute(0, 2, 1, 3, 4)
    shared = shared[cache.owner, cache.slot]  # (rows, KVH, G, prefix span)
    own = torch.matmul(query, own_k.transpose(-1, -2)) * core.scaling + own_mask
    weights = torch.softmax(torch.cat([shared, own], dim=-1), dim=-1)
    split = shared.shape[-1]
    to_prefix = weights[..., :split].new_zeros(prefixes, cache.width, core.kv_heads, groups, split)
    to_prefix = to_prefix.index_put((cache.owner, cache.slot), weights[..., :split]).permute(0, 2, 1, 3, 4)
    out = torch.matmul(to_prefix.reshape(prefixes, core.kv_heads, cache.width * groups, split), prefix_v)
    out = out.view(prefixes, core.kv_heads, cache.width, groups, dim).permute(0, 2, 1, 3, 4)[cache.owner, cache.slot]
    out = out + torch.matmul(weights[..., split:], own_v)
    return out[rows].reshape(q.shape[0], -1)


@torch.inference_mode()
def decode_step(core: Core, cache: KVBatch | SharedKVBatch, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token to each of ``rows`` (a cache row index each); the logits after it, (len(rows), vocab)."""
    if isinstance(cache, SharedKVBatch):
        return _decode_shared(core, cache, rows, tokens)
    positions = cache.lengths.index_select(0, rows)
    ends = cache.lengths.index_add(0, rows, torch.ones_like(rows))
    present = torch.zeros(cache.rows, dtype=torch.bool, device=core.device).index_fill(0, rows, True)
    mask = _decode_mask(ends, present, int(ends.max()), core.dtype)
    span = mask.shape[-1]
    pack = Packing(rows, positions, 1)
    logits = _decode_layers(core, tokens, positions, cache, rows, positions,
                            lambda index, q: _attend_step(core, q, pack, cache.k[index][:, :, :span],
                                                          cache.v[index][:, :, :span], mask))
    cache.lengths = ends
    return logits


def _decode_layers(core: Core, tokens: torch.Tensor, positions: torch.Tensor, buffers: KVBatch,
                   rows: torch.Tensor, slots: torch.Tensor,
                   attend: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One new token per row through every layer: its keys/values written to ``buffers`` at (rows, slots),
    ``attend(layer index, queries)`` giving the attention output; returns the logits."""
    x = core.model.embed_tokens(tokens)
    cos, sin = core.rotary(x, positions)
    for index, layer in enumerate(core.layers):
        q, k, v = core.qkv(layer.self_attn, layer.input_layernorm(x), cos, sin)
        buffers.k[index][rows, :, slots] = k
        buffers.v[index][rows, :, slots] = v
        x = _block(layer, x, attend(index, q))
    return core.logits(x)


def _decode_shared(core: Core, cache: SharedKVBatch, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    own = cache.own
    positions = (cache.prefix.lengths[cache.owner] + own.lengths).index_select(0, rows)
    own_positions = own.lengths.index_select(0, rows)
    ends = own.lengths.index_add(0, rows, torch.ones_like(rows))
    present = torch.zeros(own.rows, dtype=torch.bool, device=core.device).index_fill(0, rows, True)
    key = torch.arange(int(ends.max()), device=core.device)
    own_mask = torch.zeros(own.rows, 1, 1, key.shape[0], dtype=core.dtype, device=core.device).masked_fill(
        ~((key[None, :] < ends[:, None]) & present[:, None])[:, None, None], float("-inf"))
    prefix_lengths = cache.prefix.lengths
    key = torch.arange(int(prefix_lengths.max()), device=core.device)
    prefix_mask = torch.zeros(cache.prefix.rows, 1, 1, key.shape[0], dtype=core.dtype, device=core.device).masked_fill(
        ~(key[None, :] < prefix_lengths[:, None])[:, None, None], float("-inf"))
    logits = _decode_layers(core, tokens, positions, own, rows, own_positions,
                            lambda index, q: _attend_shared(core, q, rows, cache, index, (prefix_mask, own_mask)))
    own.lengths = ends
    return logits


class PrefixCache:
    """Keys and values of recent token sequences, found again by their longest shared prefix.

    Entries are indexed by a hash chain over blocks of ``PREFIX_BLOCK`` tokens (vLLM's scheme), so a
    lookup costs one dict probe per block; the match is then checked and extended token by token.
    Least recently used entries leave once the stored tensors exceed ``budget_bytes`` or there are more
    than ``max_entries`` (an episode needs only its latest turn's entry, so twice the number of
    episodes in flight is plenty, and memory stays flat however many episodes run).
    """

    def __init__(self, budget_bytes: int, max_entries: int = 64) -> None:
        self.budget = budget_bytes
        self.max_entries = max_entries
        self.entries: OrderedDict[int, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]], int]] = OrderedDict()
        self.blocks: dict[int, int] = {}
        self.bytes = 0
        self._next = 0
        self.hits = 0
        self.reused_tokens = 0

    @staticmethod
    def _chain(ids: Sequence[int]) -> list[int]:
        keys, key = [], 0
        for start in range(0, len(ids) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
            key = hash((key, tuple(ids[start:start + PREFIX_BLOCK])))
            keys.append(key)
        return keys

    def lookup(self, ids: Sequence[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """(matched length, per-layer keys/values) of the stored sequence sharing the longest prefix."""
        found = None
        for key in self._chain(ids):
            entry = self.blocks.get(key)
            if entry is None or entry not in self.entries:
                break
            found = entry
        if found is None:
            return 0, None
        stored, layers, _ = self.entries[found]
        length = 0
        limit = min(len(stored), len(ids))
        while length < limit and stored[length] == ids[length]:
            length += 1
        self.entries.move_to_end(found)
        self.hits += 1
        self.reused_tokens += length
        return length, layers

    def add(self, ids: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.budget or len(ids) < PREFIX_BLOCK:
            return
        handle, self._next = self._next, self._next + 1
        self.entries[handle] = (list(ids), layers, size)
        for key in self._chain(ids):
            self.blocks[key] = handle
        self.bytes += size
        while self.bytes > self.budget or len(self.entries) > self.max_entries:
            old, (old_ids, _, old_size) = self.entries.popitem(last=False)
            self.bytes -= old_size
            for key in self._chain(old_ids):
                if self.blocks.get(key) == old:
                    del self.blocks[key]

    def clear(self) -> None:
        self.entries.clear()
        self.blocks.clear()
        self.bytes = 0


# ------------------------------------------------------------------------------------ training
def _prompt_pass(core: Core, prompts: Sequence[Sequence[int]]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                                        torch.Tensor]:
    """Run the prompts (no cache): per layer their packed keys/values (T, KVH, D), and each last token's logits."""
    counts = [len(p) for p in prompts]
    pack = Packing.of(counts, [0] * len(prompts), core.device)
    bounds = _bounds(counts)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=core.device)
    x = core.model.embed_tokens(ids)
    cos, sin = core.rotary(x, pack.position)
    layers = []
    last = torch.as_tensor([stop - 1 for _, stop in bounds], dtype=torch.long, device=core.device)
    for index, layer in enumerate(core.layers):
        # The last layer runs only each prompt's last token past its keys/values: the others' outputs are unused.
        final = index == len(core.layers) - 1
        q, k, v = core.qkv(layer.self_attn, layer.input_layernorm(x), cos, sin, last if final else None)
        layers.append((k, v))
        rows_kv = [(kr.transpose(0, 1), vr.transpose(0, 1)) for kr, vr in zip(k.split(counts), v.split(counts))]
        attention = _attend_rows(core, q.split([1] * len(prompts) if final else counts), rows_kv)
        x = _block(layer, x[last] if final else x, attention)
    return layers, core.logits(x)


def _continuation_pass(core: Core, prompt_layers: list[tuple[torch.Tensor, torch.Tensor]],
                       prompt_bounds: Sequence[tuple[int, int]], group: Sequence[int],
                       inputs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits after each token of ``inputs[b]``, which continues prompt ``group[b]``: (sum of lengths, vocab)."""
    counts = [len(t) for t in inputs]
    starts = [prompt_bounds[g][1] - prompt_bounds[g][0] for g in group]
    pack = Packing.of(counts, starts, core.device)
    ids = torch.tensor([t for row in inputs for t in row], dtype=torch.long, device=core.device)
    x = core.model.embed_tokens(ids)
    cos, sin = core.rotary(x, pack.position)
    prompt_counts = [stop - start for start, stop in prompt_bounds]
    for layer, (prompt_k, prompt_v) in zip(core.layers, prompt_layers):
        q, k, v = core.qkv(layer.self_attn, layer.input_layernorm(x), cos, sin)
        prompt_rows = list(zip(prompt_k.split(prompt_counts), prompt_v.split(prompt_counts)))
        rows_kv = []
        for g, own_k, own_v in zip(group, k.split(counts), v.split(counts)):
            rows_kv.append((torch.cat([prompt_rows[g][0], own_k]).transpose(0, 1),
                            torch.cat([prompt_rows[g][1], own_v]).transpose(0, 1)) if own_k.shape[0] else None)
        x = _block(layer, x, _attend_rows(core, q.split(counts), rows_kv))
    return core.logits(x)


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per row, as verl's ``logprobs_from_logits`` computes it on CPU."""
    if logits.dtype in (torch.float32, torch.float64):
        return logits.gather(-1, labels[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return F.log_softmax(logits, dim=-1).gather(-1, labels[:, None])[:, 0]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits``: logsumexp - sum(softmax * logits)."""
    return torch.logsumexp(logits, dim=-1) - torch.sum(F.softmax(logits, dim=-1) * logits, dim=-1)


def continuation_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], group: Sequence[int],
                          with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability (and entropy) of each token of ``continuations[b]`` after ``prompts[group[b]]``.

    Each prompt runs once however many continuations share it. Returns (B, R) tensors, R the longest
    continuation (at least 1), zero past a row's end; differentiable unless called under no_grad.
    """
    outputs = _continuation_outputs(model, prompts, continuations, group, "continuation_logprobs")
    labels = torch.as_tensor([continuations[b][j] for b, j in outputs.keys], dtype=torch.long,
                             device=outputs.head.device)
    log_probs = outputs.scatter(_token_logprobs(outputs.head, labels))
    entropy = outputs.scatter(_entropy(outputs.head)) if with_entropy else None
    return log_probs, entropy


def continuation_values(critic: torch.nn.Module, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], group: Sequence[int]) -> torch.Tensor:
    """A critic's value of the state before each token of ``continuations[b]`` after ``prompts[group[b]]``.

    ``critic`` is a token-classification model with one label (``ftrl.llm.models.load_value_model``);
    the value before token j is its score at the token before it (the prompt's last token for j = 0),
    as the padded forward of ``ftrl.train.batch.value_predictions`` reads it. (B, R), zero past a
    row's end; each prompt runs once however many continuations share it.
    """
    outputs = _continuation_outputs(critic, prompts, continuations, group, "continuation_values")
    return outputs.scatter(outputs.head[:, 0])


@dataclass
class _Outputs:
    """The head's outputs at the positions that predict each continuation token, and where they go."""

    head: torch.Tensor                  # (N, outputs): one row per continuation token
    keys: list[tuple[int, int]]         # (row, column) of each
    shape: tuple[int, int]              # (rows, widest continuation, at least 1)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) values into a zero (rows, width) tensor at ``keys``."""
        rows = torch.as_tensor([b for b, _ in self.keys], dtype=torch.long, device=values.device)
        cols = torch.as_tensor([j for _, j in self.keys], dtype=torch.long, device=values.device)
        return torch.zeros(self.shape, dtype=values.dtype, device=values.device).index_put((rows, cols), values)


def _continuation_outputs(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], group: Sequence[int], caller: str) -> _Outputs:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"{caller}: every prompt needs at least one token")
    core = Core(model)
    rows = len(continuations)
    width = max([1] + [len(c) for c in continuations])
    group_t = torch.as_tensor(list(group), dtype=torch.long, device=core.device)
    prompt_layers, first = _prompt_pass(core, prompts)
    inputs = [list(c[:-1]) for c in continuations]
    head = first.index_select(0, group_t)
    counts = [len(c) for c in continuations]
    # Outputs in the order of ``head``: every row's first token (predicted by its prompt's last
    # token), then the later tokens of every row (predicted by the continuation pass), packed.
    keys = [(b, 0) for b in range(rows)]
    if any(inputs):
        head = torch.cat([head, _continuation_pass(core, prompt_layers, _bounds([len(p) for p in prompts]),
                                                   list(group), inputs)])
        keys += [(b, j + 1) for b, row in enumerate(inputs) for j in range(len(row))]
    present = [i for i, (b, _) in enumerate(keys) if counts[b] > 0]
    index = torch.as_tensor(present, dtype=torch.long, device=core.device)
    return _Outputs(head.index_select(0, index), [keys[i] for i in present], (rows, width))
