"""Our MMDiT-X against diffusers' SD3Transformer2DModel holding the same random weights, layer by layer (fp32)."""

import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmditx import load_mmditx
from tests.mmditx_oracle import diffusers_transformer, rel_error, run_both
from tests.official import mmditx_layout, write_random_checkpoint

pytest.importorskip("diffusers")

TOL = 1e-5  # max abs error relative to the scale (max |value|) of each compared tensor


def inputs(cfg, batch=2, h=8, w=8, tokens=12, seed=0, t=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    y = torch.randn(batch, cfg.pooled_dim, generator=g)
    t = torch.rand(batch, generator=g) * 1000 if t is None else t
    return x, t, context, y


def build(tmp_path_factory, name, **layout):
    path = tmp_path_factory.mktemp(name) / "model.safetensors"
    write_random_checkpoint(mmditx_layout(**layout), path, seed=zlib.crc32(name.encode()))
    ours = load_mmditx(path)
    return ours, diffusers_transformer(path, ours.config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 blocks, 2 of them with dual attention, small widths, a 16x16 positional table."""
    return build(tmp_path_factory, "tiny", hidden=128, depth=4, dual=(0, 1), pos_max=16,
                 context_dim=96, pooled_dim=64)


def assert_all_stages_close(stages, out, ref_out):
    assert {"x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer"} <= set(stages)
    for name, (a, b) in stages.items():
        assert a.shape == b.shape, name
        assert rel_error(a, b) <= TOL, f"{name}: relative error {rel_error(a, b):.2e}"
    assert out.shape == ref_out.shape
    assert rel_error(out, ref_out) <= TOL


def test_tiny_layer_by_layer(tiny):
    ours, ref = tiny
    stages, out, ref_out = run_both(ours, ref, *inputs(ours.config, h=12, w=8))
    assert sum(k.startswith("block") for k in stages) == 2 * 4 - 1  # the last context stream has no output
    assert_all_stages_close(stages, out, ref_out)


@pytest.mark.parametrize("skip", [(1,), (0, 2), (3,)])
def test_tiny_skip_layers(tiny, skip):
    ours, ref = tiny
    x, t, context, y = inputs(ours.config)
    stages, out, ref_out = run_both(ours, ref, x, t, context, y, skip_layers=skip)
    assert_all_stages_close(stages, out, ref_out)
    # skipping really changes the output (the comparison above is not vacuous)
    with torch.no_grad():
        assert (ours(x, t, context, y) - out).abs().max() > 1e-3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), h=st.integers(1, 16), w=st.integers(1, 16),
       t=st.floats(0.0, 1000.0), tokens=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_tiny_property_sizes_and_times(tiny, batch, h, w, t, tokens, seed):
    """Square and non-square latents up to the table's 32x32, any batch, timesteps across [0, 1000]."""
    ours, ref = tiny
    x, _, context, y = inputs(ours.config, batch, 2 * h, 2 * w, tokens, seed)
    stages, out, ref_out = run_both(ours, ref, x, torch.full((batch,), t), context, y)
    assert out.shape == x.shape
    assert_all_stages_close(stages, out, ref_out)


@pytest.mark.parametrize("kind", ["sd3_medium", "sd3.5_large"])
def test_other_sd3_architectures(tmp_path_factory, kind):
    """SD3 Medium (no QK norm, no dual attention) and SD3.5 Large (QK norm, no dual) layouts, small widths."""
    layout = dict(hidden=128, depth=3, dual=(), pos_max=12, context_dim=64, pooled_dim=32,
                  qk_norm=(kind != "sd3_medium"))
    ours, ref = build(tmp_path_factory, kind.replace(".", "_"), **layout)
    assert ours.config.qk_norm == layout["qk_norm"] and ours.config.dual_attention_blocks == ()
    stages, out, ref_out = run_both(ours, ref, *inputs(ours.config, h=10, w=14))
    assert_all_stages_close(stages, out, ref_out)


def test_real_widths_few_blocks(tmp_path_factory):
    """SD3.5 Medium widths (hidden 1536, 24 heads, context 4096, pooled 2048), 3 blocks (2 dual), CFG batch of 2,
    154 context tokens as the pipeline sends them."""
    ours, ref = build(tmp_path_factory, "real_widths", hidden=1536, depth=3, dual=(0, 1), pos_max=24)
    x, t, context, y = inputs(ours.config, batch=2, h=16, w=12, tokens=154)
    stages, out, ref_out = run_both(ours, ref, x, t, context, y)
    assert_all_stages_close(stages, out, ref_out)
    stages, out, ref_out = run_both(ours, ref, x, t, context, y, skip_layers=(1,))
    assert_all_stages_close(stages, out, ref_out)
