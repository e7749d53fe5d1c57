"""LoRA files: the one place that knows every key convention, and merging their products into weights.

A LoRA stores, per adapted linear layer with weight W (out, in), two factors and a scale:

    delta W = up @ down * (alpha / rank) * strength        down (rank, in), up (out, rank); no alpha = rank

Inside this project a LoRA is a dict {module path in our model: LoraFactor}, keyed by the official names our
modules carry (`joint_blocks.3.x_block.attn.qkv`, `final_layer.linear`, `context_embedder`, ...); text-encoder
factors are keyed by the module paths of our CLIP-L / CLIP-G / T5 (which are the transformers names,
`text_model.encoder.layers.0.self_attn.q_proj`, `encoder.block.0.layer.0.SelfAttention.q`).

Formats on disk (`read_lora` detects them from the keys; `save_lora` writes them):

    diffusers   transformer.transformer_blocks.3.attn.to_q.lora_A.weight / lora_B.weight   (PEFT names; q, k, v
                separate; alpha = rank, or alphas in the `lora_adapter_metadata` JSON as diffusers writes it;
                we write alpha / rank folded into lora_B);
                text_encoder.* (CLIP-L), text_encoder_2.* (CLIP-G), text_encoder_3.* (T5)
    kohya       lora_unet_joint_blocks_3_x_block_attn_qkv.lora_down.weight / lora_up.weight / alpha;
                lora_te1_* (CLIP-L), lora_te2_* (CLIP-G), lora_te3_* (T5)
    official    [model.]diffusion_model.joint_blocks.3.x_block.attn.qkv.lora_A.weight / lora_B.weight (or
                lora_down / lora_up, .alpha), ComfyUI style; q, k, v may be split as qkv.0 / qkv.1 / qkv.2
                (OneTrainer)

Where diffusers splits a fused official weight (q, k, v of `attn.qkv`), the parts are merged exactly into one
block-structured factor: down = [down_q; down_k; down_v], up = blockdiag(up_q, up_k, up_v); and split back
exactly. Where diffusers orders adaLN chunks differently (the final layer and the pre-only last context block
emit (scale, shift), the official ones (shift, scale)) the rows of `up` are swapped.

This module imports nothing of the model: `mmditx.apply_lora` and the text-encoder application in `sampling`
use `merge_lora` below on any nn.Module by module path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import written_whole
from .diffusers_names import transformer_rules

FORMATS = ("diffusers", "kohya", "official")
TEXT_ENCODERS = ("clip_l", "clip_g", "t5")


class LoraError(ValueError):
    """A LoRA file that cannot be read or applied; the message names the file and what is wrong."""


@dataclass
class LoraFactor:
    """One adapted linear layer: delta W = up @ down * (alpha / rank) * strength."""
    down: torch.Tensor              # (rank, in_features)   lora_A / lora_down
    up: torch.Tensor                # (out_features, rank)  lora_B / lora_up
    alpha: float | None = None      # None: alpha = rank (scale 1), the diffusers/PEFT convention

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        """The (out, in) shape of the weight this factor adapts."""
        return self.up.shape[0], self.down.shape[1]

    def delta(self, strength: float = 1.0, rows: slice = slice(None)) -> torch.Tensor:
        """(up[rows] * scale * strength) @ down in fp32: the change of W's `rows`."""
        up = self.up[rows].float() * (self.scale * strength)
        return up @ self.down.float()


@dataclass
class LoraFile:
    format: str                                                     # one of FORMATS
    transformer: dict[str, LoraFactor] = field(default_factory=dict)
    text_encoders: dict[str, dict[str, LoraFactor]] = field(default_factory=dict)   # TEXT_ENCODERS -> factors
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<state dict>"                                    # file name, for error messages


# ---------------------------------------------------------------------------------------------------------
# Name tables: diffusers (SD3Transformer2DModel) <-> official (MMDiTX), read off the one rename table of
# mmditx/diffusers_names.py: its rules for weights ('.{w}' templates), as module names; `part` is the q/k/v
# index inside a fused qkv. x_embedder.proj is the patch convolution, which LoRAs here do not target.


def _name_tables() -> tuple[dict[str, tuple[str, int | None]], dict[str, str]]:
    block, glob = {}, {}
    for rule in transformer_rules(depth=1):
        if not rule.ours.endswith(".{w}") or rule.ours == "x_embedder.proj.{w}":
            continue
        ours, theirs = rule.ours[:-len(".{w}")], [t[:-len(".{w}")] for t in rule.theirs]
        if ours.startswith("joint_blocks.{b}."):
            for part, name in enumerate(theirs):
                block[name.removeprefix("transformer_blocks.{b}.")] = (
                    ours.removeprefix("joint_blocks.{b}."), part if len(theirs) == 3 else None)
        elif not ours.startswith("joint_blocks."):   # the pre-only block's rule names its index: see swaps_scale_shift
            glob[theirs[0]] = ours
    return block, glob


# per joint block: diffusers suffix -> (official suffix, part of qkv or None); global: diffusers name -> official
BLOCK_NAMES, GLOBAL_NAMES = _name_tables()
OFFICIAL_TO_DIFFUSERS_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
OFFICIAL_TO_DIFFUSERS_BLOCK: dict[str, list[str]] = {}
for _d, (_o, _part) in BLOCK_NAMES.items():
    OFFICIAL_TO_DIFFUSERS_BLOCK.setdefault(_o, [None, None, None] if _part is not None else [None])
    OFFICIAL_TO_DIFFUSERS_BLOCK[_o][_part or 0] = _d

# Module-path components that contain "_" (kohya flattens paths with "_": these must be put back together).
COMPOUND_NAMES = ("joint_blocks", "x_block", "context_block", "adaLN_modulation", "final_layer", "context_embedder",
                  "t_embedder", "y_embedder", "x_embedder", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
                  "out_proj", "text_projection", "wi_0", "wi_1")

DIFFUSERS_TE = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5"}
KOHYA_TE = {"lora_te1": "clip_l", "lora_te2": "clip_g", "lora_te3": "t5"}


def swaps_scale_shift(official_name: str, factor_shape: tuple[int, int]) -> bool:
    """diffusers' AdaLayerNormContinuous (final layer, pre-only last context block) emits (scale, shift);
    the official modulation emits (shift, scale). Those are the adaLN linears with 2 * D outputs."""
    out, inp = factor_shape
    return official_name.endswith("adaLN_modulation.1") and out == 2 * inp and (
        official_name.startswith("final_layer") or ".context_block." in official_name)


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


# ---------------------------------------------------------------------------------------------------------
# Fused qkv <-> separate q, k, v

def merge_parts(parts: Mapping[int, LoraFactor]) -> LoraFactor:
    """{0: q, 1: k, 2: v} factors (some may be missing) -> one factor on the fused (3 D, in) weight, exactly:
    down = [down_q; down_k; down_v] (R = r_q + r_k + r_v rows), up = blockdiag(up_q, up_k, up_v)."""
    first = next(iter(parts.values()))
    D, dtype = first.up.shape[0], first.up.dtype
    ordered = [parts[j] for j in sorted(parts)]
    R = sum(f.rank for f in ordered)
    scales = {f.scale for f in ordered}
    same_scale = len(scales) == 1
    down = torch.cat([f.down for f in ordered])
    up = torch.zeros(3 * D, R, dtype=dtype)
    col = 0
    for j in sorted(parts):
        f = parts[j]
        # a part with its own scale (rare: per-module alphas) has it folded into its rows of up
        up[j * D:(j + 1) * D, col:col + f.rank] = f.up if same_scale else f.up * f.scale
        col += f.rank
    if not same_scale or all(f.alpha is None for f in ordered):
        return LoraFactor(down, up, None)
    return LoraFactor(down, up, scales.pop() * R)


def split_parts(factor: LoraFactor) -> dict[int, LoraFactor]:
    """A factor on a fused (3 D, in) qkv weight -> {0: q, 1: k, 2: v}, exactly; block-structured factors (as
    merge_parts builds them) come back with their own ranks, parts whose rows are all zero are left out."""
    D = factor.up.shape[0] // 3
    out = {}
    for j in range(3):
        rows = factor.up[j * D:(j + 1) * D]
        cols = rows.ne(0).any(dim=0).nonzero().flatten()
        if len(cols) == 0:
            continue
        if len(cols) == factor.rank:
            out[j] = LoraFactor(factor.down, rows, factor.alpha)
            continue
        alpha = factor.scale * len(cols)
        out[j] = LoraFactor(factor.down[cols], rows[:, cols], None if alpha == len(cols) else alpha)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading

NOT_LORA = {  # key fragment -> the adapter type it reveals (refused with its name)
    "hada_w1": "LoHa (LyCORIS)", "lokr_w1": "LoKr (LyCORIS)", "lokr_w2": "LoKr (LyCORIS)",
    "oft_blocks": "OFT (LyCORIS)", "oft_R": "OFT", "lora_mid": "LoCon with Tucker decomposition (lora_mid)",
    ".diff": "full weight difference (LyCORIS 'full')", ".a1.weight": "GLoRA (LyCORIS)",
    "ia3_l": "IA3", "dora_scale": "DoRA (dora_scale)", "lora_magnitude_vector": "DoRA (PEFT magnitude vector)",
}
OTHER_MODELS = {  # key fragment -> the model family a LoRA was made for
    "double_blocks": "Flux", "single_blocks": "Flux", "single_transformer_blocks": "Flux",
    "input_blocks": "SDXL/SD1.x (UNet)", "output_blocks": "SDXL/SD1.x (UNet)", "middle_block": "SDXL/SD1.x (UNet)",
    "down_blocks": "SDXL/SD1.x (UNet)", "up_blocks": "SDXL/SD1.x (UNet)", "mid_block": "SDXL/SD1.x (UNet)",
}

# (suffix of a down key, suffix of the matching up key) per convention
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"))


def _open(path_or_state_dict) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    if isinstance(path_or_state_dict, Mapping):
        return dict(path_or_state_dict), {}, "<state dict>"
    path = Path(path_or_state_dict)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}), str(path)
    except Exception as e:  # safetensors raises its own types for truncated / non-safetensors files
        raise LoraError(f"{path}: not a readable safetensors LoRA file ({e})") from None


def _refuse_other_types(sd: Mapping[str, torch.Tensor], source: str) -> None:
    for fragment, kind in NOT_LORA.items():
        if any(fragment in k for k in sd):
            what = "DoRA is not supported: its weight normalisation cannot be merged per strength like a LoRA" \
                if "DoRA" in kind else "only LoRA (down/up products) is supported"
            raise LoraError(f"{source}: this is a {kind} adapter, not a plain LoRA; {what}")
    for fragment, model in OTHER_MODELS.items():
        if any(fragment in k for k in sd):
            raise LoraError(f"{source}: this LoRA was made for {model} (keys like '{next(k for k in sd if fragment in k)}'),"
                            f" not for an SD3/SD3.5 MMDiT; use a LoRA trained for SD3.5")


def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_")) for k in keys):
        return "kohya"
    if any("transformer_blocks." in k or k.startswith(tuple(p + "." for p in DIFFUSERS_TE)) for k in keys):
        return "diffusers"
    if any("joint_blocks." in k or "final_layer." in k or "context_embedder." in k for k in keys):
        return "official"
    return "unknown"


def unflatten(flat: str) -> str:
    """A kohya module name ('joint_blocks_3_x_block_attn_qkv') -> the module path ('joint_blocks.3.x_block.attn.qkv')."""
    parts, out, i = flat.split("_"), [], 0
    while i < len(parts):
        for n in (3, 2):
            if "_".join(parts[i:i + n]) in COMPOUND_NAMES:
                out.append("_".join(parts[i:i + n]))
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def _pairs(sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, LoraFactor], list[str]]:
    """Group {name.lora_A.weight, name.lora_B.weight, name.alpha} -> {name: LoraFactor}; returns the keys left."""
    factors, used = {}, set()
    for k in sd:
        for down_sfx, up_sfx in _PAIRS:
            if k.endswith(down_sfx):
                name = k[: -len(down_sfx)]
                if name + up_sfx not in sd:
                    raise LoraError(f"{source}: '{k}' has no matching '{name + up_sfx}'")
                down, up = sd[k], sd[name + up_sfx]
                if down.ndim != 2 or up.ndim != 2:
                    raise LoraError(f"{source}: '{name}' has {down.ndim}-d factors (a convolution LoRA); only "
                                    f"linear layers are supported")
                if up.shape[1] != down.shape[0]:
                    raise LoraError(f"{source}: '{name}': up {tuple(up.shape)} and down {tuple(down.shape)} ranks differ")
                alpha = sd.get(name + ".alpha")
                factors[name] = LoraFactor(down, up, None if alpha is None else float(alpha))
                used |= {k, name + up_sfx, name + ".alpha"}
    return factors, [k for k in sd if k not in used]


def _diffusers_alphas(metadata: Mapping[str, str], prefix: str) -> tuple[float | None, dict[str, float]]:
    """lora_alpha and alpha_pattern for one component from diffusers' `lora_adapter_metadata` JSON."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    meta = json.loads(raw)
    lead = prefix + "."
    if any(k.startswith(lead) for k in meta):
        meta = {k[len(lead):]: v for k, v in meta.items() if k.startswith(lead)}
    elif any(k.startswith(tuple(p + "." for p in ("transformer", *DIFFUSERS_TE))) for k in meta):
        return None, {}
    pattern = {k.lstrip("^"): float(v) for k, v in (meta.get("alpha_pattern") or {}).items()}
    alpha = meta.get("lora_alpha")
    return (None if alpha is None else float(alpha)), pattern


def _alpha_for(name: str, default: float | None, pattern: Mapping[str, float]) -> float | None:
    for key, value in pattern.items():  # PEFT matches a pattern against the end of the module path
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def _from_diffusers_transformer(factors: dict[str, LoraFactor]) -> tuple[dict[str, LoraFactor], list[str]]:
    out, parts, unknown = {}, {}, []
    for name, f in factors.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
        if m and m.group(2) in BLOCK_NAMES:
            official, part = BLOCK_NAMES[m.group(2)]
            official = f"joint_blocks.{m.group(1)}.{official}"
        elif name in GLOBAL_NAMES:
            official, part = GLOBAL_NAMES[name], None
        else:
            unknown.append(name)
            continue
        if part is not None:
            parts.setdefault(official, {})[part] = f
            continue
        if swaps_scale_shift(official, f.shape):
            f = LoraFactor(f.down, swap_halves(f.up), f.alpha)
        out[official] = f
    for official, p in parts.items():
        out[official] = merge_parts(p)
    return out, unknown


def _merge_split_qkv(factors: dict[str, LoraFactor]) -> dict[str, LoraFactor]:
    """OneTrainer-style 'attn.qkv.0/1/2' parts -> one fused 'attn.qkv' factor."""
    out, parts = {}, {}
    for name, f in factors.items():
        m = re.fullmatch(r"(.+\.qkv)\.([012])", name)
        if m:
            parts.setdefault(m.group(1), {})[int(m.group(2))] = f
        else:
            out[name] = f
    for name, p in parts.items():
        out[name] = merge_parts(p)
    return out


def read_lora(path_or_state_dict, strict_keys: bool = True) -> LoraFile:
    """Read a LoRA of any supported format (see the module docstring) into our module names.

    Raises LoraError for adapter types that are not LoRA, LoRAs for other model families, and (strict_keys) keys
    that belong to no LoRA factor of a known layout; with strict_keys=False they are returned in
    `LoraFile.metadata['unmatched']` (a JSON list) instead.
    """
    sd, metadata, source = _open(path_or_state_dict)
    if not sd:
        raise LoraError(f"{source}: the file holds no tensors")
    _refuse_other_types(sd, source)
    fmt = detect_format(sd)
    if fmt == "unknown":
        raise LoraError(f"{source}: no SD3 LoRA keys found (expected e.g. 'transformer.transformer_blocks.0.attn."
                        f"to_q.lora_A.weight', 'lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight' or "
                        f"'diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight'); first keys: "
                        f"{list(sd)[:3]}")
    factors, leftover = _pairs(sd, source)
    lora = LoraFile(fmt, metadata=metadata, source=source)
    unmatched = list(leftover)

    if fmt == "kohya":
        for name, f in factors.items():
            if name.startswith("lora_unet_"):
                lora.transformer[unflatten(name[len("lora_unet_"):])] = f
            elif name[:8] in KOHYA_TE and name[8:9] == "_":
                lora.text_encoders.setdefault(KOHYA_TE[name[:8]], {})[unflatten(name[9:])] = f
            else:
                unmatched.append(name)
        lora.transformer = _merge_split_qkv(lora.transformer)     # 'attn_qkv_0/1/2', should a tool split them
    elif fmt == "diffusers":
        components: dict[str, dict[str, LoraFactor]] = {}
        for name, f in factors.items():
            prefix, _, rest = name.partition(".")
            if prefix not in ("transformer", *DIFFUSERS_TE):
                prefix, rest = "transformer", name         # diffusers' bare transformer names
            components.setdefault(prefix, {})[rest] = f
        for prefix, comp in components.items():
            alpha, pattern = _diffusers_alphas(metadata, prefix)
            comp = {n: LoraFactor(f.down, f.up, f.alpha if f.alpha is not None else _alpha_for(n, alpha, pattern))
                    for n, f in comp.items()}
            if prefix == "transformer":
                lora.transformer, unknown = _from_diffusers_transformer(comp)
                unmatched += ["transformer." + n for n in unknown]
            else:
                lora.text_encoders[DIFFUSERS_TE[prefix]] = comp
    else:  # official names, ComfyUI / OneTrainer style
        for name, f in factors.items():
            bare = re.sub(r"^(model\.)?diffusion_model\.|^transformer\.", "", name)
            lora.transformer[bare] = f
        lora.transformer = _merge_split_qkv(lora.transformer)

    if unmatched:
        if strict_keys:
            raise LoraError(f"{source}: {len(unmatched)} keys match no LoRA factor of the {fmt} layout: "
                            f"{sorted(unmatched)[:10]}{' ...' if len(unmatched) > 10 else ''}")
        lora.metadata = {**metadata, "unmatched": json.dumps(sorted(unmatched))}
    return lora


# ---------------------------------------------------------------------------------------------------------
# Writing

def _to_diffusers_transformer(factors: Mapping[str, LoraFactor]) -> dict[str, LoraFactor]:
    out = {}
    for name, f in factors.items():
        m = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", name)
        if m and m.group(2) in OFFICIAL_TO_DIFFUSERS_BLOCK:
            names = OFFICIAL_TO_DIFFUSERS_BLOCK[m.group(2)]
            if len(names) == 3:
                for j, part in split_parts(f).items():
                    out[f"transformer_blocks.{m.group(1)}.{names[j]}"] = part
                continue
            target = f"transformer_blocks.{m.group(1)}.{names[0]}"
        elif name in OFFICIAL_TO_DIFFUSERS_GLOBAL:
            target = OFFICIAL_TO_DIFFUSERS_GLOBAL[name]
        else:
            raise LoraError(f"'{name}' has no diffusers name (diffusers' SD3 transformer has no such linear layer)")
        if swaps_scale_shift(name, f.shape):
            f = LoraFactor(f.down, swap_halves(f.up), f.alpha)
        out[target] = f
    return out


def to_state_dict(factors: Mapping[str, LoraFactor], format: str = "diffusers",
                  text_encoders: Mapping[str, Mapping[str, LoraFactor]] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our factors -> (tensors, safetensors metadata) in `format`."""
    if format not in FORMATS:
        raise LoraError(f"unknown LoRA format '{format}'; choose one of {', '.join(FORMATS)}")
    text_encoders = dict(text_encoders or {})
    for te in text_encoders:
        if te not in TEXT_ENCODERS:
            raise LoraError(f"unknown text encoder '{te}'; choose from {', '.join(TEXT_ENCODERS)}")
    sd: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    if format == "diffusers":
        te_prefix = {v: k for k, v in DIFFUSERS_TE.items()}
        components = {"transformer": _to_diffusers_transformer(factors)} if factors else {}
        components.update({te_prefix[te]: dict(f) for te, f in text_encoders.items() if f})
        for prefix, comp in components.items():
            for n, f in comp.items():
                # alpha folded into up (scale 1, alpha = rank): what every diffusers-format reader assumes
                # without metadata (diffusers' load_lora_adapter ignores the file's metadata unless told
                # use_safetensors=True; ComfyUI never reads it). Exact where alpha / rank is a power of two.
                sd[f"{prefix}.{n}.lora_A.weight"] = f.down
                sd[f"{prefix}.{n}.lora_B.weight"] = f.up if f.alpha is None else f.up * f.scale
        return sd, meta

    def put(name, f, down_key, up_key):
        sd[f"{name}.{down_key}.weight"] = f.down.contiguous()
        sd[f"{name}.{up_key}.weight"] = f.up.contiguous()
        if f.alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(f.alpha))

    if format == "kohya":
        kohya_te = {v: k for k, v in KOHYA_TE.items()}
        for n, f in factors.items():
            put("lora_unet_" + n.replace(".", "_"), f, "lora_down", "lora_up")
        for te, comp in text_encoders.items():
            for n, f in comp.items():
                put(f"{kohya_te[te]}_" + n.replace(".", "_"), f, "lora_down", "lora_up")
    else:
        if text_encoders:
            raise LoraError("the official-name LoRA layout has no text-encoder part; save text-encoder factors in "
                            "the diffusers or kohya format")
        for n, f in factors.items():
            put("diffusion_model." + n, f, "lora_A", "lora_B")
    return sd, meta


def save_lora(path, factors: Mapping[str, LoraFactor], format: str = "diffusers",
              text_encoders: Mapping[str, Mapping[str, LoraFactor]] | None = None,
              metadata: Mapping[str, str] | None = None) -> Path:
    """Write our factors as a safetensors LoRA in `format` (atomically: a temp file in the same folder, renamed)."""
    from safetensors.torch import save_file
    sd, meta = to_state_dict(factors, format, text_encoders)
    if not sd:
        raise LoraError(f"{path}: nothing to save (no factors)")
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}, **meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as tmp:
        save_file({k: v.detach().cpu().clone() for k, v in sd.items()}, tmp, metadata=meta)  # clone: parts share tensors
    return path


# ---------------------------------------------------------------------------------------------------------
# Applying: merged into the weights, removable bit-exactly

CHUNK = 1 << 21  # elements of a weight updated per step (8 MiB of fp32 delta): the whole (out, in) delta never exists


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as integers (so -0.0 and NaN compare as themselves)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _chunks(weight: torch.Tensor, f: LoraFactor, strength: float, buffers: int = 1):
    """Yield (first row, rows of `weight` (a view), fp32 work buffers of their shape, up rows, down), row chunk
    by row chunk. up is scaled by scale * strength and both factors are fp32."""
    up = f.up.to(weight.device, torch.float32) * (f.scale * strength)
    down = f.down.to(weight.device, torch.float32)
    w2 = weight.view(weight.shape[0], -1)
    step = max(1, CHUNK // max(1, w2.shape[1]))
    bufs = [torch.empty(min(step, w2.shape[0]), w2.shape[1], dtype=torch.float32, device=weight.device)
            for _ in range(buffers)]
    for r in range(0, w2.shape[0], step):
        rows = w2[r:r + step]
        yield r, rows, [b[:rows.shape[0]] for b in bufs], up[r:r + step], down


def _plus_delta(buf: torch.Tensor, rows: torch.Tensor, up: torch.Tensor, down: torch.Tensor, sign: float):
    """buf <- rows + sign * up @ down in fp32, rounded to the rows' dtype. One in-place addmm_ (BLAS adds the
    product into the buffer: no (out, in) temporary, fp32 accumulation for any weight dtype), always in a fresh
    aligned buffer so that merging, the frugal mode and removal compute the very same bits."""
    buf.copy_(rows)
    return buf.addmm_(up, down, alpha=sign).to(rows.dtype)


def _add_product_(weight: torch.Tensor, f: LoraFactor, strength: float, sign: float) -> None:
    """weight += sign * up @ down * scale * strength, in place. fp32 weights: one addmm_ into the weight itself,
    no copy (a third of the memory traffic of going through a buffer; BLAS gives the very bits of _plus_delta's
    fresh buffer, whatever the alignment: tests/test_lora_apply.py); half precision: through an fp32 buffer."""
    if weight.dtype == torch.float32:
        for _, rows, _, up, down in _chunks(weight, f, strength, buffers=0):
            rows.addmm_(up, down, alpha=sign)
        return
    for _, rows, (buf,), up, down in _chunks(weight, f, strength):
        rows.copy_(_plus_delta(buf, rows, up, down, sign))


def add_delta_(weight: torch.Tensor, f: LoraFactor, strength: float) -> None:
    """weight += up @ down * scale * strength, in place (the frugal mode calls it on each freshly converted block:
    the same bits as a merged model)."""
    _add_product_(weight, f, strength, 1.0)


def _merge_restorable(weight: torch.Tensor, f: LoraFactor, strength: float):
    """Merge exactly like add_delta_ and return what `_unmerge` needs to give back the original bits: the
    positions where (W + d) - d does not round back to W (where W + d left W's binade, and ties) and their
    original values; everywhere else subtracting the same delta restores W exactly."""
    idx, vals = [], []
    for r, rows, (buf, buf2), up, down in _chunks(weight, f, strength, buffers=2):
        new = _plus_delta(buf, rows, up, down, 1.0)
        back = _plus_delta(buf2, new, up, down, -1.0)              # exactly what _unmerge will compute
        bad = (_bits(back) != _bits(rows)).view(-1).nonzero().view(-1)
        if len(bad):
            idx.append((bad + r * rows.shape[1]).to(torch.int32 if weight.numel() < 2 ** 31 else torch.int64))
            vals.append(rows.reshape(-1)[bad])
        rows.copy_(new)
    return (torch.cat(idx), torch.cat(vals)) if idx else None


def _unmerge(weight: torch.Tensor, f: LoraFactor, strength: float, fix) -> None:
    _add_product_(weight, f, strength, -1.0)
    if fix is not None:
        weight.view(-1)[fix[0].long()] = fix[1]


class LoraHandle:
    """What `apply_lora` / `merge_lora` did; `.remove()` undoes it (bit-identical weights)."""

    def __init__(self, module: torch.nn.Module, format: str, source: str, strength: float):
        self.module, self.format, self.source, self.strength = module, format, source, strength
        self.merged: list[tuple[torch.nn.Parameter, LoraFactor, object]] = []   # (weight, factor, fixups)
        self.streamed: list[tuple[torch.nn.Parameter, object]] = []             # (weight, adjust callable)
        self.removed = False
        self.restorable = True

    @property
    def targets(self) -> int:
        return len(self.merged) + len(self.streamed)

    def remove(self) -> None:
        if self.removed:
            raise RuntimeError(f"the LoRA {self.source} was already removed")
        if not self.restorable:
            raise RuntimeError(f"the LoRA {self.source} was merged with restorable=False: reload the model instead")
        stack = self.module._lora_handles
        if stack[-1] is not self:
            raise RuntimeError(f"remove LoRAs in reverse order of application: {stack[-1].source} was applied "
                               f"after {self.source}; remove it first")
        with torch.no_grad():
            for p, f, fix in reversed(self.merged):
                _unmerge(p.data, f, self.strength, fix)
        from .streaming import weight_adjustments
        adjust = weight_adjustments(self.module)
        for p, fn in self.streamed:
            adjust[p].remove(fn)
        stack.pop()
        self.removed = True

    def __repr__(self) -> str:
        return f"LoraHandle({self.source}, format={self.format}, strength={self.strength}, {self.targets} weights)"


def merge_lora(module: torch.nn.Module, factors: Mapping[str, LoraFactor], strength: float = 1.0,
               source: str = "<LoRA>", format: str = "?", strict: bool = True,
               restorable: bool = True) -> LoraHandle:
    """Add each factor's delta to `module`'s `<path>.weight` (any nn.Module: our transformer or text encoders).

    A module whose weights are streamed (mmditx.streaming, the frugal memory mode) keeps its stored weights:
    the delta is added to each converted copy just before the block runs (same bits as merged).
    Unknown paths or wrong shapes: LoraError listing them; strict=False skips them with a warning.
    A layer with a `weight_scale` (scaled fp8, encoders.t5.CastLinear: the true weight is the stored one times
    it) gets delta / weight_scale added to the stored weight, so that the true weight changes by the delta.
    restorable=False merges with one product per weight and keeps nothing for `.remove()` (which then
    refuses): for runs that never take a LoRA off (the pipeline)."""
    import warnings

    from .streaming import weight_adjustments
    strength = float(strength)
    params = dict(module.named_parameters())
    modules = dict(module.named_modules())
    bad = []
    for name, f in factors.items():
        w = params.get(name + ".weight")
        if w is None:
            bad.append(f"{name} (no such layer)")
        elif w.dim() < 2 or (w.shape[0], w[0].numel()) != f.shape:
            bad.append(f"{name} (LoRA for {f.shape[0]}x{f.shape[1]}, weight is {'x'.join(map(str, w.shape))})")
    if bad:
        msg = f"{source}: {len(bad)} of {len(factors)} LoRA layers match nothing in the model: " \
              f"{', '.join(sorted(bad)[:8])}{' ...' if len(bad) > 8 else ''}"
        if strict:
            raise LoraError(msg + " (strict=False skips them)")
        warnings.warn(f"{source}: ignoring {len(bad)} of {len(factors)} LoRA layers that match nothing in the model")
    handle = LoraHandle(module, format, source, strength)
    adjust = weight_adjustments(module)
    with torch.no_grad():
        for name, f in factors.items():
            w = params.get(name + ".weight")
            if w is None or (w.shape[0], w[0].numel()) != f.shape:
                continue
            scale = getattr(modules.get(name), "weight_scale", None)
            if scale is not None:   # in the stored weight's units (one fp32 division of up; remove() uses the same)
                f = LoraFactor(f.down, f.up.float() / float(scale), f.alpha)
            if adjust is not None:
                fn = _StreamedDelta(f, strength)
                adjust.setdefault(w, []).append(fn)
                handle.streamed.append((w, fn))
            elif restorable:
                handle.merged.append((w, f, _merge_restorable(w.data, f, strength)))
            else:
                add_delta_(w.data, f, strength)
                handle.restorable = False
    if not hasattr(module, "_lora_handles"):
        module._lora_handles = []
    module._lora_handles.append(handle)
    return handle


class _StreamedDelta:
    def __init__(self, factor: LoraFactor, strength: float):
        self.factor, self.strength = factor, strength

    def __call__(self, weight: torch.Tensor) -> None:
        add_delta_(weight, self.factor, self.strength)


# -- which model a LoRA was made for ---------------------------------------------------------------------

_BLOCK_IN_D = re.compile(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(attn2?\.(qkv|proj)|mlp\.fc1|adaLN_modulation\.1)")


def describe_model(hidden: int, depth: int, dual: bool | None) -> str:
    known = {(2432, 38): "SD3.5 Large", (1536, 24): "SD3.5 Medium" if dual else "SD3 Medium"}
    name = known.get((hidden, depth))
    if name is None and dual is None and hidden == 1536:
        name = "SD3.5 Medium or SD3 Medium"
    what = f"hidden size {hidden}, {depth} blocks"
    return f"{name} ({what})" if name else f"an MMDiT with {what}"


def check_made_for(cfg, factors: Mapping[str, LoraFactor], source: str) -> None:
    """Refuse, naming both, a LoRA whose shapes say it was made for another MMDiT (e.g. SD3.5 Large on Medium).
    cfg: the model's MMDiTXConfig (`model.config`, or `read_config(path)` before loading anything)."""
    ours = describe_model(cfg.hidden_size, cfg.depth, bool(cfg.dual_attention_blocks))
    widths, depth, dual = set(), 0, False
    for name, f in factors.items():
        m = _BLOCK_IN_D.fullmatch(name)
        if m:
            widths.add(f.shape[1])
            depth = max(depth, int(m.group(1)) + 1)
            dual |= ".attn2." in name
    if not widths:
        return
    hidden = max(widths)
    if hidden != cfg.hidden_size or depth > cfg.depth:
        theirs = describe_model(hidden, max(depth, 1), dual or None)
        theirs = theirs.replace(f"{depth} blocks", f"at least {depth} blocks") if theirs.startswith("an ") else theirs
        raise LoraError(f"{source}: this LoRA was made for {theirs}; the model is {ours}")
    if dual and not cfg.dual_attention_blocks:
        raise LoraError(f"{source}: this LoRA adapts the dual attention (attn2) of SD3.5 Medium (MMDiT-X); the "
                        f"model is {ours}, which has none")


def apply_lora(model, path_or_state_dict, strength: float = 1.0, strict: bool = True,
               restorable: bool = True) -> LoraHandle:
    """Merge the transformer part of a LoRA file (any format of this module) into an MMDiTX, scaled by
    `strength` (any real number: negative subtracts, above 1 exaggerates). Several LoRAs stack; the handle's
    `.remove()` restores the exact weights (remove in reverse order; restorable=False merges faster and keeps
    nothing, see merge_lora). Text-encoder parts are left to
    `sampling` (`Pipeline(loras=...)`), which owns the encoders.

        handle = mmditx.apply_lora(model, "style.safetensors", strength=0.8)
        print(handle.format)          # 'diffusers', 'kohya' or 'official'
        handle.remove()
    """
    lora = path_or_state_dict if isinstance(path_or_state_dict, LoraFile) else read_lora(path_or_state_dict, strict)
    unmatched = json.loads(lora.metadata.get("unmatched", "[]"))
    if unmatched:
        import warnings
        warnings.warn(f"{lora.source}: ignoring {len(unmatched)} keys that match no LoRA layer of the "
                      f"{lora.format} layout")
    if not lora.transformer:
        raise LoraError(f"{lora.source}: the LoRA has no transformer part (only text encoders: "
                        f"{', '.join(lora.text_encoders) or 'none'})")
    check_made_for(model.config, lora.transformer, lora.source)
    return merge_lora(model, lora.transformer, strength, lora.source, lora.format, strict, restorable)


def random_lora_factors(module: torch.nn.Module, rank: int = 8, seed: int = 0, magnitude: float = 0.02,
                        include=lambda name: True) -> dict[str, LoraFactor]:
    """A random LoRA on every nn.Linear of `module` (for demos, tests and benchmarks; works on the meta device
    for shapes only): down ~ N(0, 1/in), up ~ N(0, magnitude^2), alpha = rank. Each delta has entries of
    about `magnitude` times the input's scale."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and include(name):
            out[name] = LoraFactor(torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5,
                                   torch.randn(m.out_features, rank, generator=g) * magnitude)
    return out
