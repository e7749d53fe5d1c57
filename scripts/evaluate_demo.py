"""Check generated images against their prompts: the demo model's prompt-following, per attribute.

    python scripts/evaluate_demo.py --prompts held_out > held_out.txt      # the evaluation prompts
    python scripts/generate.py --prompt-file held_out.txt --num-images 4 --out gen/   # 4 seeds each
    python scripts/evaluate_demo.py gen/ --grid grid.png --json report.json
    python scripts/evaluate_demo.py --compare a.json b.json              # a markdown table, one row per report
    python scripts/evaluate_demo.py --text-probe sampling/demo_model     # what the text encoders carry
    python scripts/evaluate_demo.py --restore sampling/demo_model        # where each attribute is decided
    python scripts/evaluate_demo.py --vae-colours sampling/demo_model    # each palette pair through the VAE

Each PNG's ground truth is its dataset sidecar (name.json), else the prompt generate.py stored in it, else
name.txt, read with the dataset's grammar; prompts naming a held-out combination count as 'held out'. The
reader is plain colour and geometry statistics (training/demo/evaluate.py); run it on a dataset folder
(scripts/make_shapes_dataset.py) to see its own accuracy on ground truth.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

from mmditx.checkpoint import written_whole  # noqa: E402
from scripts.errors import add_debug_flag, run_cli  # noqa: E402
from training.demo.evaluate import (ATTRIBUTES, accuracies, compare_table, evaluate_folder,  # noqa: E402
                                    format_table, ground_truth_trials, markdown_table, write_grid)
from training.demo.shapes import NEW_SHAPES, SHAPES, evaluation_prompts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Per-attribute accuracy of demo-model images against their prompts.")
    p.add_argument("folder", type=Path, nargs="?", help="folder of PNG images")
    p.add_argument("--prompts", choices=["seen", "held_out", "new_shapes"],
                   help="print the evaluation prompts of this split, one per line, and exit")
    p.add_argument("--per-combination", type=int, default=2,
                   help="with --prompts: prompts per held-out combination (and as many seen ones; default 2)")
    p.add_argument("--grid", type=Path, help="write a grid PNG (green frame: everything asked is right)")
    p.add_argument("--json", type=Path, help="write per-image readings and the accuracy table as JSON")
    p.add_argument("--compare", type=Path, nargs="+", metavar="REPORT",
                   help="print a markdown table of these --json reports (cells: seen / held-out %%) and exit")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    p.add_argument("--new-shapes", action="store_true",
                   help=f"also accept and read {', '.join(NEW_SHAPES)} (the word a LoRA teaches; not in the dataset)")
    p.add_argument("--self-test", type=int, metavar="N",
                   help="the reader's own accuracy on N freshly rendered scenes (no folder needed)")
    p.add_argument("--size", type=int, default=128, help="with --self-test: image side (default 128)")
    p.add_argument("--degrade", metavar="BLUR,NOISE,SHIFT",
                   help="with --self-test: blur radius (px at 128), noise sd, colour shift, e.g. 1,8,15")
    p.add_argument("--thumbnail", type=int, metavar="CELLS",
                   help="with --self-test: squeeze each scene through a CELLS x CELLS RGB image first")
    p.add_argument("--seed", type=int, default=0, help="with --self-test")
    p.add_argument("--text-probe", type=Path, metavar="MODEL_DIR",
                   help="how linearly readable each attribute is from the text encoders' output (pooled vector, "
                        "padding tokens) of this demo model set, 4,000 one-object captions; then exit")
    p.add_argument("--restore", type=Path, metavar="MODEL_DIR",
                   help="per noise level: new scenes noised to sigma s and denoised by this demo model set, read "
                        "back (where the model decides each attribute; training.demo.train.restoration_check)")
    p.add_argument("--restore-count", type=int, default=48, metavar="N", help="with --restore: scenes (default 48)")
    p.add_argument("--vae-colours", type=Path, metavar="MODEL_DIR",
                   help="every palette colour on every background through this demo model set's VAE: the RGB "
                        "it gives back, ** where a channel is more than 40 off; then exit")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.prompts:
        for prompt, _ in evaluation_prompts(args.prompts, args.per_combination):
            print(prompt)
        return 0
    if args.compare:
        tables = {}
        for path in args.compare:
            try:
                acc = json.loads(path.read_text(encoding="utf-8"))["accuracy"]
            except (OSError, ValueError, KeyError) as e:
                raise SystemExit(f"error: {path}: not a report of evaluate_demo.py --json ({e})")
            tables[path.stem] = {s: {a: (c["right"], c["asked"]) for a, c in row.items()} for s, row in acc.items()}
        print(compare_table(tables))
        return 0
    if args.restore or args.text_probe:
        from encoders import TextConditioner
    if args.restore:
        from mmditx import load_mmditx
        from training.demo.train import restoration_check
        from vae import load_vae

        model_file = args.restore / "sd3.5_medium.safetensors"
        table = restoration_check(load_mmditx(model_file).eval(), load_vae(model_file).eval(),
                                  TextConditioner.from_model_dir(args.restore, t5="off"), count=args.restore_count)
        print(markdown_table(["from sigma", *ATTRIBUTES],
                             [[str(level)] + [f"{r / k:.1%}" for r, k in map(row.get, ATTRIBUTES)]
                              for level, row in table.items()]))
        return 0
    if args.vae_colours:
        from training.demo.shapes import BACKGROUNDS, COLOURS
        from training.demo.train import palette_reconstruction
        from vae import load_vae

        back = palette_reconstruction(load_vae(args.vae_colours / "sd3.5_medium.safetensors").eval())
        off = {pair for pair, rgb in back.items() if max(abs(a - b) for a, b in zip(rgb, COLOURS[pair[0]])) > 40}
        print(markdown_table(["colour", *BACKGROUNDS], [
            [f"{c} {COLOURS[c]}"] + ["{0}{1}{0}".format("**" * ((c, b) in off), back[c, b]) for b in BACKGROUNDS]
            for c in COLOURS]))
        print(f"{len(off)} of {len(back)} pairs come back more than 40 off in some channel")
        return 0
    if args.text_probe:
        from training.demo.text import attribute_probe

        probe = attribute_probe(TextConditioner.from_model_dir(args.text_probe, t5="off"))
        print(markdown_table(["features", *ATTRIBUTES], [[features] + [f"{row[a]:.1%}" for a in ATTRIBUTES]
                                                        for features, row in probe.items()]))
        return 0
    shapes = SHAPES + NEW_SHAPES if args.new_shapes else SHAPES
    if args.self_test:
        try:
            degradation = tuple(float(v) for v in args.degrade.split(",")) if args.degrade else None
            if degradation is not None and len(degradation) != 3:
                raise ValueError
        except ValueError:
            p.error(f"--degrade takes three numbers BLUR,NOISE,SHIFT, e.g. 1,8,15; got {args.degrade!r}")
        trials = ground_truth_trials(args.self_test, args.size, args.seed, degradation, shapes, args.thumbnail)
        print(f"{len(trials)} rendered scenes, {args.size}x{args.size}, "
              f"{f'through a {args.thumbnail}x{args.thumbnail} thumbnail, ' if args.thumbnail else ''}"
              f"{'degraded (blur, noise, shift) = ' + args.degrade if degradation else 'clean'}")
        print(format_table(accuracies(trials)))
        return 0
    if args.folder is None:
        p.error("give a folder of images, --prompts seen|held_out, or --self-test N")
    items, problems = evaluate_folder(args.folder, args.limit, shapes)
    for line in problems:
        print(f"skipped {line}", file=sys.stderr)
    if not items:
        raise SystemExit(f"error: {args.folder}: no usable PNG images (need a prompt of the demo grammar in each)")
    table = accuracies(items)
    print(f"{len(items)} images ({sum(i.split == 'held_out' for i in items)} with held-out prompts)")
    print(format_table(table))
    if args.grid:
        print(f"wrote {write_grid(items, args.grid)}", file=sys.stderr)
    if args.json:
        report = {"accuracy": {s: {a: {"right": r, "asked": k} for a, (r, k) in row.items()}
                               for s, row in table.items()},
                  "images": [{"file": i.path.name, "prompt": i.prompt, "split": i.split,
                              "truth": i.truth.to_dict(), "background": i.reading.background,
                              "objects": [{**o.attributes(), "features": o.features} for o in i.reading.objects],
                              "scores": i.scores} for i in items],
                  "skipped": problems}
        with written_whole(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
