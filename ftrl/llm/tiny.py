"""Offline tiny models: a locally trained tokenizer and a seeded Qwen3-shaped causal LM.

No machine here reaches the Hugging Face hub, so the default run builds its base model in-process:

* :func:`build_tokenizer` trains a byte-level BPE tokenizer with ``tokenizers`` (any text encodes;
  the same corpus gives the same vocabulary). Its pre-tokenizer cuts out capitalised words, single
  digits and newlines and leaves everything between them as one chunk, so an argument such as
  ``Paris`` or ``2023`` is the same token(s) in the question, the tool call and the tool output,
  while templated glue (``", "arguments": {"``) merges into few tokens: prompts come out ~4x shorter
  than with Qwen's regex (docs/reference.md §9). ``<|im_start|>``, ``<|im_end|>`` (eos) and ``<|endoftext|>``
  (pad) are special; the tool and thought tags are single tokens that decoding keeps, as in Qwen.
  Names and ids of the environment set (:func:`atomic_words_from_records`: tool and parameter names,
  argument values, sub-answers) are added as single tokens, so choosing a tool or passing an id
  is copying one token from the context.
* :func:`build_tiny_model` makes a ``Qwen3ForCausalLM`` from :class:`ftrl.config.TinyModelConfig`,
  bit-identical for the same seed, with the vocabulary of the tokenizer.
* :func:`pretrain_copying` gives the fresh model the in-context copying skill that real LLMs bring
  from pretraining, on random synthetic sequences (a few hundred cheap steps); without it the
  tiny model needs far longer than a CPU demo allows to learn to copy an argument.
* :func:`create_tiny_base` writes both with ``save_pretrained`` (idempotent), so everything
  downstream loads the tiny model exactly like a real one (``model.path``).
* :func:`corpus_from_records` turns reference records into the tokenizer's training text.

    python -m ftrl.llm.tiny --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from ftrl.artifacts import atomic_dir
from ftrl.config import TinyModelConfig
from ftrl.llm.chat_template import END_OF_TEXT, IM_END, IM_START, TOOL_TAGS, chat_template, render_chat
from ftrl.llm.models import count_parameters, load_model_and_tokenizer
from ftrl.types import TOOL_ERROR_PREFIX, as_json_obj, make_tool_call

if TYPE_CHECKING:
    from ftrl.run_state import RunContext

log = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = (END_OF_TEXT, IM_START, IM_END)
# Capitalised words (any script), single digits, newlines: each becomes its own pre-token.
PRE_TOKENIZER_PATTERN = r"\p{Lu}\p{L}*|\p{N}|\n"
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS) + len(TOOL_TAGS)
BUILD_INFO_FILE = "ftrl_tiny.json"
# Files whose presence means a directory holds a loadable model + tokenizer.
REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


# ----------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(corpus: Iterable[str], vocab_size: int = 2048,
                    atomic_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it for transformers.

    The vocabulary has at most ``vocab_size`` entries (fewer when the corpus runs out of merges);
    ``len(tokenizer)`` is the exact size a model needs. Ids 0-2 are ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>``; ids 3-10 are the tags of ``TOOL_TAGS``.

    ``atomic_words`` (e.g. the ids and answers of an environment set, see
    :func:`atomic_words_from_records`) become single tokens wherever they occur, so an argument is
    one token in the question, in the call and in the tool output. A ~1M-parameter model then learns
    to copy it with one attention lookup; copying a multi-token id digit by digit needs induction
    heads that take far longer to form than a CPU demo allows.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the byte alphabet, special tokens and tool "
            f"tags alone take {MIN_VOCAB_SIZE}"
        )
    reserved = list(SPECIAL_TOKENS) + list(TOOL_TAGS)
    atomic = sorted(dict.fromkeys(w for w in atomic_words if w and w not in reserved))
    if vocab_size - len(atomic) < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for BPE after {len(atomic)} atomic words")
    # Encoding cuts text at reserved tokens before BPE runs; train on the same pieces so no merges
    # are spent on fragments such as "tool_call>" or on glue spanning "</tool_call><|im_end|>".
    boundary = re.compile("|".join(re.escape(token) for token in reserved))
    texts = [piece for text in corpus if text for piece in boundary.split(text) if piece]
    if not texts:
        raise ValueError("build_tokenizer: the corpus is empty")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(atomic),
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in reserved],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend = _unmark_tool_tags(backend)
    if atomic:
        backend.add_tokens([AddedToken(word, normalized=False, special=False) for word in atomic])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template()
    return tokenizer


def _unmark_tool_tags(backend: Tokenizer) -> Tokenizer:
    """Keep the tags single tokens but not special, so ``skip_special_tokens`` leaves them in text.

    The trainer registers every reserved token as special; the flag lives only in the serialised
    form, so it is edited there.
    """
    state = json.loads(backend.to_str())
    for entry in state["added_tokens"]:
        if entry["content"] in TOOL_TAGS:
            entry["special"] = False
    return Tokenizer.from_str(json.dumps(state))


# ----------------------------------------------------------------------------------------- corpus
def _builtin_tools() -> tuple[dict, dict]:
    """The two tool schemas of the built-in conversations: get_weather and get_population."""
    weather_tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather of a city on a date.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "date": {"type": "string", "description": "Date as YYYY-MM-DD"},
                },
                "required": ["city", "date"],
            },
        },
    }
    population_tool = {
        "type": "function",
        "function": {
            "name": "get_population",
            "description": "Return the population of a city in a year.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "year": {"type": "integer", "description": "Year"},
                },
                "required": ["city", "year"],
            },
        },
    }
    return weather_tool, population_tool


def _builtin_messages(index: int, city: str, other: str) -> list[dict]:
    """Conversation ``index``: population of ``city`` and weather in ``other``, both called in one turn."""
    year = 1990 + 7 * index
    population = str(100000 + 12345 * (index + 1))
    date = f"2024-0{1 + index % 9}-1{index}"
    return [
        {
            "role": "user",
            "content": f"What was the population of {city} in {year}, and the weather in "
            f"{other} on {date}?",
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                make_tool_call("get_population", {"city": city, "year": year}, f"call_{index}_0"),
                make_tool_call("get_weather", {"city": other, "date": date}, f"call_{index}_1"),
            ],
        },
        {"role": "tool", "content": population, "tool_call_id": f"call_{index}_0"},
        {"role": "tool", "content": "sunny" if index % 2 else "rain", "tool_call_id": f"call_{index}_1"},
        {
            "role": "assistant",
            "content": f"{city} had {population} people in {year}; {other} will see "
            f"{'sunny' if index % 2 else 'rain'}.",
            "tool_calls": None,
        },
    ]


def _builtin_conversations() -> list[tuple[list[dict], list[dict]]]:
    """A few deterministic tool-use conversations (messages, tools) in the reference format."""
    weather_tool, population_tool = _builtin_tools()
    cities = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Oslo"]
    conversations: list[tuple[list[dict], list[dict]]] = []
    for index, city in enumerate(cities):
        other = cities[(index + 3) % len(cities)]
        conversations.append((_builtin_messages(index, city, other), [weather_tool, population_tool]))
    return conversations


def fixed_corpus_text() -> list[str]:
    """Text every tiny tokenizer sees: characters, numbers and the template's own scaffolding."""
    lines = [
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -42 1e-3 50%",
        "! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~",
        f"{TOOL_ERROR_PREFIX} get_weather: missing argument 'city'",
        " ".join(TOOL_TAGS),
    ]
    for messages, tools in _builtin_conversations()[:2]:
        for enable_thinking in (False, True):
            lines.append(
                render_chat(messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking)
            )
        lines.append(
            render_chat(
                [{"role": "system", "content": "You are a helpful assistant."}] + messages, keep_thoughts=True
            )
        )
    return lines


def builtin_corpus() -> list[str]:
    """The small corpus the CLI and quick experiments build a tokenizer from."""
    corpus = fixed_corpus_text()
    for messages, tools in _builtin_conversations():
        corpus.append(render_chat(messages, tools))
    return corpus


def _record_field(record: Mapping[str, Any], key: str, index: int) -> Any:
    if key not in record:
        raise KeyError(f"record {index} lacks field '{key}'; has {sorted(record)}")
    try:
        return as_json_obj(record[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"record {index} field '{key}' is not valid JSON: {error}") from None


def corpus_from_records(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Training text that fits a tokenizer to an environment set of reference records.

    Per record: the rendered prompt (system, tool schemas, question, history, generation prompt),
    the tool outputs (the expected sub-answers) as tool responses, the final answer as an assistant
    turn and, when the record has ``gold_calls`` (JSON list of turns, each a list of ``{"name",
    "arguments"}``), the assistant turns that make those calls. :func:`fixed_corpus_text` is added
    once so every tokenizer covers characters, digits and the template's own strings.
    """
    corpus = fixed_corpus_text()
    for index, record in enumerate(records):
        messages = _record_field(record, "messages", index)
        tools = _record_field(record, "tools", index) or None
        unsolved = _record_field(record, "unsolved_set", index)
        answer = str(record.get("answer") or "")
        corpus.append(render_chat(messages, tools, add_generation_prompt=True, enable_thinking=False))
        tool_outputs = [
            {"role": "tool", "content": str(value)} for values in unsolved.values() for value in values
        ]
        if tool_outputs:
            corpus.append(render_chat(tool_outputs))
        if answer:
            corpus.append(render_chat([{"role": "assistant", "content": answer}]))
        if record.get("gold_calls"):
            turns = _record_field(record, "gold_calls", index)
            assistant_turns = [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [make_tool_call(call["name"], call["arguments"]) for call in turn],
                }
                for turn in turns
            ]
            corpus.append(render_chat(assistant_turns))
    return corpus


ATOMIC_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+\-_.]{0,31}$")


def atomic_words_from_records(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names and short values of an environment set that should each be one token.

    Tool names and parameter names from the schemas (so choosing a tool is copying one of the
    offered names, as larger models do), gold-call argument values and sub-answers (so an id is one
    token in the question, the call and the output). Only single words of up to 32 characters
    qualify; sentences and JSON never do. Sorted, so the result depends only on the set of words.
    """
    words: set[str] = set()
    for index, record in enumerate(records):
        values: list[Any] = [v for answers in _record_field(record, "unsolved_set", index).values() for v in answers]
        values += str(record.get("answer") or "").split(", ")
        for tool in _record_field(record, "tools", index) or []:
            function = tool.get("function", {}) if isinstance(tool, Mapping) else {}
            values.append(function.get("name"))
            values += list((function.get("parameters") or {}).get("properties") or {})
        if record.get("gold_calls"):
            for turn in _record_field(record, "gold_calls", index):
                for call in turn:
                    arguments = call.get("arguments") or {}
                    values += list(arguments.values()) if isinstance(arguments, dict) else []
        for value in values:
            if isinstance(value, (str, int)) and not isinstance(value, bool) and ATOMIC_WORD.match(str(value)):
                words.add(str(value))
    return sorted(words)


# ----------------------------------------------------------------------------------------- model
def _special_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no token {token!r}; build it with ftrl.llm.tiny.build_tokenizer")
    return int(token_id)


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    """A freshly initialised Qwen3-shaped model; the same (cfg, tokenizer, seed) gives equal tensors.

    The embedding has ``len(tokenizer)`` rows (``cfg.vocab_size`` is the tokenizer's target size).
    The global torch RNG is left as it was.
    """
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"hidden_size={cfg.hidden_size} must be divisible by "
            f"num_attention_heads={cfg.num_attention_heads}"
        )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={cfg.num_attention_heads} must be divisible by "
            f"num_key_value_heads={cfg.num_key_value_heads}"
        )
    vocab_size = len(tokenizer)
    if vocab_size != cfg.vocab_size:
        log.info("tiny model: vocab %d from the tokenizer (config target %d)", vocab_size, cfg.vocab_size)
    pad_id = _special_id(tokenizer, END_OF_TEXT)
    eos_id = _special_id(tokenizer, IM_END)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model = model.to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id,
        eos_token_id=[eos_id, pad_id],
        pad_token_id=pad_id,
    )
    return model


def atomic_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids of the atomic words (added tokens that are neither special tokens nor tool tags)."""
    reserved = set(SPECIAL_TOKENS) | set(TOOL_TAGS)
    return sorted(token_id for token_id, token in tokenizer.added_tokens_decoder.items()
                  if token.content not in reserved)


def pretrain_copying(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, steps: int, seed: int,
                     batch_size: int = 32, lr: float = 2e-3) -> list[float]:
    """Teach a fresh model in-context copying on synthetic sequences; return the loss per step.

    A randomly initialised model has none of the skills pretraining gives real LLMs, and the one
    tool use needs most is copying a value from the context (an id from the question into a call,
    a value from a tool output into the next call or the answer). Learned from the tool-use data
    alone, that circuit forms only after many hundreds of steps (measured: none after 800 warm-start
    steps). Here the model sees sequences of 10-60 random ordinary tokens with 1-3 atomic words
    inserted, then a separator, and learns to repeat the atomic words in order: a few hundred cheap
    steps. No environment content is involved (the sequences are random), so nothing about the
    tasks leaks into the base model.

    The circuit forms in a jump, not gradually (default sizes, seed 0: loss 3.4 at step 160, 0.88 at
    400, 0.34 at 560, 0.26 at 800). On the scaled default environments (prompts of 190 tokens with
    shuffled tools and look-alike distractors) a model stopped at 400 steps, mid-jump, warm-starts to
    held-out Solve-F1 1.2; at 800 steps (with the longer warm start of ``warmup.steps``) to 28-35.
    """
    atomic = atomic_token_ids(tokenizer)
    if steps <= 0 or not atomic:
        return []
    atomic_set = set(atomic)
    ordinary = [i for i in range(len(SPECIAL_TOKENS) + len(TOOL_TAGS), len(tokenizer)) if i not in atomic_set]
    separator = _special_id(tokenizer, IM_START)
    eos_id = _special_id(tokenizer, IM_END)
    pad_id = _special_id(tokenizer, END_OF_TEXT)
    rng = random.Random(f"copy-pretrain-{seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    from ftrl.progress import progress

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = progress(range(steps), desc="copy pretraining", unit="step")
        for _ in bar:
            rows = []
            for _ in range(batch_size):
                words = [rng.choice(atomic) for _ in range(rng.choice((1, 1, 2, 3)))]
                sequence = [rng.choice(ordinary) for _ in range(rng.randint(10, 60))]
                for offset, position in enumerate(sorted(rng.sample(range(len(sequence) + 1), len(words)))):
                    sequence.insert(position + offset, words[offset])
                rows.append((sequence + [separator], words + [eos_id]))
            loss = _continuation_loss(model, rows, pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def _continuation_loss(
    model: Qwen3ForCausalLM, rows: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> torch.Tensor:
    """Mean cross-entropy of each row's continuation given its prefix.

    Padding-free (``ftrl.llm.engines.packed``: only the continuations' logits are computed); a model
    the packed path does not cover runs as one right-padded batch.
    """
    from ftrl.llm.engines.packed import continuation_logprobs, unsupported_reason

    if unsupported_reason(model, training=True) is None:
        log_probs, _ = continuation_logprobs(model, [prefix for prefix, _ in rows], [target for _, target in rows],
                                             range(len(rows)))
        return -log_probs.sum() / sum(len(target) for _, target in rows)
    width = max(len(prefix) + len(target) for prefix, target in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prefix, target) in enumerate(rows):
        sequence = prefix + target
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        attention[row, :len(sequence)] = 1
        labels[row, len(prefix):len(sequence)] = torch.tensor(target)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def is_complete_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def create_tiny_base(cfg: TinyModelConfig, corpus: Iterable[str], out_dir: Path, seed: int,
                     atomic_words: Sequence[str] = ()) -> Path:
    """Build tokenizer + model and save them to ``out_dir``; return ``out_dir``.

    Idempotent: a directory that already holds a complete model is returned as it is. The files are
    written to a sibling temporary directory and renamed into place, so an interrupted build never
    leaves a half-written model behind.
    """
    out_dir = Path(out_dir)
    if is_complete_model_dir(out_dir):
        _warn_if_different(out_dir, cfg, seed)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        missing = [name for name in REQUIRED_FILES if not (out_dir / name).is_file()]
        raise FileExistsError(
            f"{out_dir} exists but is not a complete model (missing {missing}); "
            "remove it or choose another directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus, vocab_size=cfg.vocab_size, atomic_words=atomic_words)
    tokenizer.model_max_length = cfg.max_position_embeddings
    model = build_tiny_model(cfg, tokenizer, seed)
    started = time.time()
    losses = pretrain_copying(model, tokenizer, cfg.copy_pretrain_steps, seed,
                              batch_size=cfg.copy_pretrain_batch_size, lr=cfg.copy_pretrain_lr)
    if losses:
        tail = losses[-20:]
        log.info("tiny base: copy pretraining %d steps, loss %.2f -> %.2f in %.0f s", len(losses), losses[0],
                 sum(tail) / len(tail), time.time() - started)
    # out_dir, if it exists, is empty (checked above): replacing it removes nothing.
    with atomic_dir(out_dir, if_exists="replace") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _, total = count_parameters(model)
        info = {
            "config": dataclasses.asdict(cfg),
            "seed": seed,
            "copy_pretrain_loss": [round(x, 4) for x in losses[:: max(1, len(losses) // 20)]],
            "vocab_size": len(tokenizer),
            "parameters": total,
        }
        (staging / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("tiny base: %s params=%d vocab=%d seed=%d", out_dir, total, len(tokenizer), seed)
    return out_dir


def ensure_base_model(ctx: RunContext) -> Path | str:
    """The configured model, or the tiny model built once for this run from its train environments."""
    cfg = ctx.cfg
    if cfg.model.path is not None:
        return cfg.model.path
    from ftrl.envs.io import read_records

    out_dir = ctx.run_dir.base_model
    if "base_model" not in ctx.cache:
        train_path = ctx.run_dir.envs("train")
        if not train_path.exists():
            raise FileNotFoundError(f"{train_path} is missing: the tiny model's tokenizer is fitted to the "
                                    "train environments, so run the build_envs stage first")
        records = read_records(train_path)
        ctx.cache["base_model"] = create_tiny_base(cfg.model.tiny, corpus_from_records(records), out_dir,
                                                   seed=cfg.seed, atomic_words=atomic_words_from_records(records))
    return ctx.cache["base_model"]


def _warn_if_different(out_dir: Path, cfg: TinyModelConfig, seed: int) -> None:
    info_path = out_dir / BUILD_INFO_FILE
    if not info_path.is_file():
        return
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("config") != dataclasses.asdict(cfg) or info.get("seed") != seed:
        log.warning(
            "tiny base %s was built with config=%s seed=%s; reusing it although the request is "
            "config=%s seed=%s",
            out_dir,
            info.get("config"),
            info.get("seed"),
            dataclasses.asdict(cfg),
            seed,
        )


# ----------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
    defaults = TinyModelConfig()
    parser = argparse.ArgumentParser(description="Build the offline tiny model from the built-in corpus.")
    parser.add_argument("--out", type=Path, required=True, help="output directory (reused if complete)")
    parser.add_argument("--seed", type=int, default=0)
    for field in dataclasses.fields(TinyModelConfig):
        if field.type in ("int", int):
            parser.add_argument(
                f"--{field.name.replace('_', '-')}", type=int, default=getattr(defaults, field.name)
            )
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # keep the printout readable
    cfg = dataclasses.replace(
        defaults,
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(TinyModelConfig)
            if hasattr(args, f.name)
        },
    )
    path = create_tiny_base(cfg, builtin_corpus(), args.out, args.seed)

    model, tokenizer = load_model_and_tokenizer(str(path))
    trainable, total = count_parameters(model)
    messages, tools = _builtin_conversations()[0]
    prompt = tokenizer.apply_chat_template(
        messages[:1], tools=tools[:1], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    reply = render_chat(messages[1:2])
    print(f"model: {path}")
    print(f"parameters: {total:,} (trainable {trainable:,}); vocab {len(tokenizer)}")
    print(f"prompt ({len(tokenizer(prompt, add_special_tokens=False)['input_ids'])} tokens):\n{prompt}")
    print(f"reply tokens: {tokenizer.tokenize(reply)}")


if __name__ == "__main__":
    main()
