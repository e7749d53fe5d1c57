"""The T5 v1.1 encoder (T5-XXL for SD3): 24 blocks, width 4096, 64 heads of 64, gated-GELU feed-forward of 10240.

What sets T5 apart from a textbook transformer:
  - no position embeddings: a learned bias per head, indexed by the bucketed distance between query and key,
    is added to the attention scores. Only block 0 holds its table; the bias is computed there once and reused
    by every block;
  - no 1/sqrt(d) scaling of the scores (folded into the weights at training time);
  - RMSNorm without bias or mean subtraction ("T5LayerNorm"), computed in fp32;
  - feed-forward gelu_tanh(wi_0 x) * (wi_1 x) -> wo, no biases anywhere.
SD3 uses the output after the final norm, without an attention mask (padding tokens are attended to).

Weights may be kept in a lower precision than the computation (fp8 for t5xxl_fp8_e4m3fn.safetensors, or fp16
mapped from the file): `CastLinear`/`CastEmbedding` upcast one matrix at a time as it is used, so only one
layer's weights ever exist in the compute dtype. ComfyUI's "scaled fp8" files (t5xxl_fp8_e4m3fn_scaled, the
T5 inside sd3.5_*_incl_clips_t5xxlfp8scaled) store each linear layer's weight in fp8 divided by a per-tensor
`scale_weight` (fp32, a marker key `scaled_fp8` beside them): the upcast multiplies it back, as ComfyUI does
(`weight.to(dtype) * scale_weight.to(dtype)`, comfy/ops.py).

Module attribute names are the official checkpoint's (encoder.block.0.layer.0.SelfAttention.q, ...).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmditx.checkpoint import (CheckpointError, assign_from_file, build_on_meta, check_keys, convert, expected_shapes,
                               open_checkpoint, parse_dtype)

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    width: int = 4096          # d_model
    heads: int = 64
    head_dim: int = 64         # d_kv
    ff_width: int = 10240      # d_ff
    blocks: int = 24
    num_buckets: int = 32
    max_distance: int = 128    # not stored in the file: T5's constant
    eps: float = 1e-6


T5_XXL = T5Config()


class CastLinear(nn.Linear):
    """A bias-free Linear whose weight may be stored in a smaller dtype (fp8, fp16) than the input's: it is
    upcast for this one product, so low-precision weights never exist in full precision all at once.
    `weight_scale` (scaled fp8; not saved with the weights): the stored weight times it is the true weight."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("weight_scale", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype:
            w = convert(w, x.dtype, w.device)
            if self.weight_scale is not None:
                w.mul_(self.weight_scale.to(x.dtype))
        elif self.weight_scale is not None:
            w = w * self.weight_scale.to(x.dtype)
        return F.linear(x, w)


class CastEmbedding(nn.Embedding):
    """Embedding lookup that returns `dtype` rows whatever the stored dtype (only the looked-up rows are cast)."""

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[ids].to(dtype)


class T5LayerNorm(nn.Module):
    """RMSNorm with a gain and no bias, in fp32 whatever the compute dtype (T5's activations grow large)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 buckets of (key - query) distances: half the buckets for each direction; within one,
    distances below num_buckets/4 get their own bucket, larger ones share logarithmically wider buckets
    up to max_distance, beyond which all fall into the last."""
    num_buckets //= 2
    bucket = (relative_position > 0).long() * num_buckets            # keys after the query: upper half
    n = relative_position.abs()
    max_exact = num_buckets // 2
    log_ratio = torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


class T5Attention(nn.Module):
    def __init__(self, c: T5Config, has_relative_bias: bool):
        super().__init__()
        self.heads, self.head_dim, self.c = c.heads, c.head_dim, c
        inner = c.heads * c.head_dim
        self.q = CastLinear(c.width, inner)
        self.k = CastLinear(c.width, inner)
        self.v = CastLinear(c.width, inner)
        self.o = CastLinear(inner, c.width)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(c.num_buckets, c.heads)

    def position_bias(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """(1, heads, L, L) additive score bias from the bucketed (key - query) distance."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.c.num_buckets, self.c.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).to(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))                               # (B, heads, L, 64) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)     # no 1/sqrt(d) in T5
        return self.o(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, c: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_bias)
        self.layer_norm = T5LayerNorm(c.width, c.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5GatedFeedForward(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.wi_0 = CastLinear(c.width, c.ff_width)
        self.wi_1 = CastLinear(c.width, c.ff_width)
        self.wo = CastLinear(c.ff_width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5FeedForwardLayer(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(c)  # the checkpoint's name, from T5 v1.0's ReLU
        self.layer_norm = T5LayerNorm(c.width, c.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, c: T5Config, has_relative_bias: bool):
        super().__init__()
        # layer.0 / layer.1: the checkpoint numbers the two residual branches.
        self.layer = nn.ModuleList([T5SelfAttentionLayer(c, has_relative_bias), T5FeedForwardLayer(c)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.embed_tokens = CastEmbedding(c.vocab_size, c.width)
        self.block = nn.ModuleList(T5Block(c, has_relative_bias=(i == 0)) for i in range(c.blocks))
        self.final_layer_norm = T5LayerNorm(c.width, c.eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        dtype = self.final_layer_norm.weight.dtype                                # the compute dtype
        x = self.embed_tokens(ids, dtype)                                         # (B, L, D)
        bias = self.block[0].layer[0].SelfAttention.position_bias(ids.shape[1], dtype)  # (1, heads, L, L)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)                                           # (B, L, D)


class T5Encoder(nn.Module):
    """`model(ids)` (B, L) -> hidden (B, L, width) after the final norm, no attention mask (as SD3 uses it)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.encoder = T5Stack(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids)


# -- loading ------------------------------------------------------------------------------------------------

PREFIXES = ("", "text_encoders.t5xxl.transformer.")
EMBEDDING = "encoder.embed_tokens.weight"
SHARED = "shared.weight"  # what transformers' T5EncoderModel calls the same (tied) table
# Scaled fp8 (ComfyUI): `LAYER.scale_weight` per linear layer (newer files: `LAYER.weight_scale` with a
# `LAYER.comfy_quant` JSON note); the input scales and the markers serve fp8 matrix products only.
WEIGHT_SCALES = (".scale_weight", ".weight_scale")
SCALED_FP8_EXTRAS = ("scaled_fp8", ".scale_input", ".input_scale", ".comfy_quant")


def _is_matrix(name: str) -> bool:
    """The large weights that may stay in a low-precision storage dtype (everything but norms and the bias table)."""
    return name == EMBEDDING or (name.endswith(".weight") and "layer_norm" not in name
                                 and "relative_attention_bias" not in name)


def read_t5_config(f, prefix: str, embedding_key: str) -> T5Config:
    shapes = f.shapes(prefix)
    blocks = 0
    while f"encoder.block.{blocks}.layer.0.SelfAttention.q.weight" in shapes:
        blocks += 1
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
        raise CheckpointError(f"{f.path}: this is a T5 v1.0 encoder (ReLU feed-forward 'DenseReluDense.wi'); "
                              "SD3 uses T5 v1.1 XXL (gated-GELU, 'wi_0'/'wi_1'): use t5xxl_fp16.safetensors.")
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if bias_key not in shapes or blocks == 0:
        raise CheckpointError(f"{f.path}: no T5 encoder blocks found (looked for '{prefix}{bias_key}' and "
                              f"'{prefix}encoder.block.N.*'). Is this a T5 encoder checkpoint?")
    vocab, width = f.shape(embedding_key)
    buckets, heads = shapes[bias_key]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    ff = shapes.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", (T5_XXL.ff_width,))[0]
    return T5Config(vocab_size=vocab, width=width, heads=heads, head_dim=inner // heads, ff_width=ff,
                    blocks=blocks, num_buckets=buckets)


def load_t5(path: str | os.PathLike, device: torch.device | str = "cpu",
            dtype: torch.dtype | str = torch.float32,
            weight_dtype: torch.dtype | str | None = None, check_finite: bool = False) -> T5Encoder:
    """T5-XXL from `text_encoders/t5xxl_fp16.safetensors` or `t5xxl_fp8_e4m3fn.safetensors` (the block count is
    read from the file; the embedding may be named `encoder.embed_tokens.weight` or `shared.weight`), from a
    file that bundles it (`text_encoders.t5xxl.transformer.*`, also in ComfyUI's scaled fp8), or from a
    diffusers folder's text_encoder_3/ (sharded as transformers saves it).

    dtype: the compute dtype (activations, norms, position bias): fp32 on CPU; bf16 on GPU (T5's activations
        overflow fp16).
    weight_dtype: how the large matrices are kept in memory. None: as stored when that is smaller than `dtype`
        (fp8 stays fp8; fp16 stays fp16 under fp32 compute, zero-copy mapped from the file on CPU), else
        `dtype`. "fp8" quantizes an fp16 file on load. Matrices smaller than `dtype` are upcast one at a time
        while computing, so encoding needs about their stored size plus one layer in `dtype`.
    """
    dtype = parse_dtype(dtype)
    weight_dtype = parse_dtype(weight_dtype)
    if dtype is None or dtype in FP8:
        raise ValueError(f"dtype is the compute dtype (fp32, bf16 or fp16), not {dtype}; "
                         "use weight_dtype='fp8' to keep the weights in fp8")
    device = torch.device(device)
    f = open_checkpoint(path, "text_encoder_3", ("T5EncoderModel",))
    prefix, embedding_key = find_t5(f)
    config = read_t5_config(f, prefix, embedding_key)
    model = build_on_meta(lambda: T5Encoder(config))
    expected = expected_shapes(model)
    embedding_name = embedding_key[len(prefix):]
    # check_keys against the file's spelling of the embedding, the other spelling of a tied copy is ignored.
    file_names = {(embedding_name if k == EMBEDDING else k): v for k, v in expected.items()}
    scales = {k[len(prefix):] for k in f.keys() if k.startswith(prefix) and k.endswith(WEIGHT_SCALES)}
    check_keys(f, prefix, file_names, "T5 v1.1 encoder",
               ignore_unexpected=lambda k: k in (SHARED, EMBEDDING) or k in scales or k.endswith(SCALED_FP8_EXTRAS))

    def dtype_of(name: str, stored: torch.dtype) -> torch.dtype:
        if _is_matrix(name):
            return weight_dtype or (stored if stored.itemsize < dtype.itemsize else dtype)
        return dtype

    model = assign_from_file(model, f, prefix, device=device, dtype_of=dtype_of,
                             rename=lambda k: embedding_name if k == EMBEDDING else k, check_finite=check_finite)
    for name, module in model.named_modules():
        for suffix in WEIGHT_SCALES:
            if isinstance(module, CastLinear) and name + suffix in scales:
                module.weight_scale = convert(f.tensor(prefix + name + suffix).reshape(()), torch.float32, device)
                scales.discard(name + suffix)
    if scales:
        raise CheckpointError(f"{f.path}: weight scales for layers that are not linear layers of T5: "
                              f"{sorted(prefix + k for k in scales)[:4]}. Only scaled-fp8 linear weights are supported.")
    return model


def find_t5(f) -> tuple[str, str]:
    """(prefix, full key of the token embedding)."""
    for prefix in PREFIXES:
        for name in (EMBEDDING, SHARED):
            if prefix + name in f and prefix + "encoder.final_layer_norm.weight" in f:
                return prefix, prefix + name
    hint = ""
    if "text_model.embeddings.token_embedding.weight" in f:
        hint = " It looks like a CLIP text encoder: use encoders.load_clip_l or encoders.load_clip_g."
    elif any(k.startswith("decoder.") for k in f.keys()):
        hint = " It holds a T5 decoder but no encoder."
    tops = sorted({k.split(".")[0] for k in f.keys()})
    raise CheckpointError(f"{f.path}: no T5 encoder found (looked for '{EMBEDDING}' or '{SHARED}' with "
                          f"'encoder.final_layer_norm.weight'; the file's top-level names are {tops[:12]}).{hint}")
