"""A small example image folder (kohya layout: name.png + name.txt), so every training command in the README
runs on a fresh machine: flat-coloured shapes on plain backgrounds, one caption per image."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square")


def make_example_data(folder: str | Path, count: int = 8, size: int = 256, seed: int = 0) -> Path:
    """Write `count` images of `size` x `size` pixels with captions into `folder` (created; files replaced)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    for i in range(count):
        shape, fg = SHAPES[i % 2], names[i % len(names)]
        bg = names[(i + 3) % len(names)]
        im = Image.new("RGB", (size, size), COLOURS[bg])
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLOURS[fg])
        im.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {fg} {shape} on a {bg} background\n")
    return folder
