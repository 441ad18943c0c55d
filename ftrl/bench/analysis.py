"""Benchmark stage ``analysis``: ``param_delta`` throughput against the disk's read speed.

Two checkpoints of a Qwen-shaped layout (``SIZE_MB`` each, the target a small perturbation of the
base) are written to a temporary directory; their pages are dropped from the page cache
(``posix_fadvise(DONTNEED)``) before each measurement, so both read from the disk:

* ours: ``ftrl.analysis.param_delta.compare_checkpoints`` (streamed row blocks, float64 norms);
* baseline (and limit): reading both files sequentially in 16 MiB blocks, nothing computed.

    python -m ftrl.bench analysis --quick
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from ftrl.bench.report import Measure
from ftrl.bench.world import BenchContext

SIZE_MB = {"quick": 24, "full": 384}
BLOCK = 16 << 20


def write_checkpoints(root: Path, size_mb: int) -> tuple[Path, Path]:
    """A base and a target checkpoint (``model.safetensors`` each) of about ``size_mb`` MiB."""
    from safetensors.torch import save_file

    hidden, inter = 512, 1536
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden // 4, hidden),
              "self_attn.v_proj.weight": (hidden // 4, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
              "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,)}
    per_layer = sum(torch.Size(s).numel() for s in shapes.values()) * 4
    layers = max(1, (size_mb << 20) // per_layer)
    generator = torch.Generator().manual_seed(0)
    base, target = {}, {}
    for layer in range(layers):
        for key, shape in shapes.items():
            name = f"model.layers.{layer}.{key}"
            base[name] = torch.randn(shape, generator=generator)
            target[name] = base[name] + 1e-3 * torch.randn(shape, generator=generator)
    paths = []
    for label, tensors in (("base", base), ("target", target)):
        (root / label).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(root / label / "model.safetensors"))
        paths.append(root / label)
    return paths[0], paths[1]


def drop_cache(*files: Path) -> None:
    """Ask the kernel to forget the files' cached pages (a no-op where posix_fadvise is missing)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_speed(files: list[Path]) -> float:
    """Seconds to read ``files`` sequentially in 16 MiB blocks."""
    buffer = bytearray(BLOCK)
    started = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - started


def run(ctx: BenchContext) -> list[Measure]:
    from ftrl.analysis.param_delta import compare_checkpoints

    with tempfile.TemporaryDirectory(prefix="ftrl-bench-analysis-") as tmp:
        base, target = write_checkpoints(Path(tmp), SIZE_MB["quick" if ctx.quick else "full"])
        files = [base / "model.safetensors", target / "model.safetensors"]
        gigabytes = sum(f.stat().st_size for f in files) / 1e9
        drop_cache(*files)
        raw_s = read_speed(files)
        drop_cache(*files)
        started = time.perf_counter()
        rows = compare_checkpoints(base, target).rows
        ours_s = time.perf_counter() - started
        drop_cache(*files)
    raw, ours = gigabytes / raw_s, gigabytes / ours_s
    return [Measure("analysis", "analysis", f"param_delta over two {gigabytes / 2:.2f} GB checkpoints", "GB/s",
                    ours, raw, "sequential read of both files (the disk)", limit=raw,
                    checks={"every_tensor_compared": len(rows) > 0 and all(r.rel_change > 0 for r in rows)},
                    details={"gigabytes_read": gigabytes, "tensors": len(rows)})]
