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
executes this file as a bare module: start-up ~50 ms, no torch, a scrubbed environment (no API keys),
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
replaying the episode's earlier calls in the same job (``ftrl.envs.taubench.StatefulExecutor``).
A worker crash in the middle of such a job re-runs the rest of its calls on a fresh copy.

    python -m ftrl.envs.sandbox --bench          # calls/s and per-call overhead vs in-process
    python -m pytest tests/test_sandbox.py -q
"""

from __future__ import annotations

import _signal
import atexit
import builtins
import copy
import hashlib
import json
import keyword
import logging
import math
import mmap
import os
import pickle
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections import deque
from functools import lru_cache
from typing import Any, Mapping, Optional, Sequence, Union

log = logging.getLogger(__name__)

ERROR_TEMPLATE = "an error occured when call {name}: {error}"  # spelling as in the reference
SCOPES: tuple[str, ...] = ("ftrl", "module")
DEFAULT_TIMEOUT_S = 10.0

Codes = Union[Mapping[str, str], str]
Job = Union[tuple[Codes, Sequence[Mapping]], tuple[Codes, Sequence[Mapping], Optional[Mapping[str, Any]]]]

# Frames on the pipes: 8-byte little-endian length, then the payload (pickle parent->worker, JSON
# worker->parent). The progress record is shared memory the worker updates around every call.
_HEADER = struct.Struct("<Q")
_PROGRESS = struct.Struct("<qqdq")  # request seq, call index, call start (monotonic), in-call flag
_PROGRESS_BYTES = 64
_FLUSH_EVERY_S = 0.2  # a worker sends partial results this often, so a later crash re-runs little
_MARKER_ROOM = 128  # characters the truncation marker may add beyond max_output_chars
_MALFORMED_CALL = "malformed tool call: expected {'function': {'name', 'arguments'}}"
_MAX_RETRIES = 2  # re-runs of a call whose worker died while it was queued behind another


def format_error(name: Any, error: str) -> str:
    """The reference's tool message for a failed call."""
    return ERROR_TEMPLATE.format(name=name, error=error)


def truncate_output(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters with a visible marker (tool outputs feed a prompt)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n...[truncated by the sandbox: {len(text)} characters, first {limit} shown]"


# =========================================================================================
# Worker side: everything below up to "Parent side" runs inside the sandboxed interpreter.
# =========================================================================================
class _Limit(BaseException):
    """A sandbox limit fired inside tool code (BaseException: ``except Exception`` cannot swallow it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _WorkerState:
    """Per-worker mutable state (a class so the signal handler and hot path share it cheaply)."""

    armed = False
    wall_message = ""
    cpu_message = ""
    memory_mb = 0
    builtins_snapshot: dict[str, Any] = {}
    reference_globals: dict[str, Any] = {}
    recursion_limit = 1000
    compiles = 0


def _on_limit_signal(signum: int, frame: Any) -> None:
    if not _WorkerState.armed:  # the call already returned; a late timer is ignored
        return
    _WorkerState.armed = False
    raise _Limit(_WorkerState.wall_message if signum == signal.SIGALRM else _WorkerState.cpu_message)


_LIMIT_SIGNALS = (signal.SIGALRM, signal.SIGPROF, signal.SIGXCPU)


def _arm(timeout: float, cpu_limit: float) -> None:
    for signum in _LIMIT_SIGNALS:  # tool code may have replaced a handler during an earlier call
        if _signal.getsignal(signum) is not _on_limit_signal:  # the C function: signal's wrapper costs 5 us
            signal.signal(signum, _on_limit_signal)
    if sys.getrecursionlimit() != _WorkerState.recursion_limit:
        sys.setrecursionlimit(_WorkerState.recursion_limit)
    _WorkerState.armed = True
    signal.setitimer(signal.ITIMER_REAL, timeout)
    signal.setitimer(signal.ITIMER_PROF, cpu_limit)


def _disarm() -> None:
    _WorkerState.armed = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.setitimer(signal.ITIMER_PROF, 0)


def _lookup(name: Any, first: dict, second: dict, builtins_ns: dict) -> Any:
    """``eval(name)`` as the reference does it, without compiling when ``name`` is a plain identifier."""
    if isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name):
        for namespace in (first, second, builtins_ns):
            if name in namespace:
                return namespace[name]
        raise NameError(f"name '{name}' is not defined")
    return eval(name, second, first)  # noqa: S307 - same expression the reference evaluates


def _execute(call: tuple, codes: dict, compiled: dict, extras: list, scope: str) -> str:
    """One call with the reference's order of failures; returns the tool message text."""
    name, arguments_text, digest, extra_index, lookup_error = call
    arguments = json.loads(arguments_text)
    if digest is None:
        if lookup_error is not None:
            raise TypeError(lookup_error)
        raise KeyError(name)
    code = compiled.get(digest)
    if code is None:
        if digest not in codes:  # the parent's record of this worker's sources is wrong: a bug, not the tool
            raise RuntimeError("sandbox internal error: the tool's source never reached this worker")
        try:
            # "<string>" is the file name exec(str) uses, so SyntaxError texts match the reference.
            code = compile(codes[digest], "<string>", "exec")
        except BaseException as error:  # noqa: BLE001 - cached and re-raised on every call
            code = error
        compiled[digest] = code
        _WorkerState.compiles += 1
    if isinstance(code, BaseException):
        raise code
    builtins_ns = dict(_WorkerState.builtins_snapshot)
    if scope == "ftrl":
        globals_ns = dict(_WorkerState.reference_globals)
        globals_ns["__builtins__"] = builtins_ns
        locals_ns: dict[str, Any] = {}
        exec(code, globals_ns, locals_ns)  # noqa: S102 - the sandbox's purpose
        function = _lookup(name, locals_ns, globals_ns, builtins_ns)
    else:
        globals_ns = {"__builtins__": builtins_ns, "__name__": "__tool__"}
        exec(code, globals_ns)  # noqa: S102
        function = _lookup(name, globals_ns, globals_ns, builtins_ns)
    if extra_index >= 0:
        result = function(**arguments, **extras[extra_index])
    else:
        result = function(**arguments)
    result_type = type(result)
    if result_type is dict or result_type is list:
        return json.dumps(result, ensure_ascii=False)
    if result_type is str:
        return result
    return str(result)


def _describe_error(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"the tool called sys.exit({error.code!r})"
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails
        text = f"{type(error).__name__} (message could not be printed)"
    if isinstance(error, MemoryError) and not text:
        return f"out of memory (sandbox limit {_WorkerState.memory_mb} MB)"
    return text


def _guarded_call(call: tuple, codes: dict, compiled: dict, extras: list, scope: str,
                  timeout: float, cpu_limit: float) -> str:
    name = call[0]
    try:
        _arm(timeout, cpu_limit)
        try:
            text = _execute(call, codes, compiled, extras, scope)
        except _Limit as limit:
            text = format_error(name, limit.message)
        except BaseException as error:  # noqa: BLE001 - every failure becomes a tool message
            text = format_error(name, _describe_error(error))  # still armed: a hostile __str__ is bounded
        finally:
            _disarm()
    except _Limit as limit:  # fired while the error above was being described
        _disarm()
        text = format_error(name, limit.message)
    return text


def _write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, size: int) -> Optional[bytes]:
    parts = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _read_frame(fd: int) -> Optional[bytes]:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    return _read_exact(fd, _HEADER.unpack(header)[0])


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _JobExtras:
    """A request's extra_kwargs, one pickle per job (the parent pickles them apart, so two jobs never
    share an object, even when the caller passed the same one). A job's copy is unpickled when its
    first call runs and the previous job's copy is dropped then (a job's calls are contiguous in a
    request), so a worker holds one decoded copy at a time however many jobs a request carries."""

    __slots__ = ("blobs", "index", "value")

    def __init__(self, blobs: list) -> None:
        self.blobs = blobs
        self.index = -1
        self.value: Any = None

    def __getitem__(self, index: int) -> Any:
        if index != self.index:
            self.index, self.value = -1, None
            try:
                value = pickle.loads(self.blobs[index])
            except _Limit:
                raise
            except BaseException as error:  # noqa: BLE001 - e.g. a class the worker cannot import
                raise RuntimeError(f"sandbox could not decode the call: {type(error).__name__}: {error}") from None
            self.index, self.value = index, value
        return self.value


def _run_request(message: dict, codes: dict, compiled: dict, result_fd: int, progress: mmap.mmap) -> None:
    seq = message["seq"]
    calls = message["calls"]
    codes.update(message["codes"])
    extras = _JobExtras(message["extras"])
    scope = message["scope"]
    timeout = message["timeout"]
    cpu_limit = message["cpu_limit"]
    max_chars = message["max_chars"]
    _WorkerState.wall_message = f"timed out after {float(timeout)} seconds"
    _WorkerState.cpu_message = f"CPU time limit exceeded ({float(cpu_limit)} seconds)"
    _WorkerState.compiles = 0
    pending: list[str] = []
    first = 0
    last_flush = time.monotonic()
    pack = _PROGRESS.pack_into
    for index, call in enumerate(calls):
        started = time.monotonic()
        pack(progress, 0, seq, index, started, 1)
        text = _guarded_call(call, codes, compiled, extras, scope, timeout, cpu_limit)
        pack(progress, 0, seq, index, started, 0)
        pending.append(text if len(text) <= max_chars else truncate_output(text, max_chars))
        now = time.monotonic()
        if now - last_flush > _FLUSH_EVERY_S and index + 1 < len(calls):
            partial = {"seq": seq, "first": first, "out": pending, "done": False}
            _write_frame(result_fd, json.dumps(partial).encode())
            first += len(pending)
            pending = []
            last_flush = now
    reply = {"seq": seq, "first": first, "out": pending, "done": True, "cpu": _cpu_seconds(),
             "compiles": _WorkerState.compiles}
    _write_frame(result_fd, json.dumps(reply).encode())


def _blocked(what: str):
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(f"sandbox: {what} is not allowed")
    return refuse


def _install_guard(scratch: str, read_roots: Sequence[str], read_files: Sequence[str]) -> None:
    """Install the audit hook that refuses network, processes, native code and writes outside scratch."""
    realpath, fsdecode, fspath, readlink, isabs = (os.path.realpath, os.fsdecode, os.fspath, os.readlink,
                                                    os.path.isabs)
    sep = os.sep
    scratch_prefix = scratch + sep
    read_prefixes = tuple(root.rstrip(sep) + sep for root in read_roots) + (scratch_prefix,)
    exact_reads = frozenset(read_files) | {root.rstrip(sep) for root in read_roots} | {scratch}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def deny(event: str, what: str) -> None:
        raise PermissionError(f"sandbox: {what} is not allowed ({event})")

    def resolve(target: Any) -> str:
        try:
            if isinstance(target, int):
                return readlink(f"/proc/self/fd/{target}")
            return realpath(fsdecode(fspath(target)))
        except (OSError, TypeError, ValueError):
            return ""

    def check_write(event: str, target: Any, dir_fd: Any = None) -> None:
        if dir_fd not in (None, -1) and not (isinstance(target, (str, bytes)) and isabs(target)):
            deny(event, "a path relative to a directory descriptor")
        if not resolve(target).startswith(scratch_prefix):
            deny(event, f"changing {target!r} outside the scratch directory")

    def check_read(event: str, target: Any) -> None:
        path = resolve(target)
        if path not in exact_reads and not path.startswith(read_prefixes):
            deny(event, f"reading {target!r}")

    def on_open(event: str, args: tuple) -> None:
        path, mode, flags = args
        if (flags or 0) & write_flags or (mode and any(letter in mode for letter in "wax+")):
            if isinstance(path, int) and path < 0:
                return
            check_write(event, path)
        else:
            check_read(event, path)

    def paths(*checks: tuple[int, Optional[int]]):
        """Handler checking each (path position, dir_fd position or None) of an event's arguments."""
        def handler(event: str, args: tuple) -> None:
            for position, dir_fd in checks:
                check_write(event, args[position], args[dir_fd] if dir_fd is not None else None)
        return handler

    def reads(event: str, args: tuple) -> None:
        check_read(event, args[0] if args and args[0] is not None else ".")

    def refuse(what: str):
        def handler(event: str, args: tuple) -> None:
            deny(event, what)
        return handler

    native_modules = frozenset({"_ctypes", "ctypes", "_posixsubprocess"})

    def on_import(event: str, args: tuple) -> None:
        if args and args[0] in native_modules:
            deny(event, f"importing {args[0]}")

    processes = refuse("starting processes")
    handlers = {
        "open": on_open,
        "import": on_import,
        "os.remove": paths((0, 1)), "os.rmdir": paths((0, 1)), "os.mkdir": paths((0, 2)),
        "os.rename": paths((0, 2), (1, 3)), "os.truncate": paths((0, None)), "os.chmod": paths((0, 2)),
        "os.chown": paths((0, 3)), "os.utime": paths((0, 3)), "os.chflags": paths((0, None)),
        "os.lchflags": paths((0, None)), "os.setxattr": paths((0, None)), "os.removexattr": paths((0, None)),
        "os.link": refuse("creating links"), "os.symlink": refuse("creating links"),
        "shutil.copyfile": paths((1, None)), "shutil.copymode": paths((1, None)),
        "shutil.copystat": paths((1, None)), "shutil.copytree": paths((1, None)),
        "shutil.move": paths((0, None), (1, None)), "shutil.rmtree": paths((0, None)),
        "shutil.chown": paths((0, None)), "shutil.make_archive": paths((0, None)),
        "shutil.unpack_archive": paths((1, None)),
        "os.listdir": reads, "os.scandir": reads, "os.chdir": reads,
        "subprocess.Popen": processes, "os.system": processes, "os.exec": processes,
        "os.posix_spawn": processes, "os.spawn": processes, "os.fork": processes, "os.forkpty": processes,
        "pty.spawn": processes, "os.startfile": processes, "webbrowser.open": processes,
        "_thread.start_new_thread": refuse("starting threads"),  # audited from Python 3.13
        "_thread.start_joinable_thread": refuse("starting threads"),
        "os.kill": refuse("sending signals"), "os.killpg": refuse("sending signals"),
        "signal.pthread_kill": refuse("sending signals"),
        "resource.setrlimit": refuse("changing resource limits"),
        "resource.prlimit": refuse("changing resource limits"),
        "sys.addaudithook": refuse("adding audit hooks"),
        "gc.get_objects": refuse("walking the interpreter's objects"),
        "gc.get_referrers": refuse("walking the interpreter's objects"),
        "gc.get_referents": refuse("walking the interpreter's objects"),
        "urllib.Request": refuse("network access"), "http.client.connect": refuse("network access"),
    }
    get = handlers.get

    def hook(event: str, args: tuple) -> None:
        handler = get(event)
        if handler is not None:
            handler(event, args)
        elif event.startswith("socket."):
            deny(event, "network access")
        elif event.startswith("ctypes."):
            deny(event, "native code (ctypes)")

    sys.addaudithook(hook)


# Modules tool code commonly imports: loaded before the guard so the first call does not pay for them.
_PRELOAD = ("json", "math", "re", "datetime", "random", "hashlib", "copy", "collections", "itertools",
            "functools", "string", "typing", "decimal", "statistics", "uuid", "heapq", "bisect", "operator")


def _setup_worker(config: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer's Ctrl-C is the parent's to handle
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
    for signum in _LIMIT_SIGNALS:
        signal.signal(signum, _on_limit_signal)
    for module in _PRELOAD:
        __import__(module)
    if not hasattr(builtins, "exit"):  # normally added by site, which workers skip
        builtins.exit = builtins.quit = sys.exit  # type: ignore[attr-defined]
    try:
        import _posixsubprocess  # multiprocessing's spawn path forks through it without an audit event
        _posixsubprocess.fork_exec = _blocked("starting processes")
    except ImportError:
        pass
    import _thread

    # No audit event covers thread start before Python 3.13; a stray thread would outlive its call.
    refuse_threads = _blocked("starting threads")
    for module, attribute in ((_thread, "start_new_thread"), (_thread, "start_new"),
                              (_thread, "start_joinable_thread"), (threading, "_start_new_thread"),
                              (threading, "_start_joinable_thread")):
        if hasattr(module, attribute):
            setattr(module, attribute, refuse_threads)

    scratch = os.path.realpath(config["scratch"])
    os.chdir(scratch)
    sys.dont_write_bytecode = True
    _WorkerState.memory_mb = config["memory_mb"]
    _WorkerState.recursion_limit = sys.getrecursionlimit()
    _WorkerState.builtins_snapshot = dict(builtins.__dict__)
    # The reference module's globals that its exec'd tool code can see (utils.utils imports them).
    _WorkerState.reference_globals = {"__name__": "utils.utils", "json": json, "deepcopy": copy.deepcopy,
                                      "sha256": hashlib.sha256, "sleep": time.sleep}

    mb = 1024 * 1024
    limits = [
        (resource.RLIMIT_AS, config["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, config["file_size_mb"] * mb),
        (resource.RLIMIT_NOFILE, config["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in limits:
        resource.setrlimit(which, (value, value))
    lifetime = int(config["cpu_lifetime_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (lifetime, lifetime + 5))

    read_roots = {sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    read_roots.update(entry for entry in sys.path if entry and os.path.isdir(entry))
    read_roots.update(config["read_paths"])
    resolved_roots = sorted({os.path.realpath(root) for root in read_roots if root})
    read_files = [os.path.realpath(path) for path in
                  ("/dev/null", "/dev/urandom", "/dev/random", "/etc/localtime", "/etc/timezone")]
    _install_guard(scratch, resolved_roots + [os.path.realpath("/usr/share/zoneinfo")], read_files)


def _worker_main(request_fd: int, result_fd: int, progress_fd: int) -> None:
    """Entry point of a worker process (started by ``Sandbox`` through the bootstrap below)."""
    progress = mmap.mmap(progress_fd, _PROGRESS_BYTES)
    os.close(progress_fd)
    frame = _read_frame(request_fd)
    if frame is None:
        return
    _setup_worker(pickle.loads(frame))
    _write_frame(result_fd, json.dumps({"ready": True, "pid": os.getpid()}).encode())
    codes: dict[bytes, str] = {}
    compiled: dict[bytes, Any] = {}
    while True:
        frame = _read_frame(request_fd)
        if frame is None:
            return
        try:
            message = pickle.loads(frame)
        except BaseException as error:  # noqa: BLE001 - e.g. extra_kwargs holding a class it cannot import
            _write_frame(result_fd, json.dumps({"decode_error": f"{type(error).__name__}: {error}"}).encode())
            continue
        if message.get("op") == "exit":
            return
        _run_request(message, codes, compiled, result_fd, progress)


_BOOTSTRAP = (
    "import sys, types\n"
    "del sys.path[0]\n"  # '' (the scratch dir): files a tool writes must not shadow modules
    "sys.path.extend(sys.argv[5:])\n"  # the parent's site-packages (-S skips site and its .pth hooks)
    "module = types.ModuleType('ftrl_sandbox_worker')\n"
    "module.__file__ = sys.argv[1]\n"
    "sys.modules[module.__name__] = module\n"
    "with open(sys.argv[1], 'rb') as source:\n"
    "    exec(compile(source.read(), sys.argv[1], 'exec'), module.__dict__)\n"
    "module._worker_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))\n"
)


# =========================================================================================
# Parent side.
# =========================================================================================
class SandboxError(RuntimeError):
    """The sandbox itself failed (workers cannot start); tool failures are tool messages instead."""


@lru_cache(maxsize=1)
def _site_packages() -> tuple[str, ...]:
    """The parent's package directories, handed to workers that start without ``site``."""
    import site

    found = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()]
    return tuple(dict.fromkeys(path for path in found if path and os.path.isdir(path)))


@lru_cache(maxsize=16384)
def _digest(source: str) -> bytes:
    return hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@lru_cache(maxsize=1024)
def _parse_codes(codes_json: str) -> dict[str, Any]:
    try:
        codes = json.loads(codes_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"codes: not valid JSON ({error}); expected an object tool name -> source") from None
    if not isinstance(codes, dict):
        raise ValueError(f"codes: expected a JSON object tool name -> source, got {type(codes).__name__}")
    return codes


class _Call:
    """One tool call on its way through the workers."""

    __slots__ = ("slot", "job", "name", "arguments", "digest", "source", "lookup_error", "extra", "retries")

    def __init__(self, slot: int, job: int, name: Any, arguments: Any, digest: Optional[bytes],
                 source: Optional[str], lookup_error: Optional[str],
                 extra: Optional[Mapping[str, Any]]) -> None:
        self.slot = slot
        self.job = job
        self.name = name
        self.arguments = arguments
        self.digest = digest
        self.source = source
        self.lookup_error = lookup_error
        self.extra = extra
        self.retries = 0


class _Task:
    __slots__ = ("seq", "calls", "new_codes", "received", "sent_at")

    def __init__(self, seq: int, calls: list[_Call], new_codes: set[bytes]) -> None:
        self.seq = seq
        self.calls = calls
        self.new_codes = new_codes  # digests whose source this message carries
        self.received = 0
        self.sent_at = time.monotonic()


class _Worker:
    """The parent's handle on one worker process."""

    __slots__ = ("slot", "proc", "send_fd", "recv_fd", "progress", "buffer", "known", "task", "ready",
                 "started_at", "calls_run", "cpu_seconds", "directory")

    def __init__(self, slot: int, proc: subprocess.Popen, send_fd: int, recv_fd: int, progress: mmap.mmap,
                 directory: str) -> None:
        self.slot = slot
        self.proc = proc
        self.send_fd = send_fd
        self.recv_fd = recv_fd
        self.progress = progress
        self.directory = directory
        self.buffer = bytearray()
        self.known: set[bytes] = set()
        self.task: Optional[_Task] = None
        self.ready = False
        self.started_at = time.monotonic()
        self.calls_run = 0
        self.cpu_seconds = 0.0


def _stop_worker(worker: _Worker) -> None:
    """SIGKILL the worker's process group, reap it and release the parent's descriptors."""
    try:
        os.killpg(worker.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        worker.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not take this long
        log.warning("sandbox: worker pid %d did not exit after SIGKILL", worker.proc.pid)
    for fd in (worker.send_fd, worker.recv_fd):
        try:
            os.close(fd)
        except OSError:
            pass
    if not worker.progress.closed:
        worker.progress.close()


def _close_all(workers: list[Optional[_Worker]], root: str, owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked child must not kill its parent's workers
        return
    for index, worker in enumerate(workers):
        if worker is not None:
            _stop_worker(worker)
            workers[index] = None
    shutil.rmtree(root, ignore_errors=True)


def _exit_description(returncode: Optional[int]) -> str:
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Sandbox:
    """A pool of warm worker processes that run tool calls with the reference's output semantics.

    ``workers``: processes (started lazily on first use); ``memory_mb``: address-space cap per worker;
    ``max_output_chars``: longer outputs are cut with a marker; ``timeout``: default wall-clock limit
    per call; ``cpu_time_s``: CPU limit per call (default: the call's timeout); ``scope``: ``"ftrl"``
    (the reference's exec-in-a-function namespace) or ``"module"``; ``read_paths``: extra files or
    directories tool code may read; ``hash_seed``: PYTHONHASHSEED of the workers (set ordering in
    outputs must not depend on which worker ran a call; ``None`` = random).
    """

    def __init__(self, workers: int = 2, memory_mb: int = 1024, max_output_chars: int = 20000, *,
                 timeout: float = DEFAULT_TIMEOUT_S, cpu_time_s: Optional[float] = None,
                 scope: str = "ftrl", file_size_mb: int = 16, open_files: int = 64,
                 read_paths: Sequence[str] = (), hash_seed: Optional[int] = 0,
                 min_batch_calls: int = 16, max_batch_calls: int = 256, recycle_after_calls: int = 20000,
                 max_cached_codes: int = 4096, cpu_lifetime_s: int = 600, kill_grace_s: float = 0.5,
                 start_timeout_s: float = 30.0, python: Optional[str] = None,
                 scratch_root: Optional[str] = None) -> None:
        for key, value in (("workers", workers), ("memory_mb", memory_mb),
                           ("max_output_chars", max_output_chars),
                           ("file_size_mb", file_size_mb), ("open_files", open_files),
                           ("min_batch_calls", min_batch_calls), ("max_batch_calls", max_batch_calls),
                           ("recycle_after_calls", recycle_after_calls),
                           ("max_cached_codes", max_cached_codes), ("cpu_lifetime_s", cpu_lifetime_s)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Sandbox({key}=...): must be a positive integer, got {value!r}")
        for key, number in (("timeout", timeout), ("kill_grace_s", kill_grace_s),
                            ("start_timeout_s", start_timeout_s), ("cpu_time_s", cpu_time_s)):
            if number is not None and not number > 0:
                raise ValueError(f"Sandbox({key}=...): must be > 0, got {number!r}")
        self._check_scope(scope)
        self.workers = workers
        self.memory_mb = memory_mb
        self.max_output_chars = max_output_chars
        self.timeout = float(timeout)
        self.cpu_time_s = cpu_time_s
        self.scope = scope
        self.file_size_mb = file_size_mb
        self.open_files = open_files
        self.read_paths = tuple(os.path.abspath(path) for path in read_paths)
        self.hash_seed = hash_seed
        self.min_batch_calls = min_batch_calls
        self.max_batch_calls = max_batch_calls
        self.recycle_after_calls = recycle_after_calls
        self.max_cached_codes = max_cached_codes
        self.cpu_lifetime_s = cpu_lifetime_s
        self.kill_grace_s = kill_grace_s
        self.start_timeout_s = start_timeout_s
        self.python = python or sys.executable
        self._root = tempfile.mkdtemp(prefix="ftrl-sandbox-", dir=scratch_root)
        self._slots: list[Optional[_Worker]] = [None] * workers
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._seq = 0
        self._start_failures = 0
        self._closed = False
        self._logged_start = False
        self._stats = {"calls": 0, "messages": 0, "compiles": 0, "timeouts": 0, "crashes": 0,
                       "workers_started": 0, "recycled": 0, "code_bytes_sent": 0}
        self._finalizer = weakref.finalize(self, _close_all, self._slots, self._root, self._owner_pid)

    # ------------------------------------------------------------------ public API
    def call_tools(self, codes: Codes, tool_calls: Sequence[Mapping], timeout: Optional[float] = None, *,
                   extra_kwargs: Optional[Mapping[str, Any]] = None,
                   scope: Optional[str] = None) -> list[str]:
        """One output string per tool call, in order (one assistant turn)."""
        return self.map_calls([(codes, tool_calls, extra_kwargs)], timeout, scope=scope)[0]

    def map_calls(self, jobs: Sequence[Job], timeout: Optional[float] = None, *,
                  scope: Optional[str] = None) -> list[list[str]]:
        """Many independent turns at once: ``jobs[i] = (codes, tool_calls[, extra_kwargs])``."""
        timeout = self.timeout if timeout is None else float(timeout)
        if not timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout!r}")
        scope = self.scope if scope is None else scope
        self._check_scope(scope)
        outputs: list[Optional[str]] = []
        shapes: list[int] = []
        calls: list[_Call] = []
        for job_index, job in enumerate(jobs):
            codes, tool_calls, extra = self._unpack_job(job_index, job)
            shapes.append(len(tool_calls))
            for tool_call in tool_calls:
                self._add_call(job_index, codes, tool_call, extra, outputs, calls)
        if calls:
            with self._lock:
                self._check_usable()
                self._run(calls, outputs, timeout, scope)
        if any(text is None for text in outputs):  # pragma: no cover - a scheduling bug, never a tool's doing
            raise SandboxError("sandbox: internal error, a call finished without an output")
        results: list[list[str]] = []
        position = 0
        for count in shapes:
            results.append(outputs[position:position + count])  # type: ignore[arg-type]
            position += count
        return results

    @property
    def stats(self) -> dict[str, int]:
        """Counters since creation: calls, messages, compiles, timeouts, crashes, workers_started, ..."""
        return dict(self._stats)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        return [worker.proc.pid for worker in self._slots if worker is not None]

    def close(self) -> None:
        """Kill the workers and remove their scratch directories; the sandbox cannot be used afterwards."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        live = sum(worker is not None for worker in self._slots)
        return (f"Sandbox(workers={self.workers}, live={live}, memory_mb={self.memory_mb}, "
                f"timeout={self.timeout}, scope={self.scope!r})")

    # ------------------------------------------------------------------ request preparation
    @staticmethod
    def _check_scope(scope: str) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope: unknown value {scope!r}; valid options: {list(SCOPES)}")

    def _check_usable(self) -> None:
        if self._closed:
            raise SandboxError("this Sandbox is closed; create a new one or use get_sandbox()")
        if os.getpid() != self._owner_pid:
            raise SandboxError(f"this Sandbox belongs to process {self._owner_pid} and cannot be used after "
                               f"fork (in process {os.getpid()}); call get_sandbox() in this process")

    @staticmethod
    def _unpack_job(index: int, job: Any) -> tuple[Any, Sequence[Mapping], Optional[Mapping[str, Any]]]:
        if not isinstance(job, (tuple, list)) or len(job) not in (2, 3):
            raise TypeError(f"jobs[{index}]: expected (codes, tool_calls) or (codes, tool_calls, "
                            f"extra_kwargs), got {type(job).__name__}")
        codes, tool_calls = job[0], job[1]
        extra = job[2] if len(job) == 3 else None
        if isinstance(codes, str):
            codes = _parse_codes(codes)
        elif not isinstance(codes, Mapping):
            raise TypeError(f"jobs[{index}]: codes must be a mapping or its JSON string, "
                            f"got {type(codes).__name__}")
        if isinstance(tool_calls, (str, bytes)) or not isinstance(tool_calls, Sequence):
            raise TypeError(f"jobs[{index}]: tool_calls must be a list of tool-call dicts, "
                            f"got {type(tool_calls).__name__}")
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(f"jobs[{index}]: extra_kwargs must be a mapping or None, "
                            f"got {type(extra).__name__}")
        return codes, tool_calls, (dict(extra) if extra else None)

    @staticmethod
    def _add_call(job: int, codes: Mapping[str, Any], tool_call: Any, extra: Optional[Mapping[str, Any]],
                  outputs: list[Optional[str]], calls: list[_Call]) -> None:
        slot = len(outputs)
        outputs.append(None)
        function = tool_call.get("function") if isinstance(tool_call, Mapping) else None
        if not isinstance(function, Mapping) or "name" not in function:
            # The reference crashes here (its except clause re-reads the name); we answer instead.
            outputs[slot] = format_error(None, _MALFORMED_CALL)
            return
        name = function["name"]
        if "arguments" not in function:
            outputs[slot] = format_error(name, str(KeyError("arguments")))
            return
        digest = source = lookup_error = None
        try:
            source = codes.get(name)
        except TypeError as error:  # an unhashable name
            lookup_error = str(error)
        if isinstance(source, str):
            digest = _digest(source)
        elif source is not None:
            lookup_error = f"the code of tool {name!r} is a {type(source).__name__}, not a string"
            source = None
        calls.append(_Call(slot, job, name, function["arguments"], digest, source, lookup_error, extra))

    # ------------------------------------------------------------------ scheduling
    def _run(self, calls: list[_Call], outputs: list[Optional[str]], timeout: float, scope: str) -> None:
        cpu_limit = float(self.cpu_time_s) if self.cpu_time_s is not None else timeout
        # About four messages per worker balance the load; a message costs a pipe round trip (~0.1-0.3 ms
        # here), so small turns travel whole to one worker.
        balanced = math.ceil(len(calls) / (self.workers * 4))
        per_message = min(self.max_batch_calls, max(self.min_batch_calls, balanced))
        queue: deque[list[_Call]] = deque(self._chunks(calls, per_message))
        started = time.monotonic()
        self._start_failures = 0
        try:
            while queue or any(worker is not None and worker.task is not None for worker in self._slots):
                self._fill_slots()
                for worker in self._slots:
                    if worker is not None and worker.ready and worker.task is None and queue:
                        self._dispatch(worker, queue.popleft(), timeout, cpu_limit, scope, outputs, queue)
                self._wait_and_collect(timeout, outputs, queue)
        except BaseException:
            # Leave no worker half-way through a request this call will never read.
            for worker in self._slots:
                if worker is not None and (worker.task is not None or not worker.ready):
                    self._discard(worker)
            raise
        self._stats["calls"] += len(calls)
        if not self._logged_start:
            self._logged_start = True
            log.info("sandbox: %d workers, first request of %d calls in %.2fs (memory %d MB, timeout %.1fs, "
                     "scope %s)", self.workers, len(calls), time.monotonic() - started, self.memory_mb,
                     timeout, scope)

    @staticmethod
    def _chunks(calls: list[_Call], per_message: int) -> list[list[_Call]]:
        """Cut calls into messages of about ``per_message`` calls, keeping each job (turn) on one worker.

        A job with extra_kwargs is never split (its calls share one copy, in order); a job without them
        is split only when it alone is longer than a message.
        """
        chunks: list[list[_Call]] = []
        current: list[_Call] = []
        start = 0
        while start < len(calls):
            end = start + 1
            while end < len(calls) and calls[end].job == calls[start].job:
                end += 1
            if calls[start].extra is None:
                end = min(end, start + per_message)
            if current and len(current) + end - start > per_message:
                chunks.append(current)
                current = []
            current.extend(calls[start:end])
            start = end
        if current:
            chunks.append(current)
        return chunks

    def _fill_slots(self) -> None:
        for slot, worker in enumerate(self._slots):
            if worker is None:
                self._slots[slot] = self._spawn(slot)

    def _spawn(self, slot: int) -> _Worker:
        directory = os.path.join(self._root, f"w{slot}")
        scratch = os.path.join(directory, "scratch")
        shutil.rmtree(scratch, ignore_errors=True)  # a respawned worker starts from an empty scratch dir
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        request_read, request_write = os.pipe()
        result_read, result_write = os.pipe()
        if hasattr(os, "memfd_create"):
            progress_fd = os.memfd_create("ftrl-sandbox-progress")
        else:  # pragma: no cover - non-Linux
            progress_fd = os.open(os.path.join(directory, "progress"), os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(progress_fd, _PROGRESS_BYTES)
        progress = mmap.mmap(progress_fd, _PROGRESS_BYTES)
        env = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch, "PATH": os.defpath,
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        if self.hash_seed is not None:
            env["PYTHONHASHSEED"] = str(self.hash_seed)
        child_fds = (request_read, result_write, progress_fd)
        try:
            with open(os.path.join(directory, "stderr.log"), "ab") as stderr:
                proc = subprocess.Popen(
                    [self.python, "-S", "-c", _BOOTSTRAP, os.path.abspath(__file__), *map(str, child_fds),
                     *_site_packages()],
                    pass_fds=child_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    cwd=scratch, env=env, start_new_session=True, close_fds=True)
        except OSError as error:
            for fd in (request_read, request_write, result_read, result_write, progress_fd):
                os.close(fd)
            progress.close()
            raise SandboxError(f"sandbox: cannot start a worker with python={self.python!r}: "
                               f"{error}") from error
        for fd in child_fds:
            os.close(fd)
        os.set_blocking(request_write, False)
        os.set_blocking(result_read, False)
        worker = _Worker(slot, proc, request_write, result_read, progress, directory)
        self._stats["workers_started"] += 1
        config = {"scratch": scratch, "memory_mb": self.memory_mb, "file_size_mb": self.file_size_mb,
                  "open_files": self.open_files, "cpu_lifetime_s": self.cpu_lifetime_s,
                  "read_paths": list(self.read_paths)}
        try:
            self._send(worker, pickle.dumps(config), time.monotonic() + self.start_timeout_s)
        except OSError:
            pass  # it died at once; the EOF path reports it with its stderr
        return worker

    def _send(self, worker: _Worker, payload: bytes, deadline: float) -> None:
        """Write one frame without blocking the loop past ``deadline`` (TimeoutError/OSError on failure)."""
        data = memoryview(_HEADER.pack(len(payload)) + payload)
        while data:
            try:
                data = data[os.write(worker.send_fd, data):]
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("worker did not read its request") from None
                poller = select.poll()
                poller.register(worker.send_fd, select.POLLOUT)
                poller.poll(math.ceil(remaining * 1000))

    def _dispatch(self, worker: _Worker, chunk: list[_Call], timeout: float, cpu_limit: float, scope: str,
                  outputs: list[Optional[str]], queue: deque) -> None:
        self._seq += 1
        new_codes: dict[bytes, str] = {}
        extras: list[Mapping[str, Any]] = []
        extra_index: dict[int, int] = {}
        wire_calls = []
        for call in chunk:
            if call.digest is not None and call.digest not in worker.known and call.digest not in new_codes:
                new_codes[call.digest] = call.source  # type: ignore[assignment]
            index = -1
            if call.extra is not None:  # one copy per job: its calls see each other's changes, in order
                index = extra_index.get(call.job, -1)
                if index < 0:
                    index = extra_index[call.job] = len(extras)
                    extras.append(call.extra)
            wire_calls.append((call.name, call.arguments, call.digest, index, call.lookup_error))
        try:
            # Each job's extras are pickled apart: one pickle of the whole message would let two jobs
            # that got the same object (a database) share, and mutate, one copy in the worker.
            # Jobs whose extras hold the very same objects share one pickle (the worker still decodes a
            # fresh copy per job): sending one database to many episodes costs one serialisation.
            pickled: dict[tuple, bytes] = {}
            blobs = []
            for extra in extras:
                identity = tuple((key, id(value)) for key, value in extra.items())
                if identity not in pickled:
                    pickled[identity] = pickle.dumps(extra, protocol=pickle.HIGHEST_PROTOCOL)
                blobs.append(pickled[identity])
            message = {"op": "run", "seq": self._seq, "codes": new_codes, "extras": blobs, "calls": wire_calls,
                       "scope": scope, "timeout": timeout, "cpu_limit": cpu_limit,
                       "max_chars": self.max_output_chars}
            payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # noqa: BLE001 - e.g. an extra_kwargs value that cannot be pickled
            for call in chunk:
                outputs[call.slot] = format_error(call.name, f"sandbox could not send the call: {error}")
            return
        worker.task = _Task(self._seq, chunk, set(new_codes))
        try:
            self._send(worker, payload, time.monotonic() + timeout + self.kill_grace_s)
        except (OSError, TimeoutError):
            self._fail(worker, None, outputs, queue)
            return
        worker.known.update(new_codes)
        self._stats["messages"] += 1
        self._stats["code_bytes_sent"] += sum(len(source) for source in new_codes.values())

    def _deadline(self, worker: _Worker, timeout: float) -> float:
        task = worker.task
        if task is None:
            return math.inf
        seq, _index, started, in_call = _PROGRESS.unpack_from(worker.progress)
        if seq == task.seq and in_call:
            return started + timeout + self.kill_grace_s
        return max(task.sent_at, started if seq == task.seq else 0.0) + timeout + self.kill_grace_s

    def _wait_and_collect(self, timeout: float, outputs: list[Optional[str]], queue: deque) -> None:
        now = time.monotonic()
        wait = 1.0
        poller = select.poll()
        by_fd: dict[int, _Worker] = {}
        for worker in self._slots:
            if worker is None:
                continue
            by_fd[worker.recv_fd] = worker
            poller.register(worker.recv_fd, select.POLLIN)
            if worker.task is not None:
                wait = min(wait, self._deadline(worker, timeout) - now)
            if not worker.ready:
                wait = min(wait, worker.started_at + self.start_timeout_s - now)
        for fd, _mask in poller.poll(max(0, math.ceil(wait * 1000))):
            worker = by_fd[fd]
            if self._slots[worker.slot] is worker:
                self._read(worker, outputs, queue)
        now = time.monotonic()
        for worker in list(self._slots):
            if worker is None:
                continue
            if worker.task is not None and now >= self._deadline(worker, timeout):
                self._stats["timeouts"] += 1
                self._fail(worker, f"timed out after {float(timeout)} seconds", outputs, queue)
            elif not worker.ready and now >= worker.started_at + self.start_timeout_s:
                self._discard(worker)
                raise SandboxError(f"sandbox: a worker did not start within {self.start_timeout_s}s; "
                                   f"its stderr: {self._stderr_tail(worker)!r}")

    def _read(self, worker: _Worker, outputs: list[Optional[str]], queue: deque) -> None:
        try:
            data = os.read(worker.recv_fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._on_exit(worker, outputs, queue)
            return
        buffer = worker.buffer
        buffer += data
        limit = self._max_frame(worker)
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if size > limit:
                self._fail(worker, "the sandbox worker sent an oversized reply", outputs, queue)
                return
            if len(buffer) < _HEADER.size + size:
                return
            payload = bytes(buffer[_HEADER.size:_HEADER.size + size])
            del buffer[:_HEADER.size + size]
            if not self._on_frame(worker, payload, outputs, queue):
                return

    def _max_frame(self, worker: _Worker) -> int:
        calls = len(worker.task.calls) if worker.task is not None else 1
        # JSON may spend up to 12 bytes on one character (an escaped surrogate pair).
        return 65536 + calls * (self.max_output_chars + 256) * 12

    def _on_frame(self, worker: _Worker, payload: bytes, outputs: list[Optional[str]], queue: deque) -> bool:
        """Apply one reply; False when the worker was failed and its buffer must not be read further."""
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self._fail(worker, "the sandbox worker sent a malformed reply", outputs, queue)
            return False
        if not worker.ready:
            if message.get("ready") is not True:
                self._fail(worker, "the sandbox worker sent a malformed reply", outputs, queue)
                return False
            worker.ready = True
            self._start_failures = 0
            return True
        task = worker.task
        if task is None:
            self._fail(worker, "the sandbox worker replied without a request", outputs, queue)
            return False
        if "decode_error" in message:
            worker.known -= task.new_codes  # the worker never stored them
            for call in task.calls[task.received:]:
                outputs[call.slot] = format_error(call.name, f"sandbox could not decode the call: "
                                                             f"{str(message['decode_error'])[:500]}")
            worker.task = None
            return True
        texts = message.get("out")
        if (message.get("seq") != task.seq or message.get("first") != task.received
                or not isinstance(texts, list) or task.received + len(texts) > len(task.calls)
                or not all(isinstance(text, str) for text in texts)):
            self._fail(worker, "the sandbox worker sent a malformed reply", outputs, queue)
            return False
        limit = self.max_output_chars
        for offset, text in enumerate(texts, start=task.received):
            # The worker already cut long outputs (marker included); this bounds a worker that did not.
            if len(text) > limit + _MARKER_ROOM:
                text = truncate_output(text, limit)
            outputs[task.calls[offset].slot] = text
        task.received += len(texts)
        if message.get("done"):
            if task.received != len(task.calls):
                self._fail(worker, "the sandbox worker sent a malformed reply", outputs, queue)
                return False
            worker.task = None
            worker.calls_run += len(task.calls)
            cpu, compiles = message.get("cpu"), message.get("compiles")
            worker.cpu_seconds = float(cpu) if isinstance(cpu, (int, float)) else worker.cpu_seconds
            self._stats["compiles"] += int(compiles) if isinstance(compiles, int) else 0
            if (worker.calls_run >= self.recycle_after_calls or len(worker.known) > self.max_cached_codes
                    or worker.cpu_seconds > self.cpu_lifetime_s / 2):
                self._stats["recycled"] += 1
                self._discard(worker)
                return False
        return True

    def _on_exit(self, worker: _Worker, outputs: list[Optional[str]], queue: deque) -> None:
        try:
            returncode = worker.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # it closed its pipe but lives on: treat as crashed
            returncode = None
        description = _exit_description(returncode)
        if not worker.ready:
            self._start_failures += 1
            stderr = self._stderr_tail(worker)
            self._discard(worker)
            if self._start_failures >= 3:
                raise SandboxError(f"sandbox: workers exit during start-up ({description}); "
                                   f"stderr: {stderr!r}")
            return
        self._stats["crashes"] += 1
        self._fail(worker, f"the sandbox worker crashed ({description})", outputs, queue)

    def _fail(self, worker: _Worker, reason: Optional[str], outputs: list[Optional[str]],
              queue: deque) -> None:
        """Kill ``worker``; the call it was running gets ``reason``, the unanswered rest is queued again."""
        task = worker.task
        blamed = -1
        if task is not None:
            seq, index, _started, in_call = _PROGRESS.unpack_from(worker.progress)
            if reason is not None and seq == task.seq and in_call and index >= task.received:
                blamed = index
        self._discard(worker)
        if task is None:
            return
        retry: list[_Call] = []
        for offset in range(task.received, len(task.calls)):
            call = task.calls[offset]
            if offset == blamed:
                outputs[call.slot] = format_error(call.name, reason)
                continue
            if blamed < 0 and offset == task.received:
                # Nobody to blame (it died between calls): the first unanswered call risks a retry budget.
                call.retries += 1
                if call.retries > _MAX_RETRIES:
                    outputs[call.slot] = format_error(call.name, reason or "the sandbox worker stopped")
                    continue
            retry.append(call)
        if retry:
            queue.appendleft(retry)

    def _discard(self, worker: _Worker) -> None:
        if self._slots[worker.slot] is worker:
            self._slots[worker.slot] = None
        _stop_worker(worker)

    @staticmethod
    def _stderr_tail(worker: _Worker) -> str:
        try:
            with open(os.path.join(worker.directory, "stderr.log"), "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 2000))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


# ------------------------------------------------------------------ process-wide default
_default_lock = threading.Lock()
_default_sandbox: Optional[Sandbox] = None
_default_options: dict[str, Any] = {"workers": 2}


def configure_sandbox(**options: Any) -> None:
    """Set the options of the process-wide sandbox (any ``Sandbox`` keyword, e.g. ``workers``, ``timeout``).

    An existing default sandbox built with other options is closed; the next use rebuilds it.
    """
    global _default_sandbox
    import inspect  # only the parent needs it; workers execute this module's top level too

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


def configure_from_run_config(run_config: Any) -> None:
    """Apply ``resources.sandbox_workers`` and ``reward.tool_timeout_s`` of a RunConfig."""
    configure_sandbox(workers=int(run_config.resources.sandbox_workers),
                      timeout=float(run_config.reward.tool_timeout_s))


def get_sandbox(workers: Optional[int] = None) -> Sandbox:
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


def call_tools(codes: Codes, tool_calls: Sequence[Mapping], timeout: Optional[float] = None, *,
               extra_kwargs: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Run one turn's tool calls in the process-wide sandbox (``timeout=None``: its configured default)."""
    return get_sandbox().call_tools(codes, tool_calls, timeout, extra_kwargs=extra_kwargs)


# ------------------------------------------------------------------ benchmark
_BENCH_TOOLS = {
    f"get_{kind}": (
        f"def get_{kind}(city: str, day: int = 0) -> dict:\n"
        f"    table = {{'Paris': 21, 'Oslo': 4, 'Lima': 18}}\n"
        f"    if city not in table:\n"
        f"        raise ValueError(f'unknown city {{city}}')\n"
        f"    return {{'city': city, 'day': day, '{kind}': table[city] + day, 'unit': 'x'}}\n")
    for kind in ("weather", "humidity", "wind", "pressure", "visibility")
}


def _reference_in_process(codes: Mapping[str, str], call: Mapping) -> str:
    """The reference's per-call work in this process (exec of the source string each call)."""
    name = call["function"]["name"]
    try:
        arguments = json.loads(call["function"]["arguments"])
        namespace: dict[str, Any] = {}
        exec(codes[name], namespace)  # noqa: S102
        result = namespace[name](**arguments)
        return json.dumps(result, ensure_ascii=False) if type(result) in (dict, list) else str(result)
    except Exception as error:  # noqa: BLE001
        return format_error(name, str(error))


def run_benchmark(total_calls: int = 20000, calls_per_turn: int = 4,
                  worker_counts: Sequence[int] = (1, 2)) -> dict[str, Any]:
    """Measure sandbox throughput and per-call overhead against in-process exec+call; returns the numbers."""
    names = sorted(_BENCH_TOOLS)
    cities = ("Paris", "Oslo", "Lima")
    turns = []
    for turn in range(total_calls // calls_per_turn):
        turns.append([{"id": f"c{turn}_{k}", "type": "function",
                       "function": {"name": names[(turn + k) % len(names)],
                                    "arguments": json.dumps({"city": cities[(turn + k) % 3], "day": k})}}
                      for k in range(calls_per_turn)])
    calls = [call for turn in turns for call in turn]
    codes_json = json.dumps(_BENCH_TOOLS)

    start = time.perf_counter()
    expected = [_reference_in_process(_BENCH_TOOLS, call) for call in calls]
    in_process_s = time.perf_counter() - start
    compiled = {name: compile(source, "<string>", "exec") for name, source in _BENCH_TOOLS.items()}
    start = time.perf_counter()
    for call in calls:
        namespace: dict[str, Any] = {}
        name = call["function"]["name"]
        exec(compiled[name], namespace)  # noqa: S102
        json.dumps(namespace[name](**json.loads(call["function"]["arguments"])), ensure_ascii=False)
    cached_s = time.perf_counter() - start

    cached_us = cached_s / len(calls) * 1e6
    results: dict[str, Any] = {"calls": len(calls), "in_process_calls_per_s": len(calls) / in_process_s,
                               "in_process_us_per_call": in_process_s / len(calls) * 1e6,
                               "in_process_cached_calls_per_s": len(calls) / cached_s,
                               "in_process_cached_us_per_call": cached_us}
    for workers in worker_counts:
        with Sandbox(workers=workers) as sandbox:
            sandbox.map_calls([(codes_json, turn) for turn in turns[:50]])  # start and warm the workers
            start = time.perf_counter()
            got = sandbox.map_calls([(codes_json, turn) for turn in turns])
            elapsed = time.perf_counter() - start
            if [text for turn in got for text in turn] != expected:
                raise SandboxError("benchmark: sandbox outputs differ from the in-process reference")
            latency_turns = turns[:300]
            start = time.perf_counter()
            for turn in latency_turns:
                sandbox.call_tools(codes_json, turn)
            latency_s = (time.perf_counter() - start) / len(latency_turns)
        wall_us = elapsed / len(calls) * 1e6
        results[f"workers={workers}"] = {
            "calls_per_s": len(calls) / elapsed,
            "wall_us_per_call": wall_us,
            # Wall time the parent waits per call beyond running it in-process with a cached code object.
            "overhead_us_per_call": wall_us - cached_us,
            "single_turn_latency_ms": latency_s * 1e3,
        }
    return results


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ftrl.envs.sandbox", description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="measure calls/s and overhead vs in-process")
    parser.add_argument("--calls", type=int, default=20000, help="tool calls in the benchmark")
    parser.add_argument("--calls-per-turn", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 0
    results = run_benchmark(args.calls, args.calls_per_turn, args.workers)
    print(f"benchmark: {results['calls']} calls of 5 tools returning dicts, {args.calls_per_turn} calls "
          f"per turn, {os.cpu_count()} CPUs")
    reference_rate, cached_rate = results["in_process_calls_per_s"], results["in_process_cached_calls_per_s"]
    print(f"  in-process, reference style (exec source + call)  {reference_rate:9.0f} calls/s"
          f"  {results['in_process_us_per_call']:7.1f} us/call")
    print(f"  in-process, cached code object + call             {cached_rate:9.0f} calls/s"
          f"  {results['in_process_cached_us_per_call']:7.1f} us/call")
    for workers in args.workers:
        row = results[f"workers={workers}"]
        print(f"  sandbox map_calls, {workers} worker(s)                   {row['calls_per_s']:9.0f} calls/s"
              f"  {row['wall_us_per_call']:7.1f} us/call (overhead {row['overhead_us_per_call']:+.1f} us vs "
              f"cached in-process); one turn via call_tools: {row['single_turn_latency_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
