"""Layer-by-layer comparison of two runs: record named stage outputs with forward hooks, tabulate the errors.

The reference tests use the same machinery (tests/mmditx_oracle.py) as `scripts/compare.py`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Recorder:
    """Forward hooks that store (a picked part of) module outputs under stage names; a context manager."""

    def __init__(self):
        self.out: dict[str, torch.Tensor] = {}
        self._handles = []

    def watch(self, name: str, module: nn.Module, pick: Callable = lambda o: o) -> "Recorder":
        def hook(m, args, output):
            value = pick(output)
            if value is not None:
                self.out[name] = value.detach()
        self._handles.append(module.register_forward_hook(hook))
        return self

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def watch_mmditx(model, rec: Recorder | None = None) -> Recorder:
    """Our transformer's stages: embedders, each block's context and image streams, final layer."""
    rec = rec or Recorder()
    for name in ("x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer"):
        rec.watch(name, getattr(model, name))
    for i, block in enumerate(model.joint_blocks):
        rec.watch(f"block{i}.context", block, lambda o: o[0])
        rec.watch(f"block{i}.x", block, lambda o: o[1])
    return rec


def watch_diffusers_sd3(ref, rec: Recorder | None = None) -> Recorder:
    """The same stages in diffusers' SD3Transformer2DModel, under our stage names."""
    rec = rec or Recorder()
    rec.watch("x_embedder", ref.pos_embed.proj, lambda o: o.flatten(2).transpose(1, 2))
    rec.watch("t_embedder", ref.time_text_embed.timestep_embedder)
    rec.watch("y_embedder", ref.time_text_embed.text_embedder)
    rec.watch("context_embedder", ref.context_embedder)
    for i, block in enumerate(ref.transformer_blocks):
        rec.watch(f"block{i}.context", block, lambda o: o[0])
        rec.watch(f"block{i}.x", block, lambda o: o[1])
    rec.watch("final_layer", ref.proj_out)
    return rec



def watch_t5(model, rec: Recorder | None = None) -> Recorder:
    """A T5 encoder's stages in the official naming (ours and transformers' T5EncoderModel alike): the token
    embedding, every block's output, the final norm."""
    rec = rec or Recorder()
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731 (transformers' blocks return tuples)
    rec.watch("embed_tokens", model.get_submodule("encoder.embed_tokens"))
    for i, block in enumerate(model.get_submodule("encoder.block")):
        rec.watch(f"block{i}", block, first)
    rec.watch("final_layer_norm", model.get_submodule("encoder.final_layer_norm"))
    return rec


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|: the error relative to the reference's scale."""
    a, ref = a.float(), ref.float()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def error_table(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[dict]:
    """One row per stage present in both runs, in `a`'s recording order."""
    rows = []
    for name, x in a.items():
        if name not in b:
            continue
        y = b[name]
        if x.shape != y.shape:
            rows.append({"stage": name, "shape": tuple(x.shape), "error": f"shape differs: {tuple(y.shape)}"})
            continue
        d = (x.float() - y.float()).abs()
        rows.append({"stage": name, "shape": tuple(x.shape), "max_abs": d.max().item(),
                     "mean_abs": d.mean().item(), "rel": rel_error(x, y), "scale": y.float().abs().max().item()})
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'stage':<18} {'shape':<22} {'max abs err':>12} {'mean abs err':>12} {'rel (max)':>10} {'ref scale':>10}")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['stage']:<18} {str(r['shape']):<22} {r['error']}")
        else:
            lines.append(f"{r['stage']:<18} {str(r['shape']):<22} {r['max_abs']:>12.3e} {r['mean_abs']:>12.3e} "
                         f"{r['rel']:>10.2e} {r['scale']:>10.3g}")
    return "\n".join(lines)
