"""Weight streaming (mmditx.streaming): weights stay stored (fp16/bf16/fp8, memory-mapped), each unit is converted
just before it runs. The converted values are exactly what loading in the compute dtype gives, so outputs must
be bit-identical to the model loaded in that dtype, with skip_layers and under tracing too."""

import pytest
import torch

from mmditx import load_mmditx, stop_streaming, stream_weights
from instruments.tracing import Trace
from tests.official import mmditx_layout, write_random_checkpoint

TINY = dict(hidden=128, depth=4, dual=(0, 1), pos_max=16)


def inputs(cfg, b=2, h=8, w=12):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(b, 16, h, w, generator=g), torch.tensor([900.0, 40.0][:b]),
            torch.randn(b, 7, cfg.context_dim, generator=g), torch.randn(b, cfg.pooled_dim, generator=g))


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_streamed_model_is_bit_identical_to_one_loaded_in_fp32(tmp_path, stored):
    path = write_random_checkpoint(mmditx_layout(**TINY), tmp_path / "m.safetensors", dtype=stored)
    full = load_mmditx(path, dtype=torch.float32)
    small = stream_weights(load_mmditx(path, dtype=None), dtype=torch.float32)
    x = inputs(full.config)
    with torch.inference_mode():
        for skip in ((), (1, 2)):
            want = full(*x, skip_layers=skip)
            got = small(*x, skip_layers=skip)
            assert got.dtype == torch.float32
            assert torch.equal(got, want)
    # no fp32 copy is kept after the forward pass: every weight is back in its stored dtype
    assert {p.dtype for p in small.parameters()} == {stored}


def test_streaming_composes_with_tracing_and_can_be_undone(tmp_path):
    path = write_random_checkpoint(mmditx_layout(**TINY), tmp_path / "m.safetensors", dtype=torch.float16)
    full = load_mmditx(path, dtype=torch.float32)
    small = stream_weights(load_mmditx(path, dtype=None), dtype="fp32")
    x = inputs(full.config, b=1, h=8, w=8)
    with torch.inference_mode():
        with Trace(full, blocks=[1], attention=True) as t_full:
            want = full(*x)
        with Trace(small, blocks=[1], attention=True) as t_small:
            got = small(*x)
        assert torch.equal(got, want)
        a, b = t_full.records[(0, 1)], t_small.records[(0, 1)]
        assert torch.equal(a["attention"]["image_to_text"], b["attention"]["image_to_text"])
        assert a["stats"]["x_out"] == b["stats"]["x_out"]
        with pytest.raises(ValueError, match="already"):
            stream_weights(small)
        stop_streaming(small)
        half = small(*x)
    assert half.dtype == torch.float16  # computing in the stored dtype again
    # streaming lives in the hooks it installed and removed: nothing of it is left on the model
    assert not small._forward_pre_hooks and not small._forward_hooks
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in small.modules())
    assert getattr(small, "_weight_swap", None) is None


def test_stream_weights_needs_a_compute_dtype(tmp_path):
    path = write_random_checkpoint(mmditx_layout(**TINY), tmp_path / "m.safetensors", dtype=torch.float16)
    with pytest.raises(ValueError, match="compute dtype"):
        stream_weights(load_mmditx(path, dtype=None), dtype=None)


def test_frugal_pipeline_makes_the_same_image(tmp_path):
    """memory='frugal' (sequential + streamed CLIP and transformer weights) changes memory, not pixels."""
    from sampling.embedded import build
    from sampling.pipeline import GenerationParams, ModelFiles, Pipeline

    build(tmp_path)
    files = ModelFiles.from_dir(tmp_path, t5="fp16")
    params = GenerationParams(prompt="a red cube", negative_prompt="blur", width=64, height=64, steps=3, seed=5,
                              cfg=4.5, sampler="euler", slg=True, slg_start=0.0, slg_end=1.0, slg_layers=(2,))
    runs = {}
    for memory in ("resident", "frugal"):
        pipe = Pipeline(files, memory=memory)
        images, latents = pipe.generate(params, return_latents=True)
        runs[memory] = (images[0].tobytes(), latents)
    assert torch.equal(runs["resident"][1], runs["frugal"][1])
    assert runs["resident"][0] == runs["frugal"][0]
    with pytest.raises(ValueError, match="memory must be one of"):
        Pipeline(files, memory="tiny")
