"""Build an intervened checkpoint on disk: every tensor from B or from T, streamed byte range by byte range.

``revert:<selector>`` is T with the selected tensors set back to B; ``transplant:<selector>`` is B with
only the selected tensors taken from T. The checkpoint the model is mostly made of (T for revert, B for
transplant) is the *host*: the output has its files (one ``model.safetensors`` or the same shards and
``model.safetensors.index.json``), its tensor order and dtypes, and its ``config.json``, tokenizer and
generation files. Each tensor's bytes are copied from the file that holds it in B or T through one
buffer of ``chunk_bytes`` (64 MiB), so building from two 8B checkpoints never holds a whole tensor, let
alone a model, in memory; where B and T store a tensor in different dtypes it is converted in row blocks
of about the same size (the only case where bytes are not copied as they are).

    python -m pytest tests/test_intervene.py -q
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ftrl.analysis.intervene.selection import num_layers_for, select_names
from ftrl.analysis.param_delta import INDEX_FILE, SINGLE_FILE, CheckpointError, natural_key, resolve_checkpoint
from ftrl.artifacts import atomic_dir
from ftrl.config import SelectorSpec, parse_selector

DEFAULT_CHUNK_BYTES = 64 << 20
# Files of a checkpoint directory that are not copied into an intervened model (weights are rebuilt;
# optimizer or trainer state is no part of a model).
_SKIPPED_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# safetensors dtype names -> torch dtype names (for the rare conversion between B's and T's dtypes).
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``file[start:stop]`` (absolute offsets), stored as ``dtype``/``shape``."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class CheckpointLayout:
    """The headers of one checkpoint: its tensors, which file holds each (in data order), the index file."""

    path: Path
    directory: Path | None  # the checkpoint directory (side files are copied from it); None for a bare file
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    files: dict[Path, list[str]] = field(default_factory=dict)
    metadata: dict[Path, dict[str, str]] = field(default_factory=dict)
    index: Path | None = None

    def names(self) -> list[str]:
        return sorted(self.tensors, key=natural_key)

    def numels(self) -> dict[str, int]:
        return {name: entry.numel for name, entry in self.tensors.items()}


def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        raw = handle.read(size)
    if len(raw) != size:
        raise CheckpointError(f"{file}: truncated safetensors header ({len(raw)} of {size} bytes)")
    try:
        return json.loads(raw), 8 + size
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: unreadable safetensors header ({error})") from None


def read_layout(path: str | os.PathLike) -> CheckpointLayout:
    """Headers only: ``model.safetensors``, the shards of ``model.safetensors.index.json``, or one file."""
    resolved = resolve_checkpoint(path)
    directory = resolved if resolved.is_dir() else None
    index: Path | None = None
    if resolved.is_file() and resolved.name.endswith(".index.json"):
        index = resolved
    elif directory is not None and (directory / INDEX_FILE).is_file():
        index = directory / INDEX_FILE
    if index is not None:
        try:
            files = sorted({index.parent / shard for shard in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index} is not a safetensors index with a 'weight_map' ({error})") from None
    elif directory is not None and (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    elif directory is not None:
        files = sorted(directory.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE} "
                                  f"(safetensors files: {[f.name for f in files] or 'none'})")
    else:
        files = [resolved]
    layout = CheckpointLayout(path=resolved, directory=directory, index=index)
    for file in files:
        _add_file(layout, file)
    return layout


def _add_file(layout: CheckpointLayout, file: Path) -> None:
    if not file.is_file():
        raise CheckpointError(f"{layout.path}: safetensors file {file} is missing")
    header, data_start = read_header(file)
    layout.metadata[file] = dict(header.pop("__metadata__", None) or {})
    entries = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        entries.append(TensorEntry(name, file, info["dtype"], tuple(info["shape"]), data_start + begin,
                                   data_start + end))
    entries.sort(key=lambda entry: entry.start)
    for entry in entries:
        if entry.name in layout.tensors:
            raise CheckpointError(f"{layout.path}: tensor '{entry.name}' is in {layout.tensors[entry.name].file.name} "
                                  f"and {file.name}")
        layout.tensors[entry.name] = entry
    layout.files[file] = [entry.name for entry in entries]


def check_same_tensors(base: CheckpointLayout, target: CheckpointLayout) -> None:
    """B and T must hold the same tensor names with the same shapes (the error names what differs)."""
    only_base = sorted(set(base.tensors) - set(target.tensors), key=natural_key)
    only_target = sorted(set(target.tensors) - set(base.tensors), key=natural_key)
    if only_base or only_target:
        raise CheckpointError(f"interventions need B and T with the same tensors; only in B ({base.path}): "
                              f"{only_base[:8] or 'none'}; only in T ({target.path}): {only_target[:8] or 'none'}")
    for name, entry in base.tensors.items():
        if entry.shape != target.tensors[name].shape:
            raise CheckpointError(f"tensor '{name}' has shape {list(entry.shape)} in B ({base.path}) but "
                                  f"{list(target.tensors[name].shape)} in T ({target.path})")


# ------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class BuildReport:
    """What an intervention took from the donor: tensors and parameters, out of the model's total."""

    kind: str
    selector: str
    tensors_changed: int
    params_changed: int
    total_tensors: int
    total_params: int
    changed: tuple[str, ...] = ()

    @property
    def params_share(self) -> float:
        return self.params_changed / self.total_params if self.total_params else 0.0


def plan_build(base: CheckpointLayout, target: CheckpointLayout, kind: str, selector: SelectorSpec | str,
               key: str = "intervention") -> BuildReport:
    """Which tensors ``kind:selector`` takes from the donor (T for transplant, B for revert); nothing is read."""
    spec = parse_selector(selector, key) if isinstance(selector, str) else selector
    check_same_tensors(base, target)
    names = target.names()
    chosen = select_names(spec, names, num_layers_for(target.path, names), key)
    numels = target.numels()
    return BuildReport(kind, spec.text, len(chosen), sum(numels[n] for n in chosen), len(names),
                       sum(numels.values()), tuple(chosen))


def build_intervention(base: str | os.PathLike | CheckpointLayout, target: str | os.PathLike | CheckpointLayout,
                       kind: str, selector: SelectorSpec | str, out_dir: str | os.PathLike, *,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BuildReport:
    """Write the ``kind:selector`` model of B=``base`` and T=``target`` to ``out_dir`` (atomically).

    ``kind`` is ``revert`` (T, the selection from B) or ``transplant`` (B, the selection from T). Memory:
    one ``chunk_bytes`` buffer and the headers, whatever the model size.
    """
    if kind not in ("revert", "transplant"):
        raise ValueError(f"intervention kind must be 'revert' or 'transplant', got {kind!r}")
    b = base if isinstance(base, CheckpointLayout) else read_layout(base)
    t = target if isinstance(target, CheckpointLayout) else read_layout(target)
    report = plan_build(b, t, kind, selector)
    host, donor = (t, b) if kind == "revert" else (b, t)
    chosen = set(report.changed)
    with atomic_dir(out_dir) as staging:
        _copy_side_files(host, staging)
        for file, names in host.files.items():
            sources = [(donor.tensors[name] if name in chosen else host.tensors[name], host.tensors[name])
                       for name in names]
            write_safetensors(staging / file.name, sources, host.metadata.get(file) or {}, chunk_bytes)
        if host.index is not None:
            shutil.copyfile(host.index, staging / INDEX_FILE)
    return report


def _copy_side_files(host: CheckpointLayout, staging: Path) -> None:
    if host.directory is None:
        return
    for item in sorted(host.directory.iterdir()):
        if item.is_file() and not item.name.endswith(_SKIPPED_SUFFIXES) and item.name != INDEX_FILE:
            shutil.copyfile(item, staging / item.name)


def write_safetensors(path: Path, sources: Sequence[tuple[TensorEntry, TensorEntry]], metadata: dict[str, str],
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Write a safetensors file: per ``(source, layout)`` pair, the tensor ``layout.name`` with the layout's
    dtype and shape, its bytes streamed from ``source`` (converted when the source's dtype differs)."""
    header: dict[str, Any] = {}
    offset = 0
    for _, entry in sources:
        nbytes = entry.stop - entry.start
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    buffer = memoryview(bytearray(max(1, chunk_bytes)))
    with open(path, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for source, entry in sources:
            if source.dtype == entry.dtype:
                _copy_bytes(source, out, buffer)
            else:
                _copy_converted(source, entry, out, chunk_bytes)


def _copy_bytes(source: TensorEntry, out: BinaryIO, buffer: memoryview) -> None:
    remaining = source.stop - source.start
    with open(source.file, "rb") as handle:
        handle.seek(source.start)
        while remaining:
            count = handle.readinto(buffer[:min(len(buffer), remaining)])
            if not count:
                raise CheckpointError(f"{source.file}: tensor '{source.name}' ends early (truncated file)")
            out.write(buffer[:count])
            remaining -= count


def _copy_converted(source: TensorEntry, entry: TensorEntry, out: BinaryIO, chunk_bytes: int) -> None:
    """Write ``source`` cast to ``entry.dtype`` in row blocks (B and T store this tensor in different dtypes)."""
    import torch
    from safetensors import safe_open

    if source.dtype not in _TORCH_DTYPES or entry.dtype not in _TORCH_DTYPES:
        raise CheckpointError(f"tensor '{entry.name}' is {source.dtype} in {source.file} but {entry.dtype} in the "
                              f"model it goes into; only floating-point tensors are converted")
    dtype = getattr(torch, _TORCH_DTYPES[entry.dtype])
    with safe_open(str(source.file), framework="pt") as handle:
        if not source.shape:
            out.write(handle.get_tensor(source.name).to(dtype).reshape(-1).view(torch.uint8).numpy().tobytes())
            return
        row_bytes = max(1, math.prod(source.shape[1:])) * 8
        rows = max(1, chunk_bytes // row_bytes)
        for start in range(0, source.shape[0], rows):
            block = handle.get_slice(source.name)[start:start + rows].to(dtype).contiguous()
            out.write(block.reshape(-1).view(torch.uint8).numpy().tobytes())
