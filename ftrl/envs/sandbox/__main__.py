"""``python -m ftrl.envs.sandbox --bench``: the sandbox benchmark (``ftrl.envs.sandbox.bench``).

Without ``--bench`` it prints the help, as the single-file module did.

    python -m ftrl.envs.sandbox --bench --quick
"""

from __future__ import annotations

import sys

from ftrl.envs.sandbox.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m ftrl.envs.sandbox", require_bench_flag=True))
