"""scripts/generate.py end to end on the embedded random-weight model set."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sampling.io import read_png_params

ROOT = Path(__file__).resolve().parent.parent


MODEL_FLAGS = ("--model-dir", "--model", "--reproduce", "--random-weights")


def random_weights(args) -> list:
    """args with --random-weights unless they name a model (or a PNG to reproduce): these tests exercise the
    pipeline's mechanics on the random-weight set in the full official layout (T5 included); the demo model,
    the default, has its own tests (tests/test_demo_model.py)."""
    args = [a if isinstance(a, bytes) else str(a) for a in args]
    return args if any(a in MODEL_FLAGS for a in args) else ["--random-weights", *args]


def generate(tmp_path, *args, check=True):
    env = {"MMDITX_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    args = random_weights(args)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, check=check)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    out = generate(tmp, "--prompt", "a photo of a cat 🐱", "--steps", "4", "--width", "128", "--height", "96",
                   "--seed", "7", "--out", str(tmp / "out"))
    return tmp, out


def test_png_with_metadata_and_loud_warning(first_run):
    tmp, out = first_run
    assert "EMBEDDED RANDOM-WEIGHT" in out.stderr
    assert "sampler dpmpp_2m, 4 steps, cfg 5.0, shift 3.0, SLG on" in out.stderr  # the official defaults
    assert "4/4 steps" in out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path == tmp / "out" / "000007.png"
    assert Image.open(path).size == (128, 96)
    params = read_png_params(path)
    assert params["prompt"] == "a photo of a cat 🐱" and params["seed"] == 7 and params["steps"] == 4
    assert params["sampler"] == "dpmpp_2m" and params["slg"] and params["model"] == "sd3.5_medium.safetensors"


def test_reproduce_bit_for_bit_and_never_overwrite(first_run):
    tmp, out = first_run
    first = Path(out.stdout.strip().splitlines()[-1])
    before = first.read_bytes()
    again = generate(tmp, "--reproduce", str(first), "--out", str(tmp / "out"))
    second = Path(again.stdout.strip().splitlines()[-1])
    assert second != first and second.name == "000007_1.png"  # the existing file is kept
    assert first.read_bytes() == before
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    assert read_png_params(second) == read_png_params(first)


def test_batch_and_prompt_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue sphere\n")
    out = generate(tmp_path, "--prompt-file", str(prompts), "--num-images", "2", "--steps", "2", "--width", "64",
                   "--height", "64", "--sampler", "euler_ancestral", "--no-slg", "--out", str(tmp_path / "o"))
    files = out.stdout.split()
    assert len(files) == 4  # 2 prompts x 2 images; the second prompt's seeds collide and get new names
    assert [read_png_params(f)["seed"] for f in files] == [0, 1, 0, 1]
    assert [read_png_params(f)["prompt"] for f in files] == ["a red cube"] * 2 + ["a blue sphere"] * 2
    assert len(set(files)) == 4


@pytest.mark.parametrize("args,message", [
    (["--width", "100"], "width 100 is not a positive multiple of 16"),
    (["--height", "1040"], "larger than the positional table allows: at most 1024 pixels"),
    (["--sampler", "ddim"], "invalid choice: 'ddim'"),
])
def test_clear_errors(tmp_path, args, message):
    out = generate(tmp_path, "--prompt", "x", "--steps", "1", *args, check=False)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
