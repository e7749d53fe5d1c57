"""The demo model set: what it is made of, and writing it in the official release layout.

    sd3.5_medium.safetensors              model.diffusion_model.*  MMDiT-X, hidden 128 (2 heads), 10 blocks,
                                                                   dual attention in 0-4, QK-norm, patch 2,
                                                                   positions for a 16x16 latent (128x128 px)
                                          first_stage_model.*      VAE, width 64 at every level, 16 latent channels, 8x
    text_encoders/clip_l.safetensors      CLIP-L layout, width 64, 2 layers  } trained contrastively on the scenes
    text_encoders/clip_g.safetensors      CLIP-G layout, width 64, 2 layers  } (training.demo.text), then frozen
    tokenizer/, tokenizer_2/              the real CLIP vocabulary and merges (tests/data/clip_tokenizer)
    demo.json                             version, native size, vocabulary, how it was trained

No T5: SD3 runs without it by design (its 77 context tokens are zeros, as with `--t5 off`), and a T5 of the
real layout has width 4096 even at one block, which cost 20% of every training step here (0.35 s of 1.8 s at
batch 32, measured) for words CLIP already carries.

Why the text encoders are trained (training.demo.text has the measurements): random ones keep each word in
its own token, and the transformer then learns colours from the prompt but not where to draw. Why they are
narrow: the real vocabulary has 49,408 tokens, so each CLIP's token table is 49,408 x width; at width 64 both
fit the 40 MB budget. The conditioning is SD3's exactly: CLIP-L ++ CLIP-G hidden states zero-padded to 4096 in 77
tokens, then 77 tokens of zeros where T5's would be; pooled = CLIP-L ++ CLIP-G pooled (128 here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mmditx import MMDiTX, MMDiTXConfig
from mmditx.checkpoint import save_safetensors
from vae import VAE, VAEConfig

VERSION = 11
SIZE = 128                                         # native image side, pixels
CLIP_WIDTH, CLIP_LAYERS, CLIP_MLP = 64, 2, 256
TRANSFORMER = MMDiTXConfig(hidden_size=128, depth=10, pos_embed_max_size=SIZE // 16, context_dim=4096,
                           pooled_dim=2 * CLIP_WIDTH, dual_attention_blocks=(0, 1, 2, 3, 4))
# 64 channels at every level: the VAE's GroupNorm has 32 groups, and with 32 channels (one per group) a flat
# region normalises to zero whatever its colour, so colour must be smuggled through spatial patterns (a 32-wide
# VAE trained 16 min here reconstructed 36% of object colours right); two channels per group keep a sign per
# group, enough to name a palette colour.
AUTOENCODER = VAEConfig(ch=64, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "tests" / "data" / "clip_tokenizer"


def write_text_encoders(root: Path, seed: int = 0) -> None:
    """tokenizer*/ and text_encoders/ of the demo, random weights drawn from `seed` (where training starts)."""
    from sampling.embedded import clip_layout, write_random

    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(CLIP_TOKENIZER, root / name, dirs_exist_ok=True)
    te = root / "text_encoders"
    te.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((CLIP_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    clip = clip_layout(CLIP_WIDTH, CLIP_LAYERS, len(vocab), mlp=CLIP_MLP)
    write_random(clip, te / "clip_l.safetensors", torch.float16, seed=seed + 1)
    write_random(clip, te / "clip_g.safetensors", torch.float16, seed=seed + 2)

def write_model_file(root: Path, transformer: MMDiTX, autoencoder: VAE, info: dict) -> Path:
    """sd3.5_medium.safetensors (fp16, official names) and demo.json."""
    tensors = {"model.diffusion_model." + k: v.detach().half() for k, v in transformer.state_dict().items()}
    tensors |= {"first_stage_model." + k: v.detach().half() for k, v in autoencoder.state_dict().items()}
    path = root / "sd3.5_medium.safetensors"
    save_safetensors(tensors, path, metadata={"demo_version": str(VERSION)})
    from .shapes import evaluation_prompts, vocabulary

    facts = {"version": VERSION, "size": SIZE, "vocabulary": vocabulary(),
             "examples": [prompt for prompt, _ in evaluation_prompts("seen")[::6]]}
    (root / "demo.json").write_text(json.dumps(facts | info, indent=1) + "\n")
    return path
