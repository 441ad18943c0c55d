"""The device check (scripts/device_check.sh) runs in its --dry CPU mode: every phase passes on CPU.

It has not run on a GPU yet; this keeps the script itself working so device time is not spent on it.

    OMP_NUM_THREADS=1 python -m pytest tests/test_device_check.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_device_check_dry_mode_passes_every_phase(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--dry", "--work", str(tmp_path / "w"),
                          "--json", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         # FTRL_RAY_STAND_IN: run as on the GPU box, where Ray is replaced by scripts/ray_stand_in
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": os.environ.get("PYTHON", "python"),
                              "FTRL_RAY_STAND_IN": "1"},
                         check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    phases = {row["phase"]: row for row in json.loads(results.read_text(encoding="utf-8"))}
    assert set(phases) == {"env", "native", "fsdp", "verl-reward"}
    assert all(row["status"] == "PASS" for row in phases.values()), phases
    assert "fsdp2:" in phases["fsdp"]["detail"] and "frozen bit-identical" in phases["fsdp"]["detail"]
    assert "episodes/s" in phases["native"]["detail"]
    assert "PASS device_check" in out.stdout and "ray: stand-in" in out.stdout
