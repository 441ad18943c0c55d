"""Benchmark stage ``sandbox``: tool calls through the sandbox against the reference's exec-per-call path.

The tools are FTRL-like: each function embeds a data table (``TABLE_ROWS`` rows, as the release's
environments embed theirs) and returns a dict. Three ways to run the same calls, outputs compared:

* ours: ``Sandbox.map_calls`` (warm workers, code compiled once per worker, re-executed per call),
  the way collection, evaluation and the reward run a batch of turns; ``call_tools`` per turn too;
* baseline: the reference's ``get_feedback`` path, in process: ``exec`` of the source for every call,
  run in a thread joined with a timeout;
* limit: a plain in-process call of the already-defined function (no isolation, no re-execution).

    python -m ftrl.bench sandbox --quick
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from ftrl.bench.report import Measure
from ftrl.bench.world import BenchContext

TABLE_ROWS = 200
TOOLS = 6
CALLS = {"quick": 400, "full": 6000}
CALLS_PER_TURN = 4


def tool_source(index: int, rows: int = TABLE_ROWS) -> tuple[str, str]:
    """(name, source) of a tool whose body embeds a ``rows``-entry table."""
    name = f"get_record_{index}"
    table = ", ".join(f"'K{index}{key:04d}': {{'value': {key * 7 % 1000}, 'city': 'C{key % 37}'}}"
                      for key in range(rows))
    source = (f"def {name}(key: str) -> dict:\n"
              f"    table = {{{table}}}\n"
              f"    if key not in table:\n"
              f"        raise ValueError(f'unknown key {{key}}')\n"
              f"    return {{'key': key, **table[key]}}\n")
    return name, source


def bench_calls(total: int) -> tuple[dict[str, str], list[list[dict[str, Any]]]]:
    """The tools and ``total // CALLS_PER_TURN`` turns of calls (one in 25 with an unknown key)."""
    codes = dict(tool_source(index) for index in range(TOOLS))
    names = sorted(codes)
    turns = []
    for turn in range(total // CALLS_PER_TURN):
        calls = []
        for k in range(CALLS_PER_TURN):
            n = turn * CALLS_PER_TURN + k
            tool = names[n % len(names)]
            key = f"K{tool.rsplit('_', 1)[1]}{(n * 13) % (TABLE_ROWS + 8):04d}"
            calls.append({"id": f"c{n}", "type": "function",
                          "function": {"name": tool, "arguments": json.dumps({"key": key})}})
        turns.append(calls)
    return codes, turns


def _output(result: Any) -> str:
    return json.dumps(result, ensure_ascii=False) if type(result) in (dict, list) else str(result)


def reference_call(codes: dict[str, str], call: dict[str, Any], timeout: float) -> str:
    """The reference's per-call work: exec the tool's source, call it, in a thread joined with a timeout."""
    from ftrl.types import format_tool_error

    name = call["function"]["name"]
    box: dict[str, str] = {}

    def target() -> None:
        try:
            arguments = json.loads(call["function"]["arguments"])
            namespace: dict[str, Any] = {}
            exec(codes[name], namespace)  # noqa: S102 - the reference path, measured
            box["out"] = _output(namespace[name](**arguments))
        except Exception as error:  # noqa: BLE001
            box["out"] = format_tool_error(name, str(error))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return box.get("out", format_tool_error(name, f"timed out after {timeout} seconds"))


def plain_calls(codes: dict[str, str], calls: list[dict[str, Any]]) -> tuple[list[str], float]:
    """The limit: each function defined once, then called directly; (outputs, seconds)."""
    from ftrl.types import format_tool_error

    functions: dict[str, Any] = {}
    for name, source in codes.items():
        namespace: dict[str, Any] = {}
        exec(source, namespace)  # noqa: S102
        functions[name] = namespace[name]
    started = time.perf_counter()
    outputs = []
    for call in calls:
        name = call["function"]["name"]
        try:
            outputs.append(_output(functions[name](**json.loads(call["function"]["arguments"]))))
        except Exception as error:  # noqa: BLE001
            outputs.append(format_tool_error(name, str(error)))
    return outputs, time.perf_counter() - started


def run(ctx: BenchContext) -> list[Measure]:
    from ftrl.envs.sandbox import Sandbox

    cfg = ctx.cfg
    codes, turns = bench_calls(CALLS["quick" if ctx.quick else "full"])
    calls = [call for turn in turns for call in turn]
    timeout = cfg.reward.tool_timeout_s
    limit_out, limit_s = plain_calls(codes, calls)
    started = time.perf_counter()
    reference_out = [reference_call(codes, call, timeout) for call in calls]
    reference_s = time.perf_counter() - started
    with Sandbox(workers=cfg.resources.sandbox_workers, timeout=timeout) as sandbox:
        sandbox.map_calls([(codes, turn) for turn in turns[:8]])  # start the workers, compile the tools
        started = time.perf_counter()
        ours_out = [out for turn in sandbox.map_calls([(codes, turn) for turn in turns]) for out in turn]
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        per_turn = [out for turn in turns for out in sandbox.call_tools(codes, turn)]
        call_tools_s = time.perf_counter() - started
    n = len(calls)
    return [Measure(
        "sandbox", "sandbox", f"{n} calls of {TOOLS} tools embedding {TABLE_ROWS}-row tables, "
        f"{CALLS_PER_TURN} per turn, {cfg.resources.sandbox_workers} workers", "calls/s", n / ours_s,
        n / reference_s, "exec of the source per call in a thread with a timeout (reference)", limit=n / limit_s,
        checks={"outputs_equal": ours_out == reference_out == limit_out == per_turn},
        details={"call_tools_per_turn_calls_per_s": n / call_tools_s,
                 "overhead_us_per_call": (ours_s - limit_s) / n * 1e6,
                 "call_tools_overhead_us_per_call": (call_tools_s - limit_s) / n * 1e6,
                 "reference_us_per_call": reference_s / n * 1e6})]
