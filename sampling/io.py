"""Writing images safely: names that never overwrite a file, PNG text metadata that reproduces the image,
and a progress bar with the step rate and the time left."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

from PIL import Image, PngImagePlugin

from .metadata import METADATA_KEY, read_png_metadata

MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485   # input images larger than this are refused


def prepare_output(out: str | os.PathLike, file_allowed: bool = True) -> tuple[Path, Path | None]:
    """Check `--out` before anything is loaded: (directory, file name or None). A path ending in .png names one
    file (later images get _1, _2, ...), anything else (or all, file_allowed=False) a directory; it is created, and a test file is written
    and removed, so an unwritable, read-only or missing place fails now, not after minutes of sampling."""
    out = Path(out).expanduser()
    directory, name = (out.parent, out) if file_allowed and out.suffix.lower() == ".png" else (out, None)
    directory = directory.resolve()
    if name is not None and name.is_dir():
        raise NotADirectoryError(f"--out {out} is a directory named like a .png file: give another name")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".mmditx-write-test-{os.getpid()}.partial"
        probe.write_bytes(b"x")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"--out {out}: {directory} or one of its parents is a file, not a directory: "
                                 "give a directory (it is created if missing)") from None
    except OSError as e:
        raise OSError(f"--out {out}: cannot write in {directory} ({e.strerror or e}): choose a writable "
                      "directory") from None
    return directory, (directory / name.name if name is not None else None)


def claim_path(path: str | os.PathLike, data: Path) -> Path:
    """Move the finished file `data` to `path`, or `stem_1.png`, `stem_2.png`, ... : the first name that does not
    exist yet, atomically (a hard link fails if the name exists), so two concurrent runs never share a name,
    an existing file is never overwritten and a name only ever holds a complete file."""
    path = Path(path)
    candidate, n = path, 0
    while True:
        try:
            os.link(data, candidate)
            os.unlink(data)
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        except OSError:   # a file system without hard links: check, then rename (same directory, atomic)
            if candidate.exists():
                n += 1
                candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
                continue
            os.rename(data, candidate)
            return candidate


def save_png(image: Image.Image, path: str | os.PathLike, params: dict) -> Path:
    """Save `image` as PNG under a fresh name (see claim_path) with `params` as JSON text metadata. The PNG is
    written to a hidden temporary file in the same directory first (`.NAME.PID.partial`, never taken for an
    output), so a kill or a full disk never leaves a partial PNG under an output's name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(params, sort_keys=True))
    if "prompt" in params:  # also readable by common image viewers and other tools 
        info.add_text("parameters", str(params["prompt"]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        return claim_path(path, tmp)
    finally:
        tmp.unlink(missing_ok=True)


def read_png_params(path: str | os.PathLike) -> dict:
    """The generation parameters stored by `save_png` (a dict, unchecked: see GenerationParams.from_dict)."""
    return read_png_metadata(path)


def check_image_file(path: str | os.PathLike, what: str = "image") -> None:
    """read_image's checks from the header alone (cheap: nothing is decoded)."""
    read_image(path, what, decode=False)


def read_image(path: str | os.PathLike, what: str = "image", decode: bool = True) -> Image.Image | None:
    """An RGB image from a file, with one-line errors: not a regular file (a FIFO would hang), not an image,
    or more than MAX_IMAGE_PIXELS pixels (a decompression bomb)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: not found or not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{w}x{h} pixels is more than the {MAX_IMAGE_PIXELS} allowed")
                return im.convert("RGB") if decode else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"cannot read the {what} {path}: too large ({e}); scale it down first") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read the {what} {path}: {e}") from None


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
