"""The CLIP text transformer, as SD3 uses it: CLIP-L (ViT-L/14) and OpenCLIP bigG (CLIP-G).

A stack of pre-LayerNorm transformer layers with causal self-attention over 77 tokens (token + learned position
embeddings). SD3 reads two things off it:
  hidden: the output of the penultimate layer, *without* the final layer norm         (B, 77, width)
  pooled: the final-layer-normed state at the first end token (argmax of the ids,
          the end token 49407 being the largest id), CLIP-G's projected by
          `text_projection`, CLIP-L's not (official reference and ComfyUI; diffusers
          projects CLIP-L's too)                                                     (B, width)

Module attribute names are the official checkpoint's (text_model.encoder.layers.0.self_attn.q_proj, ...), so
`load_state_dict` needs no renaming table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmditx.checkpoint import (CheckpointError, assign_from_file, build_on_meta, check_keys, expected_shapes,
                               open_checkpoint, parse_dtype)

HEAD_DIM = 64  # both CLIP-L (12 heads x 64) and CLIP-G (20 heads x 64)
NUM_POSITIONS = 77


@dataclass(frozen=True)
class CLIPConfig:
    width: int = 768
    layers: int = 12
    mlp_width: int = 3072
    vocab_size: int = 49408
    positions: int = NUM_POSITIONS
    activation: str = "quick_gelu"   # CLIP-L: x * sigmoid(1.702 x); CLIP-G: exact GELU
    project_pooled: bool = False     # CLIP-G: pooled goes through text_projection
    has_projection: bool = True      # the file holds text_projection.weight (CLIP-L's is unused by SD3)
    eps: float = 1e-5

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM


CLIP_L = CLIPConfig()
CLIP_G = CLIPConfig(width=1280, layers=32, mlp_width=5120, activation="gelu", project_pooled=True)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (CLIP-L was trained with it, so it is part of the model)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Embedding(c.positions, c.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: each token sees itself and the tokens before it."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.heads = c.heads
        self.q_proj = nn.Linear(c.width, c.width)
        self.k_proj = nn.Linear(c.width, c.width)
        self.v_proj = nn.Linear(c.width, c.width)
        self.out_proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))                  # (B, heads, L, 64) each
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)              # scale 1/sqrt(64)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.width, c.mlp_width)
        self.fc2 = nn.Linear(c.mlp_width, c.width)
        self.activation = quick_gelu if c.activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.width, eps=c.eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.width, eps=c.eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """Only holds the layers (the checkpoint names them text_model.encoder.layers.N)."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.width, eps=c.eps)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) -> (penultimate layer output (B, L, D), final-normed last layer output (B, L, D))."""
        x = self.embeddings(ids)                                                   # (B, L, D)
        *first, last = self.encoder.layers
        for layer in first:
            x = layer(x)
        penultimate = x                                                            # SD3's "hidden" (no final norm)
        return penultimate, self.final_layer_norm(last(x))


class CLIPTextModel(nn.Module):
    """CLIP text encoder with SD3 outputs: `model(ids)` -> (hidden (B, L, D), pooled (B, D))."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        if config.project_pooled and not config.has_projection:
            raise ValueError("project_pooled needs a text_projection")
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = nn.Linear(config.width, config.width, bias=False) if config.has_projection else None

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[1] > self.config.positions:
            raise ValueError(f"CLIP takes at most {self.config.positions} tokens, got {ids.shape[1]}: "
                             "tokenize with encoders.CLIPTokenizer, which truncates.")
        hidden, final = self.text_model(ids)
        # The first end token (49407, the largest id) sums up the prompt: CLIP was trained to pool there.
        pooled = final[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]   # (B, D)
        if self.config.project_pooled:
            pooled = self.text_projection(pooled)
        return hidden, pooled


# -- loading ------------------------------------------------------------------------------------------------

# Where each encoder may sit in a file: its own file (official text_encoders/*.safetensors, or a diffusers
# folder's text_encoder*/, saved by transformers under the same names), or a single file that bundles the text
# encoders (sd3_medium_incl_clips*.safetensors, ComfyUI's all-in-one checkpoints).
PREFIXES = {
    "CLIP-L": ("", "text_encoders.clip_l.transformer."),
    "CLIP-G": ("", "text_encoders.clip_g.transformer."),
}
DIFFUSERS_FOLDERS = {"CLIP-L": "text_encoder", "CLIP-G": "text_encoder_2"}
DIFFUSERS_CLASSES = ("CLIPTextModelWithProjection", "CLIPTextModel")
# Keys some CLIP files carry that the model does not need.
IGNORED = ("text_model.embeddings.position_ids", "logit_scale")


def read_clip_config(f, prefix: str, base: CLIPConfig) -> CLIPConfig:
    """Layer count, widths and vocabulary from the tensor shapes; activation and pooling from `base`."""
    shapes = f.shapes(prefix)
    layers = 0
    while f"text_model.encoder.layers.{layers}.layer_norm1.weight" in shapes:
        layers += 1
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    if layers < 2:
        raise CheckpointError(f"{f.path}: found {layers} CLIP layer(s) under '{prefix}text_model.encoder.layers.'; "
                              "SD3 reads the penultimate layer, so at least 2 are needed.")
    mlp = shapes.get("text_model.encoder.layers.0.mlp.fc1.weight", (base.mlp_width,))[0]
    return CLIPConfig(width=width, layers=layers, mlp_width=mlp, vocab_size=vocab,
                      positions=shapes.get("text_model.embeddings.position_embedding.weight", (base.positions,))[0],
                      activation=base.activation, project_pooled=base.project_pooled,
                      has_projection=base.project_pooled or "text_projection.weight" in shapes)


def load_clip(path: str | os.PathLike, base: CLIPConfig, what: str, device: torch.device | str = "cpu",
              dtype: torch.dtype | str | None = torch.float32, check_finite: bool = False) -> CLIPTextModel:
    """Load a CLIP text encoder whose activation and pooling are those of `base` (CLIP_L or CLIP_G) and whose
    width is base.width (or a scaled-down multiple of 64 below 768); the layer count comes from the file."""
    dtype = parse_dtype(dtype)
    f = open_checkpoint(path, DIFFUSERS_FOLDERS.get(what), DIFFUSERS_CLASSES)
    prefix = find_clip_prefix(f, what)
    width = f.shape(prefix + "text_model.embeddings.token_embedding.weight")[-1]
    # A width that belongs to another CLIP is a wrong file; another multiple of 64 under CLIP-L's 768 is a
    # scaled-down model of this layout (the demo model's encoders, test models).
    known = {768: "CLIP-L (use encoders.load_clip_l)", 1280: "CLIP-G (use encoders.load_clip_g)",
             1024: "OpenCLIP ViT-H (SD 2.x), not used by SD3"}
    if width != base.width and (width in known or width % HEAD_DIM or width > CLIP_L.width):
        guess = known.get(width, "not an SD3 text encoder")
        raise CheckpointError(f"{f.path}: this CLIP text encoder has width {width}, but {what} has width "
                              f"{base.width}: the file looks like {guess}.")
    config = read_clip_config(f, prefix, base)
    model = build_on_meta(lambda: CLIPTextModel(config))
    check_keys(f, prefix, expected_shapes(model), f"{what} text encoder", ignore_unexpected=lambda k: k in IGNORED)
    return assign_from_file(model, f, prefix, dtype=dtype, device=device, check_finite=check_finite)


def find_clip_prefix(f, what: str) -> str:
    probe = "text_model.embeddings.token_embedding.weight"
    for prefix in PREFIXES[what]:
        if prefix + probe in f:
            return prefix
    other = "CLIP-G" if what == "CLIP-L" else "CLIP-L"
    hint = ""
    if any(p + probe in f for p in PREFIXES[other][1:]):
        hint = f" The file bundles {other} only: use encoders.load_clip_{other[-1].lower()}."
    elif "encoder.embed_tokens.weight" in f or "shared.weight" in f:
        hint = " It looks like a T5 encoder: use encoders.load_t5."
    tops = sorted({k.split(".")[0] for k in f.keys()})
    raise CheckpointError(f"{f.path}: no {what} text encoder found (looked for "
                          f"{[p + probe for p in PREFIXES[what]]}; the file's top-level names are {tops[:12]}).{hint}")


def clip_units(model: CLIPTextModel) -> list[nn.Module]:
    """The modules of a CLIP model that are called and own all its weights: the units in which
    mmditx.streaming.stream_weights converts them (one layer at a time in memory)."""
    tm = model.text_model
    proj = [model.text_projection] if model.text_projection is not None else []
    return [tm.embeddings, *tm.encoder.layers, tm.final_layer_norm, *proj]


def load_clip_l(path: str | os.PathLike, device: torch.device | str = "cpu",
                dtype: torch.dtype | str | None = torch.float32, check_finite: bool = False) -> CLIPTextModel:
    """CLIP-L from `text_encoders/clip_l.safetensors` (or a file bundling it, or a diffusers folder's
    text_encoder/): 12 layers (read from the file), width 768, quick-GELU.
    `model(ids)` -> (hidden (B, 77, 768), pooled (B, 768), *not* projected, as in the official code).
    dtype None keeps the stored dtype (then, on CPU, the weights are a zero-copy map of the file)."""
    return load_clip(path, CLIP_L, "CLIP-L", device, dtype, check_finite)


def load_clip_g(path: str | os.PathLike, device: torch.device | str = "cpu",
                dtype: torch.dtype | str | None = torch.float32, check_finite: bool = False) -> CLIPTextModel:
    """CLIP-G (OpenCLIP bigG) from `text_encoders/clip_g.safetensors` (or a file bundling it, or a diffusers
    folder's text_encoder_2/): 32 layers, width 1280, GELU.
    `model(ids)` -> (hidden (B, 77, 1280), pooled (B, 1280) projected by text_projection)."""
    return load_clip(path, CLIP_G, "CLIP-G", device, dtype, check_finite)
