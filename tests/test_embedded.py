"""The embedded random-weight model set is in the official layout (same names, same shape rules)."""

import pytest

from mmditx.checkpoint import open_safetensors
from sampling.embedded import clip_layout, embedded_model_dir, t5_layout
from tests.official import official_layout


def test_layout_generators_reproduce_official_files():
    assert clip_layout(768, 12, 49408) == official_layout("clip_l")
    assert clip_layout(1280, 32, 49408) == official_layout("clip_g")
    assert clip_layout(1280, 32, mlp=5120) == official_layout("clip_g")
    assert t5_layout(4096, 24, 10240, 32128, heads=64) == official_layout("t5xxl")


def test_embedded_set_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDITX_CACHE", str(tmp_path))
    root = embedded_model_dir()
    assert embedded_model_dir() == root  # cached
    official = official_layout("sd3.5_medium")
    keys = set(open_safetensors(root / "sd3.5_medium.safetensors").keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model"}
    # every key of the small set is an official name once block indices are mapped into range
    assert {k for k in keys if "joint_blocks" not in k} <= set(official)
    for name in ("clip_l", "clip_g"):
        small = set(open_safetensors(root / "text_encoders" / f"{name}.safetensors").keys())
        assert {k for k in small if ".layers." not in k} == {k for k in official_layout(name) if ".layers." not in k}
    t5 = open_safetensors(root / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")
    assert str(t5.dtype("encoder.block.0.layer.0.SelfAttention.q.weight")) == "torch.float8_e4m3fn"
    for sub in ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_3/spiece.model"):
        assert (root / sub).is_file()
