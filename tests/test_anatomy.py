"""scripts/inspect_model.py and instruments.anatomy: parameter totals, the FLOPs formula, the script end to end."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmditx import MMDiTX, load_config
from instruments.anatomy import (anatomy, flop_rows, forward_flops, meta_model, parameter_rows, slg_steps, step_flops,
                            total_params, weight_bytes)
from tests.official import mmditx_layout, official_layout, write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SD35_MEDIUM_PARAMS = 2_469_663_936


# -- parameters ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd3.5_medium", "sd3.5_large", "sd3_medium", "tiny"])
def test_totals_equal_the_meta_model(name):
    config = load_config(name)
    model = meta_model(config)
    assert total_params(config) == sum(p.numel() for p in model.parameters())
    for row in parameter_rows(model):
        if row.context_params is not None:                       # joint blocks: the two streams are the block
            assert row.context_params + row.x_params == row.params


@pytest.mark.parametrize("name", ["sd3.5_medium", "sd3.5_large", "sd3_medium"])
def test_totals_equal_the_official_listing(name):
    """Independent of our modules: the sum over the official file's transformer tensors."""
    layout = official_layout(name)
    official = sum(math.prod(shape) for key, shape in layout.items() if key.startswith("model.diffusion_model."))
    assert total_params(load_config(name)) == official


def test_sd35_medium_is_about_2_5_billion():
    config = load_config("sd3.5_medium")
    assert total_params(config) == SD35_MEDIUM_PARAMS
    assert weight_bytes(SD35_MEDIUM_PARAMS) == {"fp32": 4 * SD35_MEDIUM_PARAMS, "fp16": 2 * SD35_MEDIUM_PARAMS,
                                                "bf16": 2 * SD35_MEDIUM_PARAMS, "fp8": SD35_MEDIUM_PARAMS}
    rows = {r.name: r for r in anatomy(config)}
    assert [i for i in range(24) if rows[f"joint_blocks.{i}"].note.startswith("dual attention")] == list(range(13))
    assert rows["joint_blocks.0"].attn2_params == 4 * 1536 * 1536 + 3 * 1536 + 1536 + 2 * 64  # qkv, proj, ln_q/k
    assert rows["joint_blocks.23"].note == "context pre-only"
    assert rows["pos_embed"].params == 384 * 384 * 1536


# -- FLOPs -----------------------------------------------------------------------------------------------

def addmm_inplace_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    (m, k), (_, n) = a_shape, b_shape
    return 2 * m * k * n


def measured_flops(model: MMDiTX, latent: tuple[int, int], batch: int, tokens: int, skip_layers=()):
    """FLOPs torch.utils.flop_counter sees in one forward pass, per module.

    Two gaps of FlopCounterMode are closed so the comparison can be exact: the CPU fused attention kernel
    (_scaled_dot_product_flash_attention_for_cpu) has no formula, so attention runs on the math backend,
    whose q k^T and p v are plain bmm; and only out-of-place addmm is registered, while Mlp accumulates its
    hidden-width slices with the in-place addmm_."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, *latent, generator=g)
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    y = torch.randn(batch, cfg.pooled_dim, generator=g)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace_flop})
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x, torch.full((batch,), 500.0), context, y, skip_layers=skip_layers)
    per_module = {name.removeprefix("MMDiTX."): sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MMDiTX(load_config("tiny")).eval()


@pytest.mark.parametrize("latent,batch,tokens,skip", [((16, 24), 2, 10, ()), ((8, 8), 1, 7, (1, 3))])
def test_flops_formula_matches_flop_counter_exactly(tiny_model, latent, batch, tokens, skip):
    cfg = tiny_model.config
    height, width = 8 * latent[0], 8 * latent[1]
    total, per_module = measured_flops(tiny_model, latent, batch, tokens, skip)
    formula = flop_rows(cfg, height, width, batch, tokens, skip_layers=skip)
    for name, (lin, att) in formula.items():
        assert per_module.get(name, 0) == lin + att, name
    assert total == forward_flops(cfg, height, width, batch, tokens, skip_layers=skip)


def test_flops_per_step_cfg_and_slg():
    cfg = load_config("sd3.5_medium")
    one = forward_flops(cfg, 1024, 1024, 2, 154)
    slg = forward_flops(cfg, 1024, 1024, 1, 154, skip_layers=(7, 8, 9))
    steps = dict(step_flops(cfg, 1024, 1024, 2, 154, steps=50))
    labels = list(steps)
    assert steps[labels[1]] == one                                    # CFG: cond + uncond in one batch-2 pass
    assert steps[labels[2]] == one + slg and "SLG" in labels[2]
    assert steps[labels[3]] == 50 * one + 9 * slg
    assert slg_steps(50) == list(range(1, 10))                        # 0.5 < step < 10
    assert 21e12 < one < 22e12


def test_bad_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="multiples of 16"):
        forward_flops(load_config("sd3.5_medium"), 1000, 1024, 2, 154)
    with pytest.raises(ValueError, match="positional table"):
        forward_flops(load_config("sd3_medium"), 4096, 1024, 2, 154)


# -- the script ------------------------------------------------------------------------------------------

def run_script(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_script_by_path_prints_the_table(tmp_path):
    """`python scripts/inspect_model.py` from another folder."""
    out = run_script([str(ROOT / "scripts" / "inspect_model.py"), "sd3.5_medium", "--resolution", "1024",
                      "--batch", "2", "--tokens", "154"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("sd3.5_medium: hidden 1536, 24 joint blocks")
    assert sum(line.endswith("dual attention") for line in lines) == 13
    assert any(line.startswith("total") and f"{SD35_MEDIUM_PARAMS:,}" in line for line in lines)
    assert "fp8 2.30 GiB" in out.stdout and "SLG active" in out.stdout


def test_script_as_module_reads_a_checkpoint_header(tmp_path):
    layout = mmditx_layout(hidden=128, depth=3, dual=(0,), pos_max=16)
    ckpt = write_random_checkpoint(layout, tmp_path / "small.safetensors", dtype=torch.float16)
    out = run_script(["-m", "scripts.inspect_model", str(ckpt), "--resolution", "128x64", "--batch", "1"])
    assert out.returncode == 0, out.stderr
    assert "small.safetensors: hidden 128, 3 joint blocks" in out.stdout
    total = sum(math.prod(s) for s in layout.values())
    assert any(line.startswith("total") and f"{total:,}" in line for line in out.stdout.splitlines())


def test_script_errors_are_one_line():
    out = run_script(["scripts/inspect_model.py", "no_such_config"])
    assert out.returncode == 2
    assert out.stderr.startswith("error: no configuration 'no_such_config'")
