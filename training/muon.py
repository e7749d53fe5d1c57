"""Muon: momentum whose update matrix is orthogonalised, for the 2-D weights of hidden layers.

The algorithm is torch.optim.Muon's (Keller Jordan's Muon, 2024): Nesterov momentum, the update pushed towards
the nearest semi-orthogonal matrix by a quintic Newton-Schulz iteration in bf16, decoupled weight decay, and the
step scaled to AdamW's RMS (Moonshot's "match_rms_adamw", "Muon is Scalable for LLM Training") so that one
learning rate and weight decay serve Muon and AdamW. What differs: matrices of one shape are orthogonalised
together, one batched product per shape. The demo's MMDiT-X has 107 small matrices in 7 shapes; on a 2-core CPU
one step of torch's one-by-one loop takes 0.20-0.21 s, batched 0.09-0.10 s, AdamW over the same weights 0.033 s,
beside a 0.36 s forward and backward (`scripts/benchmark.py muon`). tests/test_training_loop.py checks it against
torch.optim.Muon.
"""
from __future__ import annotations

from collections import defaultdict

import torch

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)   # the quintic's coefficients: steepest at zero (Jordan)


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """What Muon steps in an MMDiT-X: the joint blocks' 2-D weights (not LoRA factors); embedders, the final
    layer, norms and biases stay with AdamW, as Muon's authors prescribe."""
    return p.ndim == 2 and name.startswith("joint_blocks.") and ".lora_" not in name


def orthogonalise(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """(N, A, B) -> (N, A, B) in bf16: each matrix as U S' V^T, S' within about [0.5, 1.5] (not exactly 1: more
    slope at zero, fewer steps)."""
    x = g.bfloat16()
    tall = x.shape[-2] > x.shape[-1]
    if tall:                                  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon steps 2-D weight matrices, not a parameter of shape {tuple(p.shape)}: "
                                     "give the others to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, decay, mu = group["lr"], group["weight_decay"], group["momentum"]
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for shape, params in by_shape.items():
                updates = []
                for p in params:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - mu)
                    updates.append(p.grad.lerp(buf, mu))          # Nesterov
                rms_matched = lr * 0.2 * max(shape) ** 0.5        # an orthogonal A x B matrix has RMS 1/sqrt(max)
                for p, u in zip(params, orthogonalise(torch.stack(updates))):
                    p.mul_(1 - lr * decay)
                    p.add_(u, alpha=-rms_matched)
