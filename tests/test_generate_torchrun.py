"""torchrun scripts/generate.py: a job spread over 2 CPU processes gives the same files (names, pixels,
metadata) as one process."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sampling.io import read_png_params
from sampling.jobs import plan_names, share
from tests.test_generate_cli import ROOT

ARGS = ["--random-weights", "--steps", "2", "--width", "64", "--height", "64", "--sampler", "euler_ancestral", "--num-images", "2",
        "--seed", "3", "--quiet"]


def run(tmp_path, launcher, out):
    env = {"MMDITX_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, str(ROOT / "scripts" / "generate.py"), "--prompt-file", str(tmp_path / "prompts.txt"), *ARGS,
           "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, check=True)


def test_two_processes_write_the_files_of_one(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red cube\na blue sphere\n")
    one = run(tmp_path, [sys.executable], tmp_path / "one")
    two = run(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
              tmp_path / "two")
    files_one, files_two = one.stdout.split(), two.stdout.split()
    names = ["000003.png", "000004.png", "000003_1.png", "000004_1.png"]   # decided before sampling
    assert [Path(f).name for f in files_one] == [Path(f).name for f in files_two] == names
    for a, b in zip(files_one, files_two):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert read_png_params(a) == read_png_params(b)
    assert [read_png_params(f)["prompt"] for f in files_two] == ["a red cube"] * 2 + ["a blue sphere"] * 2
    assert "process 2/2: wrote" in two.stderr and "4 image(s) from 2 processes" in two.stderr


def test_share_and_names():
    assert [list(share(5, r, 2)) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert [list(share(2, r, 3)) for r in range(3)] == [[], [0], [1]]
    assert sorted(j for r in range(4) for j in share(10, r, 4)) == list(range(10))


def test_plan_names_skips_existing_and_repeated(tmp_path):
    (tmp_path / "000001.png").write_bytes(b"")
    got = plan_names([tmp_path / "000001.png", tmp_path / "000002.png", tmp_path / "000002.png"])
    assert [p.name for p in got] == ["000001_1.png", "000002.png", "000002_1.png"]
