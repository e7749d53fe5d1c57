"""SD3 prompt conditioning: prompts -> (context, pooled) for the MMDiT-X transformer.

    context = [ pad_to_4096( CLIP-L hidden (77 x 768) ++ CLIP-G hidden (77 x 1280) )   77 tokens
                T5 hidden (T x 4096), or zeros (77 x 4096) without T5 ]               + T tokens along the sequence
    pooled  = CLIP-L pooled (768) ++ CLIP-G pooled (1280)                                2048

`++` concatenates features. This is the official sd3 code's `get_cond`, plus the zeros for a missing T5.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from mmditx.checkpoint import compute_dtype, parse_dtype
from mmditx.streaming import streamed_device, stream_weights

from .clip import CLIPTextModel, clip_units, load_clip_g, load_clip_l
from .t5 import T5Encoder, load_t5
from .tokenizers import T5_MIN_LENGTH, CLIPTokenizer, T5Tokenizer

CONTEXT_WIDTH = 4096                 # T5-XXL's width; the CLIP features are zero-padded to it
T5_FILES = {"fp16": "t5xxl_fp16.safetensors", "fp8": "t5xxl_fp8_e4m3fn.safetensors"}   # in text_encoders/
T5_MODES = ("fp16", "fp8", "off")


def check_t5_mode(t5: str) -> str:
    if t5 not in T5_MODES:
        raise ValueError(f"t5 must be 'fp16', 'fp8' or 'off', not {t5!r}")
    return t5


def release_text_files(root: str | os.PathLike, t5: str = "fp16") -> dict[str, Path | None]:
    """The text part of a folder laid out like the official release, as `TextConditioner.from_files` takes it:
    text_encoders/{clip_l,clip_g}.safetensors, text_encoders/t5xxl_fp16.safetensors (t5="fp16") or
    t5xxl_fp8_e4m3fn.safetensors (t5="fp8"), or no T5 (t5="off"); tokenizer/ (CLIP-L), tokenizer_2/ (CLIP-G),
    tokenizer_3/ (T5). The one reader of that layout (sampling.pipeline.ModelFiles adds the model file)."""
    check_t5_mode(t5)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist")
    te = root / "text_encoders"
    t5_path = None if t5 == "off" else te / T5_FILES[t5]
    if t5_path is not None and not t5_path.is_file():
        other = "fp8" if t5 == "fp16" else "fp16"
        there = (te / T5_FILES[other]).is_file()
        hint = f" ({T5_FILES[other]} is there: use t5='{other}', --t5 {other})" if there else ""
        raise FileNotFoundError(f"{t5_path} not found{hint}; or run without T5 (t5='off', --t5 off)")
    files = dict(clip_l=te / "clip_l.safetensors", clip_g=te / "clip_g.safetensors", t5=t5_path,
                 tokenizer_l=root / "tokenizer", tokenizer_g=root / "tokenizer_2",
                 tokenizer_t5=None if t5 == "off" else root / "tokenizer_3")
    for p in (files["clip_l"], files["clip_g"]):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (the official release has text_encoders/{p.name})")
    return files


class TextConditioner:
    """The three text encoders with their tokenizers. `encode(prompts)` -> (context, pooled).

    Built by `from_model_dir` (the official release layout) or `from_files`; `t5=None` runs without T5
    (its part of the context is zeros: faster and ~5-10 GB lighter, but the prompt reaches the image only
    through CLIP's 77 tokens, so long prompts, text rendering and prompt adherence suffer).
    """

    def __init__(self, clip_l: CLIPTextModel, clip_g: CLIPTextModel, t5: T5Encoder | None,
                 tokenizer_l: CLIPTokenizer, tokenizer_g: CLIPTokenizer, tokenizer_t5: T5Tokenizer | None):
        if (t5 is None) != (tokenizer_t5 is None):
            raise ValueError("give both the T5 encoder and its tokenizer, or neither (to run without T5)")
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer_l, self.tokenizer_g, self.tokenizer_t5 = tokenizer_l, tokenizer_g, tokenizer_t5
        # A tokenizer that hands out ids its encoder has no embedding for would fail deep inside (or, on a GPU,
        # read other memory): check that they belong together.
        pairs = [("CLIP-L", tokenizer_l.max_id, clip_l.text_model.embeddings.token_embedding),
                 ("CLIP-G", tokenizer_g.max_id, clip_g.text_model.embeddings.token_embedding)]
        if t5 is not None:
            pairs.append(("T5", tokenizer_t5.sp.vocab_size() - 1, t5.encoder.embed_tokens))
        for what, max_id, embedding in pairs:
            if max_id >= embedding.num_embeddings:
                raise ValueError(f"the {what} tokenizer has token ids up to {max_id}, but the {what} text encoder "
                                 f"embeds only {embedding.num_embeddings} tokens: the tokenizer files and the "
                                 "checkpoint do not belong together")

    @classmethod
    def from_files(cls, clip_l: str | os.PathLike, clip_g: str | os.PathLike, t5: str | os.PathLike | None,
                   tokenizer_l: str | os.PathLike, tokenizer_g: str | os.PathLike,
                   tokenizer_t5: str | os.PathLike | None, device: torch.device | str = "cpu",
                   dtype: torch.dtype | str | None = torch.float32, stream: bool = False,
                   check_finite: bool = False,
                   t5_weight_dtype: torch.dtype | str | None = None) -> "TextConditioner":
        """Load from explicit paths: checkpoint files, tokenizer folders (vocab.json + merges.txt; spiece.model
        or its folder). t5=None: without T5. dtype None means fp32 on CPU, bf16 on GPU. T5 computes in `dtype`
        except fp16, where its activations overflow: it computes in fp32 then, with the weights kept in fp16
        (or fp8) as stored. stream=True keeps the CLIP weights as stored too (fp16, memory-mapped, on the CPU),
        converted to `dtype` on `device` one layer at a time (mmditx.streaming): same results, ~half the memory.
        t5_weight_dtype: how T5's matrices are kept (see `load_t5`'s weight_dtype; "fp8" quantizes on load)."""
        dtype = parse_dtype(dtype) or compute_dtype(device)
        # Tokenizers first: a missing tokenizer file is reported before minutes of loading.
        tok_l = CLIPTokenizer(tokenizer_l, pad_with_end=True)
        tok_g = CLIPTokenizer(tokenizer_g, pad_with_end=False)
        tok_t5 = None
        if t5 is not None:
            if tokenizer_t5 is None:
                raise ValueError(f"a T5 checkpoint ({t5}) needs its tokenizer: pass tokenizer_t5 (tokenizer_3/)")
            tok_t5 = T5Tokenizer(tokenizer_t5)
        t5_dtype = torch.float32 if dtype == torch.float16 else dtype
        encoder_t5 = None if t5 is None else load_t5(t5, device=device, dtype=t5_dtype, weight_dtype=t5_weight_dtype,
                                                     check_finite=check_finite)
        clips = []
        for load, path in ((load_clip_l, clip_l), (load_clip_g, clip_g)):
            if stream:
                model = load(path, device="cpu", dtype=None, check_finite=check_finite)
                clips.append(stream_weights(model, device, dtype, units=clip_units(model)))
            else:
                clips.append(load(path, device=device, dtype=dtype, check_finite=check_finite))
        return cls(*clips, encoder_t5, tok_l, tok_g, tok_t5)

    @classmethod
    def from_model_dir(cls, root: str | os.PathLike, t5: str = "fp16", device: torch.device | str = "cpu",
                       dtype: torch.dtype | str | None = torch.float32, stream: bool = False) -> "TextConditioner":
        """Load from a directory laid out like the official release (see `release_text_files`): t5="fp16",
        "fp8" (kept in fp8: half the memory) or "off" (no T5)."""
        return cls.from_files(**release_text_files(root, t5), device=device, dtype=dtype, stream=stream)

    @property
    def device(self) -> torch.device:
        return streamed_device(self.clip_l) or self.clip_l.text_model.final_layer_norm.weight.device

    @torch.no_grad()
    def encode(self, prompts: str | list[str], t5_length: int | None = None,
               t5_tokens: int = T5_MIN_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B of them) -> context (B, 77 + T, 4096), pooled (B, 2048), in the CLIP encoders' dtype.

        T, the T5 token count, is the batch's longest prompt (at least 77), or `t5_length` when given, so that
        a prompt and a negative prompt encoded apart can be batched (pass the same `t5_length`, or encode both
        lists in one call). Without T5, T = 77 of zeros. Every row is padded with T5's pad token 0 to T, as the
        official code pads a single prompt to 77: prompts under 77 T5 tokens get exactly the official result.
        t5_tokens > 77 (up to 512, diffusers' `max_sequence_length`): T5 reads each whole prompt (no 226-character
        cut), cut to and padded to exactly t5_tokens tokens, so T = t5_tokens. Without T5 it changes nothing.
        """
        device = self.device
        hidden_l, pooled_l = self.clip_l(self.tokenizer_l(prompts).to(device))     # (B, 77, 768), (B, 768)
        hidden_g, pooled_g = self.clip_g(self.tokenizer_g(prompts).to(device))     # (B, 77, 1280), (B, 1280)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)                              # (B, 77, 2048)
        clip = F.pad(clip, (0, CONTEXT_WIDTH - clip.shape[-1]))                     # (B, 77, 4096)
        if self.t5 is None:
            t5 = clip.new_zeros(clip.shape[0], t5_length or T5_MIN_LENGTH, CONTEXT_WIDTH)
        else:
            if t5_tokens != T5_MIN_LENGTH:
                ids = self.tokenizer_t5(prompts, max_length=t5_tokens)
            else:
                ids = self.tokenizer_t5(prompts, min_length=t5_length)
            if t5_length is not None and ids.shape[1] > t5_length:
                raise ValueError(f"a prompt has {ids.shape[1]} T5 tokens, more than t5_length={t5_length}")
            t5 = self.t5(ids.to(device)).to(clip.dtype)                            # (B, T, 4096)
        context = torch.cat([clip, t5], dim=1)                                      # (B, 77 + T, 4096)
        pooled = torch.cat([pooled_l, pooled_g], dim=-1)                            # (B, 2048)
        return context, pooled

    def encode_pair(self, prompts: list[str], negatives: list[str], t5_tokens: int = T5_MIN_LENGTH):
        """(prompts' (context, pooled), negatives' (context, pooled)) with one T5 length, ready to batch for CFG:
        one `encode` call, so prompt and negative share the T5 length."""
        prompts, negatives = list(prompts), list(negatives)
        context, pooled = self.encode(prompts + negatives, t5_tokens=t5_tokens)
        n = len(prompts)
        return (context[:n], pooled[:n]), (context[n:], pooled[n:])
