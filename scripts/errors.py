"""The scripts' error boundary: every failure ends as one line on stderr that says what to do.

    from scripts.errors import add_debug_flag, run_cli
    ...
    if __name__ == "__main__":
        sys.exit(run_cli(main))

Expected failures (bad values, bad files, OS and device errors) print `error: ...` and exit 1 (2 for usage
errors from argparse, 130 when interrupted); anything else prints `internal error: ...`, asking for a report.
The traceback is printed only with `--debug`.
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from typing import Callable, Sequence

# What to do, by errno, for OS errors whose message alone does not say it.
_OS_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere (--out)",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EMFILE: "raise the limit on open files (ulimit -n)",
}


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback")


def describe(e: BaseException) -> tuple[str, bool]:
    """(one-line message, expected?) for an exception: expected failures are the user's to fix."""
    from PIL import Image

    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
            isinstance(e, RuntimeError) and "out of memory" in str(e).lower()):
        return ("out of memory: use a smaller size, --batch-size 1, or --memory sequential / frugal", True)
    if isinstance(e, Image.DecompressionBombError):
        return (f"image too large ({e}): scale it down first", True)
    if isinstance(e, UnicodeDecodeError):
        where = f" at byte {e.start}" if e.start is not None else ""
        return (f"a file is not valid UTF-8 text{where} ({e.reason}): save it as UTF-8", True)
    if isinstance(e, UnicodeError):
        return (f"text that is not valid UTF-8 ({e}): check the terminal's or file's encoding", True)
    if isinstance(e, OSError):
        if e.strerror and e.filename is not None:
            message = f"{e.filename}: {e.strerror}"
        else:
            message = str(e) or type(e).__name__
        hint = _OS_HINTS.get(e.errno)
        return (f"{message}: {hint}" if hint and hint not in message else message, True)
    if isinstance(e, ValueError):   # ours (CheckpointError, MetadataError, ...) say what is wrong and what to do
        return (str(e), True)
    if isinstance(e, (RuntimeError, AssertionError)) and any(
            w in str(e) for w in ("CUDA", "cuda", "MPS", "device", "Torch not compiled")):
        return (f"device error: {e} (use --device cpu, or check the GPU driver)", True)
    return (f"{type(e).__name__}: {e}", False)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call main(argv) inside the error boundary; return the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - this is the boundary
        if debug:
            traceback.print_exc()
        message, expected = describe(e)
        message = " ".join(message.split())  # one line
        if expected:
            print(f"error: {message}", file=sys.stderr)
        else:
            print(f"internal error: {message}. Rerun with --debug for the traceback, and please report it.",
                  file=sys.stderr)
        return 1


def bounded(kind: type, lo=None, hi=None):
    """An argparse `type=` that also checks lo <= value <= hi (and finiteness for floats), naming the limit."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            limits = " and ".join(s for s in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None
                                                                                    else "") if s)
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {limits}")
        return value
    parse.__name__ = kind.__name__
    return parse
