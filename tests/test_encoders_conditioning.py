"""SD3 conditioning (context, pooled) against the same assembly done with transformers' models and tokenizers,
from a model directory laid out like the official release."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import encoders
from tests.official import CLIP_TOKENIZER_DIR
from tests.test_encoders_common import (CLIP_G_HF, CLIP_L_HF, clip_g_file, clip_l_file, clip_oracle, spiece_dir,
                                        t5_oracle, t5_small_file, write_t5_fp8)

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, oil painting", ""]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The release layout: text_encoders/, tokenizer/, tokenizer_2/, tokenizer_3/ (files linked, not copied)."""
    root = tmp_path_factory.mktemp("sd3.5_medium")
    te = root / "text_encoders"
    te.mkdir()
    os.symlink(clip_l_file(), te / "clip_l.safetensors")
    os.symlink(clip_g_file(), te / "clip_g.safetensors")
    os.symlink(t5_small_file(), te / "t5xxl_fp16.safetensors")
    write_t5_fp8(t5_small_file(), te / "t5xxl_fp8_e4m3fn.safetensors")
    shutil.copytree(CLIP_TOKENIZER_DIR, root / "tokenizer")
    shutil.copytree(CLIP_TOKENIZER_DIR, root / "tokenizer_2")
    shutil.copytree(spiece_dir(), root / "tokenizer_3")
    return root


def reference(prompts: list[str], t5_path=None, t5_length: int = 77):
    """DESIGN.md's assembly, with transformers doing the tokenizing and encoding."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_tok = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    ids = [clip_tok(p, truncation=True, max_length=77)["input_ids"] for p in prompts]
    ids_l = torch.tensor([r + [49407] * (77 - len(r)) for r in ids])
    ids_g = torch.tensor([r + [0] * (77 - len(r)) for r in ids])
    with torch.no_grad():
        out_l = clip_oracle(clip_l_file(), **CLIP_L_HF)(ids_l, output_hidden_states=True)
        out_g = clip_oracle(clip_g_file(), **CLIP_G_HF)(ids_g, output_hidden_states=True)
        pooled_l = clip_oracle(clip_l_file(), **CLIP_L_HF).text_model(ids_l).pooler_output   # not projected
        clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        clip = F.pad(clip, (0, 4096 - 2048))
        if t5_path is None:
            t5 = torch.zeros(len(prompts), 77, 4096)
        else:
            tok = T5TokenizerFast.from_pretrained(str(spiece_dir()))
            rows = [tok(p)["input_ids"] for p in prompts]
            t5_ids = torch.tensor([r + [0] * (t5_length - len(r)) for r in rows])
            t5 = t5_oracle(t5_path)(t5_ids).last_hidden_state
    return torch.cat([clip, t5], dim=1), torch.cat([pooled_l, out_g.text_embeds], dim=-1)


def test_context_and_pooled_with_t5(model_dir):
    text = encoders.TextConditioner.from_model_dir(model_dir, t5="fp16")
    context, pooled = text.encode(PROMPTS)
    assert context.shape == (3, 154, 4096) and pooled.shape == (3, 2048)
    ref_context, ref_pooled = reference(PROMPTS, t5_small_file())
    assert (context - ref_context).abs().max() < 1e-4      # achieved ~1e-5
    assert (pooled - ref_pooled).abs().max() < 1e-4
    assert (context[:, :77, 2048:] == 0).all()             # CLIP features zero-padded to 4096


def test_without_t5_its_part_is_zeros(model_dir):
    text = encoders.TextConditioner.from_model_dir(model_dir, t5="off")
    assert text.t5 is None
    context, pooled = text.encode(PROMPTS)
    ref_context, ref_pooled = reference(PROMPTS)
    assert context.shape == (3, 154, 4096)
    assert (context[:, 77:] == 0).all()
    assert (context - ref_context).abs().max() < 1e-4 and (pooled - ref_pooled).abs().max() < 1e-4


def test_fp8_t5_from_the_release_directory(model_dir):
    text = encoders.TextConditioner.from_model_dir(model_dir, t5="fp8")
    assert text.t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    context, _ = text.encode(PROMPTS[:1])
    ref_context, _ = reference(PROMPTS[:1], model_dir / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")
    assert (context - ref_context).abs().max() < 1e-4


def test_streamed_clip_weights_give_identical_conditioning(model_dir):
    """stream=True: CLIP weights stay as stored (memory-mapped), converted one layer at a time: same numbers."""
    plain = encoders.TextConditioner.from_model_dir(model_dir, t5="fp8")
    lean = encoders.TextConditioner.from_model_dir(model_dir, t5="fp8", stream=True)
    stored = {p.dtype for p in encoders.load_clip_g(model_dir / "text_encoders" / "clip_g.safetensors",
                                                    dtype=None).parameters()}
    assert {p.dtype for p in lean.clip_g.parameters()} == stored
    for a, b in zip(plain.encode(PROMPTS), lean.encode(PROMPTS)):
        assert torch.equal(a, b)
    assert {p.dtype for p in lean.clip_g.parameters()} == stored   # no converted copy kept


def test_long_t5_prompts_and_common_length(model_dir):
    text = encoders.TextConditioner.from_model_dir(model_dir, t5="fp16")
    long = "⑳ " * 40                                       # NFKC '(20)': ~3 T5 tokens a word, > 77 in all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # CLIP truncates it (and says so)
        context, _ = text.encode(["cat", long])
        n = context.shape[1] - 77
        assert n == len(text.tokenizer_t5.tokenize(long)) > 77
        # the short prompt padded with 0 to the batch length, as transformers computes it
        ref_context, _ = reference(["cat", long], t5_small_file(), t5_length=n)
        assert (context - ref_context).abs().max() < 1e-4
        # a negative prompt encoded apart can be brought to the same length
        assert text.encode("", t5_length=n)[0].shape == (1, 77 + n, 4096)
        with pytest.raises(ValueError, match="t5_length"):
            text.encode(long, t5_length=77)
        # or both encoded together, for classifier-free guidance
        (cond, cond_pooled), (uncond, uncond_pooled) = text.encode_pair(["cat"], [long])
        assert cond.shape == uncond.shape == (1, 77 + n, 4096)
        assert torch.equal(torch.cat([cond, uncond]), context)


def test_model_dir_errors(model_dir, tmp_path):
    with pytest.raises(ValueError, match="'fp16', 'fp8' or 'off'"):
        encoders.TextConditioner.from_model_dir(model_dir, t5="int4")
    with pytest.raises(FileNotFoundError, match="model directory"):
        encoders.TextConditioner.from_model_dir(tmp_path / "nowhere")
    root = tmp_path / "partial"
    shutil.copytree(model_dir, root, symlinks=True)
    (root / "text_encoders" / "t5xxl_fp16.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"t5xxl_fp16\.safetensors not found.*t5='fp8'"):
        encoders.TextConditioner.from_model_dir(root, t5="fp16")
    shutil.rmtree(root / "tokenizer_3")
    with pytest.raises(FileNotFoundError, match=r"tokenizer_3/spiece\.model"):
        encoders.TextConditioner.from_model_dir(root, t5="fp8")
    shutil.rmtree(root / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=r"tokenizer_2/vocab\.json"):
        encoders.TextConditioner.from_model_dir(root, t5="off")
