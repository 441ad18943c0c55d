"""`ruff check` is part of the test suite, so CI's one test command also keeps the code lint-clean.

    python -m pytest tests/test_lint.py -q        # or: ruff check ftrl tests launchers scripts
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -e '.[test]' brings the pinned version"
    result = subprocess.run([ruff, "check", "--output-format", "concise", "ftrl", "tests", "launchers", "scripts"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
