"""Converting a model between the official release layout and a diffusers-format folder (scripts/convert.py).

    official (DIR/sd3.5_medium.safetensors, DIR/text_encoders/*.safetensors, DIR/tokenizer*/, or one file that
              bundles the text encoders)
        <->
    diffusers (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, text_encoder_3/,
               tokenizer*/, scheduler/), each component sharded like diffusers/transformers do, with an index

The names are mapped by the same tables the loaders use (mmditx/diffusers_names.py, vae/diffusers_names.py);
the text encoders are stored under the same names in both layouts except T5's embedding (`shared.weight` as
transformers saves it, `encoder.embed_tokens.weight` in the release). Tensors are written one at a time from the
memory-mapped sources, so a conversion needs little memory; values are copied bit for bit (fused q/k/v are split
and joined again, halves swapped and swapped back), so a round trip gives back identical tensors. Output goes to
a temporary folder beside the target, renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

import encoders.clip as clip_lib
import encoders.t5 as t5_lib
from encoders.conditioning import T5_FILES
import mmditx.diffusers_names as transformer_names
import vae.diffusers_names as vae_names
from mmditx.checkpoint import (CheckpointError, open_checkpoint, parse_dtype, write_safetensors_sharded,
                               write_safetensors_streaming)
from mmditx.diffusers_names import diffusers_sd3_kwargs
from mmditx.config import MMDiTXConfig
from mmditx.loading import PREFIX as TRANSFORMER_PREFIX
from mmditx.loading import open_transformer
from vae.loading import PREFIX as VAE_PREFIX
from vae.loading import config_from_shapes, open_vae
from vae.model import SCALE_FACTOR, SHIFT_FACTOR

from .pipeline import ModelFiles

DIFFUSERS_SHARD = 10 * 10**9   # diffusers' and transformers' default max_shard_size ("10GB")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
ENCODERS = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G"}
T5_EMBEDDING, T5_SHARED = t5_lib.EMBEDDING, t5_lib.SHARED


class Tensors:
    """Named tensors from one or more checkpoints: {name: (checkpoint, key there)}, written out by `write`."""

    def __init__(self):
        self.sources: dict[str, tuple[object, str]] = {}

    def add(self, f, prefix: str = "", new_prefix: str = "", rename: Callable[[str], str] = lambda k: k,
            skip: Callable[[str], bool] = lambda k: False) -> "Tensors":
        for key in f.keys():
            if key.startswith(prefix) and not skip(key[len(prefix):]):
                self.sources[new_prefix + rename(key[len(prefix):])] = (f, key)
        return self

    def specs(self, dtype: torch.dtype | None) -> dict:
        return {name: (tuple(f.shape(key)), self._dtype(f.dtype(key), dtype)) for name, (f, key) in self.sources.items()}

    @staticmethod
    def _dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
        return dtype if dtype is not None and stored.is_floating_point and stored.itemsize > 1 else stored

    def produce(self, dtype: torch.dtype | None) -> Callable[[str], torch.Tensor]:
        def tensor(name: str) -> torch.Tensor:
            f, key = self.sources[name]
            t = f.tensor(key)
            return t.to(self._dtype(t.dtype, dtype))
        return tensor

    def write_sharded(self, folder: Path, base: str, max_shard_bytes: int, dtype: torch.dtype | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors_sharded(self.specs(dtype), self.produce(dtype), folder, base, max_shard_bytes)

    def write_file(self, path: Path, dtype: torch.dtype | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors_streaming(self.specs(dtype), self.produce(dtype), path)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _into_place(out: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a fresh folder beside `out`, then rename it to `out` (never a half-written model)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new output folder (nothing is overwritten)")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_tokenizers(src: dict[str, Path | None], out: Path) -> None:
    for name, folder in src.items():
        if folder is not None and folder.is_dir():
            shutil.copytree(folder, out / name)


# -- official -> diffusers ------------------------------------------------------------------------------------

def clip_config(config: clip_lib.CLIPConfig) -> dict:
    """transformers' CLIPTextConfig for CLIPTextModelWithProjection (ids as in the released SD3 folders: eos 2
    makes transformers pool at the argmax of the ids, as the official code does)."""
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            "hidden_act": config.activation, "hidden_size": config.width, "intermediate_size": config.mlp_width,
            "num_attention_heads": config.heads, "num_hidden_layers": config.layers, "projection_dim": config.width,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.positions,
            "layer_norm_eps": config.eps, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def t5_config(config: t5_lib.T5Config) -> dict:
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": config.width, "d_kv": config.head_dim,
            "d_ff": config.ff_width, "num_heads": config.heads, "num_layers": config.blocks,
            "vocab_size": config.vocab_size, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
            "is_gated_act": True, "relative_attention_num_buckets": config.num_buckets,
            "relative_attention_max_distance": config.max_distance, "layer_norm_epsilon": config.eps,
            "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "is_encoder_decoder": False,
            "tie_word_embeddings": False}


def vae_config(c) -> dict:
    levels = len(c.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [c.ch * m for m in c.ch_mult], "layers_per_block": c.num_res_blocks,
            "act_fn": "silu", "latent_channels": c.z_channels, "norm_num_groups": 32, "sample_size": 1024,
            "scaling_factor": SCALE_FACTOR, "shift_factor": SHIFT_FACTOR, "use_quant_conv": False,
            "use_post_quant_conv": False, "force_upcast": True, "mid_block_add_attention": True}


MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def official_files(src: str | os.PathLike, tokenizers: str | os.PathLike | None = None) -> ModelFiles:
    """The pieces of an official release folder (T5 in fp16, else fp8, else none) or of one file that bundles
    the text encoders (tokenizers from `tokenizers`, default its folder)."""
    src = Path(src)
    if src.is_file():
        f = open_checkpoint(src)
        t5 = "fp16" if t5_lib.PREFIXES[1] + "encoder.final_layer_norm.weight" in f else "off"
        return ModelFiles.from_single_file(src, tokenizers, t5=t5)
    if (src / "model_index.json").is_file():
        raise CheckpointError(f"{src}: already a diffusers-format folder (model_index.json): use to-official")
    te = src / "text_encoders"
    t5 = next((k for k in ("fp16", "fp8") if (te / T5_FILES[k]).is_file()), "off")
    return ModelFiles.from_dir(src, t5=t5)


def official_to_diffusers(src: str | os.PathLike, out: str | os.PathLike, tokenizers: str | os.PathLike | None = None,
                          max_shard_bytes: int = DIFFUSERS_SHARD, dtype: torch.dtype | str | None = None) -> Path:
    """Write the model at `src` (see `official_files`) as a diffusers-format folder `out`."""
    files = official_files(src, tokenizers)
    dtype = parse_dtype(dtype)

    def write(tmp: Path) -> None:
        f, prefix = open_transformer(files.model)
        config = MMDiTXConfig.from_shapes(f.shapes(prefix), source=str(f.path))
        Tensors().add(transformer_names.to_diffusers(f, prefix)).write_sharded(
            tmp / "transformer", "diffusion_pytorch_model", max_shard_bytes, dtype)
        _write_json(tmp / "transformer" / "config.json",
                    {"_class_name": "SD3Transformer2DModel", **diffusers_sd3_kwargs(config)})
        f, prefix = open_vae(files.vae or files.model)
        Tensors().add(vae_names.to_diffusers(f, prefix)).write_sharded(
            tmp / "vae", "diffusion_pytorch_model", max_shard_bytes, dtype)
        _write_json(tmp / "vae" / "config.json", vae_config(config_from_shapes(f.shapes(prefix), str(f.path))))
        for folder, what, path in (("text_encoder", "CLIP-L", files.clip_l), ("text_encoder_2", "CLIP-G", files.clip_g)):
            f = open_checkpoint(path)
            prefix = clip_lib.find_clip_prefix(f, what)
            base = clip_lib.CLIP_L if what == "CLIP-L" else clip_lib.CLIP_G
            Tensors().add(f, prefix).write_sharded(tmp / folder, "model", max_shard_bytes, dtype)
            _write_json(tmp / folder / "config.json", clip_config(clip_lib.read_clip_config(f, prefix, base)))
        index = dict(MODEL_INDEX)
        if files.t5 is not None:
            f = open_checkpoint(files.t5)
            prefix, embedding = t5_lib.find_t5(f)
            if any(k.startswith(prefix) and k.endswith(t5_lib.WEIGHT_SCALES) for k in f.keys()):
                raise CheckpointError(f"{f.path}: its T5 is in scaled fp8 (per-tensor scale_weight), which "
                                      "transformers' T5EncoderModel cannot hold: convert without it (no T5 in the "
                                      "source) or from the release's t5xxl_fp16.safetensors")
            Tensors().add(f, prefix, rename=lambda k: T5_SHARED if k == T5_EMBEDDING else k).write_sharded(
                tmp / "text_encoder_3", "model", max_shard_bytes, dtype)
            _write_json(tmp / "text_encoder_3" / "config.json",
                        t5_config(t5_lib.read_t5_config(f, prefix, embedding)))
        else:
            index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
        _write_json(tmp / "model_index.json", index)
        _write_json(tmp / "scheduler" / "scheduler_config.json",
                    {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})
        _copy_tokenizers({"tokenizer": files.tokenizer_l, "tokenizer_2": files.tokenizer_g,
                          "tokenizer_3": files.tokenizer_t5}, tmp)

    return _into_place(Path(out), write)


# -- diffusers -> official ------------------------------------------------------------------------------------

def diffusers_to_official(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | str | None = None,
                          name: str = "sd3.5_medium.safetensors") -> Path:
    """Write the diffusers-format folder `src` as an official release folder `out`: `name` (transformer +
    VAE), text_encoders/clip_l, clip_g and t5xxl_fp16 (or t5xxl_fp8_e4m3fn) .safetensors, tokenizer*/."""
    src = Path(src)
    files = ModelFiles.from_diffusers(src, t5="fp16" if (src / "text_encoder_3").is_dir() else "off")
    dtype = parse_dtype(dtype)

    def write(tmp: Path) -> None:
        transformer, _ = open_transformer(src)
        autoencoder, _ = open_vae(src)
        (Tensors().add(transformer, new_prefix=TRANSFORMER_PREFIX)
         .add(autoencoder, new_prefix=VAE_PREFIX).write_file(tmp / name, dtype))
        te = tmp / "text_encoders"
        for folder, file in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
            f = open_checkpoint(src / folder)
            Tensors().add(f, skip=lambda k: k in clip_lib.IGNORED).write_file(te / f"{file}.safetensors", dtype)
        if files.t5 is not None:
            f = open_checkpoint(src / "text_encoder_3")
            both = T5_EMBEDDING in f and T5_SHARED in f
            t5 = Tensors().add(f, rename=lambda k: T5_EMBEDDING if k == T5_SHARED else k,
                               skip=lambda k: both and k == T5_SHARED)
            stored = {s[1] for s in t5.specs(dtype).values()}
            kind = "fp8" if torch.float8_e4m3fn in stored else "fp16" if torch.float16 in stored else None
            if kind is None:
                raise CheckpointError(f"{f.path}: T5 is stored in {sorted(map(str, stored))}; the release layout "
                                      "has t5xxl_fp16 or t5xxl_fp8_e4m3fn: pass --dtype fp16")
            t5.write_file(te / T5_FILES[kind], dtype)
        _copy_tokenizers({"tokenizer": files.tokenizer_l, "tokenizer_2": files.tokenizer_g,
                          "tokenizer_3": files.tokenizer_t5}, tmp)

    return _into_place(Path(out), write)
