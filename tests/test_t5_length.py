"""--t5-tokens: T5 reads whole prompts up to N tokens, against transformers' tokenizer and T5 with diffusers'
max_sequence_length rule (truncate to N with the end token last, pad to N); the 77 default stays official."""

from __future__ import annotations

import warnings

import pytest
import torch

import encoders
from tests.test_encoders_common import spiece_dir, t5_oracle, t5_small_file
from tests.test_encoders_conditioning import model_dir, reference  # noqa: F401  (a fixture)

LONG = ("a detailed oil painting of a red fox in a snowy forest at night, the moon light on the trees, " * 6).strip()


def hf_t5_context(prompts, n):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(spiece_dir()))
    ids = tok(prompts, max_length=n, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, t5_oracle(t5_small_file())(ids).last_hidden_state


def test_long_prompt_read_whole_against_transformers(model_dir):  # noqa: F811
    text = encoders.TextConditioner.from_model_dir(model_dir, t5="fp16")
    assert len(LONG) > 226
    whole = len(text.tokenizer_t5.tokenize(LONG, max_length=512))
    assert whole > len(text.tokenizer_t5.tokenize(LONG))  # the official cut drops tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CLIP truncates it, and says so
        for n in (whole + 20, whole - 10):  # padded, and cut (the end token kept last)
            context, _ = text.encode([LONG, "cat"], t5_tokens=n)
            ids, ref = hf_t5_context([LONG, "cat"], n)
            assert torch.equal(text.tokenizer_t5([LONG, "cat"], max_length=n), ids)
            assert context.shape == (2, 77 + n, 4096)
            assert (context[:, 77:] - ref).abs().max() < 1e-4
    # 77 keeps the official rule (and its result)
    official, _ = text.encode(["cat"])
    ref_context, _ = reference(["cat"], t5_small_file())
    assert torch.equal(text.encode(["cat"], t5_tokens=77)[0], official)
    assert (official - ref_context).abs().max() < 1e-4


def test_warnings_and_limits(model_dir):  # noqa: F811
    tok = encoders.T5Tokenizer(model_dir / "tokenizer_3")
    very_long = LONG + " " + LONG + " " + LONG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = len(tok.tokenize(very_long, max_length=10**6))
    assert n > 300
    with pytest.warns(UserWarning) as record:
        tok([very_long], max_length=300)
    assert [str(w.message)[:40] for w in record] == [f"the prompt has {n} T5 tokens; T5 reads t",
                                                     "the prompt has 300 T5 tokens; SD3.5 was "]
    assert "model card warns of artifacts at the image edges" in str(record[1].message)
    with pytest.warns(UserWarning, match=f"has {n} T5 tokens; T5 reads the first 100") as record:
        tok([very_long], max_length=100)
    assert len(record) == 1  # 100 tokens read: no 256 warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok([LONG], max_length=256)  # under 256 tokens: silent
    for bad in (76, 513):
        with pytest.raises(ValueError, match="between 77 and 512"):
            tok(["cat"], max_length=bad)
