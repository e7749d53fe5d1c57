"""The anatomy of an MMDiT-X model: parameters per component, FLOPs per forward pass and per sampling step,
memory of the weights per dtype. No weights needed: the model is built on the meta device.

    from mmditx import load_config
    from instruments.anatomy import report
    print(report(load_config("sd3.5_medium"), height=1024, width=1024, batch=2, tokens=154))

FLOPs are counted analytically, for the matrix products only (one multiply-add = 2 FLOPs):
    linear / patch conv   2 * tokens * in * out
    attention             2 * 2 * B * heads * Lq * Lk * head_dim   (q k^T, then probabilities @ v)
over the joint attention ([context ; x], Lq = Lk = Lc + N) and attn2 (image tokens only, Lq = Lk = N).
Norms, activations, softmax, modulation and residual adds are not counted (well under 1% at real sizes).
`tests/test_anatomy.py` checks these formulas against torch.utils.flop_counter on a real small model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from configs import DEFAULT_PRESET, load_sampling_preset

from mmditx.blocks import modulation_names
from mmditx.checkpoint import build_on_meta
from mmditx.config import MMDiTXConfig
from mmditx.model import MMDiTX

BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
TIMESTEP_FREQ_DIM = 256  # sinusoidal features fed to t_embedder (layers.TimestepEmbedder)

# Skip-layer guidance as the default sampling preset sets it (configs/sampling_sd3.5_medium.json): the conditional
# half runs once more with these blocks skipped on steps with start*steps < step < end*steps (step from 0).
_PRESET = load_sampling_preset(DEFAULT_PRESET)
_SLG = _PRESET["slg"]
SLG_LAYERS = tuple(_SLG["layers"])
SLG_START, SLG_END = _SLG["start"], _SLG["end"]
STEPS = _PRESET["steps"]   # a run's length in the per-run FLOPs line
NOT_COUNTED = "Not counted: norms, activations, softmax, modulation, residual adds (about 1%, mostly softmax)."


@dataclass
class Component:
    """One row of the table. Block rows split their parameters into the two streams."""
    name: str
    params: int
    linear_flops: int = 0
    attention_flops: int = 0
    context_params: int | None = None   # joint blocks only
    x_params: int | None = None
    attn2_params: int | None = None     # part of x_params; dual-attention blocks only
    note: str = ""

    @property
    def flops(self) -> int:
        return self.linear_flops + self.attention_flops


# -- parameters ------------------------------------------------------------------------------------------

def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def meta_model(config: MMDiTXConfig) -> MMDiTX:
    return build_on_meta(lambda: MMDiTX(config))


def parameter_rows(model: MMDiTX) -> list[Component]:
    """Parameters per component, in forward order, joint blocks split into context / x streams."""
    rows = [Component(name, count(getattr(model, name)))
            for name in ("x_embedder", "t_embedder", "y_embedder", "context_embedder")]
    rows.insert(1, Component("pos_embed", model.pos_embed.numel()))
    for i, block in enumerate(model.joint_blocks):
        ctx, x = block.context_block, block.x_block
        notes = (["dual attention"] if x.dual_attention else []) + (["context pre-only"] if ctx.pre_only else [])
        rows.append(Component(f"joint_blocks.{i}", count(block), context_params=count(ctx), x_params=count(x),
                              attn2_params=count(getattr(x, "attn2", None)) if x.dual_attention else None,
                              note=", ".join(notes)))
    rows.append(Component("final_layer", count(model.final_layer)))
    return rows


# -- FLOPs -----------------------------------------------------------------------------------------------

def linear(tokens: int, n_in: int, n_out: int) -> int:
    return 2 * tokens * n_in * n_out


def attention(batch: int, heads: int, lq: int, lk: int, head_dim: int) -> int:
    return 2 * 2 * batch * heads * lq * lk * head_dim


def image_tokens(config: MMDiTXConfig, height: int, width: int) -> int:
    """Pixels -> number of image tokens: the VAE divides by 8, the patch by patch_size."""
    step = 8 * config.patch_size
    if height % step or width % step:
        raise ValueError(f"image sides must be multiples of {step} pixels; got {width}x{height}")
    if max(height, width) > 8 * config.max_latent_size:
        raise ValueError(f"{width}x{height} is larger than the positional table allows (up to "
                         f"{8 * config.max_latent_size} pixels a side)")
    return (height // step) * (width // step)


def stream_flops(config: MMDiTXConfig, batch: int, tokens: int, pre_only: bool, dual: bool) -> int:
    """Linear FLOPs of one stream (DismantledBlock) of a joint block over `tokens` tokens per sample."""
    D, hidden, BL = config.hidden_size, int(config.hidden_size * config.mlp_ratio), batch * tokens
    n_mod = len(modulation_names(pre_only, dual))                       # adaLN vectors of size D
    flops = linear(batch, D, n_mod * D) + linear(BL, D, 3 * D)            # adaLN, attn.qkv
    if not pre_only:
        flops += linear(BL, D, D) + linear(BL, D, hidden) + linear(BL, hidden, D)   # attn.proj, mlp
    if dual:
        flops += linear(BL, D, 3 * D) + linear(BL, D, D)                   # attn2.qkv, attn2.proj
    return flops


def flop_rows(config: MMDiTXConfig, height: int, width: int, batch: int, tokens: int,
              skip_layers=()) -> dict[str, tuple[int, int]]:
    """{component: (linear FLOPs, attention FLOPs)} of one forward pass; skipped blocks cost nothing."""
    cfg, B, Lc = config, batch, tokens
    D, H, d, p = cfg.hidden_size, cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.patch_size
    N = image_tokens(cfg, height, width)
    rows = {
        "x_embedder": (linear(B * N, cfg.in_channels * p * p, D), 0),    # p x p stride-p conv
        "pos_embed": (0, 0),
        "t_embedder": (linear(B, TIMESTEP_FREQ_DIM, D) + linear(B, D, D), 0),
        "y_embedder": (linear(B, cfg.pooled_dim, D) + linear(B, D, D), 0),
        "context_embedder": (linear(B * Lc, cfg.context_dim, D), 0),
    }
    for i in range(cfg.depth):
        if i in skip_layers:
            rows[f"joint_blocks.{i}"] = (0, 0)
            continue
        dual = i in cfg.dual_attention_blocks
        lin = (stream_flops(cfg, B, Lc, pre_only=(i == cfg.depth - 1), dual=False)
               + stream_flops(cfg, B, N, pre_only=False, dual=dual))
        att = attention(B, H, Lc + N, Lc + N, d) + (attention(B, H, N, N, d) if dual else 0)
        rows[f"joint_blocks.{i}"] = (lin, att)
    rows["final_layer"] = (linear(B, D, 2 * D) + linear(B * N, D, p * p * cfg.out_channels), 0)
    return rows


def forward_flops(config: MMDiTXConfig, height: int, width: int, batch: int, tokens: int, skip_layers=()) -> int:
    """Matmul FLOPs of one transformer forward pass (see the module docstring for what is counted)."""
    return sum(lin + att for lin, att in flop_rows(config, height, width, batch, tokens, skip_layers).values())


def slg_steps(steps: int, start: float = SLG_START, end: float = SLG_END) -> list[int]:
    """The sampling steps (from 0) on which skip-layer guidance runs its extra pass."""
    return [i for i in range(steps) if start * steps < i < end * steps]


# -- memory ----------------------------------------------------------------------------------------------

def weight_bytes(params: int) -> dict[str, int]:
    """Bytes of the weights stored in each dtype (fp8: every tensor in fp8, as a lower bound)."""
    return {name: params * n for name, n in BYTES_PER_WEIGHT.items()}


# -- the whole picture -----------------------------------------------------------------------------------

def anatomy(config: MMDiTXConfig, height: int = 1024, width: int = 1024, batch: int = 2,
            tokens: int = 154) -> list[Component]:
    """Parameter rows of the meta-built model, with the FLOPs of one forward pass filled in."""
    flops = flop_rows(config, height, width, batch, tokens)
    rows = parameter_rows(meta_model(config))
    for row in rows:
        row.linear_flops, row.attention_flops = flops[row.name]
    m, step = config.pos_embed_max_size, 8 * config.patch_size
    rows[1].note = f"{m}x{m} table, center {height // step}x{width // step} used"
    return rows


def total_params(config: MMDiTXConfig) -> int:
    return sum(row.params for row in parameter_rows(meta_model(config)))


def _blocks_text(blocks) -> str:
    blocks = list(blocks)
    if not blocks:
        return "none"
    if blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])
    return ",".join(map(str, blocks))


def _flops_text(flops: int) -> str:
    return f"{flops / 1e12:,.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:,.2f} GFLOP"


def _bytes_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _g(flops: int) -> str:
    return f"{flops / 1e9:,.1f}"


def _n(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def format_table(rows: list[Component]) -> str:
    head = (f"{'component':<18} {'params':>15} {'context':>13} {'x stream':>13} {'(x.attn2)':>11}"
            f" {'linear GFLOP':>13} {'attn GFLOP':>11}  notes")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<18} {r.params:>15,} {_n(r.context_params):>13} {_n(r.x_params):>13}"
                     f" {_n(r.attn2_params):>11} {_g(r.linear_flops):>13} {_g(r.attention_flops):>11}  {r.note}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<18} {sum(r.params for r in rows):>15,} {'':>13} {'':>13} {'':>11}"
                 f" {_g(sum(r.linear_flops for r in rows)):>13} {_g(sum(r.attention_flops for r in rows)):>11}")
    return "\n".join(lines)


def format_memory(params: int) -> str:
    return "weights: " + " | ".join(f"{name} {_bytes_text(b)}" for name, b in weight_bytes(params).items())


def step_flops(config: MMDiTXConfig, height: int, width: int, batch: int, tokens: int,
               steps: int = STEPS) -> list[tuple[str, int]]:
    """(label, FLOPs) per sampling step. CFG batches cond and uncond into one forward (batch = 2 x images);
    skip-layer guidance adds, on its steps, a forward of the conditional half with SLG_LAYERS skipped."""
    one = forward_flops(config, height, width, batch, tokens)
    rows = [(f"one forward pass, batch {batch}", one)]
    if batch % 2:
        return rows + [(f"per step without CFG (batch {batch} is odd: no cond/uncond pairs)", one)]
    images = batch // 2
    rows.append((f"per step, CFG on ({images} image{'s' * (images > 1)}: cond + uncond in that forward)", one))
    if max(SLG_LAYERS) >= config.depth:
        return rows
    slg = forward_flops(config, height, width, images, tokens, skip_layers=SLG_LAYERS)
    active = slg_steps(steps)
    return rows + [
        (f"per step, CFG + SLG active (+1 forward, batch {images}, blocks {_blocks_text(SLG_LAYERS)} skipped)",
         one + slg),
        (f"{steps}-step run, CFG on every step, SLG on steps {_blocks_text(active)} ({len(active)} steps)",
         steps * one + len(active) * slg),
    ]


def format_step_flops(rows: list[tuple[str, int]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(["FLOPs (matrix products only)"]
                     + [f"  {label:<{width}} {_flops_text(flops):>16}" for label, flops in rows])


def report(config: MMDiTXConfig, height: int = 1024, width: int = 1024, batch: int = 2, tokens: int = 154,
           name: str = "MMDiT-X", steps: int = STEPS) -> str:
    """The whole plain-text report: header, per-component table, memory, FLOPs per step."""
    cfg = config
    rows = anatomy(cfg, height, width, batch, tokens)
    n_img = image_tokens(cfg, height, width)
    header = [
        f"{name}: hidden {cfg.hidden_size}, {cfg.depth} joint blocks, {cfg.num_heads} heads x "
        f"{cfg.hidden_size // cfg.num_heads}, patch {cfg.patch_size}, mlp x{cfg.mlp_ratio:g}, "
        f"QK-norm {'on' if cfg.qk_norm else 'off'}, "
        f"dual attention (x.attn2) in blocks {_blocks_text(cfg.dual_attention_blocks)}",
        f"FLOPs of one forward pass at {width}x{height} (latent {width // 8}x{height // 8}, {n_img} image tokens), "
        f"{tokens} context tokens, batch {batch}",
        "",
    ]
    total = sum(r.params for r in rows)
    steps_text = format_step_flops(step_flops(cfg, height, width, batch, tokens, steps))
    return "\n".join(header + [format_table(rows), "", format_memory(total), "", steps_text, NOT_COUNTED])


def controlnet_flops(net, config: MMDiTXConfig, height: int, width: int, batch: int, tokens: int) -> dict[str, int]:
    """{component: matmul FLOPs} of one ControlNet forward (a ControlNetConfig `net` steering a transformer of
    `config`), counted as above; the residual adds into the transformer are not counted."""
    B, Lc, N, D, p = batch, tokens, image_tokens(config, height, width), net.hidden_size, net.patch_size
    H, d = net.num_heads, net.hidden_size // net.num_heads
    rows = {"pos_embed_input": linear(B * N, net.cond_channels * p * p, D),
            "t_embedder": linear(B, TIMESTEP_FREQ_DIM, D) + linear(B, D, D),
            "y_embedder": linear(B, net.pooled_dim, D) + linear(B, D, D)}
    if net.own_tokens:
        rows["x_embedder"] = linear(B * N, config.in_channels * p * p, D)
    if net.pooled_from_main:  # the "2b" nets run the main model's y_embedder once more
        rows["main y_embedder"] = linear(B, config.pooled_dim, D) + linear(B, D, D)
    if net.joint:
        rows["context_embedder"] = linear(B * Lc, net.context_dim, D)
    blocks = 0
    for i in range(net.depth):
        dual = i in net.dual_attention_blocks
        blocks += stream_flops(config, B, N, pre_only=False, dual=dual) + (attention(B, H, N, N, d) if dual else 0)
        if net.joint:
            blocks += stream_flops(config, B, Lc, pre_only=False, dual=False) + attention(B, H, Lc + N, Lc + N, d)
        else:
            blocks += attention(B, H, N, N, d)                  # self-attention over the image tokens only
    rows["transformer_blocks"] = blocks
    rows["controlnet_blocks"] = net.depth * linear(B * N, D, D)
    return rows


def controlnet_report(net, config: MMDiTXConfig, height: int, width: int, batch: int, tokens: int,
                      name: str = "ControlNet") -> str:
    rows = controlnet_flops(net, config, height, width, batch, tokens)
    total, model = sum(rows.values()), forward_flops(config, height, width, batch, tokens)
    width_ = max(len(k) for k in rows)
    return "\n".join(
        [f"{name}: {net.variant}, {net.depth} blocks, hidden {net.hidden_size}; FLOPs of one forward pass "
         f"(batch {batch}, same sizes)"]
        + [f"  {k:<{width_}} {_flops_text(v):>16}" for k, v in rows.items()]
        + [f"  {'total':<{width_}} {_flops_text(total):>16}  = {total / model:.3f} x the transformer's "
           f"{_flops_text(model)}: a step with it costs at most {1 + total / model:.3f}x"])
