"""The two model sets that come with the project, for a machine without the official files.

The demo model (`demo_model_dir`): a tiny SD3 of the real architecture trained by this project on coloured
shapes (scripts/train_demo.py, docs/demo_model.md), in the official release layout, in sampling/demo_model/
(or $MMDITX_DEMO_DIR). When it is there it is the default of scripts/generate.py and scripts/attention_maps.py.
Version 1 is shipped: it follows background, position, size and (less reliably) colour words, not yet shape
words (docs/demo_model.md).

The random-weight set (`embedded_model_dir`, `--random-weights`): the full official layout (T5 included) at
small size, built once and cached, so tests and tools run every stage of the real path (tokenizers, text
encoders, transformer, sampler, VAE, PNG) in seconds. Its images are noise: the weights are random.

Layout of the random-weight set (as the official release):
    sd3.5_medium.safetensors              model.diffusion_model.* (MMDiT-X: 10 blocks, 3 with dual attention)
                                          + first_stage_model.* (a narrow VAE)
    text_encoders/clip_l.safetensors      CLIP-L layout, width 768, 2 layers
    text_encoders/clip_g.safetensors      CLIP-G layout, width 1280, 2 layers, text_projection
    text_encoders/t5xxl_fp16.safetensors  T5 layout, width 4096, 2 heads, 2 blocks (fp16), and t5xxl_fp8_e4m3fn
    tokenizer/, tokenizer_2/              CLIP BPE files of our own making (bytes only, no merges)
    tokenizer_3/spiece.model              a sentencepiece model trained here on a small corpus
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from mmditx import MMDiTX, MMDiTXConfig
from mmditx.checkpoint import build_on_meta, expected_shapes, write_safetensors_streaming

VERSION = "3"
# The encoders keep the real widths (the conditioning is then exactly SD3's: context 4096, pooled 2048) with
# 2 layers each; T5 keeps its 4096 width but only 2 heads and a narrow feed-forward.
CLIP_L_WIDTH, CLIP_G_WIDTH, CLIP_LAYERS = 768, 1280, 2
T5_WIDTH, T5_HEADS, T5_BLOCKS, T5_FF = 4096, 2, 2, 256
# 10 blocks so that the official skip-layer guidance layers 7, 8, 9 exist.
TRANSFORMER = MMDiTXConfig(hidden_size=128, depth=10, pos_embed_max_size=64, context_dim=T5_WIDTH,
                           pooled_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, dual_attention_blocks=(0, 1, 2))
CORPUS = ("a photo of a cat sitting on a red chair in the sun. a painting of a mountain lake at dawn. "
          "an astronaut riding a horse on the moon, digital art. a bowl of fruit on a wooden table. "
          "portrait of an old man with a beard, studio lighting. a city street at night in the rain. ") * 20


def cache_dir() -> Path:
    return Path(os.environ.get("MMDITX_CACHE", Path.home() / ".cache" / "mmditx")) / f"embedded-v{VERSION}"


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A plausible random value for a weight called `name`: norm gains near 1, small biases, matrices scaled
    by 1/sqrt(fan_in) so activations stay O(1) through deep stacks."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and ("norm" in name or ".ln_" in name) and leaf == "weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if leaf == "bias" or len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=generator)
    if "pos_embed" in name:
        return torch.randn(shape, generator=generator) * 0.5
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    if "embedding" in name or "embed_tokens" in name or name.endswith("shared.weight"):
        fan_in = 1
    return torch.randn(shape, generator=generator) / fan_in ** 0.5


def write_random(shapes: dict, path: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    specs = {k: (tuple(s), dtype) for k, s in shapes.items()}
    write_safetensors_streaming(specs, lambda k: random_tensor(k, specs[k][0], g).to(dtype), path)


def clip_layout(width: int, layers: int, vocab: int = 49408, mlp: int | None = None, positions: int = 77,
                projection: bool = True) -> dict:
    """Key names and shapes of the official clip_l / clip_g files, at any size (MLP width 4x by default)."""
    mlp = mlp or 4 * width
    p = "text_model."
    out = {p + "embeddings.token_embedding.weight": (vocab, width),
           p + "embeddings.position_embedding.weight": (positions, width)}
    for i in range(layers):
        b = f"{p}encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            out[b + n + ".weight"] = out[b + n + ".bias"] = (width,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[b + f"self_attn.{n}.weight"], out[b + f"self_attn.{n}.bias"] = (width, width), (width,)
        out[b + "mlp.fc1.weight"], out[b + "mlp.fc1.bias"] = (mlp, width), (mlp,)
        out[b + "mlp.fc2.weight"], out[b + "mlp.fc2.bias"] = (width, mlp), (width,)
    out[p + "final_layer_norm.weight"] = out[p + "final_layer_norm.bias"] = (width,)
    if projection:
        out["text_projection.weight"] = (width, width)
    return out


def t5_layout(width: int, blocks: int, ff: int, vocab: int, heads: int, head_dim: int = 64) -> dict:
    """Key names and shapes of the official t5xxl file (T5 v1.1 encoder), at any size."""
    inner = heads * head_dim
    out = {"encoder.embed_tokens.weight": (vocab, width)}
    for i in range(blocks):
        b = f"encoder.block.{i}.layer."
        for n in "qkv":
            out[b + f"0.SelfAttention.{n}.weight"] = (inner, width)
        out[b + "0.SelfAttention.o.weight"] = (width, inner)
        if i == 0:
            out[b + "0.SelfAttention.relative_attention_bias.weight"] = (32, heads)
        out[b + "0.layer_norm.weight"] = out[b + "1.layer_norm.weight"] = (width,)
        out[b + "1.DenseReluDense.wi_0.weight"] = out[b + "1.DenseReluDense.wi_1.weight"] = (ff, width)
        out[b + "1.DenseReluDense.wo.weight"] = (width, ff)
    out["encoder.final_layer_norm.weight"] = (width,)
    return out


def write_clip_tokenizer(folder: Path) -> int:
    """A byte-level CLIP BPE vocabulary of our own making: the 256 byte symbols with and without the
    end-of-word marker, no merges (every word is spelled out byte by byte), then the two special tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def write_t5_tokenizer(folder: Path) -> int:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS.replace(". ", ".\n"))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=200,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    corpus.unlink()
    (folder / "spiece.vocab").unlink(missing_ok=True)
    return spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")).vocab_size()


def build(root: Path) -> None:
    """Write the whole model set into `root`."""
    from vae import VAE, VAEConfig

    vocab = write_clip_tokenizer(root / "tokenizer")
    shutil.copytree(root / "tokenizer", root / "tokenizer_2")
    t5_vocab = write_t5_tokenizer(root / "tokenizer_3")

    te = root / "text_encoders"
    te.mkdir(parents=True, exist_ok=True)
    write_random(clip_layout(CLIP_L_WIDTH, CLIP_LAYERS, vocab), te / "clip_l.safetensors", torch.float16, seed=1)
    write_random(clip_layout(CLIP_G_WIDTH, CLIP_LAYERS, vocab), te / "clip_g.safetensors", torch.float16, seed=2)
    t5 = t5_layout(T5_WIDTH, T5_BLOCKS, T5_FF, t5_vocab, heads=T5_HEADS)
    write_random(t5, te / "t5xxl_fp16.safetensors", dtype=torch.float16, seed=3)
    write_random(t5, te / "t5xxl_fp8_e4m3fn.safetensors", dtype=torch.float8_e4m3fn, seed=3)

    shapes = {"model.diffusion_model." + k: v
              for k, v in expected_shapes(build_on_meta(lambda: MMDiTX(TRANSFORMER))).items()}
    ae = build_on_meta(lambda: VAE(VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)))
    shapes.update({"first_stage_model." + k: v for k, v in expected_shapes(ae).items()})
    write_random(shapes, root / "sd3.5_medium.safetensors", dtype=torch.float16, seed=4)


def demo_model_dir() -> Path:
    """Where the demo model set lives: $MMDITX_DEMO_DIR, else sampling/demo_model/ (it may be absent)."""
    return Path(os.environ.get("MMDITX_DEMO_DIR") or Path(__file__).resolve().parent / "demo_model")


def demo_available() -> bool:
    return (demo_model_dir() / "demo.json").is_file()


def demo_info(root: Path | None = None) -> dict:
    """demo.json: version, native `size`, `vocabulary` (what it can draw), `examples` (prompts), training;
    optionally `limits` (what it measurably does not follow, printed with the vocabulary) and `sampling`."""
    return json.loads(((root or demo_model_dir()) / "demo.json").read_text(encoding="utf-8"))


def demo_defaults(info: dict) -> dict:
    """GenerationParams fields the demo model samples with unless told otherwise: its native size and the
    settings demo.json's "sampling" records (measured on it: docs/demo_model.md)."""
    return {"width": info["size"], "height": info["size"], **info.get("sampling", {})}


def model_dir_or_demo(model_dir: str | os.PathLike | None, random_weights: bool = False) -> tuple[Path, str]:
    """(folder, kind): `model_dir` ("given"); else the demo model ("demo") when there is one and the random-weight
    set was not asked for, after a notice of what it can draw; else the random-weight set ("random"), after a
    warning. Notices go to stderr."""
    if model_dir is not None:
        return Path(model_dir), "given"
    if random_weights or not demo_available():
        return model_dir_or_embedded(None, "Its images are noise; pass --model-dir with the official files for "
                                           "real images.")[0], "random"
    root = demo_model_dir()
    info = demo_info(root)
    print(f"!! no --model-dir: using the DEMO MODEL (v{info['version']}, {root}): a tiny SD3 trained by this project "
          f"on coloured shapes, {info['size']}x{info['size']} pixels. It draws only its vocabulary:\n"
          + "".join(f"     {line}\n" for line in info["vocabulary"].splitlines())
          + (f"   Measured limits: {info['limits']}\n" if info.get("limits") else "")
          + f"   e.g. \"{info['examples'][0]}\". For real images pass --model-dir with the official SD3.5 Medium "
            "files.", file=sys.stderr)
    return root, "demo"


def default_t5(kind: str) -> str:
    """The T5 mode when none is asked for: the demo model set has no T5 ("off"); any other runs it ("fp16")."""
    return "off" if kind == "demo" else "fp16"


def model_label(model_dir: Path, kind: str) -> str:
    """How the scripts name the model they run, for a `kind` of model_dir_or_demo."""
    return {"random": "embedded random weights", "demo": f"demo model, {model_dir}"}.get(kind, str(model_dir))


def model_dir_or_embedded(model_dir: str | os.PathLike | None, consequence: str) -> tuple[Path, bool]:
    """(`model_dir`, False), or without one (the embedded random-weight set, True) after a loud warning on
    stderr ending with `consequence` (what random weights mean for the command's output)."""
    if model_dir is not None:
        return Path(model_dir), False
    root = embedded_model_dir()
    print(f"!! no --model-dir: using the EMBEDDED RANDOM-WEIGHT model set in {root}. {consequence}", file=sys.stderr)
    return root, True


def embedded_model_dir() -> Path:
    """The cached embedded model set, built on first use (a few seconds).

    Safe when several first runs start at once: each builds in its own temporary folder and renames it into
    place; a rename onto a folder that exists fails, and the loser uses the winner's set and deletes only its
    own temporary folder. `root` only ever appears complete, so nothing ever deletes another run's result."""
    root = cache_dir()
    if (root / "COMPLETE").is_file():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp", dir=root.parent))
    except OSError as e:
        raise OSError(f"cannot create the model cache in {root.parent} ({e.strerror or e}): set MMDITX_CACHE to a "
                      "writable directory") from None
    try:
        build(tmp)
        (tmp / "COMPLETE").write_text("random weights; built by mmditx sampling.embedded\n")
        if root.exists() and not (root / "COMPLETE").is_file():
            # Left incomplete by an older version: move it aside (atomic) before deleting, so a complete set
            # renamed into place meanwhile by another run is never the one deleted.
            stale = Path(tempfile.mkdtemp(prefix=root.name + ".stale", dir=root.parent))
            try:
                os.rename(root, stale / "old")
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "COMPLETE").is_file():   # not another run's complete set: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # ours only (gone after a successful rename)
    return root
