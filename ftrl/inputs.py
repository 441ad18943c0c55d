"""A run's external inputs: what must exist before the work starts, and fingerprints of their contents.

Inputs are the files, directories, models and credentials a run reads from outside its run
directory: environment files (``envs.files.*``), LLM-builder seeds and prompts, the tau-bench data
directory, stored env sets, the policy model (``model.path``), analysis checkpoints and API keys.

* :func:`preflight` lists what a run's pending stages need and is missing (dry runs print it; real
  runs refuse to start, before any expensive work).
* :func:`input_fingerprints` hashes the contents of every input that exists; the run manifest
  records them, and a later invocation whose inputs changed is refused with the input named (the run
  keeps what it built from the old contents, so silently continuing would mix the two).

File contents are hashed in full up to 256 MiB; larger files (model weights) by their size, the
safetensors header (names, shapes, dtypes, offsets) and 16 blocks of 64 KiB spread over the file, so
an 8B checkpoint is fingerprinted in well under a second and a retrained one (every tensor moved) is
still told apart.

    python -m ftrl.run dry_run=true envs=ftrl_files envs.files.train=missing.jsonl   # preflight lists it
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrl.config import RunConfig
from ftrl.errors import MissingInputError

FULL_HASH_LIMIT = 256 << 20
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 16, 64 << 10
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Input:
    """One external input: the config key that names it, where it is, and which stage reads it."""

    key: str
    path: str
    stage: str  # the stage that reads it (build_envs, collect, train, eval, analyze)
    kind: str = "file"  # file | dir | model | set | package | api_key
    hub_ok: bool = False  # a model id that is not a local directory may come from the hub
    sets_dir: str = ""  # kind "set": where stored env sets live (envs.sets_dir)


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def run_inputs(cfg: RunConfig) -> list[Input]:
    """Every external input ``cfg`` names, with the stage that reads it."""
    found: list[Input] = []
    envs = cfg.envs
    if envs.name == "ftrl_files":
        found += [Input(f"envs.files.{split}", path, "build_envs")
                  for split, path in (("train", envs.files.train), ("test", envs.files.test)) if path]
    elif envs.name == "llm":
        if envs.llm.seed_file:
            found.append(Input("envs.llm.seed_file", envs.llm.seed_file, "build_envs"))
        source = envs.llm.seed_source
        if source.kind == "jsonl" and source.path:
            found.append(Input("envs.llm.seed_source.path", source.path, "build_envs"))
        elif source.kind == "datasets" and source.path and _looks_local(source.path):
            kind = "dir" if Path(source.path).suffix == "" else "file"
            found.append(Input("envs.llm.seed_source.path", source.path, "build_envs", kind=kind))
        if envs.llm.prompts_dir:
            found.append(Input("envs.llm.prompts_dir", envs.llm.prompts_dir, "build_envs", kind="dir"))
        found += [Input(f"envs.llm.prompts.{stage}", path, "build_envs") for stage, path in envs.llm.prompts.items()]
        if envs.llm.api.api_key_env:
            found.append(Input("envs.llm.api.api_key_env", envs.llm.api.api_key_env, "build_envs", kind="api_key"))
    elif envs.name == "set":
        found += [Input(f"envs.mix.{ref}", ref, "build_envs", kind="set", sets_dir=envs.sets_dir) for ref in envs.mix]
    elif envs.name == "taubench":
        data_dir = envs.taubench.data_dir or cfg.eval.data_dir or os.environ.get("FTRL_DATA_DIR") or ""
        key = "envs.taubench.data_dir" if envs.taubench.data_dir else "FTRL_DATA_DIR"
        found += [Input(f"{key} (tau-bench/{domain})", str(Path(data_dir) / "tau-bench" / domain) if data_dir else "",
                        "build_envs", kind="dir") for domain in envs.taubench.domains]
    if cfg.model.path is not None and cfg.model.engine != "openai":
        found.append(Input("model.path", cfg.model.path, "collect", kind="model", hub_ok=not _looks_local(cfg.model.path)))
    if cfg.model.engine == "openai" and cfg.model.api.api_key_env:
        found.append(Input("model.api.api_key_env", cfg.model.api.api_key_env, "collect", kind="api_key"))
    found += _benchmark_inputs(cfg)
    for key, value in (("analysis.base", cfg.analysis.base), ("analysis.target", cfg.analysis.target)):
        if value:
            found.append(Input(key, value, "analyze", kind="model", hub_ok=not _looks_local(value)))
    return found


# Benchmarks that read a folder of eval.data_dir, the folder, and the config key of a single-file alternative.
_BENCHMARK_DATA = {"toolhop": ("toolhop", "file"), "rotbench": ("rotbench", "file"), "general": ("general", "file"),
                   "taubench": ("tau-bench", None)}
BFCL_INSTALL = 'pip install --no-deps "bfcl-eval==2026.3.23" && pip install -e ".[bfcl]"'


def _benchmark_inputs(cfg: RunConfig) -> list[Input]:
    """What ``eval.benchmarks`` read: data folders (or their single-file alternative), packages, API keys."""
    found: list[Input] = []
    root = cfg.eval.data_dir or os.environ.get("FTRL_DATA_DIR") or ""
    root_key = "eval.data_dir" if cfg.eval.data_dir else "FTRL_DATA_DIR"
    for name in cfg.eval.benchmarks:
        if name in _BENCHMARK_DATA:
            folder, file_key = _BENCHMARK_DATA[name]
            single = getattr(getattr(cfg.eval, name), file_key) if file_key else None
            if single:
                found.append(Input(f"eval.{name}.{file_key}", single, "eval"))
            elif not (name == "general" and list(cfg.eval.general.tasks) == ["humaneval"]):  # HumanEval ships
                found.append(Input(f"{root_key} ({folder}/ for {name})", str(Path(root) / folder) if root else "",
                                   "eval", kind="dir"))
        if name == "bfcl":
            found.append(Input("eval.benchmarks (bfcl)", "bfcl_eval", "eval", kind="package"))
    user = cfg.eval.taubench.user
    if "taubench" in cfg.eval.benchmarks and user.engine == "openai" and user.api.api_key_env:
        found.append(Input("eval.taubench.user.api.api_key_env", user.api.api_key_env, "eval", kind="api_key"))
    return found


def _problem(item: Input) -> str | None:
    if item.kind == "api_key":
        return None if os.environ.get(item.path) else (
            f"{item.key}: the environment variable {item.path} is not set (export {item.path}=...; or set "
            f"{item.key}='' for an endpoint without a key)")
    if item.kind == "package":
        import importlib.util

        return None if importlib.util.find_spec(item.path) else (
            f"{item.key}: the {item.path} package is not installed ({BFCL_INSTALL})")
    if item.kind == "set":
        return None if _resolve_set(item) else (
            f"{item.key}: no stored env set '{item.path}' in {item.sets_dir} (python -m ftrl.envs.sets list)")
    if not item.path:
        return f"{item.key}: not set (point it at the folder that holds the benchmark's data)"
    path = Path(item.path).expanduser()
    if item.kind == "model":
        if path.is_dir():
            return None if (path / "config.json").is_file() else (
                f"{item.key}: '{path}' has no config.json; point it at a Hugging Face model directory")
        if item.hub_ok and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
            return None  # a hub id: transformers resolves it (and its cache) when the model loads
        return f"{item.key}: no model directory '{path}' (give a local model directory or a hub id)"
    exists = path.is_dir() if item.kind == "dir" else path.is_file()
    return None if exists else f"{item.key}: no such {'directory' if item.kind == 'dir' else 'file'} '{path}'"


def _stage_pending(cfg: RunConfig, stage: str, done: set[str]) -> bool:
    """Whether ``stage`` will do work: it is asked for, and (for build_envs) not already finished."""
    needed = {"collect": ("collect", "train", "eval"), "build_envs": ("build_envs",), "analyze": ("analyze",),
              "eval": ("eval",)}
    if not any(s in cfg.stages for s in needed.get(stage, (stage,))):
        return False
    return not (stage == "build_envs" and "build_envs" in done)


def preflight(cfg: RunConfig, done_steps: set[str] = frozenset()) -> list[str]:
    """Problems with the inputs the run's pending stages need (empty: all there). Never raises."""
    problems = []
    for item in run_inputs(cfg):
        if _stage_pending(cfg, item.stage, set(done_steps)):
            problem = _problem(item)
            if problem:
                problems.append(problem)
    return problems


def require_inputs(cfg: RunConfig, done_steps: set[str] = frozenset()) -> None:
    """Raise :class:`MissingInputError` listing every missing input, before any stage runs."""
    problems = preflight(cfg, done_steps)
    if problems:
        raise MissingInputError("missing input(s), nothing was run: " + "; ".join(problems))


def _resolve_set(item: Input) -> Any:
    """The stored env set a mix reference names now (its newest version for a bare name), or None."""
    from ftrl.envs.sets import resolve_set

    try:
        return resolve_set(item.path, item.sets_dir)
    except (LookupError, OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ fingerprints
def file_fingerprint(path: Path) -> str:
    """sha256 of the contents (sampled above FULL_HASH_LIMIT, see the module docstring)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(f"size={size}".encode())
        if path.suffix == ".safetensors":
            header_length = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(min(header_length, FULL_HASH_LIMIT)))
        for index in range(SAMPLE_BLOCKS):
            handle.seek(index * (size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
            digest.update(handle.read(SAMPLE_BLOCK_BYTES))
    return "sampled:" + digest.hexdigest()


def _dir_fingerprint(path: Path, weights_only: bool) -> str:
    """One hash over the directory's files (names and contents); a model directory: its config and weights."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if weights_only and not (file.name.endswith(_WEIGHT_SUFFIXES) or file.name == "config.json"):
            continue
        if any(part.startswith(".") for part in file.relative_to(path).parts):
            continue
        digest.update(relative.encode() + b"\0" + file_fingerprint(file).encode() + b"\0")
    return digest.hexdigest()


def input_fingerprints(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """``{key: {"path", "sha256"}}`` for every input that exists now (API keys are never recorded)."""
    prints: dict[str, dict[str, Any]] = {}
    for item in run_inputs(cfg):
        # Eval data is not part of a run's identity (as eval settings are not); API keys are never recorded.
        if item.kind in ("api_key", "package") or item.stage == "eval" or not item.path:
            continue
        if item.kind == "set":  # sets are content-hashed: a bare name that now means a newer version changes
            env_set = _resolve_set(item)
            if env_set is not None:
                prints[item.key] = {"path": str(env_set.path), "sha256": env_set.hash}
            continue
        path = Path(item.path).expanduser()
        if path.is_file():
            prints[item.key] = {"path": str(path.resolve()), "sha256": file_fingerprint(path)}
        elif path.is_dir():
            prints[item.key] = {"path": str(path.resolve()),
                                "sha256": _dir_fingerprint(path, weights_only=item.kind == "model")}
    return prints
