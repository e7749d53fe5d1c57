"""LoRA key conventions (mmditx.lora): every format round-trips exactly, and diffusers (with peft) reads our
diffusers-format files onto the same weights as our own names.

The oracle for the name mapping: a LoRA saved by us in the diffusers format, loaded by diffusers'
`load_lora_adapter` into its SD3Transformer2DModel and fused, must equal (diffusers' own single-file converter
applied to) the official weights with `W + up @ down * alpha / rank` added by the written-out formula.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmditx.lora import LoraError, LoraFactor, merge_parts, read_lora, save_lora, split_parts, unflatten
from tests.official import mmditx_layout, write_random_checkpoint

PREFIX = "model.diffusion_model."
LAYOUT = dict(hidden=128, depth=3, dual=(0, 1), pos_max=16, context_dim=96, pooled_dim=64)


def linear_targets(layout: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """Every linear weight of the official layout: {module path: (out, in)} (the conv x_embedder excluded)."""
    return {k[len(PREFIX):-len(".weight")]: v for k, v in layout.items()
            if k.endswith(".weight") and len(v) == 2}


def random_factors(targets, rank=4, seed=0, alpha=(None, 2.0, 8.0)) -> dict[str, LoraFactor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (o, n)) in enumerate(sorted(targets.items())):
        r = rank + i % 3                                   # ranks differ per module
        out[name] = LoraFactor(torch.randn(r, n, generator=g) / n ** 0.5, torch.randn(o, r, generator=g) * 0.1,
                               alpha[i % len(alpha)])
    return out


def formula_delta(f: LoraFactor, strength=1.0) -> torch.Tensor:
    """delta W = up @ down * alpha / rank * strength, in float64 (written out here, not taken from mmditx)."""
    alpha = f.rank if f.alpha is None else f.alpha
    return (f.up.double() @ f.down.double()) * (alpha / f.rank) * strength


def assert_same_deltas(a: dict[str, LoraFactor], b: dict[str, LoraFactor], exact=True):
    assert set(a) == set(b)
    for k in a:
        da, db = formula_delta(a[k]), formula_delta(b[k])
        if exact:
            assert a[k].shape == b[k].shape, k
        assert (da - db).abs().max() <= 1e-6 * da.abs().max(), k   # fp32 rounding of a folded alpha at most


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    layout = mmditx_layout(**LAYOUT)
    path = tmp_path_factory.mktemp("lora_formats") / "model.safetensors"
    write_random_checkpoint(layout, path, seed=zlib.crc32(b"lora_formats"))
    return layout, path


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "official"])
def test_round_trip_every_format(tiny, tmp_path, fmt):
    layout, _ = tiny
    factors = random_factors(linear_targets(layout))
    path = save_lora(tmp_path / f"{fmt}.safetensors", factors, format=fmt)
    back = read_lora(path)
    assert back.format == fmt
    # kohya and official names keep the factors as they are; diffusers splits qkv and merges it back
    assert_same_deltas(factors, back.transformer)
    if fmt != "diffusers":
        for k, f in factors.items():
            assert torch.equal(f.down, back.transformer[k].down) and torch.equal(f.up, back.transformer[k].up)
            assert f.alpha == back.transformer[k].alpha


def test_diffusers_qkv_split_and_merge_are_exact():
    g = torch.Generator().manual_seed(1)
    D, n = 8, 6
    parts = {0: LoraFactor(torch.randn(2, n, generator=g), torch.randn(D, 2, generator=g), 4.0),
             2: LoraFactor(torch.randn(3, n, generator=g), torch.randn(D, 3, generator=g), 6.0)}  # no k
    fused = merge_parts(parts)
    assert fused.shape == (3 * D, n) and fused.rank == 5
    expected = torch.zeros(3 * D, n, dtype=torch.float64)
    expected[:D], expected[2 * D:] = formula_delta(parts[0]), formula_delta(parts[2])
    assert torch.allclose(formula_delta(fused), expected, rtol=1e-12, atol=1e-12)
    back = split_parts(fused)
    assert set(back) == {0, 2}
    for j in back:
        assert torch.equal(back[j].down, parts[j].down) and torch.equal(back[j].up, parts[j].up)
        assert back[j].scale == parts[j].scale


def test_kohya_names_unflatten():
    assert unflatten("joint_blocks_3_x_block_attn_qkv") == "joint_blocks.3.x_block.attn.qkv"
    assert unflatten("joint_blocks_0_context_block_adaLN_modulation_1") == "joint_blocks.0.context_block.adaLN_modulation.1"
    assert unflatten("final_layer_linear") == "final_layer.linear"
    assert unflatten("t_embedder_mlp_0") == "t_embedder.mlp.0"
    assert unflatten("text_model_encoder_layers_11_self_attn_q_proj") == "text_model.encoder.layers.11.self_attn.q_proj"
    assert unflatten("encoder_block_2_layer_1_DenseReluDense_wi_0") == "encoder.block.2.layer.1.DenseReluDense.wi_0"


def test_onetrainer_split_qkv_gives_the_fused_factor(tiny, tmp_path):
    """official names with 'attn.qkv.0/1/2' parts (OneTrainer) read as the same fused factor as diffusers' q/k/v."""
    layout, _ = tiny
    factors = {k: v for k, v in random_factors(linear_targets(layout)).items() if k.endswith("attn.qkv")}
    diff = read_lora(save_lora(tmp_path / "d.safetensors", factors, "diffusers"))
    sd = {}
    for name, f in factors.items():
        for j, part in split_parts(f).items():
            sd[f"diffusion_model.{name}.{j}.lora_down.weight"] = part.down.clone()
            sd[f"diffusion_model.{name}.{j}.lora_up.weight"] = part.up.clone()
            if part.alpha is not None:
                sd[f"diffusion_model.{name}.{j}.alpha"] = torch.tensor(part.alpha)
    save_file(sd, tmp_path / "ot.safetensors")
    ot = read_lora(tmp_path / "ot.safetensors")
    assert ot.format == "official"
    assert_same_deltas(diff.transformer, ot.transformer)


def test_text_encoder_parts_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    te = {"clip_l": {"text_model.encoder.layers.0.self_attn.q_proj": LoraFactor(torch.randn(2, 8, generator=g),
                                                                             torch.randn(8, 2, generator=g), 1.0)},
          "t5": {"encoder.block.0.layer.1.DenseReluDense.wi_0": LoraFactor(torch.randn(2, 8, generator=g),
                                                                         torch.randn(16, 2, generator=g))}}
    for fmt in ("diffusers", "kohya"):
        back = read_lora(save_lora(tmp_path / f"{fmt}.safetensors", {}, fmt, text_encoders=te))
        assert set(back.text_encoders) == {"clip_l", "t5"}
        for enc in te:
            assert_same_deltas(te[enc], back.text_encoders[enc])
    keys = load_file(tmp_path / "diffusers.safetensors")
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.lora_down.weight" in load_file(tmp_path / "kohya.safetensors")


# -- bad inputs ------------------------------------------------------------------------------------------

def write(tmp_path, sd, name="bad.safetensors"):
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("key,kind", [
    ("lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_a", "LoHa"),
    ("lora_unet_joint_blocks_0_x_block_attn_qkv.lokr_w1", "LoKr"),
    ("lora_unet_joint_blocks_0_x_block_attn_qkv.dora_scale", "DoRA"),
    ("transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector", "DoRA"),
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "Flux"),
    ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "SDXL"),
    ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "SDXL"),
])
def test_other_adapter_types_and_models_are_refused_by_name(tmp_path, key, kind):
    path = write(tmp_path, {key: torch.zeros(2, 4)})
    with pytest.raises(LoraError, match=kind) as e:
        read_lora(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unmatched_keys_are_listed_or_counted(tmp_path):
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2),
          "transformer.transformer_blocks.0.attn.to_nowhere.lora_A.weight": torch.zeros(2, 8),
          "transformer.transformer_blocks.0.attn.to_nowhere.lora_B.weight": torch.zeros(8, 2)}
    path = write(tmp_path, sd)
    with pytest.raises(LoraError, match="to_nowhere"):
        read_lora(path)
    lora = read_lora(path, strict_keys=False)
    assert json.loads(lora.metadata["unmatched"]) == ["transformer.transformer_blocks.0.attn.to_nowhere"]
    assert list(lora.transformer) == ["joint_blocks.0.x_block.attn.qkv"]


def test_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(LoraError, match="no such LoRA file"):
        read_lora(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="not a readable safetensors"):
        read_lora(tmp_path / "junk.safetensors")
    with pytest.raises(LoraError, match="no SD3 LoRA keys"):
        read_lora(write(tmp_path, {"something.weight": torch.zeros(2)}))
    with pytest.raises(LoraError, match="has no matching"):
        read_lora({"lora_unet_final_layer_linear.lora_down.weight": torch.zeros(2, 4)})


def test_save_is_atomic_and_checks_format(tmp_path):
    f = {"final_layer.linear": LoraFactor(torch.zeros(2, 4), torch.zeros(8, 2))}
    with pytest.raises(LoraError, match="unknown LoRA format"):
        save_lora(tmp_path / "x.safetensors", f, format="comfy")
    save_lora(tmp_path / "x.safetensors", f)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]          # no temp file left behind


# -- the oracle: diffusers reads our diffusers-format file onto the same weights -------------------------

def test_diffusers_reads_our_file_as_the_same_weights(tiny, tmp_path):
    pytest.importorskip("peft")
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from mmditx import read_config
    from tests.mmditx_oracle import diffusers_transformer

    layout, model_path = tiny
    factors = random_factors(linear_targets(layout), seed=3)
    lora_path = save_lora(tmp_path / "lora.safetensors", factors, format="diffusers")
    ref = diffusers_transformer(model_path, read_config(model_path))
    ref.load_lora_adapter(str(lora_path), prefix="transformer", adapter_name="a")
    ref.fuse_lora(lora_scale=0.5)

    # the official weights plus the formula's delta, converted by diffusers' own single-file converter
    official = {k: v.double() for k, v in load_file(model_path).items()}
    for name, f in factors.items():
        official[PREFIX + name + ".weight"] += formula_delta(f, strength=0.5)
    expected = convert_sd3_transformer_checkpoint_to_diffusers(official)
    got = {k.replace(".base_layer", ""): v for k, v in ref.state_dict().items() if "lora_" not in k}
    assert set(expected) <= set(got)
    for k, v in expected.items():
        err = (got[k].double() - v).abs().max() / v.abs().max()
        assert err < 1e-6, f"{k}: {err:.2e}"
