"""Per-word attention maps: words -> CLIP/T5 context positions against the real tokenizers, the accumulated
probabilities against a plain Trace of the same run, and scripts/attention_maps.py end to end on the embedded
random-weight model set."""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import CLIPTokenizer, T5Tokenizer
from encoders.tokenizers import _UNICODE_SPACE
from instruments.tracing import Trace
from instruments.attention_maps import (attention_maps, colormap, contact_sheet, map_words, overlay, slug,
                                     split_words, word_maps)
from tests.official import CLIP_TOKENIZER_DIR
from tests.test_encoders_common import spiece_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is faster, and stays fast when other jobs share the cores
    (two spinning threads on a busy 2-core machine ran these tests 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clip():
    return CLIPTokenizer(CLIP_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def t5():
    return T5Tokenizer(spiece_dir())


def clip_text(tok: CLIPTokenizer, prompt: str, positions: list[int]) -> str:
    """The BPE tokens at these context positions, joined, '</w>' markers removed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(prompt)[0]
    return "".join(tok.tokenizer.id_to_token(int(ids[p])) for p in positions).replace("</w>", "")


def t5_text(tok: T5Tokenizer, prompt: str, positions: list[int]) -> str:
    ids = tok.tokenize(prompt)
    return tok.sp.decode([ids[p - 77] for p in positions])


# -- words -> positions --------------------------------------------------------------------------------------

def test_split_words_strips_edge_punctuation():
    words = split_words("  A photo, of (a) x-ray cat!! ... 🐱\tdon't\n")
    assert [w.text for w in words] == ["A", "photo", "of", "a", "x-ray", "cat", "🐱", "don't"]
    assert [(w.start, w.end) for w in words][:2] == [(2, 3), (4, 10)]   # spans of the whole chunk


def test_one_token_words(clip, t5):
    words = map_words("a photo of a cat", [clip], t5)
    assert [w.clip for w in words] == [[1], [2], [3], [4], [5]]       # CLIP ids 320 1125 539 320 2368
    for w in words:
        assert t5_text(t5, "a photo of a cat", w.t5) == w.text
        assert w.t5 and min(w.t5) >= 77
    assert [p for w in words for p in w.t5] == sorted(p for w in words for p in w.t5)   # in order, disjoint


def test_multi_token_words_get_all_their_positions(clip, t5):
    prompt = "photorealistic naïve astronaut quzzkaph"
    words = map_words(prompt, [clip], t5)
    assert clip_text(clip, prompt, words[0].clip) == "photorealistic" and len(words[0].clip) == 2
    assert len(words[1].clip) == 3                                     # na, ï (bytes), ve
    for w in words:
        if w.text.isascii():
            assert clip_text(clip, prompt, w.clip) == w.text.lower()
        assert t5_text(t5, prompt, w.t5) == w.text
    assert len(words[3].t5) > 1                                       # T5 splits the made-up word into pieces
    # every CLIP token of the prompt belongs to exactly one word
    assert sorted(p for w in words for p in w.clip) == list(range(1, 1 + sum(len(w.clip) for w in words)))


def test_punctuation_stays_out_of_words(clip, t5):
    prompt = 'cat, (dog)! x-ray "moon" photo. \'moon\''
    words = map_words(prompt, [clip], t5)
    texts = ["cat", "dog", "x-ray", "moon", "photo", "moon"]
    assert [w.text for w in words] == texts
    # CLIP's word regex reads 'm as a contraction ("I'm"): the token 'm carries part of the word and stays
    assert [clip_text(clip, prompt, w.clip) for w in words] == texts[:-1] + ["'moon"]
    words = words[:-1]
    assert all(len(w.clip) == 1 for w in words if w.text != "x-ray")       # no ',' '(' ')!' "'" '.' tokens
    assert [t5_text(t5, prompt, w.t5) for w in words if w.text != "x-ray"] == ["cat", "dog", "moon", "photo"]
    # 'x' and '-' are unknown to the test vocabulary: pieces <unk>('x-') r a y, the lone '▁' left out
    assert len(words[2].t5) == 4 and t5_text(t5, prompt, words[2].t5).endswith("ray")
    assert map_words("... , !", [clip], t5) == []                      # nothing but punctuation: no words


def test_clip_l_and_g_share_positions(clip, t5):
    g = CLIPTokenizer(CLIP_TOKENIZER_DIR, pad_with_end=False)
    assert map_words("a red photo, cat", [clip, g], t5) == map_words("a red photo, cat", [clip], t5)


def test_words_past_clip_truncation_keep_t5_only(clip, t5):
    prompt = " ".join(["cat"] * 80)                                     # 80 one-token words; CLIP keeps 75
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        words = map_words(prompt, [clip], t5)
    assert [w.clip for w in words[:75]] == [[1 + k] for k in range(75)]
    assert all(w.clip == [] for w in words[75:])
    # T5 sees the first 226 characters: words 0..55 whole ("cat " is 4 characters), word 56 cut to "ca"
    assert all(t5_text(t5, prompt, w.t5) == "cat" for w in words[:56])
    assert t5_text(t5, prompt, words[56].t5) == "ca"
    assert all(w.t5 == [] for w in words[57:])
    assert words[-1].positions == []                                   # past both: the model never sees it
    n_t5 = len(t5.tokenize(prompt)) - 1
    assert max(p for w in words for p in w.t5) == 77 + n_t5 - 1        # the last T5 token belongs to a word


def test_every_token_lands_in_one_word(clip, t5):
    """On the tokenizer tests' awkward prompts (emoji, CJK, odd spaces, 100 words, typed special tokens): word
    positions are disjoint, in order and in range, and every CLIP or T5 token left out is punctuation."""
    from tests.test_tokenizers import PROMPTS

    for prompt in PROMPTS + ["(a), [b]; {c}! ? 'quoted' \"double\" x-ray, 1e-5"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            words = map_words(prompt, [clip], t5)
            clip_ids = clip.tokenizer.encode(prompt, add_special_tokens=False)
        t5_ids = t5.tokenize(prompt)[:-1]
        # the pieces as text (an unknown piece keeps its characters): the tokenizer's word split, as strings
        t5_words = _UNICODE_SPACE.split(t5.sp.normalize(prompt[:226]).replace("\u2581", " "))
        t5_pieces = [s for piece in t5.sp.encode([w for w in t5_words if w], out_type=str) for s in piece]
        assert len(t5_pieces) == len(t5_ids)
        for name, positions, n, lo in (("clip", [p for w in words for p in w.clip], len(clip_ids.ids), 1),
                                       ("t5", [p for w in words for p in w.t5], len(t5_ids), 77)):
            assert positions == sorted(set(positions)), (prompt, name)
            assert all(lo <= p < lo + min(n, 75 if name == "clip" else n) for p in positions), (prompt, name)
            for i in sorted(set(range(lo, lo + min(n, 75 if name == "clip" else n))) - set(positions)):
                if name == "clip":
                    a, b = clip_ids.offsets[i - 1]
                    text = prompt[a:b]
                else:
                    text = t5_pieces[i - 77].replace("\u2581", "")
                assert all(unicodedata.category(ch).startswith("P") for ch in text), (prompt, name, text)


def test_without_t5(clip):
    words = map_words("a cat", [clip], None)
    assert [(w.clip, w.t5) for w in words] == [([1], []), ([2], [])]


# -- maps from a real run --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MMDITX_CACHE")
    os.environ["MMDITX_CACHE"] = str(cache)
    try:
        from sampling.embedded import embedded_model_dir
        root = embedded_model_dir()
    finally:
        if old is None:
            del os.environ["MMDITX_CACHE"]
        else:
            os.environ["MMDITX_CACHE"] = old
    return cache, root


@pytest.fixture(scope="module")
def pipe(embedded):
    from sampling.pipeline import Pipeline
    return Pipeline.from_model_dir(embedded[1])


def params(**kw):
    from sampling.pipeline import GenerationParams
    base = dict(prompt="a photo of a cat", negative_prompt="blurry", width=64, height=48, steps=6, seed=3,
                sampler="dpmpp_2m", cfg=5.0, slg=True, slg_start=0.01, slg_end=0.5)
    return GenerationParams(**{**base, **kw})


def test_accumulated_maps_equal_a_plain_trace(pipe):
    """The running mean equals the mean over a plain Trace of the same generation (conditional row 0 of the
    CFG passes, skip-layer-guidance passes left out), and every traced image row is a probability distribution."""
    p = params()
    blocks, steps = [0, 4, 9], [1, 2, 5]
    result = attention_maps(pipe, p, blocks=blocks, steps=steps)

    model = pipe.transformer()
    with Trace(model, blocks=blocks, attention=True, modulation=False, tensors=True) as trace:  # step = model call
        image = pipe.generate(p)[0]
    assert np.array_equal(np.asarray(image), np.asarray(result.image))             # tracing changes nothing
    # row 0 of the CFG batch is the prompt (row 1 the negative): compare the context entering block 0
    (cond, _), (uncond, _) = pipe.encode_prompts([p.prompt], [p.negative_prompt])
    with torch.no_grad():
        embedded_cond = model.context_embedder(cond)[0]
    assert torch.allclose(trace.records[(0, 0)]["context_in"][0], embedded_cond, atol=1e-5)
    assert not torch.allclose(trace.records[(0, 0)]["context_in"][1], embedded_cond, atol=1e-3)
    cfg_calls = sorted({s for (s, b), r in trace.records.items() if r["attention"]["image_to_text"].shape[0] == 2})
    assert len(cfg_calls) == p.steps and len({s for s, _ in trace.records}) > p.steps   # SLG passes were made
    chosen, L_img = [], (48 // 16) * (64 // 16)
    for step, call in enumerate(cfg_calls):
        for b in blocks:
            att = trace.records[(call, b)]["attention"]
            rows = torch.cat([att["image_to_text"], att["image_to_image"]], -1).sum(-1)    # (B, L_img)
            assert rows.shape == (2, L_img) and torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
            if step in steps:
                chosen.append(att["image_to_text"][0])
    want = torch.stack(chosen).double().mean(0).float()
    assert result.mean.shape == want.shape == (L_img, 154)
    assert torch.allclose(result.mean, want, atol=1e-6)
    assert result.blocks == blocks and result.steps == steps

    # per-word maps: probability mass on the word's positions, on the (H/16, W/16) patch grid
    assert [w.text for w in result.words] == ["a", "photo", "of", "a", "cat"]
    assert result.maps.shape == (5, 3, 4)
    for word, m in zip(result.words, result.maps):
        assert torch.allclose(m.flatten(), want[:, word.positions].sum(-1), atol=1e-6)
    assert (result.maps > 0).all() and (result.maps.sum(0) < 1).all()
    assert torch.equal(word_maps(result.mean, result.words, (3, 4)), result.maps)


def test_bad_blocks_and_steps(pipe):
    with pytest.raises(ValueError, match=r"blocks \[10\] outside the model's joint blocks 0..9"):
        attention_maps(pipe, params(), blocks=[1, 10])
    with pytest.raises(ValueError, match=r"steps \[6\] outside the sampling steps 0..5"):
        attention_maps(pipe, params(), steps=[6])


# -- rendering ------------------------------------------------------------------------------------------------

def test_colormap_and_panels():
    c = colormap(np.array([0.0, 0.5, 1.0, np.nan, 7.0]))
    assert c.dtype == np.uint8 and c.shape == (5, 3)
    assert c[0].sum() < 20 and c[2].sum() > 600 and (c[3] == c[0]).all() and (c[4] == c[2]).all()
    assert np.all(np.diff(colormap(np.linspace(0, 1, 50)).astype(int).sum(-1)) >= 0)   # dark to bright
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    heat = torch.zeros(3, 4)
    heat[2, 3] = 1.0
    panel = overlay(image, heat, "a very long label that cannot fit")
    assert panel.size == (64, 48)
    a = np.asarray(panel).astype(int)
    assert a[-2, -2].sum() > a[-2, 2].sum()                         # the hot patch is bottom right
    sheet = contact_sheet(image, [panel] * 3, title="title")
    assert sheet.width == 2 * 64 + 3 * 4 and sheet.height > 2 * 48
    assert slug("Ünïcödé!") == "unicode" and slug("東京") == "word"


# -- the command line ------------------------------------------------------------------------------------------

def run_cli(cache, *args, check=True):
    env = {"MMDITX_CACHE": str(cache), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "attention_maps.py"), "--random-weights", *args],
                          capture_output=True,
                          text=True, env=env, cwd=cache, check=check)


def test_cli_writes_one_png_per_word_and_a_sheet(embedded, tmp_path, monkeypatch, capsys):
    cache, _ = embedded
    out = tmp_path / "maps"
    prompt = "a photo of a cat, sitting!"
    r = run_cli(cache, "--prompt", prompt, "--steps", "3", "--width", "64", "--height", "64", "--blocks", "0-4,9",
                "--out", str(out))
    assert "EMBEDDED RANDOM-WEIGHT" in r.stderr and "not semantically meaningful" in r.stderr
    files = sorted(out.iterdir())
    assert [Path(p) for p in r.stdout.split()] == [out / n for n in [
        "000000_00_a.png", "000000_01_photo.png", "000000_02_of.png", "000000_03_a.png", "000000_04_cat.png",
        "000000_05_sitting.png", "000000_sheet.png"]]
    assert len(files) == len(split_words(prompt)) + 1
    for f in files[:-1]:
        with Image.open(f) as im:
            im.load()
            assert im.size == (64, 64) and im.mode == "RGB"
    with Image.open(files[-1]) as im:
        im.load()
        assert im.width > 64 * 2 and im.height > 64 * 2

    # run again into the same folder: new names, the old files untouched
    before = {f: f.read_bytes() for f in files}
    from scripts.attention_maps import main

    monkeypatch.setenv("MMDITX_CACHE", str(cache))
    assert main(["--random-weights", "--prompt", "cat", "--steps", "1", "--width", "64", "--height", "64", "--quiet",
                 "--out", str(out)]) == 0
    again = capsys.readouterr().out.split()
    assert [Path(p).name for p in again] == ["000000_00_cat.png", "000000_sheet_1.png"]
    assert all(f.read_bytes() == b for f, b in before.items())


@pytest.mark.parametrize("args, message", [
    (["--blocks", "3-12"], "--blocks '3-12': 10 is outside 0..9"),
    (["--blocks", "x"], "--blocks 'x': expected indices like"),
    (["--blocks", "5-2"], "runs backwards"),
    (["--steps-used", "4"], "--steps-used '4': 4 is outside 0..1"),
    (["--width", "70"], "width 70 is not a positive multiple of 16"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--prompt", "!!! ..."], "has no words"),
])
def test_cli_errors(embedded, tmp_path, monkeypatch, args, message):
    from scripts.attention_maps import main

    monkeypatch.setenv("MMDITX_CACHE", str(embedded[0]))
    with pytest.raises(SystemExit) as e:
        main(["--random-weights", "--steps", "2", "--width", "64", "--height", "64", "--quiet",
              "--out", str(tmp_path / "o"), *args])
    assert message in str(e.value)


def test_cli_out_is_a_file(tmp_path):
    from scripts.attention_maps import main

    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(SystemExit, match="is a file; give a directory"):
        main(["--out", str(f)])
