"""The demo model: the shipped weights draw what their prompts ask (judged by the demo's reader, which stays at
chance on noise: tests/test_demo_shapes.py), generate.py uses them by default, and the trainer that made them
runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sampling.embedded import DEMO_DIR, demo_info
from training.demo.evaluate import accuracies, format_table, read_image, score
from training.demo.shapes import evaluation_prompts, held_out_reasons

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6


def test_shipped_model_set_is_the_official_layout_in_fp16_within_40_mb():
    from mmditx import read_config
    from mmditx.checkpoint import open_safetensors
    from sampling.pipeline import ModelFiles

    files = ModelFiles.from_dir(DEMO_DIR, t5="off")
    weights = [files.model, files.clip_l, files.clip_g]
    assert sum(p.stat().st_size for p in weights) < 40 * MB
    for path in weights:
        f = open_safetensors(path)
        assert {f.dtype(k) for k in f.keys()} == {torch.float16}, path
    config = read_config(files.model)
    assert config.depth >= 10 and config.dual_attention_blocks and config.qk_norm   # SLG layers 7, 8, 9 exist
    info = demo_info()
    assert info["size"] == 128 and "circle" in info["vocabulary"] and info["total_minutes"] <= 90


@pytest.fixture(scope="module")
def judged():
    """The shipped model on 12 seen and 12 held-out evaluation prompts, default sampling, seed 0."""
    from sampling.pipeline import GenerationParams, Pipeline

    pipe = Pipeline.from_model_dir(DEMO_DIR, t5="off")
    prompts = evaluation_prompts("seen")[:12] + evaluation_prompts("held_out")[::2][:12]
    trials = []
    for prompt, truth in prompts:
        params = GenerationParams.from_preset("sd3.5_medium", prompt=prompt, width=128, height=128, seed=0)
        image = pipe.generate(params)[0]
        reading = read_image(image)
        trials.append(_trial(truth, reading))
    return accuracies(trials)


def _trial(truth, reading):
    from training.demo.evaluate import Trial
    return Trial(truth, "held_out" if held_out_reasons(truth) else "seen", reading, score(reading, truth))


def test_shipped_model_draws_what_prompts_ask(judged):
    rate = lambda split, attr: judged[split][attr][0] / judged[split][attr][1]  # noqa: E731
    print(format_table(judged))
    for split in ("seen", "held_out"):
        # chance: background 25%, colour 12.5%, shape 16.7%, position 20%
        assert rate(split, "background") >= 0.9, split
        assert rate(split, "colour") >= 0.7, split
        assert rate(split, "position") >= 0.7, split
        assert rate(split, "shape") >= 0.5, split


def test_generate_without_model_dir_uses_the_demo_model(tmp_path):
    env = {"MMDITX_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt",
                          "a large yellow square on a black background", "--steps", "20", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "DEMO MODEL" in out.stderr and "shapes: circle" in out.stderr and "--model-dir" in out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    from sampling.io import read_png_params
    params = read_png_params(path)
    assert params["demo_model"] and params["t5"] == "off" and (params["width"], params["height"]) == (128, 128)
    with Image.open(path) as im:
        reading = read_image(im)
    assert reading.background == "black" and reading.objects and reading.objects[0].colour == "yellow"
    assert not (tmp_path / "cache").exists()   # no random-weight set built, nothing trained on first run


def test_train_demo_runs_every_stage_and_writes_a_loadable_model_set(tmp_path):
    """The rebuild script at toy size: scenes, VAE (with its gate), latents, text encoders, transformer."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--work", str(tmp_path / "w"),
                          "--images", "32", "--vae-steps", "2", "--steps", "2", "--batch-size", "4", "--checks", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    model = Path(out.stdout.strip())
    info = json.loads((model / "demo.json").read_text())
    assert set(info["minutes"]) == {"scenes", "vae", "vae_gate", "latents", "text_encoders", "transformer"}
    from sampling.pipeline import GenerationParams, Pipeline
    image = Pipeline.from_model_dir(model, t5="off").generate(
        GenerationParams(prompt="a red circle", width=64, height=64, steps=2))[0]
    assert image.size == (64, 64)


def test_latent_scale_matching_keeps_reconstructions_and_gives_unit_variance():
    from training.vae import match_latent_scale
    from vae import VAE, VAEConfig

    torch.manual_seed(0)
    ae = VAE(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1)).eval()
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    x = images.float() / 127.5 - 1
    before = ae.decode(ae.encode(x, sample=False))
    a = match_latent_scale(ae, images)
    z = ae.encode(x, sample=False)
    assert a != pytest.approx(1.0, abs=0.05)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(ae.decode(z), before, atol=1e-5, rtol=0)
