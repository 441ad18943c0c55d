"""Sandbox benchmark: calls/s and per-call overhead of ``Sandbox.map_calls`` against in-process exec.

Runs ``total_calls`` calls of five small tools returning dicts (``calls_per_turn`` per turn) in this
process, reference style (exec the source, call) and with a cached code object, then through
sandboxes of each requested worker count; the sandbox outputs must equal the in-process ones.

    python -m ftrl.envs.sandbox.bench                     # 20000 calls, 1 and 2 workers
    python -m ftrl.envs.sandbox.bench --quick             # 400 calls, 1 worker
    python -m ftrl.envs.sandbox --bench                   # the same command through the package
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl.envs.sandbox.pool import Sandbox, SandboxError
from ftrl.types import format_tool_error

BENCH_TOOLS = {
    f"get_{kind}": (
        f"def get_{kind}(city: str, day: int = 0) -> dict:\n"
        f"    table = {{'Paris': 21, 'Oslo': 4, 'Lima': 18}}\n"
        f"    if city not in table:\n"
        f"        raise ValueError(f'unknown city {{city}}')\n"
        f"    return {{'city': city, 'day': day, '{kind}': table[city] + day, 'unit': 'x'}}\n")
    for kind in ("weather", "humidity", "wind", "pressure", "visibility")
}


def reference_in_process(codes: Mapping[str, str], call: Mapping) -> str:
    """The reference's per-call work in this process (exec of the source string each call)."""
    name = call["function"]["name"]
    try:
        arguments = json.loads(call["function"]["arguments"])
        namespace: dict[str, Any] = {}
        exec(codes[name], namespace)  # noqa: S102
        result = namespace[name](**arguments)
        return json.dumps(result, ensure_ascii=False) if type(result) in (dict, list) else str(result)
    except Exception as error:  # noqa: BLE001
        return format_tool_error(name, str(error))


def bench_turns(total_calls: int, calls_per_turn: int) -> list[list[dict[str, Any]]]:
    """The benchmark's turns: ``total_calls // calls_per_turn`` turns of ``calls_per_turn`` calls each."""
    names = sorted(BENCH_TOOLS)
    cities = ("Paris", "Oslo", "Lima")
    turns = []
    for turn in range(total_calls // calls_per_turn):
        turns.append([{"id": f"c{turn}_{k}", "type": "function",
                       "function": {"name": names[(turn + k) % len(names)],
                                    "arguments": json.dumps({"city": cities[(turn + k) % 3], "day": k})}}
                      for k in range(calls_per_turn)])
    return turns


def _in_process_timings(calls: list[dict[str, Any]]) -> tuple[list[str], float, float]:
    """``(expected outputs, reference-style seconds, cached-code seconds)`` for ``calls`` in this process."""
    start = time.perf_counter()
    expected = [reference_in_process(BENCH_TOOLS, call) for call in calls]
    in_process_s = time.perf_counter() - start
    compiled = {name: compile(source, "<string>", "exec") for name, source in BENCH_TOOLS.items()}
    start = time.perf_counter()
    for call in calls:
        namespace: dict[str, Any] = {}
        name = call["function"]["name"]
        exec(compiled[name], namespace)  # noqa: S102
        json.dumps(namespace[name](**json.loads(call["function"]["arguments"])), ensure_ascii=False)
    cached_s = time.perf_counter() - start
    return expected, in_process_s, cached_s


def run_benchmark(total_calls: int = 20000, calls_per_turn: int = 4,
                  worker_counts: Sequence[int] = (1, 2)) -> dict[str, Any]:
    """Measure sandbox throughput and per-call overhead against in-process exec+call; returns the numbers."""
    turns = bench_turns(total_calls, calls_per_turn)
    calls = [call for turn in turns for call in turn]
    codes_json = json.dumps(BENCH_TOOLS)
    expected, in_process_s, cached_s = _in_process_timings(calls)

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


def _print_results(results: dict[str, Any], calls_per_turn: int, worker_counts: Sequence[int]) -> None:
    print(f"benchmark: {results['calls']} calls of 5 tools returning dicts, {calls_per_turn} calls "
          f"per turn, {os.cpu_count()} CPUs")
    reference_rate, cached_rate = results["in_process_calls_per_s"], results["in_process_cached_calls_per_s"]
    print(f"  in-process, reference style (exec source + call)  {reference_rate:9.0f} calls/s"
          f"  {results['in_process_us_per_call']:7.1f} us/call")
    print(f"  in-process, cached code object + call             {cached_rate:9.0f} calls/s"
          f"  {results['in_process_cached_us_per_call']:7.1f} us/call")
    for workers in worker_counts:
        row = results[f"workers={workers}"]
        print(f"  sandbox map_calls, {workers} worker(s)                   {row['calls_per_s']:9.0f} calls/s"
              f"  {row['wall_us_per_call']:7.1f} us/call (overhead {row['overhead_us_per_call']:+.1f} us vs "
              f"cached in-process); one turn via call_tools: {row['single_turn_latency_ms']:.2f} ms")


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m ftrl.envs.sandbox.bench",
         require_bench_flag: bool = False) -> int:
    """The benchmark command; with ``require_bench_flag`` (``python -m ftrl.envs.sandbox``) it runs
    only when ``--bench`` is given and prints the help otherwise."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true",
                        help="measure calls/s and overhead vs in-process (implied with python -m "
                             "ftrl.envs.sandbox.bench)")
    parser.add_argument("--calls", type=int, default=20000, help="tool calls in the benchmark")
    parser.add_argument("--calls-per-turn", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 400 calls, 1 worker")
    args = parser.parse_args(argv)
    if require_bench_flag and not args.bench:
        parser.print_help()
        return 0
    if args.quick:
        args.calls, args.workers = 400, [1]
    results = run_benchmark(args.calls, args.calls_per_turn, args.workers)
    _print_results(results, args.calls_per_turn, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
