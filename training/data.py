"""Image folders with captions -> (image, caption) examples sorted into aspect-ratio buckets.

Two layouts, as people already keep them:
  - `name.png|jpg|jpeg|webp` beside `name.txt` holding the caption (kohya / DreamBooth);
  - `metadata.jsonl` with one {"file_name": ..., "text": ...} per line (Hugging Face imagefolder).
Buckets are sizes (multiples of 64) whose area is at most a target area, aspect ratios up to `max_ratio`
(kohya's and SimpleTuner's scheme); each image goes to the bucket of closest aspect ratio, is resized to cover
it and cropped (center or random). Problems (unreadable image, missing caption, image smaller than the
smallest bucket) are collected and reported with counts and names; `on_error` skips them or stops.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
STEP = 64  # bucket sides are multiples of 64 pixels (8 latent positions: whole 2x2 patches)


class DataError(ValueError):
    """The image folder cannot be used as asked; the message lists the files and what to do."""


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    size: tuple[int, int]          # (width, height) as stored
    bucket: tuple[int, int]        # (width, height) it is trained at


@dataclass
class Report:
    """What was skipped, by reason: {reason: [file names]}."""
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.problems.setdefault(reason, []).append(name)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def summary(self, limit: int = 5) -> str:
        parts = []
        for reason, names in sorted(self.problems.items()):
            shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
            parts.append(f"{len(names)} {reason}: {shown}")
        return "; ".join(parts)


def make_buckets(area: int = 1024 * 1024, max_ratio: float = 2.0, step: int = STEP) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, for each width the largest height with w*h <= area,
    aspect ratios within [1/max_ratio, max_ratio]. 512x512 area: (256, 1024) ... (512, 512) ... (1024, 256)."""
    if area < step * step:
        raise DataError(f"target area {area} is below one {step}x{step} bucket; use a resolution of at least {step}")
    buckets = set()
    for w in range(step, int(math.sqrt(area * max_ratio)) + step, step):
        h = (area // w) // step * step
        if h >= step and 1 / max_ratio <= w / h <= max_ratio:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def closest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def read_captions(root: Path) -> tuple[dict[Path, str | None], Report]:
    """{image path: caption or None} from metadata.jsonl if present, else from .txt files beside the images."""
    report = Report()
    meta = root / "metadata.jsonl"
    if meta.is_file():
        captions: dict[Path, str | None] = {}
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[root / row["file_name"]] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                report.add("bad metadata.jsonl lines (need file_name and text)", f"line {n}")
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p not in captions:
                captions[p] = None
        return captions, report
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    caps = {}
    for p in images:
        txt = p.with_suffix(".txt")
        caps[p] = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
    return caps, report


def scan_folder(root: str | Path, resolution: int = 1024, max_ratio: float = 2.0,
                on_error: str = "skip") -> tuple[list[Example], Report]:
    """The usable examples of an image folder and a report of the rest. on_error: 'skip' or 'stop'
    ('stop' raises DataError listing every problem)."""
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', not {on_error!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    buckets = make_buckets(resolution * resolution, max_ratio)
    smallest = min(min(b) for b in buckets)
    captions, report = read_captions(root)
    examples = []
    for path, caption in sorted(captions.items()):
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        if not path.is_file():
            report.add("listed in metadata.jsonl but missing", name)
            continue
        if caption is None:
            report.add("images without a caption (.txt or metadata.jsonl)", name)
            continue
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                size = im.size
        except Exception:  # PIL raises many kinds on corrupt files
            report.add("unreadable images", name)
            continue
        if min(size) < smallest:
            report.add(f"images smaller than the smallest bucket side ({smallest} px)", name)
            continue
        examples.append(Example(path, caption, size, closest_bucket(size, buckets)))
    if report and on_error == "stop":
        raise DataError(f"{root}: {report.summary(limit=20)}. Fix or remove these files, or pass --on-error skip")
    if not examples:
        raise DataError(f"{root}: no usable images ({report.summary() or 'the folder has no images'}); "
                        f"images are {', '.join(IMAGE_SUFFIXES)} with a caption in name.txt or metadata.jsonl")
    return examples, report


def load_crop(example: Example, crop: str = "center", rng: random.Random | None = None,
              flip: bool = False) -> Image.Image:
    """The example's image resized to cover its bucket, then cropped to it (center or random), then mirrored."""
    w, h = example.bucket
    with Image.open(example.image) as im:
        im = im.convert("RGB")
        scale = max(w / im.width, h / im.height)
        rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((rw, rh), Image.LANCZOS)
    if crop == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, rw - w), rng.randint(0, rh - h)
    else:
        left, top = (rw - w) // 2, (rh - h) // 2
    im = im.crop((left, top, left + w, top + h))
    return im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im
