"""LoRAs in the pipeline: read once, applied to the transformer and the text encoders as each is loaded, and
recorded (file name, sha256 of the content, strength) so `--reproduce` applies them again.

The key conventions and the merging live in mmditx.lora (one home); this module owns what mmditx cannot:
the text encoders (CLIP-L, CLIP-G, T5 modules of `encoders`), and files named on a command line.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from mmditx.lora import LoraError, LoraFile, LoraHandle, check_made_for, merge_lora, read_lora

from .metadata import LoraRecord


@dataclass
class LoadedLora:
    path: Path
    strength: float
    sha256: str
    lora: LoraFile

    def record(self) -> LoraRecord:
        """What a PNG stores: enough to find the file again and to notice it changed."""
        return LoraRecord(file=self.path.name, path=str(self.path), sha256=self.sha256, strength=self.strength)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """'FILE[:STRENGTH]' -> (path, strength); strength defaults to 1.0 (a ':' inside FILE is kept)."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def load_loras(specs, config=None) -> list[LoadedLora]:
    """[(path, strength), ...] -> read and checked LoRAs (errors before any model is loaded). config: the
    transformer's MMDiTXConfig, to refuse a LoRA made for another model at once."""
    out = []
    for spec in specs or ():
        path, strength = (spec, 1.0) if isinstance(spec, (str, os.PathLike)) else spec
        path = Path(path)
        lora = read_lora(path)
        if config is not None and lora.transformer:
            check_made_for(config, lora.transformer, str(path))
        out.append(LoadedLora(path, float(strength), file_sha256(path), lora))
    return out


def apply_to_transformer(model, loras: list[LoadedLora]) -> list[LoraHandle]:
    # restorable=False: a pipeline never takes a LoRA off (one product per weight, nothing kept)
    return [merge_lora(model, x.lora.transformer, x.strength, str(x.path), x.lora.format, restorable=False)
            for x in loras if x.lora.transformer]


def apply_to_text_encoders(conditioner, loras: list[LoadedLora]) -> list[LoraHandle]:
    """The text-encoder parts onto a TextConditioner's clip_l / clip_g / t5 (our module paths are the
    transformers names every LoRA format uses for them)."""
    handles = []
    for x in loras:
        for name, factors in x.lora.text_encoders.items():
            module = getattr(conditioner, name)
            if module is None:
                raise LoraError(f"{x.path}: the LoRA adapts T5, but the pipeline runs without T5 (--t5 off)")
            handles.append(merge_lora(module, factors, x.strength, f"{x.path} ({name})", x.lora.format,
                                      restorable=False))
    return handles


def check_reproduce(recorded: list[LoraRecord], given: list[tuple[Path, float]]) -> list[tuple[Path, float]]:
    """The LoRAs a PNG recorded, found again: the recorded path, or a file of the same name among `given`
    (--lora FILE on the command line), with the recorded strength; refused if the content changed."""
    by_name = {Path(p).name: Path(p) for p, _ in given}
    out = []
    for r in recorded:
        path = by_name.get(r.file, Path(r.path))
        if not path.is_file():
            raise LoraError(f"the image used the LoRA {r.file} (sha256 {r.sha256[:12]}...), which is not at "
                            f"{r.path}: pass it with --lora FILE")
        digest = file_sha256(path)
        if digest != r.sha256:
            raise LoraError(f"{path}: this LoRA file changed since the image was made (sha256 {digest[:12]}... "
                            f"instead of {r.sha256[:12]}...); the image cannot be reproduced with it")
        out.append((path, r.strength))
    return out
