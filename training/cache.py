"""Caches of what training does not train: VAE latents and text conditioning, computed once.

    RUN/cache/<key>/latents.safetensors   "<i>" (and "<i>.flip") -> (16, h/8, w/8) fp16 latent of example i
                    text.safetensors      "context.<j>", "pooled.<j>" -> fp16, once per unique caption j
                    index.json            examples (file, caption index, bucket), the encoders' widths

The key is a hash of every image's bytes, every caption and the options (resolution, crop, flip, seed, model
files): change any of them and a new cache is built; otherwise it is reused. The files are memory-mapped
(mmditx.checkpoint), so a step reads only its batch. The text encoders and the VAE are released once the
cache is written: training then holds only what it trains. Crops are fixed when caching (seeded random crops
when asked); with flip, both the image and its mirror are encoded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import encoders
import vae as vae_lib
from mmditx.checkpoint import open_safetensors, save_safetensors, written_whole
from sampling.pipeline import ModelFiles

from .data import Example, load_crop
from .objective import ConditioningLayout

VERSION = 1


@dataclass(frozen=True)
class CacheOptions:
    crop: str = "center"        # "center" or "random" (drawn once, from `seed`)
    flip: bool = False          # also cache the mirrored image; training picks one at random
    seed: int = 0
    batch_size: int = 4         # images per VAE call

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', not {self.crop!r}")


def _file_identity(path: Path | None) -> str:
    if path is None:
        return "none"
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def cache_key(examples: list[Example], files: ModelFiles, options: CacheOptions, prompts=()) -> str:
    h = hashlib.sha256(json.dumps({"version": VERSION, "options": asdict(options), "prompts": list(prompts)},
                                  sort_keys=True).encode())
    for f in (files.model, files.vae, files.clip_l, files.clip_g, files.t5):
        h.update(_file_identity(f).encode())
    for ex in examples:
        h.update(hashlib.sha256(ex.image.read_bytes()).digest())
        h.update(json.dumps([ex.caption, ex.bucket]).encode())
    return h.hexdigest()[:20]


def build_cache(examples: list[Example], files: ModelFiles, run_dir: str | Path, options: CacheOptions = CacheOptions(),
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, prompts=(), log=print) -> Path:
    """The cache directory for these examples (built unless an identical one exists). `prompts`: extra texts
    to encode (validation prompts; the empty prompt is always there, for guidance)."""
    folder = Path(run_dir) / "cache" / cache_key(examples, files, options, prompts)
    if (folder / "index.json").is_file():
        log(f"cache: reusing {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    captions = sorted({ex.caption for ex in examples} | set(prompts) | {""})
    caption_index = {c: j for j, c in enumerate(captions)}

    log(f"cache: encoding {len(captions)} unique captions and prompts")
    text = encoders.TextConditioner.from_files(
        clip_l=files.clip_l, clip_g=files.clip_g, t5=files.t5, tokenizer_l=files.tokenizer_l,
        tokenizer_g=files.tokenizer_g, tokenizer_t5=files.tokenizer_t5, device=device, dtype=dtype)
    # one T5 length for every caption (the longest), so any captions batch together
    t5_length = None if text.tokenizer_t5 is None else max(77, text.tokenizer_t5(captions).shape[1])
    layout = ConditioningLayout.of(text)
    tensors = {}
    with torch.no_grad():
        for start in range(0, len(captions), 8):
            chunk = captions[start:start + 8]
            context, pooled = text.encode(chunk, t5_length=t5_length)
            for k in range(len(chunk)):
                tensors[f"context.{start + k}"] = context[k].to(torch.float16).cpu()
                tensors[f"pooled.{start + k}"] = pooled[k].to(torch.float16).cpu()
    del text
    gc.collect()
    save_safetensors(tensors, folder / "text.safetensors")
    del tensors

    log(f"cache: encoding {len(examples)} images" + (" and their mirrors" if options.flip else ""))
    ae = vae_lib.load_vae(files.vae or files.model, device=device, dtype=dtype)
    rng = random.Random(options.seed)
    crops = [load_crop(ex, options.crop, rng) for ex in examples]  # drawn in example order: reproducible
    latents = {}
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, ex in enumerate(examples):
        by_bucket.setdefault(ex.bucket, []).append(i)
    for flip in ((False, True) if options.flip else (False,)):
        for indices in by_bucket.values():
            for start in range(0, len(indices), options.batch_size):
                chunk = indices[start:start + options.batch_size]
                images = [crops[i].transpose(0) if flip else crops[i] for i in chunk]  # 0 = FLIP_LEFT_RIGHT
                z = ae.encode(vae_lib.image_to_tensor(images), sample=False)
                for k, i in enumerate(chunk):
                    latents[f"{i}.flip" if flip else str(i)] = z[k].to(torch.float16).cpu()
    del ae, crops
    gc.collect()
    save_safetensors(latents, folder / "latents.safetensors")

    index = {"examples": [{"file": str(ex.image), "caption": caption_index[ex.caption], "bucket": list(ex.bucket)}
                          for ex in examples],
             "flip": options.flip, "layout": asdict(layout), "captions": captions}
    with written_whole(folder / "index.json") as tmp:    # written last: its presence marks a complete cache
        tmp.write_text(json.dumps(index, indent=1))
    return folder


class CachedDataset:
    """The cache opened for training: `batch(indices, flips, generator)` -> latents (B, 16, h, w), context, pooled
    (fp16, read from the memory-mapped files); `buckets` groups example indices by size. The trainer hands each
    batch its micro-batch's generator for a dataset's own random choices; a cached example makes none."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.index = json.loads((folder / "index.json").read_text())
        self.latents = open_safetensors(folder / "latents.safetensors")
        self.text_file = open_safetensors(folder / "text.safetensors")
        self.flip = self.index["flip"]
        self.layout = ConditioningLayout(**self.index["layout"])
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for i, ex in enumerate(self.index["examples"]):
            self.buckets.setdefault(tuple(ex["bucket"]), []).append(i)

    def __len__(self) -> int:
        return len(self.index["examples"])

    def text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (1, L, 4096), pooled (1, 2048)) of a cached caption or prompt."""
        try:
            j = self.index["captions"].index(prompt)
        except ValueError:
            raise KeyError(f"prompt {prompt!r} is not in the cache (pass it when building the cache)") from None
        return self.text_file.tensor(f"context.{j}")[None], self.text_file.tensor(f"pooled.{j}")[None]

    def batch(self, indices: list[int], flips: list[bool] | None = None, generator: torch.Generator | None = None):
        flips = flips or [False] * len(indices)
        caps = [self.index["examples"][i]["caption"] for i in indices]
        x0 = torch.stack([self.latents.tensor(f"{i}.flip" if f else str(i)) for i, f in zip(indices, flips)])
        context = torch.stack([self.text_file.tensor(f"context.{j}") for j in caps])
        pooled = torch.stack([self.text_file.tensor(f"pooled.{j}") for j in caps])
        return x0, context, pooled
