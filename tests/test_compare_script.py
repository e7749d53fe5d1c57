"""scripts/compare.py end to end: the per-stage error table for ours vs diffusers, fp32 vs bf16, T5 fp16 vs fp8."""

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


def test_t5_fp16_vs_fp8_table(tmp_path):
    rows = run("t5", "--random", "tiny")
    assert {"embed_tokens", "block0", "block3", "final_layer_norm", "output"} <= set(rows)
    # fp8 e4m3 keeps 3 bits of mantissa: the embedding rows alone differ by a few percent, and never by nothing
    assert 1e-3 < rows["embed_tokens"] < 0.1 and rows["output"] > 1e-3


def test_t5_two_files_table(tmp_path):
    import torch

    from sampling.embedded import t5_layout, write_random

    layout = t5_layout(128, 2, ff=256, vocab=300, heads=2)
    write_random(layout, tmp_path / "a.safetensors", dtype=torch.float16, seed=1)
    write_random(layout, tmp_path / "b.safetensors", dtype=torch.float16, seed=1)   # the same weights
    rows = run("t5", "--checkpoint", str(tmp_path / "a.safetensors"), "--b", str(tmp_path / "b.safetensors"))
    assert set(rows) == {"embed_tokens", "block0", "block1", "final_layer_norm", "output"}
    assert max(rows.values()) == 0.0


def test_t5_bad_b_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), "t5", "--random", "tiny",
                          "--b", str(tmp_path / "missing.safetensors")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "another T5 file or 'fp8'" in out.stderr
