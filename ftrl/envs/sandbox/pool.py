"""The parent side of the sandbox: ``Sandbox``, a pool of warm worker processes, and its bookkeeping.

``Sandbox.map_calls`` cuts a request into messages of calls (a job, one turn, stays on one worker),
sends each to an idle worker with only the tool sources that worker has not seen, collects the
streamed JSON replies, enforces a deadline per call from the shared progress record (SIGKILL and
respawn past ``timeout + kill_grace_s``), re-queues the unanswered calls of a crashed worker and
recycles workers after ``recycle_after_calls`` calls. The worker processes run
``ftrl.envs.sandbox.worker`` (started through its ``BOOTSTRAP``); the output semantics and the
containment layers are described in ``ftrl.envs.sandbox``.

    python -m ftrl.envs.sandbox.bench --quick     # drives Sandbox.map_calls, checks every output
    python -m pytest tests/test_sandbox.py -q
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from ftrl.envs.sandbox import worker as worker_runtime
from ftrl.envs.sandbox.worker import BOOTSTRAP, HEADER, PROGRESS, PROGRESS_BYTES, truncate_output
from ftrl.types import TOOL_ERROR_TEMPLATE, format_tool_error

log = logging.getLogger(__name__)

SCOPES: tuple[str, ...] = ("ftrl", "module")
DEFAULT_TIMEOUT_S = 10.0

Codes = Mapping[str, str] | str
Job = tuple[Codes, Sequence[Mapping]] | tuple[Codes, Sequence[Mapping], Mapping[str, Any] | None]

_MARKER_ROOM = 128  # characters the truncation marker may add beyond max_output_chars
_MALFORMED_CALL = "malformed tool call: expected {'function': {'name', 'arguments'}}"
_MAX_RETRIES = 2  # re-runs of a call whose worker died while it was queued behind another


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
        raise ValueError(  # noqa: TRY004 - kept a ValueError, like the bad-JSON case above
            f"codes: expected a JSON object tool name -> source, got {type(codes).__name__}")
    return codes


class _Call:
    """One tool call on its way through the workers."""

    __slots__ = ("arguments", "digest", "extra", "job", "lookup_error", "name", "retries", "slot", "source")

    def __init__(self, slot: int, job: int, name: Any, arguments: Any, digest: bytes | None,
                 source: str | None, lookup_error: str | None,
                 extra: Mapping[str, Any] | None) -> None:
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
    __slots__ = ("calls", "new_codes", "received", "sent_at", "seq")

    def __init__(self, seq: int, calls: list[_Call], new_codes: set[bytes]) -> None:
        self.seq = seq
        self.calls = calls
        self.new_codes = new_codes  # digests whose source this message carries
        self.received = 0
        self.sent_at = time.monotonic()


class _Worker:
    """The parent's handle on one worker process."""

    __slots__ = (
        "buffer",
        "calls_run",
        "cpu_seconds",
        "directory",
        "known",
        "proc",
        "progress",
        "ready",
        "recv_fd",
        "send_fd",
        "slot",
        "started_at",
        "task",
    )

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
        self.task: _Task | None = None
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


def _close_all(workers: list[_Worker | None], root: str, owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked child must not kill its parent's workers
        return
    for index, worker in enumerate(workers):
        if worker is not None:
            _stop_worker(worker)
            workers[index] = None
    shutil.rmtree(root, ignore_errors=True)


def _exit_description(returncode: int | None) -> str:
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
                 timeout: float = DEFAULT_TIMEOUT_S, cpu_time_s: float | None = None,
                 scope: str = "ftrl", file_size_mb: int = 16, open_files: int = 64,
                 read_paths: Sequence[str] = (), hash_seed: int | None = 0,
                 min_batch_calls: int = 16, max_batch_calls: int = 256, recycle_after_calls: int = 20000,
                 max_cached_codes: int = 4096, cpu_lifetime_s: int = 600, kill_grace_s: float = 0.5,
                 start_timeout_s: float = 30.0, python: str | None = None,
                 scratch_root: str | None = None) -> None:
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
        self._slots: list[_Worker | None] = [None] * workers
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._seq = 0
        self._start_failures = 0
        self._closed = False
        self._logged_start = False
        self._stats = {"calls": 0, "messages": 0, "compiles": 0, "timeouts": 0, "crashes": 0,
                       "workers_started": 0, "recycled": 0, "code_bytes_sent": 0, "outputs_cut": 0}
        self._finalizer = weakref.finalize(self, _close_all, self._slots, self._root, self._owner_pid)

    # ------------------------------------------------------------------ public API
    def call_tools(self, codes: Codes, tool_calls: Sequence[Mapping], timeout: float | None = None, *,
                   extra_kwargs: Mapping[str, Any] | None = None,
                   scope: str | None = None) -> list[str]:
        """One output string per tool call, in order (one assistant turn)."""
        return self.map_calls([(codes, tool_calls, extra_kwargs)], timeout, scope=scope)[0]

    def map_calls(self, jobs: Sequence[Job], timeout: float | None = None, *,
                  scope: str | None = None) -> list[list[str]]:
        """Many independent turns at once: ``jobs[i] = (codes, tool_calls[, extra_kwargs])``."""
        timeout = self.timeout if timeout is None else float(timeout)
        if not timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout!r}")
        scope = self.scope if scope is None else scope
        self._check_scope(scope)
        outputs: list[str | None] = []
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

    def __enter__(self) -> Sandbox:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
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
    def _unpack_job(index: int, job: Any) -> tuple[Any, Sequence[Mapping], Mapping[str, Any] | None]:
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
    def _add_call(job: int, codes: Mapping[str, Any], tool_call: Any, extra: Mapping[str, Any] | None,
                  outputs: list[str | None], calls: list[_Call]) -> None:
        slot = len(outputs)
        outputs.append(None)
        function = tool_call.get("function") if isinstance(tool_call, Mapping) else None
        if not isinstance(function, Mapping) or "name" not in function:
            # The reference crashes here (its except clause re-reads the name); we answer instead.
            outputs[slot] = format_tool_error(None, _MALFORMED_CALL)
            return
        name = function["name"]
        if "arguments" not in function:
            outputs[slot] = format_tool_error(name, str(KeyError("arguments")))
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
    def _run(self, calls: list[_Call], outputs: list[str | None], timeout: float, scope: str) -> None:
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
        os.ftruncate(progress_fd, PROGRESS_BYTES)
        progress = mmap.mmap(progress_fd, PROGRESS_BYTES)
        env = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch, "PATH": os.defpath,
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        if self.hash_seed is not None:
            env["PYTHONHASHSEED"] = str(self.hash_seed)
        child_fds = (request_read, result_write, progress_fd)
        try:
            with open(os.path.join(directory, "stderr.log"), "ab") as stderr:
                proc = subprocess.Popen(
                    [self.python, "-S", "-c", BOOTSTRAP, os.path.abspath(worker_runtime.__file__), *map(str, child_fds),
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
                  "read_paths": list(self.read_paths), "error_template": TOOL_ERROR_TEMPLATE}
        try:
            self._send(worker, pickle.dumps(config), time.monotonic() + self.start_timeout_s)
        except OSError:
            pass  # it died at once; the EOF path reports it with its stderr
        return worker

    def _send(self, worker: _Worker, payload: bytes, deadline: float) -> None:
        """Write one frame without blocking the loop past ``deadline`` (TimeoutError/OSError on failure)."""
        data = memoryview(HEADER.pack(len(payload)) + payload)
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
                  outputs: list[str | None], queue: deque) -> None:
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
                outputs[call.slot] = format_tool_error(call.name, f"sandbox could not send the call: {error}")
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
        seq, _index, started, in_call = PROGRESS.unpack_from(worker.progress)
        if seq == task.seq and in_call:
            return started + timeout + self.kill_grace_s
        return max(task.sent_at, started if seq == task.seq else 0.0) + timeout + self.kill_grace_s

    def _wait_and_collect(self, timeout: float, outputs: list[str | None], queue: deque) -> None:
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

    def _read(self, worker: _Worker, outputs: list[str | None], queue: deque) -> None:
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
        while len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            if size > limit:
                self._fail(worker, "the sandbox worker sent an oversized reply", outputs, queue)
                return
            if len(buffer) < HEADER.size + size:
                return
            payload = bytes(buffer[HEADER.size:HEADER.size + size])
            del buffer[:HEADER.size + size]
            if not self._on_frame(worker, payload, outputs, queue):
                return

    def _max_frame(self, worker: _Worker) -> int:
        calls = len(worker.task.calls) if worker.task is not None else 1
        # JSON may spend up to 12 bytes on one character (an escaped surrogate pair).
        return 65536 + calls * (self.max_output_chars + 256) * 12

    def _on_frame(self, worker: _Worker, payload: bytes, outputs: list[str | None], queue: deque) -> bool:
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
                outputs[call.slot] = format_tool_error(call.name, f"sandbox could not decode the call: "
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
            if len(text) > limit and "\n...[truncated by the sandbox: " in text[limit:]:
                self._stats["outputs_cut"] += 1
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

    def _on_exit(self, worker: _Worker, outputs: list[str | None], queue: deque) -> None:
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

    def _fail(self, worker: _Worker, reason: str | None, outputs: list[str | None],
              queue: deque) -> None:
        """Kill ``worker``; the call it was running gets ``reason``, the unanswered rest is queued again."""
        task = worker.task
        blamed = -1
        if task is not None:
            seq, index, _started, in_call = PROGRESS.unpack_from(worker.progress)
            if reason is not None and seq == task.seq and in_call and index >= task.received:
                blamed = index
        self._discard(worker)
        if task is None:
            return
        retry: list[_Call] = []
        for offset in range(task.received, len(task.calls)):
            call = task.calls[offset]
            if offset == blamed:
                outputs[call.slot] = format_tool_error(call.name, reason)
                continue
            if blamed < 0 and offset == task.received:
                # Nobody to blame (it died between calls): the first unanswered call risks a retry budget.
                call.retries += 1
                if call.retries > _MAX_RETRIES:
                    outputs[call.slot] = format_tool_error(call.name, reason or "the sandbox worker stopped")
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
