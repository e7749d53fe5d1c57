"""Write the demo model's synthetic dataset: coloured shapes with captions, from a seed.

    python scripts/make_shapes_dataset.py OUT_DIR --count 20000 --size 128 --seed 0

OUT_DIR gets 000000.png + 000000.txt (the caption: the kohya layout scripts/train.py reads) + 000000.json
(the scene's ground truth), and dataset.json (vocabulary, held-out combinations, parameters). The same seed
gives the same files; a dataset of N samples is the first N of any larger one. See docs/demo_model.md.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

from scripts.errors import add_debug_flag, run_cli  # noqa: E402
from training.demo.shapes import HELD_OUT, NEW_SHAPES, SHAPES, vocabulary, write_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the synthetic shapes dataset of the demo model.")
    p.add_argument("out_dir", type=Path, help="new folder to write (must not exist or be empty)")
    p.add_argument("--count", type=int, default=20000, help="number of images (default 20000)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes objects are drawn from "
                   f"(default: the demo's {len(SHAPES)}; 'heart': the new word of the LoRA example)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    start = time.perf_counter()

    def progress(done):
        if done % 1000 == 0 or done == args.count:
            print(f"\r{done}/{args.count} images, {time.perf_counter() - start:.0f} s", end="", file=sys.stderr)
    shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
    unknown = sorted(set(shapes) - set(SHAPES + NEW_SHAPES))
    if unknown or not shapes:
        raise ValueError(f"--shapes {args.shapes!r}: unknown {unknown or 'none given'}; choose from "
                         f"{', '.join(SHAPES + NEW_SHAPES)}")
    out = write_dataset(args.out_dir, args.count, args.size, args.seed, progress=progress, shapes=shapes)
    print(file=sys.stderr)
    print(vocabulary(), file=sys.stderr)
    print(f"held out: {len(HELD_OUT.colour_shape)} colour x shape, {len(HELD_OUT.colour_background)} colour x "
          f"background, {len(HELD_OUT.shape_pairs)} shape pairs (never in these images)", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
