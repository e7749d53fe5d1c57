"""CLIP-L, CLIP-G and T5 layer by layer against transformers holding the same random weights (fp32).

Real widths with the first 2 layers (CLIP) or 3 blocks (T5: all of width 4096, narrow heads), and tiny
models with more layers. Achieved max abs errors are in the tolerances' comments (torch 2.13 CPU).
"""

from __future__ import annotations

import pytest
import torch

import encoders
from encoders.t5 import relative_position_bucket
from tests.official import write_random_checkpoint
from tests.test_encoders_common import (CLIP_G_HF, CLIP_L_HF, clip_g_file, clip_ids, clip_l_file, clip_layout,
                                        clip_oracle, record, t5_layout, t5_oracle, t5_small_file, write_t5_fp8)

TOL = 1e-4  # absolute, fp32, values up to ~10; achieved: 0 (bit-exact) for CLIP-L and CLIP-G


def clip_names(layers: int) -> list[str]:
    names = ["text_model.embeddings", "text_model.final_layer_norm"]
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        names += [p, p + ".self_attn", p + ".mlp", p + ".layer_norm1", p + ".layer_norm2"]
    return names


def compare_clip(path, load, hf_kwargs, pad, projected: bool):
    ours = load(path)
    ref = clip_oracle(path, **hf_kwargs)
    ids = clip_ids(3, seed=0, pad=pad)
    names = clip_names(ours.config.layers)
    got, want = record(ours, names, ids), record(ref, names, ids)
    errors = {n: (got[n] - want[n]).abs().max().item() for n in names}
    assert max(errors.values()) < TOL, errors

    with torch.no_grad():
        hidden, pooled = ours(ids)
        out = ref(ids, output_hidden_states=True)
        ref_pooled = ref.text_model(ids).pooler_output
    # SD3's hidden: the penultimate layer's output, without the final norm (transformers: hidden_states[-2])
    assert hidden.shape == (3, 77, ours.config.width)
    assert (hidden - out.hidden_states[-2]).abs().max() < TOL
    assert (pooled - (out.text_embeds if projected else ref_pooled)).abs().max() < TOL
    return ours, ref, ids, pooled, out


def test_clip_l_real_width_layer_by_layer():
    compare_clip(clip_l_file(), encoders.load_clip_l, CLIP_L_HF, pad=49407, projected=False)


def test_clip_g_real_width_layer_by_layer_with_projection():
    compare_clip(clip_g_file(), encoders.load_clip_g, CLIP_G_HF, pad=0, projected=True)


def test_clip_l_pooled_is_not_projected_unlike_diffusers():
    """Official SD3 (and ComfyUI) pool CLIP-L without text_projection; diffusers' StableDiffusion3Pipeline
    uses CLIPTextModelWithProjection's text_embeds, i.e. projected. We follow the official code."""
    ours, ref, ids, pooled, out = compare_clip(clip_l_file(), encoders.load_clip_l, CLIP_L_HF, 49407, False)
    projected = out.text_embeds                                  # what diffusers feeds the transformer
    assert (pooled - projected).abs().max() > 0.1                # a real difference, not rounding
    with torch.no_grad():
        assert (ours.text_projection(pooled) - projected).abs().max() < TOL


@pytest.mark.parametrize("act,hf,pad,projected", [("quick_gelu", CLIP_L_HF, 49407, False),
                                                  ("gelu", CLIP_G_HF, 0, True)])
def test_clip_tiny_deep_layer_by_layer(tmp_path, act, hf, pad, projected):
    """6 layers of width 128 (2 heads of 64): every layer and the pooled output."""
    path = write_random_checkpoint(clip_layout(128, 6, mlp=256), tmp_path / "tiny.safetensors", seed=5)
    what = "CLIP-L" if act == "quick_gelu" else "CLIP-G"
    base = encoders.CLIPConfig(width=128, activation=act, project_pooled=projected)
    load = lambda p: encoders.clip.load_clip(p, base, what)  # noqa: E731  (load_clip_l/g insist on 768/1280)
    hf = dict(hf, num_attention_heads=2)
    compare_clip(path, load, hf, pad, projected)


def t5_names(blocks: int) -> list[str]:
    names = ["encoder.embed_tokens", "encoder.final_layer_norm"]
    for i in range(blocks):
        p = f"encoder.block.{i}"
        names += [p, p + ".layer.0", p + ".layer.1", p + ".layer.0.SelfAttention", p + ".layer.1.DenseReluDense"]
    return names


def compare_t5(ours, ref, ids, tol):
    names = t5_names(ours.config.blocks)
    got, want = record(ours, names, ids), record(ref, names, ids)
    errors = {n: ((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in names}
    assert max(errors.values()) < tol, errors
    with torch.no_grad():
        hidden = ours(ids)
        expected = ref(ids).last_hidden_state
    assert hidden.shape == (*ids.shape, ours.config.width)
    assert ((hidden - expected).abs().max() / expected.abs().max()) < tol
    return hidden


def test_t5_real_width_layer_by_layer():
    """Width 4096, 3 blocks (block 0 computes the position bias, 1 and 2 reuse it), 150 tokens so that
    distances beyond max_distance 128 are bucketed too. fp16 weights stay fp16 and are upcast per layer."""
    ours = encoders.load_t5(t5_small_file())
    assert ours.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16  # kept as stored
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(0))
    compare_t5(ours, t5_oracle(t5_small_file()), ids, tol=1e-5)  # achieved 2.7e-6 relative (1.6e-5 abs)


def test_t5_tiny_many_heads(tmp_path):
    """8 heads of 8, width 64, 4 blocks, the bucket table shared from block 0."""
    path = write_random_checkpoint(t5_layout(64, 4, ff=96, vocab=300, heads=8, head_dim=8), tmp_path / "t5.safetensors", seed=7)
    ours = encoders.load_t5(path)
    assert not hasattr(ours.encoder.block[1].layer[0].SelfAttention, "relative_attention_bias")
    ids = torch.randint(0, 300, (3, 77), generator=torch.Generator().manual_seed(1))
    compare_t5(ours, t5_oracle(path), ids, tol=1e-5)


def test_t5_position_bias_matches_transformers():
    ours = encoders.load_t5(t5_small_file())
    ref = t5_oracle(t5_small_file())
    for length in (1, 77, 300):
        bias = ours.encoder.block[0].layer[0].SelfAttention.position_bias(length, torch.float32)
        with torch.no_grad():
            expected = ref.encoder.block[0].layer[0].SelfAttention.compute_bias(length, length)
        assert torch.equal(bias, expected)


def test_relative_position_buckets_by_hand():
    # 16 buckets per direction: distances 0..7 exact, 8..127 logarithmic in 8 buckets, >= 128 the last one.
    rel = torch.tensor([0, -1, -7, -8, -127, -128, -1000, 1, 7, 8, 1000])
    assert relative_position_bucket(rel).tolist() == [0, 1, 7, 8, 15, 15, 15, 17, 23, 24, 31]


def test_fp8_t5_against_fp16(tmp_path):
    """The same weights rounded to fp8 e4m3 (every tensor, as in t5xxl_fp8_e4m3fn): the matrices stay fp8 in
    memory, and the result equals transformers holding the fp8-rounded weights in fp32 (the per-layer upcast
    is exact). Against fp16 the difference is fp8's rounding, and it is large on these random weights: drawn
    with std 1/sqrt(4096) = 2^-6, most lie in e4m3's subnormal range (below 2^-6), where it keeps fewer than
    3 mantissa bits. Measured relative RMS error: 0.11 after block 0, 0.29 after 3 blocks (bounds 0.15, 0.4);
    a broken upcast or a wrong scale would give errors of order 1."""
    fp8_path = write_t5_fp8(t5_small_file(), tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    fp8 = encoders.load_t5(fp8_path)
    layer = fp8.encoder.block[1].layer[1].DenseReluDense
    assert layer.wi_0.weight.dtype == torch.float8_e4m3fn and fp8.encoder.embed_tokens.weight.dtype == torch.float8_e4m3fn
    assert fp8.encoder.final_layer_norm.weight.dtype == torch.float32   # small tensors: compute dtype
    ids = torch.randint(0, 512, (2, 77), generator=torch.Generator().manual_seed(2))
    hidden8 = compare_t5(fp8, t5_oracle(fp8_path), ids, tol=1e-5)

    fp16 = encoders.load_t5(t5_small_file())
    names = ["encoder.block.0", "encoder.final_layer_norm"]
    got8, got16 = record(fp8, names, ids), record(fp16, names, ids)
    rel_rms = {n: ((got8[n] - got16[n]).pow(2).mean().sqrt() / got16[n].pow(2).mean().sqrt()).item() for n in names}
    assert rel_rms["encoder.block.0"] < 0.15 and rel_rms["encoder.final_layer_norm"] < 0.4, rel_rms
    # quantizing the fp16 file on load rounds the matrices as the fp8 file does (its norms stay in fp32)
    quantized = encoders.load_t5(t5_small_file(), weight_dtype="fp8")
    for name, w in quantized.named_parameters():
        expected = dict(fp8.named_parameters())[name]
        assert w.dtype == expected.dtype or "norm" in name or "relative" in name
        if w.dtype == torch.float8_e4m3fn:
            assert torch.equal(w.view(torch.uint8), expected.view(torch.uint8)), name


def test_t5_accepts_shared_weight_name(tmp_path):
    """Some T5 files (transformers' own saves) name the embedding `shared.weight`."""
    layout = t5_layout(64, 2, ff=96, vocab=300, heads=2, head_dim=32)
    layout["shared.weight"] = layout.pop("encoder.embed_tokens.weight")
    path = write_random_checkpoint(layout, tmp_path / "t5_shared.safetensors", seed=8)
    ids = torch.randint(0, 300, (1, 80))
    compare_t5(encoders.load_t5(path), t5_oracle(path), ids, tol=1e-5)


def test_dtypes_and_zero_copy(tmp_path):
    clip = encoders.load_clip_l(clip_l_file(), dtype=None)       # stored fp16, kept (mapped from the file)
    assert clip.text_model.final_layer_norm.weight.dtype == torch.float16
    clip32 = encoders.load_clip_l(clip_l_file(), dtype="fp32")
    assert clip32.text_model.encoder.layers[1].mlp.fc1.weight.dtype == torch.float32
    t5 = encoders.load_t5(t5_small_file(), dtype="fp32", weight_dtype="fp32")
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="compute dtype"):
        encoders.load_t5(t5_small_file(), dtype="fp8")
