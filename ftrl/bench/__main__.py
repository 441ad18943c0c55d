"""``python -m ftrl.bench``: run the benchmark stages, print their tables, write bench.json.

    python -m ftrl.bench                          # every stage, full size (minutes)
    python -m ftrl.bench episodes train --quick   # two stages, smoke size
    python -m ftrl.bench --run outputs/default/base episodes   # a finished run's test set and checkpoint
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

STAGES: tuple[str, ...] = ("sandbox", "episodes", "train", "analysis")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftrl.bench", description=__doc__.split("\n")[0])
    parser.add_argument("stages", nargs="*", metavar="stage", help=f"stages to run, of {list(STAGES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke sizes: about a minute in all")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="where bench.json goes")
    parser.add_argument("--run", type=Path, default=None,
                        help="benchmark on a finished run's environments and last checkpoint")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: resources.num_threads of the run config, else torch's)")
    args = parser.parse_args(argv)
    unknown = [stage for stage in args.stages if stage not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; valid: {list(STAGES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from ftrl.bench.report import check_schema, format_table, machine_info, write_results
    from ftrl.bench.world import BenchContext

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    stages = [stage for stage in STAGES if stage in (args.stages or STAGES)]
    ctx = BenchContext(args.out, args.quick, args.run)
    threads = args.threads or ctx.cfg.resources.num_threads
    if threads:
        torch.set_num_threads(threads)
    machine = machine_info()
    print(f"ftrl.bench: {', '.join(stages)}{' (quick)' if args.quick else ''}; {machine.get('cpu_model')}, "
          f"{machine['cpus']} CPUs, {machine['torch_threads']} torch threads, load {machine.get('load_average')}")
    measures = []
    for stage in stages:
        started = time.perf_counter()
        results = importlib.import_module(f"ftrl.bench.{stage}").run(ctx)
        print(f"\n== {stage} ({time.perf_counter() - started:.0f} s)\n{format_table(results)}", flush=True)
        measures += results
    machine["load_average_end"] = machine_info().get("load_average")
    path = write_results(args.out, measures, machine)
    import json

    problems = check_schema(json.loads(path.read_text(encoding="utf-8")))
    print(f"\nwrote {path}" + ("" if not problems else "\nproblems: " + "; ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
