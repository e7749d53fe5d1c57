"""Shared pieces of the text-encoder tests: small checkpoints in the official layout, transformers oracles
holding the same weights, and the full-size layout checks (on the meta device).

Oracles are transformers' CLIPTextModelWithProjection and T5EncoderModel, read from our files with the
safetensors library (not our reader), so nothing here depends on the code under test except what is tested.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import encoders
from mmditx.checkpoint import build_on_meta, expected_shapes, save_safetensors
from instruments.compare import Recorder
from sampling.embedded import clip_layout, t5_layout  # noqa: F401 (re-exported for the encoder tests)
from tests.official import official_layout, write_random_checkpoint

CLIP_L_HF = dict(hidden_act="quick_gelu", num_attention_heads=12)
CLIP_G_HF = dict(hidden_act="gelu", num_attention_heads=20)


# -- layouts ------------------------------------------------------------------------------------------------

def first_layers(layout: dict, n: int) -> dict:
    """The official layout cut to its first `n` layers/blocks (CLIP 'layers.N.', T5 'block.N.')."""
    out = {}
    for k, s in layout.items():
        m = re.search(r"\.(layers|block)\.(\d+)\.", k)
        if m is None or int(m.group(2)) < n:
            out[k] = s
    return out


# -- oracles ------------------------------------------------------------------------------------------------

def clip_oracle(path: Path, eos_token_id: int = 49407, **hf):
    """transformers' CLIPTextModelWithProjection holding the weights of `path` (fp32)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[3] for k in sd if ".layers." in k})
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, projection_dim=width, num_hidden_layers=layers,
                            intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                            max_position_embeddings=77, eos_token_id=eos_token_id, **hf)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    model.load_state_dict(sd, assign=True, strict=True)
    model.text_model.embeddings.register_buffer("position_ids", torch.arange(77)[None], persistent=False)
    return model.eval()


def t5_oracle(path: Path, dtype=torch.float32):
    """transformers' T5EncoderModel holding the weights of `path`, upcast to `dtype`."""
    from transformers import T5Config, T5EncoderModel

    sd = {k: v.to(dtype) for k, v in load_file(str(path)).items()}
    emb = sd.get("encoder.embed_tokens.weight", sd.get("shared.weight"))
    vocab, width = emb.shape
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    config = T5Config(vocab_size=vocab, d_model=width, d_kv=inner // heads, num_heads=heads,
                      d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                      num_layers=len({k.split(".")[2] for k in sd if ".block." in k}), feed_forward_proj="gated-gelu",
                      relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    sd["shared.weight"] = sd["encoder.embed_tokens.weight"] = emb
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


def record(model: torch.nn.Module, names: list[str], *args) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules during model(*args) (first element when a module returns a tuple),
    recorded with the same hooks as scripts/compare.py (instruments.compare.Recorder)."""
    rec = Recorder()
    for name in names:
        rec.watch(name, model.get_submodule(name), lambda o: (o[0] if isinstance(o, tuple) else o).float())
    with rec, torch.no_grad():
        model(*args)
    return rec.out


def clip_ids(batch: int, seed: int, pad: int, length: int = 77) -> torch.Tensor:
    """Random token rows shaped like tokenizer output: start, words, end, padding (varied prompt lengths)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), pad, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(0, length - 1, (1,), generator=g))
        ids[b, 0] = 49406
        ids[b, 1:n + 1] = torch.randint(0, 49406, (n,), generator=g)
        ids[b, n + 1] = 49407
    return ids


def write_t5_fp8(src: Path, dst: Path) -> Path:
    """The fp8 variant of a T5 file as the official t5xxl_fp8_e4m3fn is made: every tensor cast to e4m3fn."""
    save_safetensors({k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(src)).items()}, dst)
    return dst


# -- small checkpoints, written once per test session (shared by the test modules that import them) ------

_TMP = Path(tempfile.mkdtemp(prefix="encoders_tests_"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@lru_cache(maxsize=None)
def clip_l_file() -> Path:
    """Real CLIP-L width (768), first 2 of its 12 layers, fp16 as released."""
    return write_random_checkpoint(first_layers(official_layout("clip_l"), 2), _TMP / "clip_l.safetensors",
                                   torch.float16, seed=1)


@lru_cache(maxsize=None)
def clip_g_file() -> Path:
    """Real CLIP-G width (1280), first 2 of its 32 layers, fp16 as released."""
    return write_random_checkpoint(first_layers(official_layout("clip_g"), 2), _TMP / "clip_g.safetensors",
                                   torch.float16, seed=2)


@lru_cache(maxsize=None)
def t5_small_file() -> Path:
    """T5 at the real width 4096 but with 2 heads of 16, a 64-wide feed-forward, 3 blocks and a 512-token
    vocabulary (enough for the test spiece.model): fits the 4096-wide context, and cheap."""
    return write_random_checkpoint(t5_layout(4096, 3, ff=64, vocab=512, heads=2, head_dim=16), _TMP / "t5xxl_fp16.safetensors",
                                   torch.float16, seed=3)


@lru_cache(maxsize=None)
def spiece_dir() -> Path:
    """A small sentencepiece model trained like T5's (pad 0, end 1, unk 2, no start token): no real T5
    vocabulary is available here."""
    import sentencepiece

    folder = _TMP / "tokenizer_3"
    folder.mkdir()
    rng = random.Random(0)
    words = ("a photo of cat dog astronaut riding horse on the moon painting in style oil red blue green sky "
             "mountain river city night light dark beautiful detailed portrait woman man child tree forest").split()
    syllables = ["ka", "lo", "mi", "ne", "ru", "st", "an", "ing", "er", "th", "qu", "zz", "ph", "A", "B", "Ö"]
    lines = [" ".join(rng.choice(words) if rng.random() < 0.6 else
                      "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                      for _ in range(rng.randint(3, 15))) for _ in range(3000)]
    lines += ["Hello, World! 123 4567 café naïve ÉCOLE", "punctuation: (a), [b]; {c}! ? 'quoted' \"double\""] * 20
    corpus = _TMP / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=500, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        logstream=open(os.devnull, "w"))
    return folder


# -- full-size layouts, on the meta device ----------------------------------------------------------------

@pytest.mark.parametrize("name,factory", [
    ("clip_l", lambda: encoders.CLIPTextModel(encoders.CLIP_L)),
    ("clip_g", lambda: encoders.CLIPTextModel(encoders.CLIP_G)),
    ("t5xxl", lambda: encoders.T5Encoder(encoders.T5_XXL)),
])
def test_full_size_names_and_shapes_are_the_official_files(name, factory):
    model = build_on_meta(factory)
    assert expected_shapes(model) == official_layout(name)
