"""LoRAs in the pipeline and the CLI (embedded random-weight model set), and text-encoder LoRAs against
transformers + peft."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import encoders
from mmditx import read_config
from mmditx.lora import LoraError, LoraFactor, merge_lora, random_lora_factors, read_lora, save_lora
from sampling.io import read_png_params
from tests.test_generate_cli import random_weights
from tests.test_encoders_common import (CLIP_G_HF, CLIP_L_HF, clip_g_file, clip_ids, clip_l_file, clip_oracle,
                                        t5_oracle, t5_small_file)

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path, script, *args, check=True):
    env = {"MMDITX_CACHE": str(tmp_path.parent / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    if script == "generate.py":
        args = random_weights(args)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, check=check)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_cli")
    run(tmp, "random_lora.py", "--out", str(tmp / "style.safetensors"), "--format", "kohya", "--magnitude", "0.05")
    common = ["--prompt", "a cat", "--steps", "3", "--width", "64", "--height", "64", "--seed", "3", "--quiet"]
    with_lora = run(tmp, "generate.py", *common, "--lora", f"{tmp / 'style.safetensors'}:0.7",
                    "--out", str(tmp / "lora.png"))
    return tmp, with_lora


def generate_error(tmp, *args) -> str:
    """scripts/generate.py's main in this process (no interpreter start): the one-line error it prints."""
    import contextlib
    import io
    import os

    from scripts.generate import main
    os.environ["MMDITX_CACHE"] = str(tmp.parent / "cache")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(random_weights(args))
    lines = err.getvalue().strip().splitlines()
    assert status == 1 and lines[-1].startswith("error:") and "Traceback" not in err.getvalue()
    return lines[-1]


def pixels(path):
    return np.asarray(Image.open(path))


def test_cli_lora_changes_the_image_and_is_recorded(cli):
    tmp, with_lora = cli
    assert "LoRA style.safetensors (kohya format, strength 0.7" in with_lora.stderr
    (rec,) = read_png_params(tmp / "lora.png")["loras"]
    assert rec["file"] == "style.safetensors" and rec["strength"] == 0.7 and len(rec["sha256"]) == 64


def test_cli_reproduce_reapplies_and_refuses_a_changed_file(cli):
    tmp, _ = cli
    again = run(tmp, "generate.py", "--reproduce", str(tmp / "lora.png"), "--quiet", "--out", str(tmp / "again.png"))
    assert np.array_equal(pixels(tmp / "lora.png"), pixels(tmp / "again.png"))
    # the same name, other content: refused
    changed = tmp / "elsewhere"
    changed.mkdir()
    save_lora(changed / "style.safetensors", {"final_layer.linear": LoraFactor(torch.zeros(1, 8), torch.zeros(8, 1))})
    error = generate_error(tmp, "--reproduce", str(tmp / "lora.png"), "--lora", str(changed / "style.safetensors"),
                           "--out", str(tmp / "no.png"))
    assert "changed since the image was made" in error
    assert not (tmp / "no.png").exists()


def test_cli_bad_lora_files_are_one_line_errors(cli):
    tmp, _ = cli
    (tmp / "junk.safetensors").write_bytes(b"junk")
    for arg, msg in ((str(tmp / "missing.safetensors"), "no such LoRA file"),
                     (str(tmp / "junk.safetensors") + ":0.5", "not a readable safetensors")):
        assert msg in generate_error(tmp, "--prompt", "x", "--steps", "1", "--lora", arg)


def test_pipeline_frugal_equals_resident_with_stacked_loras(cli):
    """Pipeline(loras=...): the frugal mode (LoRA added to each streamed block) gives the resident mode's image
    bit for bit; stacked strengths 1.5 and -0.5 change the image."""
    from sampling.embedded import embedded_model_dir
    from sampling.pipeline import GenerationParams, Pipeline

    tmp, _ = cli
    import os
    os.environ["MMDITX_CACHE"] = str(tmp.parent / "cache")
    root = embedded_model_dir()
    params = GenerationParams.from_preset("sd3.5_medium", prompt="a cat", steps=2, width=64, height=64, seed=1)
    lora = tmp / "style.safetensors"
    plain = Pipeline.from_model_dir(root, memory="sequential").generate(params)[0]
    resident = Pipeline.from_model_dir(root, loras=[(lora, 1.5), (lora, -0.5)]).generate(params)[0]
    frugal = Pipeline.from_model_dir(root, memory="frugal", loras=[(lora, 1.5), (lora, -0.5)]).generate(params)[0]
    assert np.array_equal(np.asarray(resident), np.asarray(frugal))
    assert not np.array_equal(np.asarray(resident), np.asarray(plain))


def test_pipeline_refuses_a_lora_for_another_model_before_loading(tmp_path):
    from sampling.embedded import embedded_model_dir
    from sampling.pipeline import Pipeline

    root = embedded_model_dir()
    cfg = read_config(root / "sd3.5_medium.safetensors")
    g = torch.Generator().manual_seed(0)
    wide = {f"joint_blocks.{cfg.depth}.x_block.attn.proj": LoraFactor(torch.randn(2, 2432, generator=g),
                                                                         torch.randn(2432, 2, generator=g))}
    path = save_lora(tmp_path / "large.safetensors", wide, format="official")
    with pytest.raises(LoraError, match="made for an MMDiT with hidden size 2432.*the model is"):
        Pipeline.from_model_dir(root, memory="sequential", loras=[(path, 1.0)])


# -- text encoders: our CLIP-L / CLIP-G / T5 with a merged LoRA against transformers with peft's LoRA layers --

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]     # attention and the gated feed-forward
KOHYA_PREFIX = {"clip_l": "lora_te1", "clip_g": "lora_te2", "t5": "lora_te3"}
DIFFUSERS_PREFIX = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}


def te_lora(tmp_path, ours, te: str, targets: list[str], fmt: str):
    """Random rank-4 factors on `ours`' linears named in `targets` (alpha 2, none (= rank) or 8 in turn), written
    in `fmt` as the `te` text-encoder part of a LoRA file and read back: (our factors, the factors read)."""
    factors = random_lora_factors(ours, rank=4, seed=1, magnitude=0.05,
                                  include=lambda n: n.rsplit(".", 1)[-1] in targets)
    assert len(factors) > len(targets)
    for i, f in enumerate(factors.values()):
        f.alpha = (2.0, None, 8.0)[i % 3]
    path = save_lora(tmp_path / "te.safetensors", {}, format=fmt, text_encoders={te: factors})
    # the names on disk are those of the other tools (kohya sd-scripts' lora_sd3.py, diffusers' SD3 LoRA loader):
    # their prefix, then the transformers module path, '.' -> '_' for kohya
    prefix = {"kohya": KOHYA_PREFIX, "diffusers": DIFFUSERS_PREFIX}[fmt][te]
    sep, down = ("_", "lora_down") if fmt == "kohya" else (".", "lora_A")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert all(k.startswith(prefix + sep) for k in keys)
    assert {f"{prefix}{sep}{n.replace('.', sep)}.{down}.weight" for n in factors} <= keys
    lora = read_lora(path)
    assert lora.format == fmt and set(lora.text_encoders) == {te} and set(lora.text_encoders[te]) == set(factors)
    return factors, lora.text_encoders[te]


def peft_oracle(ref, factors, targets: list[str], strength: float):
    """transformers' `ref` with peft's LoRA layers holding `factors`, each with its own rank and alpha, scaled
    by `strength`."""
    import peft
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                             alpha_pattern={f"^{n}": (f.alpha or f.rank) for n, f in factors.items()})
    ref = peft.inject_adapter_in_model(config, ref)
    state = {}
    for n, f in factors.items():
        state[f"{n}.lora_A.weight"], state[f"{n}.lora_B.weight"] = f.down, f.up
    missing = peft.set_peft_model_state_dict(ref, state)
    assert not missing.unexpected_keys
    layers = [m for m in ref.modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling]
    assert len(layers) == len(factors)                       # peft adapted exactly the layers of the file
    for m in layers:
        m.scaling["default"] *= strength
    return ref


def weights_copy(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_bits(model, saved: dict[str, torch.Tensor]):
    now = dict(model.named_parameters())
    assert set(now) == set(saved)
    for n, p in now.items():
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[p.element_size()]
        assert p.dtype == saved[n].dtype and torch.equal(p.view(bits), saved[n].view(bits)), n


def close(got, want, tol=1e-4):
    return (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("te", ["clip_l", "clip_g"])
def test_clip_lora_against_peft(tmp_path, te, fmt):
    """CLIP-L (kohya lora_te1_, diffusers text_encoder.) and CLIP-G (lora_te2_, text_encoder_2.; its pooled
    output goes through text_projection, which the LoRA adapts too): hidden states and pooled outputs."""
    pytest.importorskip("peft")
    if te == "clip_l":
        path, load, hf, pad, targets = clip_l_file(), encoders.load_clip_l, CLIP_L_HF, 49407, CLIP_TARGETS
    else:
        path, load, hf, pad, targets = clip_g_file(), encoders.load_clip_g, CLIP_G_HF, 0, [*CLIP_TARGETS,
                                                                                           "text_projection"]
    ours = load(path)
    factors, read = te_lora(tmp_path, ours, te, targets, fmt)
    ref = peft_oracle(clip_oracle(path, **hf), factors, targets, 0.6)

    ids = clip_ids(2, seed=0, pad=pad)
    original = weights_copy(ours)
    with torch.no_grad():
        before, pooled_before = ours(ids)
        handle = merge_lora(ours, read, 0.6)
        hidden, pooled = ours(ids)
        out = ref(ids, output_hidden_states=True)
        # SD3's pooled: CLIP-G's projected (text_embeds), CLIP-L's not (the pooler output)
        want_pooled = out.text_embeds if te == "clip_g" else ref.text_model(ids).pooler_output
    want = out.hidden_states[-2]
    assert (hidden - before).abs().max() > 1e-3 and (pooled - pooled_before).abs().max() > 1e-3
    assert close(hidden, want) and close(pooled, want_pooled)
    handle.remove()
    assert_same_bits(ours, original)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_t5_lora_against_peft(tmp_path, fmt):
    """T5 (kohya lora_te3_, diffusers text_encoder_3.): q, k, v, o and the gated feed-forward wi_0, wi_1, wo
    of all 3 blocks of the width-4096 test T5, fp32 weights; the final hidden states against transformers'
    T5EncoderModel with peft's LoRA layers."""
    pytest.importorskip("peft")
    path = t5_small_file()
    ours = encoders.load_t5(path, weight_dtype="fp32")
    factors, read = te_lora(tmp_path, ours, "t5", T5_TARGETS, fmt)
    assert len(factors) == 7 * ours.config.blocks
    ref = peft_oracle(t5_oracle(path), factors, T5_TARGETS, 0.6)

    ids = torch.randint(0, ours.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    original = weights_copy(ours)
    with torch.no_grad():
        before = ours(ids)
        handle = merge_lora(ours, read, 0.6)
        hidden = ours(ids)
        want = ref(ids).last_hidden_state
    assert (hidden - before).abs().max() > 1e-3 * before.abs().max()
    assert close(hidden, want)
    handle.remove()
    assert_same_bits(ours, original)


def test_t5_lora_on_scaled_fp8_weights(tmp_path):
    """ComfyUI's scaled fp8 T5 (sd3.5_*_incl_clips_t5xxlfp8scaled): each linear layer's true weight is its fp8
    value times `weight_scale`. A merged LoRA must change the true weight by the delta (in stored units: delta /
    weight_scale), within one fp8 rounding of the sum (e4m3: 2^-4 relative, 2^-10 * weight_scale in the
    subnormal range; the conversion saturates at +-448); remove() gives back the fp8 bits."""
    from safetensors.torch import load_file

    from mmditx.checkpoint import save_safetensors
    from tests.test_model_formats import scaled_fp8

    path = tmp_path / "t5xxl_fp8_scaled.safetensors"
    save_safetensors(scaled_fp8(load_file(str(t5_small_file()))), path)
    ours = encoders.load_t5(path)
    factors, read = te_lora(tmp_path, ours, "t5", T5_TARGETS, "kohya")
    original = weights_copy(ours)
    handle = merge_lora(ours, read, 0.6)
    for n, f in read.items():
        layer = ours.get_submodule(n)
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale is not None
        scale = layer.weight_scale.float()
        want = original[n + ".weight"].float() * scale + f.delta(0.6)
        want = want.clamp(-448 * scale, 448 * scale)
        got = layer.weight.float() * scale
        assert ((got - want).abs() <= 2**-4 * want.abs() + 2**-10 * scale).all(), n
        assert (got - original[n + ".weight"].float() * scale).abs().max() > 0.5 * f.delta(0.6).abs().max(), n
    handle.remove()
    assert_same_bits(ours, original)
