"""Looking inside MMDiT-X while it runs: streams, adaLN modulation, attention probabilities, statistics.

    with Trace(model, blocks=[10, 12], attention=True) as trace:
        v = model(x, t, context=context, y=y)
    rec = trace.records[(0, 12)]                 # (step, block)
    rec["stats"]["x_out"]                        # {'rms', 'max_abs', 'nan', 'inf'}
    rec["modulation"]["x"]["gate_msa"]           # (B, D)
    rec["attention"]["image_to_text"]            # (B, L_img, L_ctx), averaged over heads

Tracing only *observes* through forward hooks: the model runs exactly the same kernels on the same values, so
its outputs are bit-identical with tracing on or off, and with no Trace active nothing is hooked (no cost).
Attention probabilities are recomputed on the side from the hooked q and k (the fused kernel never materializes
them), in fp32, head by head to bound memory.

A "step" is one call of the model's forward (set `trace.step` yourself, e.g. from a sampler callback, when one
sampling step calls the model more than once, as skip-layer guidance does).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import torch


def tensor_stats(t: torch.Tensor) -> dict[str, float]:
    """Cheap per-tensor statistics: RMS, max |value| over finite entries, NaN and inf counts."""
    t = t.detach().float()
    finite = torch.isfinite(t)
    vals = t[finite]
    return {
        "rms": vals.pow(2).mean().sqrt().item() if vals.numel() else float("nan"),
        "max_abs": vals.abs().max().item() if vals.numel() else float("nan"),
        "nan": int(torch.isnan(t).sum()),
        "inf": int(torch.isinf(t).sum()),
    }


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: str = "mean") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) for (B, H, Lq, d) x (B, H, Lk, d) -> (B, Lq, Lk) averaged over heads
    (heads='mean') or (B, H, Lq, Lk) (heads='all'). Computed in fp32, one head at a time."""
    B, H, Lq, d = q.shape
    scale = 1.0 / math.sqrt(d)
    out = None
    for h in range(H):
        p = torch.softmax((q[:, h].float() @ k[:, h].float().transpose(1, 2)) * scale, dim=-1)
        if heads == "all":
            out = p.new_empty(B, H, Lq, k.shape[2]) if out is None else out
            out[:, h] = p
        else:
            out = p / H if out is None else out.add_(p / H)
    return out


class Trace:
    """Record what happens inside chosen blocks of an `MMDiTX` (a context manager).

    blocks:      block indices to record (default: all).
    steps:       step indices to record (default: all).
    tensors:     also keep the full stream tensors entering and leaving each block (memory: 4 x (B, L, D)).
    modulation:  keep the adaLN shift/scale/gate vectors per stream (small: (B, D) each).
    attention:   keep the joint-attention probabilities split into image->text, text->image, image->image,
                 text->text parts, and the dual-attention (attn2) probabilities. heads='mean' averages over
                 heads (B, Lq, Lk); heads='all' keeps them (B, H, Lq, Lk): large at high resolution.
    Statistics (RMS, max, NaN/inf counts) of every stream in and out are always recorded for the chosen blocks.
    """

    def __init__(self, model, blocks: Iterable[int] | None = None, steps: Iterable[int] | None = None,
                 tensors: bool = False, modulation: bool = True, attention: bool = False, heads: str = "mean"):
        if heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all', not {heads!r}")
        depth = len(model.joint_blocks)
        self.blocks = set(range(depth)) if blocks is None else set(blocks)
        if not self.blocks <= set(range(depth)):
            raise ValueError(f"blocks {sorted(self.blocks - set(range(depth)))} outside the model's 0..{depth - 1}")
        self.model, self.steps = model, None if steps is None else set(steps)
        self.tensors, self.modulation, self.attention, self.heads = tensors, modulation, attention, heads
        self.records: dict[tuple[int, int], dict] = defaultdict(dict)
        self.step = -1
        self._auto_step = True
        self._context_len: dict[int, int] = {}
        self._handles = []

    # -- the hooks ---------------------------------------------------------------------------------------
    def _active(self, block: int) -> bool:
        return block in self.blocks and (self.steps is None or self.step in self.steps)

    def _rec(self, block: int) -> dict:
        return self.records[(self.step, block)]

    def _on_model(self, module, args, kwargs):
        if self._auto_step:
            self.step += 1

    def _on_block_in(self, i):
        def hook(module, args):
            context, x = args[:2]                     # (context, x, c[, key_bias])
            self._context_len[i] = context.shape[1]
            if self._active(i):
                rec = self._rec(i)
                rec["stats"] = {"context_in": tensor_stats(context), "x_in": tensor_stats(x)}
                if self.tensors:
                    rec["context_in"], rec["x_in"] = context.detach().clone(), x.detach().clone()
        return hook

    def _on_block_out(self, i):
        def hook(module, args, output):
            if self._active(i):
                context, x = output
                rec = self._rec(i)
                rec["stats"]["x_out"] = tensor_stats(x)
                if context is not None:
                    rec["stats"]["context_out"] = tensor_stats(context)
                if self.tensors:
                    rec["x_out"] = x.detach().clone()
                    rec["context_out"] = None if context is None else context.detach().clone()
        return hook

    def _on_modulation(self, i, stream, names):
        """names: the stream's modulation layout (mmditx.blocks.modulation_names)."""
        def hook(module, args, output):
            if self._active(i):
                chunks = output.detach().chunk(len(names), dim=-1)
                self._rec(i).setdefault("modulation", {})[stream] = dict(zip(names, chunks))
        return hook

    def _on_joint_attention(self, i):
        def hook(module, args):
            if self._active(i):
                if len(args) > 3:
                    raise ValueError("attention maps need the full context: trace without context_repeats")
                q, k, _ = args
                p, Lc = attention_probs(q, k, self.heads), self._context_len[i]
                self._rec(i)["attention"] = {
                    "text_to_text": p[..., :Lc, :Lc], "text_to_image": p[..., :Lc, Lc:],
                    "image_to_text": p[..., Lc:, :Lc], "image_to_image": p[..., Lc:, Lc:],
                }
        return hook

    def _on_attention2(self, i):
        def hook(module, args):
            if self._active(i):
                q, k, _ = args
                self._rec(i)["attention2"] = attention_probs(q, k, self.heads)
        return hook

    # -- context manager -----------------------------------------------------------------------------------
    def __enter__(self) -> "Trace":
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for i, block in enumerate(self.model.joint_blocks):
            if i not in self.blocks:
                continue
            h.append(block.register_forward_pre_hook(self._on_block_in(i)))
            h.append(block.register_forward_hook(self._on_block_out(i)))
            if self.modulation:
                for stream, part in (("context", block.context_block), ("x", block.x_block)):
                    hook = self._on_modulation(i, stream, part.modulation_names)
                    h.append(part.adaLN_modulation.register_forward_hook(hook))
            if self.attention:
                h.append(block.joint_attn.register_forward_pre_hook(self._on_joint_attention(i)))
                if block.x_attn2 is not None:
                    h.append(block.x_attn2.register_forward_pre_hook(self._on_attention2(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_step(self, step: int) -> None:
        """Number steps yourself (e.g. from a sampler callback); disables counting model calls."""
        self._auto_step = False
        self.step = step

    def summary(self) -> str:
        """A per-(step, block) table of the image/context stream statistics."""
        lines = [f"{'step':>4} {'block':>5} {'stream':<12} {'rms':>10} {'max_abs':>10} {'nan':>5} {'inf':>5}"]
        for (step, block), rec in sorted(self.records.items()):
            for name, s in rec.get("stats", {}).items():
                lines.append(f"{step:>4} {block:>5} {name:<12} {s['rms']:>10.4g} {s['max_abs']:>10.4g} "
                             f"{s['nan']:>5} {s['inf']:>5}")
        return "\n".join(lines)
