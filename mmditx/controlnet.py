"""ControlNet for MMDiT-X: a side branch that reads a control image's latent and steers the image stream.

    net = load_controlnet("sd3.5_large_controlnet_canny.safetensors")        # or a diffusers-format file/folder
    v = model(x, t, context=ctx, y=pooled, controls=[(net, control_latent, 1.0)])

The branch (one stack of transformer blocks, one zero-initialised linear per block):

    h = tokens of the noisy latent x                                     (B, L, D)
      + pos_embed_input(control_latent)                                  patch embedding of the control latent
    c = t_embedder(t) + y_embedder(pooled)                               (B, D)
    for block k: h_k = block_k(h, c);  out_k = controlnet_blocks[k](h_k) * strength
    main transformer: after joint block i, x += out[i * n // N]          n outputs spread over N main blocks

Three kinds of nets exist, and they differ in more than key names (`ControlNetConfig` records each choice):

  official "8b" (SD3.5 Large nets, Stability's `dit_embedder.py`): h starts from the *main* model's patch
      embedding and positional table; single-stream blocks (self-attention over image tokens only, no text);
      each block feeds the next; y is the pooled text vector.
  official "2b" (the smaller nets that code also runs): h is the net's own patch embedding of x, without
      positions; every block reads the *same* h (blocks are not chained); y is the pooled vector already
      embedded by the main model's y_embedder. Control images are encoded as 2x-1 for every type.
  diffusers `SD3ControlNetModel` with a text stream (InstantX-style nets for SD3/SD3.5 Medium): own patch
      embedding with its own stored positional table, joint blocks over [text ; image] like the main
      transformer, chained. With `force_zeros_for_pooled_projection` (the class default, kept when a file has
      no config.json) the pooled vector is replaced by zeros and the control latent lacks the VAE shift.
      diffusers' conversion of the official 8b nets (no text stream, no own patch embedding) runs as "8b".

Which main block gets which output: the official code adds output `i // (N // n)` after block i (only defined
when n divides N); diffusers uses int(i / (N / n)). `i * n // N` is both where n divides N, and diffusers' rule
otherwise. Official nets add to every block, the last one included; diffusers adds nothing to a block whose
text stream is pre-only (MMDiT-X's last block): diffusers-format nets follow diffusers, as they were trained.
A block skipped by skip-layer guidance receives no output (official; diffusers would add it to the pass-through).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .blocks import DismantledBlock, JointBlock
from .checkpoint import (CheckpointError, RenamedCheckpoint, SafetensorsFile, assign_from_file, build_on_meta,
                         check_keys, expected_shapes, open_safetensors, parse_dtype, to_ours)
from .config import HEAD_DIM
from .diffusers_names import controlnet_rules, embedder_rules
from .layers import Attention, PatchEmbed, TimestepEmbedder, VectorEmbedder

CONTROL_TYPES = ("blur", "canny", "depth")   # the official `control_type` values 0, 1, 2
# Nets trained with diffusers' force_zeros_for_pooled_projection take the control latent as vae_latent * scale,
# without the shift: model format + shift * scale (the SD3 VAE's 0.0609 and 1.5305, vae.SHIFT_FACTOR/SCALE_FACTOR;
# mmditx cannot import vae, tests/test_controlnet.py checks the two agree).
UNSHIFTED_LATENT_OFFSET = 0.0609 * 1.5305


@dataclass(frozen=True)
class ControlNetConfig:
    hidden_size: int                 # must equal the main transformer's width
    depth: int                       # number of control blocks (= number of outputs)
    patch_size: int = 2
    cond_channels: int = 16          # channels of the control latent (16, more for nets with extra channels)
    pooled_dim: int = 2048           # y_embedder input: the pooled vector, or the main model's width ("2b")
    own_tokens: bool = False         # True: own x_embedder for the noisy latent; False: the main model's tokens
    pos_embed_max_size: int = 0      # own positional table side (0: none)
    joint: bool = False              # blocks with a text stream (diffusers nets): context_embedder exists
    context_dim: int = 4096
    qk_norm: bool = False
    dual_attention_blocks: tuple[int, ...] = ()
    chained: bool = True             # each block reads the previous block's output (all but official "2b")
    pooled_from_main: bool = False   # y is first embedded by the main model's y_embedder (official "2b")
    zero_pooled: bool = False        # diffusers force_zeros_for_pooled_projection: y replaced by zeros ...
    unshifted_latent: bool = False   # ... and the control latent taken without the VAE shift
    last_block: bool = True          # the main model's last (pre-only text) block receives an output
    layout: str = "official"         # "official" or "diffusers" (key names of the file)
    variant: str = "8b"              # "8b", "2b" or "joint": a name for the above, for messages

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM


class ControlNet(nn.Module):
    """The control branch. Module names are those of the official file (dit_embedder.ControlNetEmbedder);
    diffusers-format files are renamed into them on loading."""

    def __init__(self, config: ControlNetConfig, control_type: str | None = None, source: str = "ControlNet"):
        super().__init__()
        self.config = cfg = config
        self.control_type, self.source = control_type, source
        D = cfg.hidden_size
        if cfg.own_tokens:
            self.x_embedder = PatchEmbed(cfg.patch_size, 16, D)
        if cfg.pos_embed_max_size:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_max_size ** 2, D))
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = VectorEmbedder(cfg.pooled_dim, D)
        if cfg.joint:
            self.context_embedder = nn.Linear(cfg.context_dim, D)
            self.transformer_blocks = nn.ModuleList(
                JointBlock(D, cfg.num_heads, 4.0, cfg.qk_norm, dual_attention=i in cfg.dual_attention_blocks)
                for i in range(cfg.depth))
        else:
            self.transformer_blocks = nn.ModuleList(
                DismantledBlock(D, cfg.num_heads, 4.0, cfg.qk_norm) for _ in range(cfg.depth))
            self.attention = Attention()
        # one projection per block, zero-initialised in training so a new net starts as a no-op
        self.controlnet_blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(cfg.depth))
        self.pos_embed_input = PatchEmbed(cfg.patch_size, cfg.cond_channels, D)

    def extra_repr(self) -> str:
        c = self.config
        return f"{self.source}: {c.variant}, {c.depth} blocks, hidden {c.hidden_size}, type {self.control_type}"

    # -- which main block gets which output ----------------------------------------------------------------
    def output_index(self, block: int, num_blocks: int) -> int | None:
        """Index of this net's output added after main block `block` of `num_blocks` (None: nothing)."""
        if block == num_blocks - 1 and not self.config.last_block:
            return None
        return block * self.config.depth // num_blocks

    def check_model(self, model_config) -> None:
        check_compatible(self.config, model_config, self.source)

    # -- the branch ----------------------------------------------------------------------------------------
    def forward(self, model, x: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor, control_latent: torch.Tensor, strength: float) -> list[torch.Tensor]:
        """model: the main MMDiTX (its embedders serve "8b" and "2b" nets); x (B, 16, H, W) its input latent,
        tokens (B, L, D) its patch embedding + positions, t (B,) = sigma*1000, control_latent (B or 1, C, H, W)
        in the model's latent format -> `depth` tensors (B, L, D), scaled by `strength`."""
        cfg = self.config
        dtype = tokens.dtype            # the main model's: the outputs are added to its tokens
        cond = control_latent.to(x.device, dtype).expand(x.shape[0], -1, -1, -1)
        if cfg.unshifted_latent:
            cond = cond + UNSHIFTED_LATENT_OFFSET
        if cfg.own_tokens:
            h = self.x_embedder(x.to(dtype))                                     # (B, L, D)
            if cfg.pos_embed_max_size:
                pos = self.cropped_pos_embed(x.shape[-2] // cfg.patch_size, x.shape[-1] // cfg.patch_size)
                h = h + pos                                                      # (B, L, D)
        else:
            h = tokens.to(dtype)
        if cfg.zero_pooled:
            y = torch.zeros_like(y)
        elif cfg.pooled_from_main:
            y = model.y_embedder(y.to(dtype))
        c = self.t_embedder(t) + self.y_embedder(y.to(dtype))                    # (B, D)
        h = h + self.pos_embed_input(cond)                                       # (B, L, D)
        ctx = self.context_embedder(context.to(dtype)) if cfg.joint else None

        outs = []
        for block, project in zip(self.transformer_blocks, self.controlnet_blocks):
            if cfg.joint:
                ctx, out = block(ctx, h, c)
            else:
                mod = block.modulation(c)
                (q, k, v), _ = block.pre_attention(h, mod)
                out = block.post_attention(h, self.attention(q, k, v), mod)     # self-attention, image tokens only
            if cfg.chained:
                h = out
            outs.append(project(out) * strength)
        return outs

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        m = self.config.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(f"{self.source}: its positional table covers {m}x{m} patches; this latent needs {h}x{w}")
        top, left = (m - h) // 2, (m - w) // 2
        return self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w, :].reshape(1, h * w, -1)


def check_compatible(config: ControlNetConfig, model_config, source: str) -> None:
    """A clear error when a net of `config` cannot steer a transformer of `model_config` (MMDiTXConfig)."""
    c, m = config, model_config
    problems = []
    if c.hidden_size != m.hidden_size:
        problems.append(f"width {c.hidden_size} vs {m.hidden_size}")
    if c.patch_size != m.patch_size:
        problems.append(f"patch {c.patch_size} vs {m.patch_size}")
    if c.joint and c.context_dim != m.context_dim:
        problems.append(f"text width {c.context_dim} vs {m.context_dim}")
    if not c.pooled_from_main and c.pooled_dim != m.pooled_dim:
        problems.append(f"pooled width {c.pooled_dim} vs {m.pooled_dim}")
    if problems:
        raise ValueError(
            f"{source} ({describe(c.hidden_size)}, {c.depth} blocks) cannot steer this transformer "
            f"({describe(m.hidden_size)}, {m.depth} blocks): {', '.join(problems)}. Use a ControlNet made for "
            f"this model.")


def describe(hidden_size: int) -> str:
    known = {1536: "SD3/SD3.5 Medium size", 2432: "SD3.5 Large size"}
    return f"width {hidden_size}" + (f", {known[hidden_size]}" if hidden_size in known else "")


def control_units(net: ControlNet) -> list[nn.Module]:
    """The modules of a ControlNet that are called and own every weight (for mmditx.streaming)."""
    units = [net.t_embedder, net.y_embedder, net.pos_embed_input, *net.transformer_blocks, *net.controlnet_blocks]
    if hasattr(net, "x_embedder"):
        units.append(net.x_embedder)
    if hasattr(net, "context_embedder"):
        units.append(net.context_embedder)
    return units


# -- files -----------------------------------------------------------------------------------------------------
def _our_names(f: SafetensorsFile) -> tuple[RenamedCheckpoint, str]:
    """An official or diffusers-format ControlNet file seen under our names (the official ones: the official
    files name their embedders as diffusers does, sd3_infer.CONTROLNET_MAP), and the file's layout."""
    keys = f.keys()
    if not any(k.startswith("controlnet_blocks.") for k in keys) or not any(k.startswith("transformer_blocks.")
                                                                           for k in keys):
        hint = ""
        if any(k.startswith(("model.diffusion_model.", "joint_blocks.")) for k in keys):
            hint = " It looks like an SD3 transformer: give it as the model, not as --controlnet."
        raise CheckpointError(f"{f.path}: not an SD3 ControlNet (no 'controlnet_blocks.*' and "
                              f"'transformer_blocks.*' keys).{hint}")
    diffusers = any(re.fullmatch(r"transformer_blocks\.\d+\.attn\.to_q\.weight", k) for k in keys)
    rules = controlnet_rules(joint="context_embedder.weight" in f) if diffusers else embedder_rules()
    return to_ours(f, rules, "SD3 ControlNet"), "diffusers" if diffusers else "official"


def controlnet_config(names: RenamedCheckpoint, layout: str, diffusers_config: dict | None = None) -> ControlNetConfig:
    """The configuration read off the shapes (and, for diffusers folders, the two flags of config.json)."""
    def need(key):
        if key not in names:
            raise CheckpointError(f"{names.path}: missing {key!r} (under its {layout} name), needed to read the "
                                  f"ControlNet configuration")
        return names.shape(key)

    hidden = need("controlnet_blocks.0.weight")[0]
    blocks = sorted({int(m.group(1)) for k in names.keys() if (m := re.match(r"controlnet_blocks\.(\d+)\.", k))})
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"{names.path}: controlnet_blocks are not numbered 0..{len(blocks) - 1}")
    cond_channels, patch = need("pos_embed_input.proj.weight")[1:3]
    pooled = need("y_embedder.mlp.0.weight")[1]
    joint = "context_embedder.weight" in names
    own_tokens = "x_embedder.proj.weight" in names
    pos_side = math.isqrt(names.shape("pos_embed")[1]) if "pos_embed" in names else 0
    qk = "transformer_blocks.0.x_block.attn.ln_q.weight" if joint else "transformer_blocks.0.attn.ln_q.weight"
    base = ControlNetConfig(hidden_size=hidden, depth=len(blocks), patch_size=patch, cond_channels=cond_channels,
                            pooled_dim=pooled, layout=layout, qk_norm=qk in names)
    if hidden % HEAD_DIM:
        raise CheckpointError(f"{names.path}: width {hidden} is not a multiple of the head size {HEAD_DIM}")
    if layout == "official":
        if joint:
            raise CheckpointError(f"{names.path}: an official-layout ControlNet with a text stream is unknown")
        # sd3_infer.py: "8b" when the pooled input is the raw 2048-wide vector; the "2b" nets take the main
        # model's embedded pooled vector (its width) and have their own patch embedding.
        if pooled == hidden:
            if not own_tokens:
                raise CheckpointError(f"{names.path}: a '2b' ControlNet needs its own 'pos_embed.proj' weights")
            return replace(base, variant="2b", own_tokens=True, chained=False, pooled_from_main=True)
        return replace(base, variant="8b", own_tokens=False)
    # diffusers' SD3ControlNetModel
    zero_pooled = True if diffusers_config is None else bool(
        diffusers_config.get("force_zeros_for_pooled_projection", True))
    if not joint:
        if own_tokens:
            raise CheckpointError(f"{names.path}: a diffusers ControlNet without a text stream but with its own "
                                  f"patch embedding is not supported (only the converted SD3.5 Large nets are)")
        # diffusers' conversion of the official 8b nets writes force_zeros_for_pooled_projection=False
        zero_pooled = False if diffusers_config is None else zero_pooled
        return replace(base, variant="8b", zero_pooled=zero_pooled, unshifted_latent=zero_pooled, last_block=False)
    if own_tokens and not pos_side:
        raise CheckpointError(f"{names.path}: this ControlNet has no stored positional table "
                              f"(diffusers pos_embed_max_size unset); such nets are not supported")
    dual = tuple(i for i in blocks if f"transformer_blocks.{i}.x_block.attn2.qkv.weight" in names)
    return replace(base, variant="joint", joint=True, own_tokens=own_tokens, pos_embed_max_size=pos_side,
                   context_dim=need("context_embedder.weight")[1], dual_attention_blocks=dual,
                   zero_pooled=zero_pooled, unshifted_latent=zero_pooled, last_block=False)


def _resolve(path: str | os.PathLike) -> tuple[Path, dict | None]:
    """A file, or a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    path = Path(path)
    if path.is_dir():
        weights = path / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise CheckpointError(f"{path}: a diffusers ControlNet folder needs diffusion_pytorch_model.safetensors "
                                  f"(sharded folders are not supported); found {found}")
        config = path / "config.json"
        return weights, (json.loads(config.read_text()) if config.is_file() else None)
    if not path.is_file():
        raise CheckpointError(f"ControlNet {path} not found (give a .safetensors file or a diffusers folder)")
    return path, None


def read_controlnet_config(path: str | os.PathLike) -> ControlNetConfig:
    """The configuration of a ControlNet file or folder, from its header only."""
    file, dconf = _resolve(path)
    f = open_safetensors(file)
    names, layout = _our_names(f)
    return controlnet_config(names, layout, dconf)


def _control_type(f: SafetensorsFile) -> str | None:
    """The official files' `control_type` tensor (blur 0, canny 1, depth 2); None when absent."""
    if "control_type" not in f:
        return None
    value = int(f.tensor("control_type").flatten()[0])
    return CONTROL_TYPES[value] if 0 <= value < len(CONTROL_TYPES) else None


def read_control_type(path: str | os.PathLike) -> str | None:
    """The control type recorded in a ControlNet file (official files), without loading the net."""
    return _control_type(open_safetensors(_resolve(path)[0]))


def load_controlnet(path: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype | str | None = torch.float32, check_finite: bool = False) -> ControlNet:
    """Load an official SD3.5 ControlNet file as it is, or a diffusers-format one (single file or folder).
    The configuration is read off the shapes; dtype None keeps the stored dtype (memory-mapped on CPU);
    check_finite scans every weight for NaN/inf."""
    dtype = parse_dtype(dtype)
    file, dconf = _resolve(path)
    f = open_safetensors(file)
    renamed, layout = _our_names(f)
    config = controlnet_config(renamed, layout, dconf)
    net = build_on_meta(lambda: ControlNet(config, _control_type(f), source=str(path)))
    # control_type is read above; the official 8b files may carry an unused x_embedder (pos_embed.proj): the
    # main model's embeds x.
    check_keys(renamed, "", expected_shapes(net), "SD3 ControlNet",
               ignore_unexpected=lambda k: k == "control_type"
               or (k.startswith("x_embedder.") and not config.own_tokens))
    return assign_from_file(net, renamed, "", dtype=dtype, device=device, check_finite=check_finite)


def control_residuals(model, controls, x: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor,
                      context: torch.Tensor, y: torch.Tensor, skip: set[int]) -> dict[int, torch.Tensor]:
    """{main block index: (B, L, D) sum of the control outputs added after it} for
    controls = [(net, control_latent, strength), ...]; nets with strength 0 are not run."""
    N = model.config.depth
    added: dict[int, torch.Tensor] = {}
    for item in controls:
        if not (isinstance(item, (tuple, list)) and len(item) == 3 and isinstance(item[0], ControlNet)):
            raise ValueError("controls must be a list of (ControlNet, control_latent, strength) triples; "
                             "load nets with mmditx.load_controlnet")
        net, latent, strength = item
        if strength == 0:
            continue
        net.check_model(model.config)
        B, _, H, W = x.shape
        C = net.config.cond_channels
        if not (torch.is_tensor(latent) and latent.ndim == 4 and latent.shape[1] == C
                and latent.shape[0] in (1, B) and tuple(latent.shape[2:]) == (H, W)):
            got = tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__
            raise ValueError(f"control latent for {net.source} must be (1 or {B}, {C}, {H}, {W}), the VAE latent "
                             f"of a control image of the output's size; got {got}")
        outs = net(model, x, tokens, t, context, y, latent, float(strength))
        for i in range(N):
            k = None if i in skip else net.output_index(i, N)
            if k is not None:
                added[i] = outs[k] if i not in added else added[i] + outs[k]
    return added


# -- writing: random nets in the official layout (examples, benchmarks) ------------------------------------------
def official_state_dict(net: ControlNet) -> dict[str, torch.Tensor]:
    """The net's tensors under the official file's names (embedders as diffusers names them), with its
    control_type."""
    if net.config.layout != "official" or net.config.variant not in ("8b", "2b"):
        raise ValueError(f"only official-layout nets (8b, 2b) are written; this one is {net.config.variant}")
    rules = embedder_rules()
    out = {}
    for name, t in net.state_dict().items():
        rule, fields = next(((r, m) for r in rules if (m := r.match_ours(name)) is not None), (None, None))
        out[rule.theirs[0].format(**fields) if rule else name] = t
    if net.control_type is not None:
        out["control_type"] = torch.tensor([CONTROL_TYPES.index(net.control_type)], dtype=torch.int32)
    return out


def random_controlnet(model_config, depth: int, variant: str = "8b", control_type: str = "canny",
                      seed: int = 0) -> ControlNet:
    """An untrained official-layout net for a transformer of `model_config` (random weights, the output
    projections included, so that it visibly steers): for trying the path end to end and for benchmarks."""
    if variant not in ("8b", "2b"):
        raise ValueError(f"variant must be '8b' or '2b', not {variant!r}")
    D = model_config.hidden_size
    config = ControlNetConfig(hidden_size=D, depth=depth, patch_size=model_config.patch_size,
                              pooled_dim=D if variant == "2b" else model_config.pooled_dim, variant=variant,
                              own_tokens=variant == "2b", chained=variant == "8b", pooled_from_main=variant == "2b")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ControlNet(config, control_type, source=f"random {variant} ControlNet").eval().requires_grad_(False)
