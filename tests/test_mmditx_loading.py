"""Loading the transformer: layouts of the real models, dtypes, and a clear error for every bad input."""

import math
import struct

import pytest
import torch

from mmditx import CheckpointError, MMDiTX, MMDiTXConfig, load_config, load_mmditx, read_config
from mmditx.checkpoint import build_on_meta, convert, expected_shapes, save_safetensors
from tests.official import mmditx_layout, official_layout, random_tensor, write_random_checkpoint

PREFIX = "model.diffusion_model."
TINY = dict(hidden=128, depth=3, dual=(0,), pos_max=8, context_dim=32, pooled_dim=16)


def transformer_keys(name):
    return {k[len(PREFIX):]: v for k, v in official_layout(name).items() if k.startswith(PREFIX)}


@pytest.mark.parametrize("name,billions", [("sd3.5_medium", 2.5), ("sd3.5_large", 8.1), ("sd3_medium", 2.0)])
def test_full_size_models_match_official_layout(name, billions):
    """Full-size models, built on the meta device from the shipped config, have exactly the official names and
    shapes; and the config inferred from the official listing equals the shipped one."""
    config = load_config(name)
    assert MMDiTXConfig.from_shapes(transformer_keys(name)) == config
    model = build_on_meta(lambda: MMDiTX(config))
    assert expected_shapes(model) == transformer_keys(name)
    official_count = sum(math.prod(s) for s in transformer_keys(name).values())
    assert sum(p.numel() for p in model.parameters()) == official_count
    assert official_count / 1e9 == pytest.approx(billions, rel=0.05)  # the model cards: 2.5B, 8.1B, 2B


def test_sd35_medium_config_facts():
    cfg = load_config("sd3.5_medium")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.pos_embed_max_size) == (24, 1536, 24, 384)
    assert cfg.dual_attention_blocks == tuple(range(13)) and cfg.qk_norm


def test_layout_generator_reproduces_official_listings():
    """The small test checkpoints come from mmditx_layout; with the real sizes it gives the official files."""
    full = {k: v for k, v in official_layout("sd3.5_medium").items() if k.startswith(PREFIX)}
    assert mmditx_layout(hidden=1536, depth=24, dual=tuple(range(13)), pos_max=384) == full


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A single file with the transformer, VAE and text-encoder keys, as the official release ships them."""
    shapes = mmditx_layout(**TINY)
    shapes["first_stage_model.decoder.conv_in.weight"] = (8, 16, 3, 3)
    shapes["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = (8,)
    path = tmp_path_factory.mktemp("ckpt") / "sd3.5_tiny.safetensors"
    return write_random_checkpoint(shapes, path)


def tiny_inputs(cfg, h=8, w=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 16, h, w, generator=g), torch.tensor([500.0]),
            torch.randn(1, 5, cfg.context_dim, generator=g), torch.randn(1, cfg.pooled_dim, generator=g))


def test_single_file_ignores_vae_and_text_encoders(tiny_file):
    model = load_mmditx(tiny_file)
    assert model.config == MMDiTXConfig(hidden_size=128, depth=3, pos_embed_max_size=8, context_dim=32,
                                        pooled_dim=16, dual_attention_blocks=(0,))
    assert read_config(tiny_file) == model.config
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_bare_state_dict_loads_the_same(tiny_file, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(tiny_file))
    bare = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    save_safetensors(bare, tmp_path / "bare.safetensors")
    a, b = load_mmditx(tiny_file), load_mmditx(tmp_path / "bare.safetensors")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # the weights are the file's values, bit for bit
    assert torch.equal(a.state_dict()["joint_blocks.1.x_block.attn.qkv.weight"],
                       sd[PREFIX + "joint_blocks.1.x_block.attn.qkv.weight"])


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wanted", [torch.float32, torch.bfloat16, None])
def test_stored_dtypes_convert(tmp_path, stored, wanted):
    path = write_random_checkpoint(mmditx_layout(**TINY), tmp_path / "m.safetensors", dtype=stored)
    model = load_mmditx(path, dtype=wanted)
    expect = stored if wanted is None else wanted
    assert {p.dtype for p in model.parameters()} == {expect}
    g = torch.Generator().manual_seed(0)  # same draws as write_random_checkpoint
    key = "pos_embed"
    ref = random_tensor(PREFIX + key, (1, 64, 128), g).to(stored).to(expect)
    assert torch.equal(model.pos_embed, ref)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_convert_gives_the_values_of_to_in_its_own_storage(stored):
    g = torch.Generator().manual_seed(1)
    for shape in [(3, 5), (1024, 1024)]:  # 4 MiB in fp32: the second takes empty_cpu's huge-page path
        t = torch.randn(shape, generator=g).to(stored)
        a, b = convert(t, torch.float32), convert(t, torch.float32)
        assert a.shape == t.shape and a.dtype == torch.float32
        assert torch.equal(a, t.to(torch.float32))
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        a.add_(1.0)  # writable, and shares nothing with b or t
        assert torch.equal(b, t.to(torch.float32)) and t.dtype == stored


def test_converted_weights_do_not_share_storage(tmp_path):
    # context_dim 4096 makes context_embedder.weight 2 MiB in fp32: the huge-page path, beside small tensors
    path = write_random_checkpoint(mmditx_layout(**{**TINY, "context_dim": 4096}), tmp_path / "m.safetensors",
                                   dtype=torch.float16)
    model, stored = load_mmditx(path, dtype=torch.float32), load_mmditx(path, dtype=None)
    assert model.context_embedder.weight.nbytes >= 2 << 20
    ptrs = [t.untyped_storage().data_ptr() for t in model.state_dict().values()]
    assert len(set(ptrs)) == len(ptrs)  # each tensor can be saved, freed or moved on its own
    for k, v in stored.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.float32)), k


def test_runs_in_stored_half_precision(tmp_path):
    path = write_random_checkpoint(mmditx_layout(**TINY), tmp_path / "m.safetensors", dtype=torch.float16)
    m32, m16 = load_mmditx(path), load_mmditx(path, dtype="fp16")
    with torch.no_grad():
        a, b = m32(*tiny_inputs(m32.config)), m16(*tiny_inputs(m16.config))
    assert b.dtype == torch.float16
    assert (a - b.float()).abs().max() <= 2e-2 * a.abs().max()


# -- bad input ---------------------------------------------------------------------------------------------

def rewrite(src, dst, edit):
    from safetensors.torch import load_file

    sd = load_file(str(src))
    edit(sd)
    save_safetensors(sd, dst)
    return dst


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_mmditx(tmp_path / "nope.safetensors")


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 200)  # a zip/pickle checkpoint
    with pytest.raises(CheckpointError, match=r"model\.ckpt: not a safetensors file"):
        load_mmditx(p)
    p.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_mmditx(p)


def test_truncated_file(tiny_file, tmp_path):
    p = tmp_path / "cut.safetensors"
    p.write_bytes(tiny_file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated file: tensor '.+'"):
        load_mmditx(p)


def test_missing_keys(tiny_file, tmp_path):
    key = PREFIX + "joint_blocks.1.x_block.mlp.fc2.bias"
    p = rewrite(tiny_file, tmp_path / "m.safetensors", lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*1 missing key\(s\): " + key.replace(".", r"\.")):
        load_mmditx(p)


def test_unexpected_keys(tiny_file, tmp_path):
    key = PREFIX + "joint_blocks.0.x_block.extra.weight"
    p = rewrite(tiny_file, tmp_path / "m.safetensors", lambda sd: sd.__setitem__(key, torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected key.*" + key.replace(".", r"\.")):
        load_mmditx(p)


def test_shape_mismatch(tiny_file, tmp_path):
    key = PREFIX + "joint_blocks.2.x_block.attn.proj.weight"
    p = rewrite(tiny_file, tmp_path / "m.safetensors", lambda sd: sd.__setitem__(key, torch.zeros(128, 64)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r" is \[128, 64\] but .* expects \[128, 128\]"):
        load_mmditx(p)


def test_missing_block_reported(tiny_file, tmp_path):
    def drop(sd):
        for k in [k for k in sd if ".joint_blocks.1." in k]:
            sd.pop(k)
    with pytest.raises(CheckpointError, match=r"joint blocks \[1\] are missing"):
        load_mmditx(rewrite(tiny_file, tmp_path / "m.safetensors", drop))


def test_sdxl_checkpoint_is_named(tmp_path):
    p = tmp_path / "sd_xl_base_1.0.safetensors"
    save_safetensors({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                      "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, p)
    with pytest.raises(CheckpointError, match=r"sd_xl_base_1\.0\.safetensors: this looks like a UNet"):
        load_mmditx(p)


def test_vae_only_file_is_rejected(tmp_path):
    p = tmp_path / "vae.safetensors"
    save_safetensors({"first_stage_model.decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}, p)
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: no MMDiT transformer found.*first_stage_model"):
        load_mmditx(p)


def test_latent_not_divisible_by_patch(tiny_file):
    model = load_mmditx(tiny_file)
    with pytest.raises(ValueError, match="multiples of the patch size 2.*latent 9x8"):
        model(*tiny_inputs(model.config, h=9, w=8))


def test_latent_larger_than_table(tiny_file):
    model = load_mmditx(tiny_file)  # table 8x8 patches -> latent up to 16x16 -> 128x128 pixels
    model(*tiny_inputs(model.config, h=16, w=2))
    with pytest.raises(ValueError, match=r"larger than the positional table allows.*images up to 128x128 pixels"):
        model(*tiny_inputs(model.config, h=18, w=8))


def test_wrong_conditioning_shapes(tiny_file):
    model = load_mmditx(tiny_file)
    x, t, context, y = tiny_inputs(model.config)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, context[..., :8], y)
    with pytest.raises(ValueError, match="y must be the pooled vector"):
        model(x, t, context, y[:, :4])
    with pytest.raises(ValueError, match="latent"):
        model(x[:, :4], t, context, y)
    with pytest.raises(ValueError, match="skip_layers"):
        model(x, t, context, y, skip_layers=(7,))
