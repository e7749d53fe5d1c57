"""Tokenizers against transformers: CLIPTokenizer with the real CLIP vocabulary, T5TokenizerFast built from the
same (test-trained) spiece.model. Plus SD3's padding, truncation and warning rules."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
from hypothesis import assume, HealthCheck, example, given, settings
from hypothesis import strategies as st

from encoders import CLIPTokenizer, T5Tokenizer
from tests.official import CLIP_TOKENIZER_DIR
from tests.test_encoders_common import spiece_dir

PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "",
    "   ",
    "\n\t \r\n",
    "an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation",
    "it's a dog's life; they're here, we've been, I'm ok, you'll see, he'd go",
    "emoji 🐱🐶🚀 and ❤️ with skin tone 👍🏽",
    "日本語のテキスト、中文字符、한국어",
    "naïve café résumé Ünïcödé ß Ω ∑",
    "numbers 1234567890 3.14159 1e-5 #hashtag @user $100 50%",
    "punctuation!!! ??? ... --- (brackets) [square] {curly} <angle>",
    "multiple     spaces\tand\ttabs\nand\nnewlines",
    "text with <|endoftext|> in the middle and <|startoftext|>",
    "a" * 200,
    " ".join(["word"] * 100),
    "combining e\u0301 vs \u00e9, zero\u200bwidth, nbsp\u00a0here",
]


@pytest.fixture(scope="module")
def hf_clip():
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    return HFCLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


@pytest.fixture(scope="module")
def clip_l():
    return CLIPTokenizer(CLIP_TOKENIZER_DIR, pad_with_end=True)


def reference_clip_ids(hf, prompt: str, pad: int) -> list[int]:
    ids = hf(prompt, truncation=True, max_length=77)["input_ids"]
    return ids + [pad] * (77 - len(ids))


def test_known_ids(clip_l):
    ids = clip_l("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()                          # CLIP-L pads with the end token
    g = CLIPTokenizer(CLIP_TOKENIZER_DIR, pad_with_end=False)("a photo of a cat")
    assert g[0, :7].tolist() == ids[0, :7].tolist() and (g[0, 7:] == 0).all()   # CLIP-G pads with 0


@pytest.mark.parametrize("pad_with_end", [True, False])
def test_clip_matches_transformers(hf_clip, pad_with_end):
    tok = CLIPTokenizer(CLIP_TOKENIZER_DIR, pad_with_end=pad_with_end)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = tok(PROMPTS)                                      # batched
    pad = 49407 if pad_with_end else 0
    for prompt, row in zip(PROMPTS, ours.tolist()):
        assert row == reference_clip_ids(hf_clip, prompt, pad), prompt


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)
       | st.lists(st.sampled_from(["a", "photo", "cat", "The", "don't", "🐱", "12", ",", "!!", " ", "\n", "é",
                                   "東京", "x-ray", "it's", "<|endoftext|>"]), max_size=60).map("".join))
def test_clip_matches_transformers_on_generated_text(hf_clip, clip_l, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = clip_l(prompt)[0].tolist()
    assert ours == reference_clip_ids(hf_clip, prompt, 49407)


def test_clip_truncation_warns_with_the_dropped_count(clip_l, hf_clip):
    prompt = " ".join(f"word{i}" for i in range(60))            # 'word', digit(s): 2-3 tokens each
    n = len(hf_clip(prompt, add_special_tokens=False)["input_ids"])
    with pytest.warns(UserWarning, match=f"dropped the last {n - 75} token") as record:
        ids = clip_l(prompt)
    assert "word29 word30" in str(record[0].message)             # shows where the dropped text starts
    assert ids.shape == (1, 77) and ids[0, -1] == 49407
    assert ids[0].tolist() == reference_clip_ids(hf_clip, prompt, 49407)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_l(" ".join(["cat"] * 75))                           # exactly 75 prompt tokens: no warning


def test_clip_missing_or_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer(tmp_path)
    shutil.copy(CLIP_TOKENIZER_DIR / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt.*tokenizer/"):
        CLIPTokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="vocab.json: not a CLIP vocabulary"):
        CLIPTokenizer(tmp_path)
    with pytest.raises(TypeError, match="strings"):
        CLIPTokenizer(CLIP_TOKENIZER_DIR)(["ok", None])


# -- T5 -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_t5():
    from transformers import T5TokenizerFast
    return T5TokenizerFast.from_pretrained(str(spiece_dir()))


@pytest.fixture(scope="module")
def t5():
    return T5Tokenizer(spiece_dir())


def reference_t5_ids(hf, prompt: str) -> list[int]:
    """The official code's procedure with transformers' tokenizer: text[:226], split on spaces (newlines
    first made spaces), each word tokenized without its end token, then end token 1."""
    words = [w for w in prompt[:226].replace("\n", " ").split(" ") if w]
    return [i for w in words for i in hf(w)["input_ids"][:-1]] + [1]


ODD_SPACE_THEN_MARK = re.compile(r"[^\S ]\s*[\u0300-\u036f\u0483-\u0489\u0900-\u0dff\u1ab0-\u1aff\u1dc0-\u1dff"
                                 r"\u200b-\u200f\u20d0-\u20ff\ufe00-\ufe2f]")
T5_PROMPTS = PROMPTS + ["Hello, World! 123 4567 café naïve ÉCOLE", "the moon painting in oil style"]


def test_t5_matches_transformers(hf_t5, t5):
    for prompt in T5_PROMPTS:
        ids = t5.tokenize(prompt)
        assert ids == reference_t5_ids(hf_t5, prompt), prompt
        if len(prompt) <= 226 and "\t" not in prompt:           # word by word = whole text here
            assert ids == hf_t5(prompt)["input_ids"], prompt


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
       | st.lists(st.sampled_from(["a", "photo", "cat", "The", "moon", "🐱", "12", ",", " ", "\n", "é", "Öka",
                                   "riding", "zz"]), max_size=80).map("".join))
@example("\x85")                 # Unicode spaces split words...
@example("0\x850")
@example("a\u3000b\x1cc")         # ...\x1c does not
def test_t5_matches_transformers_on_generated_text(hf_t5, t5, prompt):
    # Known gap, not emulated: T5TokenizerFast normalizes grapheme by grapheme, so a combining mark right after a
    # non-ASCII space ('\xa0\u0300') is sometimes dropped with it, and sentencepiece keeps it. Such prompts are
    # left out here; every other generated prompt must match.
    assume(not ODD_SPACE_THEN_MARK.search(prompt))
    assert_same_t5_tokens(t5, t5.tokenize(prompt), reference_t5_ids(hf_t5, prompt))


def assert_same_t5_tokens(t5: T5Tokenizer, ours: list[int], ref: list[int]) -> None:
    """Equal, or an equal-score tie: sentencepiece and the tokenizers library both find a best-scoring
    (Viterbi) segmentation but break ties differently, e.g. 'zzzzz' as 'zzzz'+'z' or 'z'+'zzzz' (same pieces,
    same score). Such ties are the only difference allowed."""
    if ours == ref:
        return
    assert t5.sp.decode(ours) == t5.sp.decode(ref)
    score = lambda ids: sum(t5.sp.get_score(i) for i in ids)  # noqa: E731
    assert abs(score(ours) - score(ref)) < 1e-4, (ours, ref)


def test_t5_tie_breaking_differs_only_in_order(hf_t5, t5):
    ours, ref = t5.tokenize("gzzzzz"), reference_t5_ids(hf_t5, "gzzzzz")
    assert_same_t5_tokens(t5, ours, ref)
    assert sorted(ours) == sorted(ref)


def test_t5_padding_end_token_and_batching(t5):
    ids = t5(["a photo of a cat", ""])
    assert ids.shape == (2, 77)                                  # padded to at least 77
    n = len(t5.tokenize("a photo of a cat"))
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and 1 not in ids[0, : n - 1].tolist()
    assert ids[1, 0] == 1 and (ids[1, 1:] == 0).all()            # empty prompt: just the end token
    long = " ".join(["qu"] * 100)                                # 100 tokens > 77: kept whole
    batch = t5(["cat", long])
    assert batch.shape == (2, len(t5.tokenize(long))) and batch.shape[1] > 77
    assert t5("cat", min_length=100).shape == (1, 100)


def test_t5_sees_the_first_226_characters_and_warns_over_256_tokens(t5):
    prompt = "cat " * 100
    assert t5.tokenize(prompt) == t5.tokenize(prompt[:226])
    assert T5Tokenizer(spiece_dir(), max_chars=None).tokenize(prompt) != t5.tokenize(prompt)
    many = "⑳ " * 113                               # 226 characters; NFKC makes each '(20)': 3 tokens a word
    with pytest.warns(UserWarning, match=r"has \d+ T5 tokens.*at most 256"):
        assert len(t5.tokenize(many)) > 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t5.tokenize("a photo of a cat")


def test_t5_missing_or_wrong_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"spiece.model.*tokenizer_3/"):
        T5Tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        T5Tokenizer(tmp_path / "spiece.model")
