"""torchrun with 2 CPU processes (gloo DDP, each a shard of every global batch) ends with the same weights as
one process on the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mmditx import load_mmditx
from sampling.embedded import embedded_model_dir

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--resolution", "64", "--full", "--steps", "1", "--batch-size", "2", "--lr", "1e-3", "--flip",
        "--caption-dropout", "0.3", "--no-full-checkpoints", "--seed", "3"]


def train(cmd, tmp_path, out):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd + ["--data", str(tmp_path / "data"), "--out", str(out)] + ARGS, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_two_processes_equal_one(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "train.py")]
    subprocess.run(script + ["--make-example-data", str(tmp_path / "data")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    train(script, tmp_path, tmp_path / "one")
    shutil.copytree(tmp_path / "one" / "cache", tmp_path / "two" / "cache")     # same key: reused, not rebuilt
    ddp = train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 str(ROOT / "scripts" / "train.py")], tmp_path, tmp_path / "two")
    assert "reusing" in ddp.stderr
    one = torch.load(tmp_path / "one" / "state.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "state.pt", weights_only=False)
    assert one["step"] == two["step"] == 1
    start = load_mmditx(embedded_model_dir() / "sd3.5_medium.safetensors").state_dict()
    for i, (name, w) in enumerate(one["trainable"].items()):
        # After one AdamW step the first moment is (1 - beta1) * gradient: the all-reduced gradient of the
        # shards equals the one-process gradient of the whole batch (fp32 rounding).
        g1, g2 = (s["optimizer"]["state"][i]["exp_avg"] / 0.1 for s in (one, two))
        assert (g1 - g2).abs().max() <= 2e-5 * g1.abs().max(), name
        # The weights then agree wherever the gradient is not at the level of Adam's eps (1e-8), where
        # g / (|g| + eps) turns rounding noise into steps of up to lr.
        sure = g1.abs() > 1e-5
        assert torch.allclose(two["trainable"][name][sure], w[sure], rtol=0, atol=1e-6), name
        assert not torch.equal(w, start[name]), name                       # every weight moved
    # only process 0 wrote: one log line per step
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == 1
