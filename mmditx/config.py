"""The MMDiT-X configuration, and how to read it off a checkpoint's tensor shapes.

Nothing here is hard-coded per model: SD3.5 Medium, SD3.5 Large and SD3 Medium all come out of
`MMDiTXConfig.from_shapes`. The shipped `configs/*.json` are these inferred values written down.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from configs import CONFIG_DIR

HEAD_DIM = 64  # every SD3 model: heads = hidden_size / 64


class ConfigError(ValueError):
    """The tensors do not describe an MMDiT-X model (missing pieces or another architecture)."""


@dataclass(frozen=True)
class MMDiTXConfig:
    hidden_size: int = 1536          # width of both streams = 64 * num_heads
    depth: int = 24                  # number of joint blocks
    patch_size: int = 2
    in_channels: int = 16            # latent channels
    out_channels: int = 16
    mlp_ratio: float = 4.0
    pos_embed_max_size: int = 384    # the stored table covers a pos_embed_max_size^2 patch grid
    context_dim: int = 4096          # text tokens in: CLIP-L|G (padded) and T5 features
    pooled_dim: int = 2048           # pooled CLIP-L ++ CLIP-G vector
    qk_norm: bool = True             # RMSNorm on q and k per head (SD3.5); SD3 Medium has none
    dual_attention_blocks: tuple[int, ...] = field(default_factory=lambda: tuple(range(13)))  # x_block.attn2

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def max_latent_size(self) -> int:
        """Largest latent height/width the positional table allows."""
        return self.pos_embed_max_size * self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dual_attention_blocks"] = list(self.dual_attention_blocks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "MMDiTXConfig":
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown configuration fields {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        d["dual_attention_blocks"] = tuple(d.get("dual_attention_blocks", ()))
        return cls(**d)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> "MMDiTXConfig":
        """Infer the configuration from {name: shape} of a transformer state dict (no prefix)."""

        def need(key: str, rank: int) -> tuple[int, ...]:
            if key not in shapes:
                raise ConfigError(f"{source}: missing key {key!r}, needed to infer the MMDiT-X configuration")
            shape = tuple(shapes[key])
            if len(shape) != rank or min(shape, default=0) < 1:
                raise ConfigError(f"{source}: {key!r} has shape {list(shape)}; an MMDiT-X transformer has {rank} "
                                  "positive dimensions there. Is this the right file, and intact?")
            return shape

        hidden, in_ch, patch, _ = need("x_embedder.proj.weight", 4)
        blocks = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
        if not blocks:
            raise ConfigError(f"{source}: no joint_blocks.* keys: not an MMDiT transformer")
        if blocks != list(range(len(blocks))):
            missing = sorted(set(range(blocks[-1] + 1)) - set(blocks))
            raise ConfigError(f"{source}: joint blocks {missing} are missing (found blocks 0..{blocks[-1]} with gaps)")
        n_pos = need("pos_embed", 3)[1]
        side = math.isqrt(n_pos)
        if side * side != n_pos:
            raise ConfigError(f"{source}: pos_embed has {n_pos} positions, not a square grid")
        if hidden % HEAD_DIM:
            raise ConfigError(f"{source}: hidden size {hidden} is not a multiple of the head size {HEAD_DIM}")
        return cls(
            hidden_size=hidden,
            depth=len(blocks),
            patch_size=patch,
            in_channels=in_ch,
            out_channels=need("final_layer.linear.weight", 2)[0] // (patch * patch),
            mlp_ratio=need("joint_blocks.0.x_block.mlp.fc1.weight", 2)[0] / hidden,
            pos_embed_max_size=side,
            context_dim=need("context_embedder.weight", 2)[1],
            pooled_dim=need("y_embedder.mlp.0.weight", 2)[1],
            qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
            dual_attention_blocks=tuple(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
        )


def load_config(name_or_path: str | Path) -> MMDiTXConfig:
    """A named configuration from configs/ ('sd3.5_medium', 'sd3.5_large', 'sd3_medium', 'tiny') or a JSON path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.json") if not p.stem.startswith("sampling"))
        raise ConfigError(f"no configuration {str(name_or_path)!r}: use one of {names} or a path to a .json file")
    data = json.loads(path.read_text())
    return MMDiTXConfig.from_dict(data.get("transformer", data))
