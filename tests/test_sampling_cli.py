"""The sampling options of scripts/generate.py (schedulers, samplers, ...) end to end on the embedded model set:
recorded in the PNG, restored by --reproduce, bad values refused with one clear line."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sampling.io import read_png_params
from tests.test_generate_cli import generate


def test_scheduler_and_sampler_recorded_and_reproduced(tmp_path):
    out = generate(tmp_path, "--prompt", "a red cube", "--steps", "3", "--width", "64", "--height", "64",
                   "--sampler", "dpmpp_2m_sde", "--scheduler", "beta", "--seed", "5", "--t5-tokens", "120",
                   "--hires-scale", "1.5", "--hires-steps", "2", "--hires-upscale", "lanczos", "--out", str(tmp_path / "o"))
    assert "beta schedule" in out.stderr
    first = Path(out.stdout.split()[-1])
    params = read_png_params(first)
    assert params["scheduler"] == "beta" and params["sampler"] == "dpmpp_2m_sde" and params["t5_tokens"] == 120
    assert (params["hires_scale"], params["hires_steps"], params["hires_upscale"]) == (1.5, 2, "lanczos")
    assert params["hires_denoise"] == 0.45 and Image.open(first).size == (96, 96)
    again = generate(tmp_path, "--reproduce", str(first), "--out", str(tmp_path / "o"))
    second = Path(again.stdout.split()[-1])
    assert second != first and read_png_params(second) == params
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    other = generate(tmp_path, "--reproduce", str(first), "--scheduler", "karras", "--out", str(tmp_path / "k"))
    third = Path(other.stdout.split()[-1])
    assert read_png_params(third)["scheduler"] == "karras"
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(third)))


@pytest.mark.parametrize("args,message", [
    (["--scheduler", "cosine"], "invalid choice: 'cosine'"),
    (["--t5-tokens", "600"], "t5_tokens is 600; it must be >= 77 and <= 512"),
    (["--hires-scale", "1"], "hires_scale is 1.0; it must be > 1.0"),
    (["--hires-scale", "1.5", "--hires-denoise", "0"], "hires_denoise is 0.0; it must be > 0.0 and <= 1.0"),
])
def test_clear_errors(tmp_path, args, message):
    out = generate(tmp_path, "--prompt", "x", "--steps", "1", *args, check=False)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
