"""scripts/compare.py end to end: the per-stage error table for ours vs diffusers and for fp32 vs bf16."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), *args, "--size", "64"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    rows = {}
    for line in out.stdout.splitlines():
        m = re.match(r"(\S+)\s+\(.*?\)\s+([0-9.e+-]+)\s+([0-9.e+-]+)\s+([0-9.e+-]+)", line)
        if m:
            rows[m.group(1)] = float(m.group(4))
    return rows


def test_ours_vs_diffusers_table():
    rows = run("diffusers", "--random", "tiny")
    assert {"x_embedder", "block0.x", "block3.x", "final_layer", "output"} <= set(rows)
    assert "block3.context" not in rows  # the last context stream is pre-only
    assert max(rows.values()) < 1e-5


def test_fp32_vs_bf16_table():
    rows = run("dtype", "--random", "tiny", "--b", "bf16")
    # bf16 keeps 8 bits of mantissa: errors of order 1e-3..1e-1 relative, and certainly not zero
    assert 1e-4 < rows["output"] < 0.2
