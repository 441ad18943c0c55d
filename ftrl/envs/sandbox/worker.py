"""The sandbox worker's runtime: what runs inside each worker process, and nothing else.

A worker is ``python -S -c BOOTSTRAP <this file> <fds> <site dirs>``: the bootstrap executes this file
as a bare module named ``ftrl_sandbox_worker`` (no package import, no ``site``, no torch), so it
imports only the standard library; what it needs from ftrl (the tool-error template of
``ftrl.types``) arrives in its start-up config. It sets its limits (signals, rlimits, the
``sys.addaudithook`` guard, the blocked process and thread starts), then answers requests: each call
compiles its tool source once per worker (cached by digest), executes it into a fresh namespace,
calls the tool under per-call wall and CPU timers and writes the tool message back as JSON.
``ftrl.envs.sandbox.pool`` starts the workers and imports the frame layout (``HEADER``,
``PROGRESS``) and ``BOOTSTRAP`` from here.

    python -m pytest tests/test_sandbox.py -q     # every call there runs through this module
"""

from __future__ import annotations

import _signal
import builtins
import copy
import hashlib
import json
import keyword
import mmap
import os
import pickle
import resource
import signal
import struct
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

# Frames on the pipes: 8-byte little-endian length, then the payload (pickle parent->worker, JSON
# worker->parent). The progress record is shared memory the worker updates around every call.
HEADER = struct.Struct("<Q")
PROGRESS = struct.Struct("<qqdq")  # request seq, call index, call start (monotonic), in-call flag
PROGRESS_BYTES = 64
_FLUSH_EVERY_S = 0.2  # a worker sends partial results this often, so a later crash re-runs little


def truncate_output(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters with a visible marker (tool outputs feed a prompt)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n...[truncated by the sandbox: {len(text)} characters, first {limit} shown]"


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
    error_template = ""  # ftrl.types.TOOL_ERROR_TEMPLATE, from the start-up config
    builtins_snapshot: ClassVar[dict[str, Any]] = {}
    reference_globals: ClassVar[dict[str, Any]] = {}
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
    return eval(name, second, first)  # same expression the reference evaluates


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


def _format_error(name: Any, error: str) -> str:
    """The reference's tool message for a failed call (the template of ``ftrl.types.format_tool_error``)."""
    return _WorkerState.error_template.format(name=name, error=error)


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
            text = _format_error(name, limit.message)
        except BaseException as error:  # noqa: BLE001 - every failure becomes a tool message
            text = _format_error(name, _describe_error(error))  # still armed: a hostile __str__ is bounded
        finally:
            _disarm()
    except _Limit as limit:  # fired while the error above was being described
        _disarm()
        text = _format_error(name, limit.message)
    return text


def _write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, size: int) -> bytes | None:
    parts = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _read_frame(fd: int) -> bytes | None:
    header = _read_exact(fd, HEADER.size)
    if header is None:
        return None
    return _read_exact(fd, HEADER.unpack(header)[0])


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
    pack = PROGRESS.pack_into
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


def _deny(event: str, what: str) -> None:
    raise PermissionError(f"sandbox: {what} is not allowed ({event})")


def _refuse(what: str) -> Callable[[str, tuple], None]:
    """Audit handler refusing an event outright."""
    deny = _deny

    def handler(event: str, args: tuple) -> None:
        deny(event, what)
    return handler


def _path_checks(scratch: str, read_roots: Sequence[str], read_files: Sequence[str]) -> tuple[Callable, Callable]:
    """``(check_write, check_read)``: writes only below ``scratch``; reads only of ``read_files`` or below
    ``read_roots`` and ``scratch`` (paths resolved with ``realpath``, descriptors through /proc/self/fd)."""
    realpath, fsdecode, fspath, readlink, isabs = (os.path.realpath, os.fsdecode, os.fspath, os.readlink,
                                                    os.path.isabs)
    deny = _deny
    sep = os.sep
    scratch_prefix = scratch + sep
    read_prefixes = tuple(root.rstrip(sep) + sep for root in read_roots) + (scratch_prefix,)
    exact_reads = frozenset(read_files) | {root.rstrip(sep) for root in read_roots} | {scratch}

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

    return check_write, check_read


def _file_handlers(check_write: Callable, check_read: Callable) -> dict[str, Callable[[str, tuple], None]]:
    """Audit events that open, change or list files, each with the check of its path arguments."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def on_open(event: str, args: tuple) -> None:
        path, mode, flags = args
        if (flags or 0) & write_flags or (mode and any(letter in mode for letter in "wax+")):
            if isinstance(path, int) and path < 0:
                return
            check_write(event, path)
        else:
            check_read(event, path)

    def paths(*checks: tuple[int, int | None]) -> Callable[[str, tuple], None]:
        """Handler checking each (path position, dir_fd position or None) of an event's arguments."""
        def handler(event: str, args: tuple) -> None:
            for position, dir_fd in checks:
                check_write(event, args[position], args[dir_fd] if dir_fd is not None else None)
        return handler

    def reads(event: str, args: tuple) -> None:
        check_read(event, args[0] if args and args[0] is not None else ".")

    return {
        "open": on_open,
        "os.remove": paths((0, 1)), "os.rmdir": paths((0, 1)), "os.mkdir": paths((0, 2)),
        "os.rename": paths((0, 2), (1, 3)), "os.truncate": paths((0, None)), "os.chmod": paths((0, 2)),
        "os.chown": paths((0, 3)), "os.utime": paths((0, 3)), "os.chflags": paths((0, None)),
        "os.lchflags": paths((0, None)), "os.setxattr": paths((0, None)), "os.removexattr": paths((0, None)),
        "os.link": _refuse("creating links"), "os.symlink": _refuse("creating links"),
        "shutil.copyfile": paths((1, None)), "shutil.copymode": paths((1, None)),
        "shutil.copystat": paths((1, None)), "shutil.copytree": paths((1, None)),
        "shutil.move": paths((0, None), (1, None)), "shutil.rmtree": paths((0, None)),
        "shutil.chown": paths((0, None)), "shutil.make_archive": paths((0, None)),
        "shutil.unpack_archive": paths((1, None)),
        "os.listdir": reads, "os.scandir": reads, "os.chdir": reads,
    }


_NATIVE_MODULES = frozenset({"_ctypes", "ctypes", "_posixsubprocess"})


def _refusal_handlers() -> dict[str, Callable[[str, tuple], None]]:
    """Audit events refused outright: processes, threads, signals, limits, gc walks, network, native code."""
    deny = _deny
    native_modules = _NATIVE_MODULES

    def on_import(event: str, args: tuple) -> None:
        if args and args[0] in native_modules:
            deny(event, f"importing {args[0]}")

    processes = _refuse("starting processes")
    return {
        "import": on_import,
        "subprocess.Popen": processes, "os.system": processes, "os.exec": processes,
        "os.posix_spawn": processes, "os.spawn": processes, "os.fork": processes, "os.forkpty": processes,
        "pty.spawn": processes, "os.startfile": processes, "webbrowser.open": processes,
        "_thread.start_new_thread": _refuse("starting threads"),  # audited from Python 3.13
        "_thread.start_joinable_thread": _refuse("starting threads"),
        "os.kill": _refuse("sending signals"), "os.killpg": _refuse("sending signals"),
        "signal.pthread_kill": _refuse("sending signals"),
        "resource.setrlimit": _refuse("changing resource limits"),
        "resource.prlimit": _refuse("changing resource limits"),
        "sys.addaudithook": _refuse("adding audit hooks"),
        "gc.get_objects": _refuse("walking the interpreter's objects"),
        "gc.get_referrers": _refuse("walking the interpreter's objects"),
        "gc.get_referents": _refuse("walking the interpreter's objects"),
        "urllib.Request": _refuse("network access"), "http.client.connect": _refuse("network access"),
    }


def _audit_hook(handlers: dict[str, Callable[[str, tuple], None]]) -> Callable[[str, tuple], None]:
    """The hook: an event's handler, else a refusal of any ``socket.*`` or ``ctypes.*`` event."""
    get = handlers.get
    deny = _deny

    def hook(event: str, args: tuple) -> None:
        handler = get(event)
        if handler is not None:
            handler(event, args)
        elif event.startswith("socket."):
            deny(event, "network access")
        elif event.startswith("ctypes."):
            deny(event, "native code (ctypes)")
    return hook


def _install_guard(scratch: str, read_roots: Sequence[str], read_files: Sequence[str]) -> None:
    """Install the audit hook that refuses network, processes, native code and writes outside scratch."""
    check_write, check_read = _path_checks(scratch, read_roots, read_files)
    handlers = {**_file_handlers(check_write, check_read), **_refusal_handlers()}
    sys.addaudithook(_audit_hook(handlers))


# Modules tool code commonly imports: loaded before the guard so the first call does not pay for them.
_PRELOAD = ("json", "math", "re", "datetime", "random", "hashlib", "copy", "collections", "itertools",
            "functools", "string", "typing", "decimal", "statistics", "uuid", "heapq", "bisect", "operator")


def _block_process_and_thread_starts() -> None:
    """Replace the entry points that start processes or threads without an audit event."""
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


def _apply_rlimits(config: dict) -> None:
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


def _allowed_reads(config: dict) -> tuple[list[str], list[str]]:
    """``(read_roots, read_files)`` for the guard: the Python installation, ``read_paths``, a few files."""
    read_roots = {sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    read_roots.update(entry for entry in sys.path if entry and os.path.isdir(entry))
    read_roots.update(config["read_paths"])
    resolved_roots = sorted({os.path.realpath(root) for root in read_roots if root})
    read_files = [os.path.realpath(path) for path in
                  ("/dev/null", "/dev/urandom", "/dev/random", "/etc/localtime", "/etc/timezone")]
    return resolved_roots + [os.path.realpath("/usr/share/zoneinfo")], read_files


def _setup_worker(config: dict) -> None:
    """Prepare this process before its first request: signals, preloads, blocks, state, limits, guard."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer's Ctrl-C is the parent's to handle
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
    for signum in _LIMIT_SIGNALS:
        signal.signal(signum, _on_limit_signal)
    for module in _PRELOAD:
        __import__(module)
    if not hasattr(builtins, "exit"):  # normally added by site, which workers skip
        builtins.exit = builtins.quit = sys.exit  # type: ignore[attr-defined]
    _block_process_and_thread_starts()

    scratch = os.path.realpath(config["scratch"])
    os.chdir(scratch)
    sys.dont_write_bytecode = True
    _WorkerState.memory_mb = config["memory_mb"]
    _WorkerState.error_template = config["error_template"]
    _WorkerState.recursion_limit = sys.getrecursionlimit()
    _WorkerState.builtins_snapshot = dict(builtins.__dict__)
    # The reference module's globals that its exec'd tool code can see (utils.utils imports them).
    _WorkerState.reference_globals = {"__name__": "utils.utils", "json": json, "deepcopy": copy.deepcopy,
                                      "sha256": hashlib.sha256, "sleep": time.sleep}
    _apply_rlimits(config)
    read_roots, read_files = _allowed_reads(config)
    _install_guard(scratch, read_roots, read_files)


def _worker_main(request_fd: int, result_fd: int, progress_fd: int) -> None:
    """Entry point of a worker process (started by ``Sandbox`` through ``BOOTSTRAP`` below)."""
    progress = mmap.mmap(progress_fd, PROGRESS_BYTES)
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


BOOTSTRAP = (
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

