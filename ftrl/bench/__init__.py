"""Benchmarks of each stage against what one would otherwise use, side by side in one process.

``python -m ftrl.bench [sandbox episodes train analysis] [--quick] [--out DIR]`` runs the named stages
(all by default), prints a table per stage (ours, baseline, ratio, the limit where one exists, the
checks) and writes ``DIR/bench.json`` (see :mod:`ftrl.bench.report`). Absolute numbers move with the
machine and its load; the ratios, measured on the same work in the same process, are the result.

* ``sandbox`` (:mod:`ftrl.bench.sandbox`): tool calls/s vs the reference's exec per call;
* ``episodes`` (:mod:`ftrl.bench.episodes`): evaluation/collection episodes/s vs one conversation
  at a time through HF ``generate``, greedy outputs checked equal;
* ``train`` (:mod:`ftrl.bench.train`): one native GRPO step vs TRL's ``GRPOTrainer``; SFT tokens/s;
* ``analysis`` (:mod:`ftrl.bench.analysis`): ``param_delta`` GB/s vs the disk's read speed.

``--quick`` (about a minute) uses the ``+debug=smoke`` config and small counts; CI runs it
(``tests/test_bench.py``).

    python -m ftrl.bench --quick --out /tmp/bench
"""
