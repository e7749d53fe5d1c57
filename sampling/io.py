"""Writing images safely: names that never overwrite a file, PNG text metadata that reproduces the image,
and a progress bar with the step rate and the time left."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from PIL import Image, PngImagePlugin

METADATA_KEY = "mmditx"  # PNG tEXt chunk holding the JSON of every generation parameter


def claim_path(path: str | os.PathLike) -> Path:
    """Return `path`, or `stem_1.png`, `stem_2.png`, ... : the first name that does not exist yet.

    The file is created atomically (O_EXCL) so two concurrent runs can never pick the same name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 0
    while True:
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")


def save_png(image: Image.Image, path: str | os.PathLike, params: dict) -> Path:
    """Save `image` as PNG under a fresh name (see claim_path) with `params` as JSON text metadata."""
    target = claim_path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(params, sort_keys=True))
    if "prompt" in params:  # also readable by common image viewers and other tools
        info.add_text("parameters", str(params["prompt"]))
    image.save(target, format="PNG", pnginfo=info)
    return target


def read_png_params(path: str | os.PathLike) -> dict:
    """The generation parameters stored by `save_png`."""
    with Image.open(path) as im:
        text = im.text.get(METADATA_KEY) if hasattr(im, "text") else None
    if text is None:
        raise ValueError(f"{path}: no mmditx generation metadata in this PNG")
    return json.loads(text)


def progress_callback(quiet: bool = False):
    """A sampling callback (`Pipeline.generate(callback=...)`) that draws one ProgressBar per run; None when
    quiet. Each bar starts at the sampler's announcement (step -1), after loading and prompt encoding."""
    if quiet:
        return None
    bars = []

    def progress(i, total, denoised):
        if i < 0:
            bars.append(ProgressBar(total))
        else:
            bars[-1].update(i + 1)
    return progress


class ProgressBar:
    """`[#####-----] 12/40 steps  2.31 s/step  1m04s left`, redrawn in place on a terminal (stderr)."""

    def __init__(self, total: int, label: str = "steps", stream=None, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.done = 0

    def update(self, done: int | None = None) -> str:
        self.done = self.done + 1 if done is None else done
        elapsed = time.perf_counter() - self.start
        per = elapsed / max(self.done, 1)
        left = per * (self.total - self.done)
        filled = int(self.width * self.done / max(self.total, 1))
        rate = f"{per:.2f} s/step" if per >= 1 else f"{1 / per:.2f} steps/s" if per > 0 else ""
        line = (f"[{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} {self.label}  "
                f"{rate}  {int(left // 60)}m{int(left % 60):02d}s left")
        end = "\n" if self.done >= self.total else ""
        if self.stream is not None:
            self.stream.write(("\r" if self.stream.isatty() else "") + line + (end if self.stream.isatty() else "\n"))
            self.stream.flush()
        return line
