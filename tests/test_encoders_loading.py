"""Loading the text encoders: layer counts from the keys, bundled files, and clear errors for bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import encoders
from encoders import CheckpointError
from mmditx.checkpoint import save_safetensors
from tests.official import official_layout, write_random_checkpoint
from tests.test_encoders_common import clip_g_file, clip_l_file, first_layers, t5_layout, t5_small_file


def test_layer_counts_come_from_the_file(tmp_path):
    path = write_random_checkpoint(first_layers(official_layout("clip_l"), 3), tmp_path / "l3.safetensors",
                                   torch.float16)
    model = encoders.load_clip_l(path)
    assert model.config.layers == 3 and len(model.text_model.encoder.layers) == 3
    assert encoders.load_clip_g(clip_g_file()).config.layers == 2
    assert encoders.load_t5(t5_small_file()).config.blocks == 3


def test_bundled_text_encoders_load(tmp_path):
    """sd3_medium_incl_clips*.safetensors carries the encoders under text_encoders.{clip_l,clip_g,t5xxl}.transformer."""
    bundle = {}
    for name, path in (("clip_l", clip_l_file()), ("clip_g", clip_g_file()), ("t5xxl", t5_small_file())):
        bundle.update({f"text_encoders.{name}.transformer.{k}": v for k, v in load_file(str(path)).items()})
    path = tmp_path / "bundle.safetensors"
    save_safetensors(bundle, path)
    ids = torch.randint(0, 49406, (1, 77))
    with torch.no_grad():
        assert torch.equal(encoders.load_clip_l(path)(ids)[1], encoders.load_clip_l(clip_l_file())(ids)[1])
        assert torch.equal(encoders.load_clip_g(path)(ids)[1], encoders.load_clip_g(clip_g_file())(ids)[1])
        t5_ids = torch.randint(0, 512, (1, 77))
        assert torch.equal(encoders.load_t5(path)(t5_ids), encoders.load_t5(t5_small_file())(t5_ids))


def test_clip_l_without_projection_and_with_position_ids(tmp_path):
    """Some CLIP-L files drop text_projection (unused by SD3) or carry transformers' position_ids buffer."""
    sd = load_file(str(clip_l_file()))
    del sd["text_projection.weight"]
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_safetensors(sd, tmp_path / "clip_l.safetensors")
    model = encoders.load_clip_l(tmp_path / "clip_l.safetensors")
    assert model.text_projection is None
    ids = torch.randint(0, 49406, (2, 77))
    with torch.no_grad():
        assert torch.equal(model(ids)[1], encoders.load_clip_l(clip_l_file())(ids)[1])


def test_wrong_file_for_the_encoder():
    with pytest.raises(CheckpointError, match=r"clip_g\.safetensors.*width 1280.*load_clip_g"):
        encoders.load_clip_l(clip_g_file())
    with pytest.raises(CheckpointError, match=r"clip_l\.safetensors.*width 768.*load_clip_l"):
        encoders.load_clip_g(clip_l_file())
    with pytest.raises(CheckpointError, match=r"t5xxl_fp16\.safetensors.*no CLIP-L.*load_t5"):
        encoders.load_clip_l(t5_small_file())
    with pytest.raises(CheckpointError, match=r"clip_l\.safetensors.*no T5 encoder.*load_clip_l"):
        encoders.load_t5(clip_l_file())


def test_diffusion_model_file_is_refused(tmp_path):
    path = write_random_checkpoint({"model.diffusion_model.x_embedder.proj.weight": (8, 16, 2, 2)},
                                   tmp_path / "sd3.5_medium.safetensors")
    for load in (encoders.load_clip_l, encoders.load_clip_g, encoders.load_t5):
        with pytest.raises(CheckpointError, match=r"sd3\.5_medium\.safetensors.*'model'"):
            load(path)


def test_truncated_and_missing_files(tmp_path):
    for name, src, load in (("clip_l", clip_l_file(), encoders.load_clip_l),
                            ("t5", t5_small_file(), encoders.load_t5)):
        data = src.read_bytes()
        cut = tmp_path / f"{name}_cut.safetensors"
        cut.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(CheckpointError, match=rf"{name}_cut\.safetensors: truncated file"):
            load(cut)
        with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
            load(tmp_path / "nope.safetensors")


def test_missing_and_misshapen_keys(tmp_path):
    sd = load_file(str(clip_g_file()))
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    sd["text_model.final_layer_norm.weight"] = torch.ones(1000)
    save_safetensors(sd, tmp_path / "bad_g.safetensors")
    with pytest.raises(CheckpointError, match=r"bad_g\.safetensors.*missing key.*layers\.1\.mlp\.fc2\.bias"
                                              r".*final_layer_norm\.weight is \[1000\]"):
        encoders.load_clip_g(tmp_path / "bad_g.safetensors")
    sd = load_file(str(clip_g_file()))
    del sd["text_projection.weight"]                       # CLIP-G's pooled output needs it
    save_safetensors(sd, tmp_path / "noproj_g.safetensors")
    with pytest.raises(CheckpointError, match=r"noproj_g\.safetensors.*missing key.*text_projection\.weight"):
        encoders.load_clip_g(tmp_path / "noproj_g.safetensors")


def test_t5_v1_0_and_incomplete_t5_are_refused(tmp_path):
    layout = t5_layout(64, 1, ff=96, vocab=300, heads=2, head_dim=32)
    layout["encoder.block.0.layer.1.DenseReluDense.wi.weight"] = layout.pop("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    del layout["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"]
    path = write_random_checkpoint(layout, tmp_path / "t5_v10.safetensors")
    with pytest.raises(CheckpointError, match=r"t5_v10\.safetensors.*T5 v1\.0.*v1\.1"):
        encoders.load_t5(path)
    layout = t5_layout(64, 2, ff=96, vocab=300, heads=2, head_dim=32)
    del layout["encoder.block.1.layer.0.SelfAttention.o.weight"]
    path = write_random_checkpoint(layout, tmp_path / "t5_bad.safetensors")
    with pytest.raises(CheckpointError, match=r"t5_bad\.safetensors.*missing key.*block\.1\.layer\.0\.SelfAttention\.o"):
        encoders.load_t5(path)


def test_clip_with_a_single_layer_is_refused(tmp_path):
    path = write_random_checkpoint(first_layers(official_layout("clip_l"), 1), tmp_path / "l1.safetensors")
    with pytest.raises(CheckpointError, match="penultimate"):
        encoders.load_clip_l(path)


def test_too_many_clip_tokens_is_a_clear_error():
    model = encoders.load_clip_l(clip_l_file())
    with pytest.raises(ValueError, match="at most 77 tokens.*CLIPTokenizer"):
        model(torch.zeros(1, 78, dtype=torch.long))


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "clip_l.bin"
    torch.save({"a": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"clip_l\.bin: not a safetensors file"):
        encoders.load_clip_l(path)
    shutil.rmtree(tmp_path, ignore_errors=True)
