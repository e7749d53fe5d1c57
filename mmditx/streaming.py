"""Weights kept small, computed big: run a model whose weights stay in their stored dtype (fp16/bf16, memory-mapped
from the file) and/or on another device, converting one block at a time just before it runs.

    model = load_mmditx("sd3.5_medium.safetensors", dtype=None)      # fp16 as stored, zero copy (4.6 GiB)
    stream_weights(model, device="cpu", dtype=torch.float32)          # computes in fp32, one block upcast at a time
    # or, on a small GPU: weights stay in CPU memory, each block visits the GPU only while it runs
    stream_weights(model, device="cuda", dtype=torch.bfloat16)

A forward pre-hook on each unit (the embedders, every joint block, the final layer) swaps the unit's parameters
for converted copies; a forward hook swaps the stored tensors back, so at most one unit exists in the compute
dtype/device at a time. The converted values are exactly those `load_mmditx(..., dtype=...)` would hold, so the
outputs are bit-identical to a model loaded in the compute dtype (tests/test_streaming.py), at the price of one
conversion of every weight per forward pass.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .checkpoint import convert, parse_dtype


def mmditx_units(model: nn.Module) -> list[nn.Module]:
    """The modules of an MMDiTX that are *called* (so their hooks fire) and own every weight used inside them."""
    return [model.x_embedder, model.t_embedder, model.y_embedder, model.context_embedder,
            *model.joint_blocks, model.final_layer]


class _Swap:
    """Pre-hook: replace a unit's parameters by converted copies. Post-hook: put the stored ones back.
    The model itself is a unit too, for the parameters it owns directly (MMDiTX's positional table): converted
    for its whole forward, so the forward computes in the dtype it finds there and knows nothing of streaming."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.stored: dict[nn.Parameter, torch.Tensor] = {}
        # in-place changes of a converted copy, in order (mmditx.lora adds its deltas here in the frugal mode)
        self.adjust: dict[nn.Parameter, list] = {}

    def before(self, module: nn.Module, args, recurse: bool = True) -> None:
        for p in module.parameters(recurse=recurse):
            if p not in self.stored:
                self.stored[p] = p.data
                dtype = self.dtype if p.is_floating_point() else p.dtype
                p.data = convert(p.data, dtype, self.device, non_blocking=True)
                if self.adjust.get(p):
                    if p.data.data_ptr() == self.stored[p].data_ptr():
                        p.data = p.data.clone()             # never change the stored weights
                    for fn in self.adjust[p]:
                        fn(p.data)

    def after(self, module: nn.Module, args, output, recurse: bool = True) -> None:
        for p in module.parameters(recurse=recurse):
            if p in self.stored:
                p.data = self.stored.pop(p)

    def before_own(self, module: nn.Module, args) -> None:
        self.before(module, args, recurse=False)

    def after_own(self, module: nn.Module, args, output) -> None:
        self.after(module, args, output, recurse=False)


def stream_weights(model: nn.Module, device: torch.device | str | None = None,
                   dtype: torch.dtype | str | None = torch.float32,
                   units: Iterable[nn.Module] | None = None) -> nn.Module:
    """Make `model` compute in `dtype` on `device` while its weights stay as they are (see the module docstring).

    units: the modules converted as one piece (default: `mmditx_units(model)` for an MMDiTX); the model's own
    direct parameters are converted for the whole forward. Inputs are cast by the model as always (to the dtype
    of its converted weights), so they must already be on `device`. Returns the model.
    """
    dtype = parse_dtype(dtype)
    if dtype is None:
        raise ValueError("stream_weights needs a compute dtype (e.g. torch.float32 on CPU, torch.bfloat16 on GPU)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if getattr(model, "_weight_swap", None):
        raise ValueError("stream_weights was already applied to this model")
    units = list(units) if units is not None else mmditx_units(model)
    swap = _Swap(device, dtype)
    handles = [model.register_forward_pre_hook(swap.before_own),
               model.register_forward_hook(swap.after_own, always_call=True)]
    for unit in units:
        handles.append(unit.register_forward_pre_hook(swap.before))
        handles.append(unit.register_forward_hook(swap.after, always_call=True))
    swap.handles = handles
    model._weight_swap = swap
    return model


def stop_streaming(model: nn.Module) -> nn.Module:
    """Undo `stream_weights`: the model computes in its weights' own dtype and device again."""
    swap = getattr(model, "_weight_swap", None)
    if swap is None:
        return model
    if any(swap.adjust.values()):
        raise ValueError("LoRAs were applied to this streamed model: remove them (handle.remove()) before "
                         "stop_streaming, or they would silently disappear")
    for h in swap.handles:
        h.remove()
    model._weight_swap = None
    return model


def streamed_device(model: nn.Module) -> torch.device | None:
    """The device a streamed model computes on (None if it is not streamed)."""
    swap = getattr(model, "_weight_swap", None)
    return swap.device if swap is not None else None


def weight_adjustments(model: nn.Module) -> dict[nn.Parameter, list] | None:
    """{parameter: [fn(converted_weight) -> None, ...]} of a streamed model (None if it is not streamed):
    each fn changes the freshly converted copy in place, in order, before its unit runs."""
    swap = getattr(model, "_weight_swap", None)
    return swap.adjust if swap is not None else None
