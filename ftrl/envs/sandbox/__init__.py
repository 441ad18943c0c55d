"""Run LLM-generated tool code outside the trainer: warm, resource-capped workers, FTRL output semantics.

Every environment ships ``codes`` (tool name -> Python source defining that function). The reward
function, snapshot collection and evaluation turn each parsed tool call into the tool message the
reference's ``get_feedback`` would produce:

* ``arguments = json.loads(call["function"]["arguments"])``, then ``codes[name]`` (in that order, so a
  bad JSON string wins over an unknown name); the tool's own source is executed afresh for every
  call and ``name(**arguments[, **extra_kwargs])`` is called;
* a ``dict`` or ``list`` result (exact type, as the reference tests ``type(x) == dict``) becomes
  ``json.dumps(result, ensure_ascii=False)``, a ``str`` stays as it is, anything else ``str(result)``;
* any failure becomes ``an error occured when call {name}: {str(error)}`` (the reference spelling);
  the sandbox's own limits read ``timed out after 10.0 seconds``, ``CPU time limit exceeded (...)``,
  ``out of memory (...)``, ``the sandbox worker crashed (...)``, ``sandbox: ... is not allowed``.

Scope (``scope=``): the reference runs ``exec(code)`` inside a function, so the tool's top-level
names land in a throw-away locals dict while its functions see the *reference module's* globals
(``json``, ``deepcopy``, ``sha256``, ``sleep``). ``scope="ftrl"`` (default) reproduces that exactly:
a top-level ``import math`` or helper function is invisible inside the tool function (NameError, as
in the reference) and ``json`` works without an import. ``scope="module"`` runs the source as a
normal module instead (the fix; use it with ``reward.compat=fixed``).

Design. ``Sandbox`` keeps ``workers`` warm processes; a request is cut into chunks of calls, one
message per chunk, spread over idle workers; each worker compiles a tool source once (cache keyed by
its BLAKE2 digest; the parent tracks which digests each worker holds and sends a source only once)
and per call executes the cached code object into a fresh namespace (re-exec semantics, about a
microsecond for a small tool), so no state survives between calls except what tool code forces into
shared modules (bounded by recycling a worker every ``recycle_after_calls`` calls). Results stream
back as JSON (never pickle: the parent must not unpickle bytes that untrusted code can write).

Why plain ``subprocess`` workers and not ``multiprocessing``: the ``spawn`` start method re-imports
the parent's ``__main__`` (the trainer, with torch) in every worker; ``fork`` from a torch/CUDA
parent is unsafe; ``forkserver`` needs sockets. A worker here is ``python -S -c <bootstrap>`` that
executes ``worker.py`` as a bare module: start-up ~50 ms, no torch, a scrubbed environment (no API keys),
its own session (no terminal signals), cwd = a private scratch directory.

Containment, in layers:

* kernel limits (``resource.setrlimit``): RLIMIT_AS (``memory_mb``), RLIMIT_FSIZE (``file_size_mb``,
  SIGXFSZ ignored so a write fails with EFBIG), RLIMIT_NOFILE, RLIMIT_CORE=0, and a lifetime
  RLIMIT_CPU backstop (workers are recycled at half of it);
* per-call timers inside the worker: ITIMER_REAL (wall ``timeout``) and ITIMER_PROF (CPU
  ``cpu_time_s``) raise a ``BaseException`` inside tool code, so ``time.sleep(60)`` or a Python
  loop ends at the limit and the worker stays warm;
* a parent-side deadline per call (a shared progress record says which call runs since when):
  past ``timeout + kill_grace_s`` the worker is SIGKILLed (C-level loops, tool code that swallows
  the timer) and respawned; a crashed worker (``os._exit``, segfault, OOM kill) likewise. The call
  in progress gets the error, calls already answered keep their outputs, the rest are re-run on a
  fresh worker;
* a ``sys.addaudithook`` guard inside the worker: denies sockets, process creation
  (``subprocess``, ``os.system``/``exec*``/``spawn*``/``posix_spawn``/``fork``/``forkpty``, and the
  ``_posixsubprocess`` path that ``multiprocessing`` uses), signals to other processes, ``ctypes``,
  raising resource limits, ``gc`` object walks, new threads, writes/renames/removals/chmods outside
  the scratch directory (``open`` write modes, ``os.*``, ``shutil.*``; paths resolved with
  ``realpath``, hard and symbolic links denied) and reads outside the Python installation, the
  scratch directory and ``read_paths``. The machine runs as root, where RLIMIT_NPROC does not bind,
  so the guard is what stops process creation.

What this does *not* stop: audit hooks are a tripwire for careless or naive code, not a security
boundary. Code that sets out to escape can tamper with the interpreter (rebinding the guard's
closure cells, reloading extension modules, ``sys._getframe`` games), use syscalls no audit event
covers, or win a race between the path check and the open. A worker can still disturb its sibling
workers (same uid), fill the disk with many files below ``file_size_mb`` (scratch is wiped only
when a worker is respawned), and keep tool state in shared modules until it is recycled. For
adversarial code run the workers inside a container, gVisor/nsjail or under seccomp and a
dedicated uid.

State: tau-bench tools take ``data=`` that persists across an episode's calls. ``extra_kwargs`` is
passed to every call of a job: the job's calls run in order on one worker and share one copy (as the
reference's ``get_feedback(calls, codes, data=data)`` does within a turn); every job gets its own
copy, even when several jobs were given the same object (each job's extras are pickled apart); the
caller's object is never changed and changes are not sent back. State across turns is rebuilt by
replaying the episode's earlier calls in the same job (``ftrl.envs.executor.StatefulExecutor``).
A worker crash in the middle of such a job re-runs the rest of its calls on a fresh copy.

Modules: ``worker`` (the runtime inside a worker process: limits, guard, execution, frames),
``pool`` (``Sandbox``, the parent's pool of workers), ``bench`` (the benchmark); this package holds
the public API and the process-wide default sandbox (``configure_sandbox``, ``get_sandbox``,
``call_tools``, ``shutdown_sandbox``).

    python -m ftrl.envs.sandbox.bench             # calls/s and per-call overhead vs in-process
    python -m ftrl.envs.sandbox --bench           # the same
    python -m pytest tests/test_sandbox.py -q
"""

from __future__ import annotations

import atexit
import inspect
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl.envs.sandbox.pool import DEFAULT_TIMEOUT_S, SCOPES, Codes, Job, Sandbox, SandboxError
from ftrl.envs.sandbox.worker import truncate_output

__all__ = [
    "DEFAULT_TIMEOUT_S", "SCOPES", "Codes", "Job", "Sandbox", "SandboxError", "call_tools",
    "configure_from_run_config", "configure_sandbox", "get_sandbox", "shutdown_sandbox", "tool_output_limit",
    "truncate_output",
]

# ------------------------------------------------------------------ process-wide default
_default_lock = threading.Lock()
_default_sandbox: Sandbox | None = None
_default_options: dict[str, Any] = {"workers": 2}


def configure_sandbox(**options: Any) -> None:
    """Set the options of the process-wide sandbox (any ``Sandbox`` keyword, e.g. ``workers``, ``timeout``).

    An existing default sandbox built with other options is closed; the next use rebuilds it.
    """
    global _default_sandbox
    valid = [name for name in inspect.signature(Sandbox).parameters]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"configure_sandbox: unknown option(s) {unknown}; valid options: {valid}")
    with _default_lock:
        changed = {key: value for key, value in options.items() if _default_options.get(key) != value}
        _default_options.update(options)
        if changed and _default_sandbox is not None:
            _default_sandbox.close()
            _default_sandbox = None


# "No cut" (reward.compat=ftrl, as the reference): bounded only by the worker's memory limit.
UNCUT_OUTPUT_CHARS = 50_000_000
CUT_OUTPUT_CHARS = 20000  # the cut under reward.compat=fixed
CUT_MARKER = "\n...[truncated by the sandbox: "


def tool_output_limit(run_config: Any) -> int:
    """Characters a tool output keeps: ``reward.max_tool_output_chars``, else by ``reward.compat``."""
    chars = getattr(run_config.reward, "max_tool_output_chars", None)
    if chars is not None:
        return int(chars)
    return UNCUT_OUTPUT_CHARS if run_config.reward.compat == "ftrl" else CUT_OUTPUT_CHARS


def configure_from_run_config(run_config: Any) -> None:
    """Apply ``resources.sandbox_workers``, ``reward.tool_timeout_s`` and the tool-output cut of a RunConfig."""
    configure_sandbox(workers=int(run_config.resources.sandbox_workers),
                      timeout=float(run_config.reward.tool_timeout_s),
                      max_output_chars=tool_output_limit(run_config))


def get_sandbox(workers: int | None = None) -> Sandbox:
    """The process-wide sandbox, built lazily; a different ``workers`` count rebuilds it."""
    global _default_sandbox
    with _default_lock:
        if workers is not None and workers != _default_options.get("workers"):
            _default_options["workers"] = workers
            if _default_sandbox is not None:
                _default_sandbox.close()
                _default_sandbox = None
        sandbox = _default_sandbox
        if sandbox is None or sandbox._closed or sandbox._owner_pid != os.getpid():
            sandbox = _default_sandbox = Sandbox(**_default_options)
        return sandbox


def shutdown_sandbox() -> None:
    """Close the process-wide sandbox (also runs at interpreter exit)."""
    global _default_sandbox
    with _default_lock:
        if _default_sandbox is not None and _default_sandbox._owner_pid == os.getpid():
            _default_sandbox.close()
        _default_sandbox = None


atexit.register(shutdown_sandbox)


def call_tools(codes: Codes, tool_calls: Sequence[Mapping], timeout: float | None = None, *,
               extra_kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """Run one turn's tool calls in the process-wide sandbox (``timeout=None``: its configured default)."""
    return get_sandbox().call_tools(codes, tool_calls, timeout, extra_kwargs=extra_kwargs)
