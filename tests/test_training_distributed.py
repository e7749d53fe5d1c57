"""torchrun with 2 CPU processes (gloo; each process a shard of every global batch) ends with the same weights as
one process on the same global batch, under DDP and under FSDP; an FSDP run resumes exactly and writes full
weights that load."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmditx import load_mmditx
from sampling.embedded import embedded_model_dir

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = [sys.executable, str(ROOT / "scripts" / "train.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + SCRIPT[1:]
ARGS = ["--resolution", "64", "--full", "--steps", "1", "--batch-size", "2", "--lr", "1e-3", "--flip",
        "--caption-dropout", "0.3", "--no-full-checkpoints", "--seed", "3"]
# One optimizer step of two accumulated micro-steps (gradient norms 7 and 13 here: clipping to 1 acts), with
# EMA, selective gradient checkpointing and a validation grid (its forwards need every process under FSDP).
FSDP_ARGS = ["--resolution", "64", "--full", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--flip",
             "--caption-dropout", "0.3", "--seed", "3", "--ema", "0.9", "--gradient-checkpointing", "selective",
             "--validation-prompt", "a red circle", "--validate-every", "1", "--validation-steps", "2"]


def train(cmd, data, out, args=ARGS):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd + ["--data", str(data), "--out", str(out)] + args, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def make_data(folder):
    subprocess.run(SCRIPT + ["--make-example-data", str(folder)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return folder


def load(run):
    return torch.load(run / "state.pt", weights_only=False)


def assert_one_step_equal(one, two):
    """After one AdamW step the first moment is (1 - beta1) * gradient: the reduced gradient of the shards equals
    the one-process gradient of the whole batch (fp32 rounding). The weights (and EMA, if kept) then agree
    wherever the gradient is not at the level of Adam's eps (1e-8), where g / (|g| + eps) turns rounding noise
    into steps of up to lr."""
    start = load_mmditx(embedded_model_dir() / "sd3.5_medium.safetensors").state_dict()
    assert one["step"] == two["step"] == 1
    for i, (name, w) in enumerate(one["trainable"].items()):
        g1, g2 = (s["optimizer"]["state"][i]["exp_avg"] / 0.1 for s in (one, two))
        assert (g1 - g2).abs().max() <= 2e-5 * g1.abs().max(), name
        sure = g1.abs() > 1e-5
        for part in ("trainable", "ema") if one["ema"] else ("trainable",):
            assert torch.allclose(two[part][name][sure], one[part][name][sure], rtol=0, atol=1e-6), (part, name)
        assert not torch.equal(w, start[name]), name                       # every weight moved


def test_ddp_two_processes_equal_one(tmp_path):
    data = make_data(tmp_path / "data")
    train(SCRIPT, data, tmp_path / "one")
    shutil.copytree(tmp_path / "one" / "cache", tmp_path / "two" / "cache")     # same key: reused, not rebuilt
    ddp = train(TORCHRUN, data, tmp_path / "two")
    assert "reusing" in ddp.stderr
    assert_one_step_equal(load(tmp_path / "one"), load(tmp_path / "two"))
    # only process 0 wrote: one log line per step
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == 1


@pytest.fixture(scope="module")
def fsdp_step(tmp_path_factory):
    """Data and a one-step FSDP run: (data folder, run folder, its stderr)."""
    root = tmp_path_factory.mktemp("fsdp")
    data = make_data(root / "data")
    result = train(TORCHRUN, data, root / "fsdp", FSDP_ARGS + ["--fsdp", "--steps", "1"])
    return data, root / "fsdp", result.stderr


def test_fsdp_two_processes_equal_one(tmp_path, fsdp_step):
    data, fsdp, stderr = fsdp_step
    held, total = (int(n.replace(",", "")) for n in
                   re.search(r"process 0 holds ([\d,]+) of the ([\d,]+) parameters", stderr).groups())
    assert 2 * held == total                                                # pos_embed split too
    shutil.copytree(fsdp / "cache", tmp_path / "one" / "cache")
    train(SCRIPT, data, tmp_path / "one", FSDP_ARGS + ["--steps", "1"])
    two = load(fsdp)
    assert_one_step_equal(load(tmp_path / "one"), two)
    # the full checkpoint, gathered from the shards: the official single file of the trained weights (fp16)
    loaded = load_mmditx(fsdp / "checkpoints" / "step_000001" / "sd3.5_medium.safetensors").state_dict()
    assert loaded.keys() == two["trainable"].keys()
    assert all(torch.equal(v, two["trainable"][k].half().float()) for k, v in loaded.items())
    assert (fsdp / "validation" / "step_000001.png").is_file()
    assert len((fsdp / "log.jsonl").read_text().splitlines()) == 1


def test_fsdp_resume_equals_one_run(tmp_path, fsdp_step):
    data, fsdp, _ = fsdp_step
    shutil.copytree(fsdp, tmp_path / "resumed", symlinks=True)
    train(TORCHRUN, data, tmp_path / "resumed", FSDP_ARGS + ["--fsdp", "--steps", "2", "--resume"])
    shutil.copytree(fsdp / "cache", tmp_path / "whole" / "cache")
    train(TORCHRUN, data, tmp_path / "whole", FSDP_ARGS + ["--fsdp", "--steps", "2"])
    a, b = load(tmp_path / "whole"), load(tmp_path / "resumed")
    assert a["step"] == b["step"] == 2
    for part in ("trainable", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k])
               for i in a["optimizer"]["state"] for k in a["optimizer"]["state"][i])
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()] for run in
              (tmp_path / "whole", tmp_path / "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_fsdp_refusals(tmp_path, monkeypatch):
    from training.distributed import Distributed
    from training.run import RunOptions, run
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="start the run with torchrun --nproc_per_node=K"):
        Distributed.from_environment(fsdp=True)
    with pytest.raises(ValueError, match="--fsdp is for full fine-tuning: add --full"):
        run(RunOptions(tmp_path, tmp_path, tmp_path, fsdp=True))                # LoRA by default
    frozen = load_mmditx(embedded_model_dir() / "sd3.5_medium.safetensors")    # loaded models are frozen
    with pytest.raises(ValueError, match="frozen parameters"):
        Distributed(world=2, fsdp=True).shard(frozen)
